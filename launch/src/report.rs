//! FP8 health of runs: the plots redrawn beside `loss.svg` during training.

use fp8lm_trainer::metrics::MetricsRecord;
use std::path::Path;

/// Redraw `fp8.svg` and `allreduce.svg` in `run_dir` (each only when the records hold
/// its statistics). A failed plot is logged, never fatal: plots must not stop a run.
pub fn plot_health(run_dir: &Path, records: &[MetricsRecord], title: &str) {
    let fp8 = run_dir.join("fp8.svg");
    if let Err(e) = fp8lm_trainer::plot_fp8::plot_fp8(&fp8, records, title) {
        tracing::warn!("plot {}: {e:#}", fp8.display());
    }
    let ar = run_dir.join("allreduce.svg");
    if let Err(e) = fp8lm_trainer::plot_fp8::plot_allreduce(&ar, records, title) {
        tracing::warn!("plot {}: {e:#}", ar.display());
    }
}

/// What `fp8lm report` shows of one run.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSummary {
    pub label: String,
    pub precision: String,
    pub recipe: String,
    pub steps: u64,
    /// Mean of the last 10 finite training losses.
    pub train_last10: Option<f64>,
    pub final_val: Option<f64>,
    pub skipped: u64,
    /// FP8 health over the whole run (all logged steps, all tensors): the largest
    /// per-cast overflow and underflow fractions, and how many tensors ever overflowed.
    pub max_overflow: Option<f64>,
    pub max_underflow: Option<f64>,
    pub tensors_overflowed: usize,
    pub tensors: usize,
    /// The all-reduce's smallest mu and largest overflow fraction (data-parallel FP8).
    pub min_mu: Option<f32>,
    pub allreduce_overflow: Option<f64>,
}

/// Summarise a run directory from its `metrics.jsonl` and `config.toml`.
pub fn summarize(dir: &Path) -> anyhow::Result<(RunSummary, Vec<MetricsRecord>)> {
    use anyhow::Context;
    let metrics = dir.join("metrics.jsonl");
    let records = fp8lm_trainer::metrics::read_metrics(&metrics)
        .with_context(|| format!("fp8lm report: {} is not a run directory", dir.display()))?;
    if records.is_empty() {
        anyhow::bail!("fp8lm report: {} holds no records", metrics.display());
    }
    // The config only labels the run: read it loosely (a run whose data moved is still
    // reported).
    let cfg: toml::Table = std::fs::read_to_string(dir.join("config.toml"))
        .ok()
        .and_then(|t| toml::from_str(&t).ok())
        .unwrap_or_default();
    let get = |k: &[&str], default: &str| {
        let mut v = cfg.get(k[0]);
        for p in &k[1..] {
            v = v.and_then(|t| t.get(*p));
        }
        v.and_then(|v| v.as_str()).unwrap_or(default).to_string()
    };
    let precision = get(&["precision"], "?");
    let recipe = if precision.starts_with("fp8") {
        get(&["fp8", "recipe"], "delayed")
    } else {
        "-".into()
    };
    let tail: Vec<f64> = records
        .iter()
        .rev()
        .filter_map(|r| r.loss.filter(|l| l.is_finite()))
        .take(10)
        .map(|l| l as f64)
        .collect();
    let mut names = std::collections::BTreeSet::new();
    let mut overflowed = std::collections::BTreeSet::new();
    let (mut max_of, mut max_uf) = (None::<f64>, None::<f64>);
    for r in &records {
        for s in &r.fp8 {
            names.insert(s.name.clone());
            if s.overflow > 0 {
                overflowed.insert(s.name.clone());
            }
            if s.numel > 0 {
                let n = s.numel as f64;
                max_of = Some(max_of.unwrap_or(0.0).max(s.overflow as f64 / n));
                max_uf = Some(max_uf.unwrap_or(0.0).max(s.underflow as f64 / n));
            }
        }
    }
    let ar: Vec<_> = records
        .iter()
        .filter_map(|r| r.allreduce.as_ref())
        .collect();
    let label = dir
        .file_name()
        .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into());
    let s = RunSummary {
        label,
        precision,
        recipe,
        steps: records.last().map_or(0, |r| r.step),
        train_last10: (!tail.is_empty()).then(|| tail.iter().sum::<f64>() / tail.len() as f64),
        final_val: records
            .iter()
            .rev()
            .find_map(|r| r.val_loss)
            .map(|v| v as f64),
        skipped: records
            .iter()
            .filter_map(|r| r.skipped_steps)
            .max()
            .unwrap_or(0),
        max_overflow: max_of,
        max_underflow: max_uf,
        tensors_overflowed: overflowed.len(),
        tensors: names.len(),
        min_mu: ar.iter().map(|a| a.mu_min).reduce(f32::min),
        allreduce_overflow: ar.iter().map(|a| a.overflow).reduce(f64::max),
    };
    Ok((s, records))
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.prec$}"))
}

fn sci(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1e}"))
}

