//! `metrics.jsonl`: one JSON object per line, one line per logged step.
//!
//! Keys (scripts rely on them): `step`, `loss` (training), `val_loss`, `lr`,
//! `grad_norm`, `tokens_per_s`, `skipped_steps` (cumulative steps skipped for non-finite
//! gradients), `elapsed_s`, and `fp8`: per-tensor FP8 statistics (`name`, `amax`,
//! `scale`, `overflow`, `underflow`, `numel`; block recipe: `scale_min`, `scale_max` over
//! tiles; written every `fp8_stats_every` steps and at steps with an overflow or a skipped
//! update), and `allreduce` (data-parallel FP8 runs: `mu_min`, `mu_mean`, `mu_max`,
//! `overflow`, `underflow` fractions of the gradient all-reduce). Absent values are
//! omitted, not written as null, except non-finite numbers (a NaN loss, the amax of a
//! skipped step), which are written as `null` (JSON has no NaN) so that a diverged run
//! stays visible, and read back as NaN.
//!
//! Every line is flushed as it is written, so a killed run keeps everything it logged; on
//! resume the lines after the checkpoint's step are dropped, so the file never holds two
//! records for one step.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// FP8 statistics of one tensor (weights, activations or gradients of one layer).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Fp8TensorStats {
    pub name: String,
    /// Largest |value| seen before the cast (real units); NaN (`null`) when the step
    /// saw a non-finite value.
    #[serde(deserialize_with = "f32_or_nan")]
    pub amax: f32,
    /// Scale used for the cast: `stored = cast(real * scale)`.
    #[serde(deserialize_with = "f32_or_nan")]
    pub scale: f32,
    /// Values that saturated at the format's max.
    pub overflow: u64,
    /// Non-zero values that flushed to zero.
    pub underflow: u64,
    /// Values in the cast (so that overflow/underflow read as fractions); 0 = unknown
    /// (older files).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub numel: u64,
    /// Block recipe: smallest and largest tile scale (`scale` is the smallest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_min: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_max: Option<f32>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The FP8 gradient all-reduce of one data-parallel step (all FP8 weight gradients):
/// FP8-LM's mu after the step's update (min, mean, max over tensors), the fraction of
/// summed values that saturated (overflow) and of this rank's non-zero values that the
/// re-quantisation flushed to zero (underflow).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AllReduceStats {
    pub mu_min: f32,
    pub mu_mean: f32,
    pub mu_max: f32,
    pub overflow: f64,
    pub underflow: f64,
}

impl AllReduceStats {
    pub fn from_tally(t: &fp8lm_collectives::GradTally) -> Option<Self> {
        let (mu_min, mu_mean, mu_max) = t.mu_range()?;
        Some(AllReduceStats {
            mu_min,
            mu_mean,
            mu_max,
            overflow: t.overflow_fraction(),
            underflow: t.underflow_fraction(),
        })
    }
}

/// serde_json writes a non-finite f32 as `null`; read it back as NaN.
fn f32_or_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
    Ok(Option::<f32>::deserialize(d)?.unwrap_or(f32::NAN))
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricsRecord {
    pub step: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped_steps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elapsed_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fp8: Vec<Fp8TensorStats>,
    /// Data-parallel FP8 runs: the step's gradient all-reduce (mu, overflow, underflow).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allreduce: Option<AllReduceStats>,
}

/// Appends records to `metrics.jsonl`, one flushed line each.
pub struct MetricsWriter {
    path: PathBuf,
    file: File,
}

