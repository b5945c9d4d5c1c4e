//! `metrics.jsonl`: one JSON object per line, one line per logged step.
//!
//! Keys (scripts rely on them): `step`, `loss` (training), `val_loss`, `lr`,
//! `grad_norm`, `tokens_per_s`, `skipped_steps` (cumulative steps skipped for non-finite
//! gradients), `elapsed_s`, and `fp8`: per-tensor FP8 statistics (`name`, `amax`,
//! `scale`, `overflow`, `underflow`, `numel`; block recipe: `scale_min`, `scale_max` over
//! tiles), `allreduce` (data-parallel FP8 runs: `mu_min`,
//! `mu_mean`, `mu_max`, `overflow`, `underflow` fractions of the gradient all-reduce). Absent values are omitted, not written as null,
//! except a non-finite loss, which is written as `null` (JSON has no NaN) so that a
//! diverged run stays visible.
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
    /// Largest |value| seen before the cast (real units).
    pub amax: f32,
    /// Scale used for the cast: `stored = cast(real * scale)`.
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
            let kept: Vec<MetricsRecord> = read_metrics(path)?
                .into_iter()
                .filter(|r| r.step <= step)
                .collect();
            let mut text = String::new();
            for r in &kept {
                text.push_str(&serde_json::to_string(r)?);
                text.push('\n');
            }
            crate::checkpoint::write_atomic(path, text.as_bytes())?;
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
    let f = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let lines: Vec<String> = BufReader::new(f).lines().collect::<std::io::Result<_>>()?;
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(r) => out.push(r),
            Err(_) if i + 1 == lines.len() => break,
            Err(e) => anyhow::bail!(
                "{}: line {}: not a metrics record: {e}",
                path.display(),
                i + 1
            ),
        }
    }
    Ok(out)
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
}