/// The table `fp8lm report` prints.
pub fn table(runs: &[RunSummary]) -> String {
    let w = runs.iter().map(|r| r.label.len()).max().unwrap_or(3).max(3);
    let mut out = format!(
        "{:<w$}  {:<9} {:<8} {:>6} {:>9} {:>9} {:>5}  {:>8} {:>8} {:>9}  {:>6} {:>8}\n",
        "run",
        "precision",
        "recipe",
        "steps",
        "train10",
        "val",
        "skip",
        "max ovf",
        "max unf",
        "ovf tens",
        "min mu",
        "ar ovf"
    );
    for r in runs {
        out += &format!(
            "{:<w$}  {:<9} {:<8} {:>6} {:>9} {:>9} {:>5}  {:>8} {:>8} {:>9}  {:>6} {:>8}\n",
            r.label,
            r.precision,
            r.recipe,
            r.steps,
            opt(r.train_last10, 4),
            opt(r.final_val, 4),
            r.skipped,
            sci(r.max_overflow),
            sci(r.max_underflow),
            if r.tensors > 0 {
                format!("{}/{}", r.tensors_overflowed, r.tensors)
            } else {
                "-".into()
            },
            r.min_mu.map_or("-".into(), |m| format!("{m:.3}")),
            sci(r.allreduce_overflow),
        );
    }
    out += "train10: mean of the last 10 training losses; val: last validation loss (nats/token);\n\
            max ovf/unf: largest fraction of one cast that saturated / flushed to zero (any tensor,\n\
            any step); ovf tens: FP8 tensors that ever saturated; min mu, ar ovf: the gradient\n\
            all-reduce's smallest mu and largest overflow fraction (data-parallel FP8 runs).\n";
    out
}

/// `fp8lm report RUN [RUN...]`: the table, and the runs' loss curves overlaid in `out`.
pub fn report(dirs: &[std::path::PathBuf], out: &Path) -> anyhow::Result<()> {
    if dirs.is_empty() {
        return Err(
            crate::UsageError("fp8lm report: give at least one run directory".into()).into(),
        );
    }
    let mut sums = Vec::new();
    let mut curves = Vec::new();
    for d in dirs {
        let (s, recs) = summarize(d)?;
        curves.push((s.label.clone(), recs));
        sums.push(s);
    }
    print!("{}", table(&sums));
    fp8lm_trainer::plot_fp8::plot_overlay(out, &curves, "fp8lm report: loss")?;
    println!("loss curves: {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fp8lm_trainer::metrics::{AllReduceStats, Fp8TensorStats, MetricsWriter};

    fn write_run(dir: &Path, precision: &str, val: f32, overflow: u64) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join("config.toml"),
            format!("precision = \"{precision}\"\n[fp8]\nrecipe = \"current\"\n"),
        )
        .unwrap();
        let mut w = MetricsWriter::create(&dir.join("metrics.jsonl")).unwrap();
        for step in 1..=20u64 {
            w.write(&MetricsRecord {
                step,
                loss: Some(3.0 + 1.0 / step as f32),
                val_loss: (step % 10 == 0).then_some(val + 1.0 / step as f32),
                skipped_steps: Some(0),
                fp8: vec![
                    Fp8TensorStats {
                        name: "h.0.fc.x".into(),
                        amax: 1.0,
                        scale: 256.0,
                        overflow: if step == 5 { overflow } else { 0 },
                        underflow: 2,
                        numel: 1000,
                        ..Default::default()
                    },
                    Fp8TensorStats {
                        name: "h.0.fc.w".into(),
                        amax: 1.0,
                        scale: 256.0,
                        overflow: 0,
                        underflow: 0,
                        numel: 100,
                        ..Default::default()
                    },
                ],
                allreduce: Some(AllReduceStats {
                    mu_min: 1.0 / step as f32,
                    mu_mean: 1.0,
                    mu_max: 1.0,
                    overflow: 1e-6,
                    underflow: 0.0,
                }),
                ..Default::default()
            })
            .unwrap();
        }
    }

    #[test]
    fn report_summarises_final_losses_and_fp8_health() {
        let d = std::env::temp_dir().join(format!("fp8lm-report-{}", std::process::id()));
        write_run(&d.join("a"), "fp8-o1", 2.0, 10);
        write_run(&d.join("b"), "fp32", 2.5, 0);
        let (a, _) = summarize(&d.join("a")).unwrap();
        assert_eq!(
            (a.label.as_str(), a.precision.as_str(), a.recipe.as_str()),
            ("a", "fp8-o1", "current")
        );
        assert_eq!(a.steps, 20);
        assert!((a.final_val.unwrap() - 2.05).abs() < 1e-6);
        let want_train: f64 = (11..=20)
            .map(|s| 3.0 + 1.0 / s as f32)
            .map(f64::from)
            .sum::<f64>()
            / 10.0;
        assert!((a.train_last10.unwrap() - want_train).abs() < 1e-6);
        assert_eq!((a.tensors_overflowed, a.tensors), (1, 2));
        assert_eq!(a.max_overflow, Some(0.01));
        assert_eq!(a.max_underflow, Some(0.002));
        assert_eq!(a.min_mu, Some(1.0 / 20.0));
        let (b, _) = summarize(&d.join("b")).unwrap();
        assert_eq!((b.recipe.as_str(), b.tensors_overflowed), ("-", 0));
        let t = table(&[a, b]);
        assert!(t.lines().nth(1).unwrap().contains("2.0500"), "{t}");
        assert!(t.lines().nth(2).unwrap().contains("fp32"), "{t}");
        let out = d.join("report.svg");
        report(&[d.join("a"), d.join("b")], &out).unwrap();
        let svg = std::fs::read_to_string(&out).unwrap();
        assert!(svg.contains("a (val)") && svg.contains("b (val)"));
        // Not a run directory: named in the error.
        let e = report(&[d.join("nope")], &out).unwrap_err();
        assert!(format!("{e:#}").contains("nope"), "{e:#}");
        std::fs::remove_dir_all(&d).ok();
    }
}