impl MetricsWriter {
    /// Start a fresh file (truncating an old one).
    pub fn create(path: &Path) -> Result<Self> {
        let file =
            File::create(path).with_context(|| format!("{}: cannot create", path.display()))?;
        Ok(MetricsWriter {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Continue a file after resuming at `step`: records with a larger step (logged after
    /// the checkpoint by the interrupted run) are dropped, atomically.
    pub fn resume(path: &Path, step: u64) -> Result<Self> {
        if path.exists() {
            // Streamed into a temporary file and renamed over the old one: a long run's
            // file is never held in memory whole.
            let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let tmp = dir
                .unwrap_or(Path::new("."))
                .join(format!(".{name}.tmp-{}", std::process::id()));
            let f =
                File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
            let mut out = std::io::BufWriter::new(f);
            let mut failed: Option<anyhow::Error> = None;
            for_each_metric(path, |r| {
                if r.step > step || failed.is_some() {
                    return;
                }
                let line = serde_json::to_string(&r).map_err(anyhow::Error::from);
                if let Err(e) = line.and_then(|l| Ok(writeln!(out, "{l}")?)) {
                    failed = Some(e);
                }
            })?;
            if let Some(e) = failed {
                return Err(e.context(format!("{}: write failed", tmp.display())));
            }
            let f = out
                .into_inner()
                .map_err(|e| anyhow::anyhow!("{}: write failed: {e}", tmp.display()))?;
            f.sync_all()
                .with_context(|| format!("{}: fsync failed", tmp.display()))?;
            std::fs::rename(&tmp, path).with_context(|| {
                format!("{}: rename from {} failed", path.display(), tmp.display())
            })?;
            // The rename is durable once the directory is synced (as write_atomic does).
            if let Ok(d) = File::open(dir.unwrap_or(Path::new("."))) {
                d.sync_all().ok();
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("{}: cannot open for append", path.display()))?;
        Ok(MetricsWriter {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn write(&mut self, r: &MetricsRecord) -> Result<()> {
        let mut line = serde_json::to_string(r)?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .with_context(|| format!("{}: write failed", self.path.display()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Read every record; a torn last line (the run was killed mid-write) is ignored, any
/// other bad line is an error naming the file and line.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsRecord>> {
    let mut out = Vec::new();
    for_each_metric(path, |r| out.push(r))?;
    Ok(out)
}

/// [`read_metrics`] one record at a time, holding one line in memory (a days-long
/// run's file is larger than what the plot needs).
pub fn for_each_metric(path: &Path, mut f: impl FnMut(MetricsRecord)) -> Result<()> {
    let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut lines = BufReader::new(file).lines().enumerate().peekable();
    while let Some((i, line)) = lines.next() {
        let line = line.with_context(|| format!("{}: read failed", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(&line) {
            Ok(r) => f(r),
            Err(_) if lines.peek().is_none() => break,
            Err(e) => anyhow::bail!(
                "{}: line {}: not a metrics record: {e}",
                path.display(),
                i + 1
            ),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_resume_truncates() {
        let d = std::env::temp_dir().join(format!("fp8lm-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("metrics.jsonl");
        let mut w = MetricsWriter::create(&p).unwrap();
        for step in 1..=5u64 {
            w.write(&MetricsRecord {
                step,
                loss: Some(5.0 / step as f32),
                val_loss: (step % 2 == 0).then_some(4.0),
                lr: Some(1e-3),
                grad_norm: Some(0.5),
                tokens_per_s: Some(1234.5),
                skipped_steps: Some(0),
                fp8: vec![Fp8TensorStats {
                    name: "h.0.attn.qkv.w".into(),
                    amax: 2.5,
                    scale: 128.0,
                    overflow: 0,
                    underflow: 3,
                    numel: 4096,
                    ..Default::default()
                }],
                ..Default::default()
            })
            .unwrap();
        }
        let text = std::fs::read_to_string(&p).unwrap();
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        for k in [
            "step",
            "loss",
            "lr",
            "grad_norm",
            "tokens_per_s",
            "skipped_steps",
            "fp8",
        ] {
            assert!(first.get(k).is_some(), "missing key {k}: {first}");
        }
        assert!(first.get("val_loss").is_none());
        assert!(text.lines().nth(1).unwrap().contains("\"val_loss\":4.0"));
        assert_eq!(first["fp8"][0]["underflow"], 3);

        // A torn last line is ignored; resume at step 3 drops steps 4 and 5.
        std::fs::write(&p, format!("{text}{{\"step\": 6, \"lo")).unwrap();
        assert_eq!(read_metrics(&p).unwrap().len(), 5);
        let mut w = MetricsWriter::resume(&p, 3).unwrap();
        w.write(&MetricsRecord {
            step: 4,
            loss: Some(f32::NAN),
            ..Default::default()
        })
        .unwrap();
        let recs = read_metrics(&p).unwrap();
        assert_eq!(
            recs.iter().map(|r| r.step).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        assert_eq!(recs[3].loss, None, "NaN loss is written as null");
        assert!(std::fs::read_to_string(&p)
            .unwrap()
            .contains("\"loss\":null"));
    }

    /// A skipped FP8 step logs `"amax": null` (its amax was NaN); resume must read it.
    #[test]
    fn null_amax_of_a_skipped_step_reads_back_as_nan() {
        let d = std::env::temp_dir().join(format!("fp8lm-metrics-null-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("metrics.jsonl");
        let mut w = MetricsWriter::create(&p).unwrap();
        for step in 1..=3u64 {
            w.write(&MetricsRecord {
                step,
                loss: Some(if step == 2 { f32::NAN } else { 1.0 }),
                fp8: vec![Fp8TensorStats {
                    name: "h.0.mlp.fc.grad".into(),
                    amax: if step == 2 { f32::NAN } else { 2.0 },
                    scale: 8.0,
                    overflow: 0,
                    underflow: 0,
                    numel: 16,
                    scale_min: None,
                    scale_max: None,
                }],
                ..Default::default()
            })
            .unwrap();
        }
        assert!(std::fs::read_to_string(&p)
            .unwrap()
            .contains("\"amax\":null"));
        let recs = read_metrics(&p).unwrap();
        assert_eq!(recs.len(), 3);
        assert!(recs[1].fp8[0].amax.is_nan());
        assert_eq!(recs[2].fp8[0].amax, 2.0);
        // And the resume rewrite keeps it.
        MetricsWriter::resume(&p, 2).unwrap();
        assert_eq!(read_metrics(&p).unwrap().len(), 2);
    }
}
