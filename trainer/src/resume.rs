//! Resuming a run: finding the checkpoint to continue from, and checking it against the
//! config, the run directory and `metrics.jsonl` before anything is written.
//!
//! The rule: a resume reads and validates everything first (checkpoint files, config,
//! metrics) and only then touches the run directory (stale temporaries removed, later
//! checkpoints moved aside, metrics truncated). So a resume that fails leaves the
//! directory exactly as it was.
//!
//! What is reported, and how:
//! - the newest `step_N` without `checkpoint.json` (an interrupted or damaged save) is
//!   skipped with a warning naming it, and the next older one is used;
//! - a newest checkpoint that is corrupt (bad CRC, truncated) is an error naming the
//!   problem and the newest intact checkpoint, to resume from explicitly;
//! - a precision change is refused naming both precisions, unless conversion was asked for
//!   (`--convert-precision`) and is one that keeps the state meaningful (see
//!   [`conversion_supported`]);
//! - a different `seed` or `data.path` is a warning naming the old and new values;
//! - `metrics.jsonl` missing steps up to the checkpoint's is a warning naming them.

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

use crate::checkpoint::{Checkpoint, META_FILE};
use crate::config::{Precision, RunConfig};
use crate::metrics::for_each_metric;

/// Every `step_N` directory under `root`, complete or not, oldest first.
fn step_dirs(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(root) else {
        return Ok(out);
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(n) = name
            .strip_prefix("step_")
            .and_then(|n| n.parse::<u64>().ok())
        {
            if e.path().is_dir() {
                out.push((n, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// What a directory that is not a checkpoint holds, for messages ("metrics.jsonl,
/// config.toml" or "nothing").
pub fn describe_dir(dir: &Path) -> String {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    if names.is_empty() {
        "nothing".into()
    } else {
        names.join(", ")
    }
}

/// Load the checkpoint `path` names for `--resume` / `--checkpoint`: a checkpoint
/// directory, or a run directory / checkpoint folder (its newest intact checkpoint).
/// See the module docs for what is skipped, refused and reported.
pub fn find_checkpoint(path: &Path) -> Result<Checkpoint> {
    find_checkpoint_leaving(path, &[])
}

/// [`find_checkpoint`], leaving the groups in `leave` on disk
/// ([`Checkpoint::load_leaving`]; `fp8lm train --resume` leaves the model group there
/// until it knows whether the run reads it whole).
pub fn find_checkpoint_leaving(path: &Path, leave: &[&str]) -> Result<Checkpoint> {
    if path.join(META_FILE).is_file() {
        return Checkpoint::load_leaving(path, leave);
    }
    if !path.exists() {
        bail!("{}: no such checkpoint or run directory", path.display());
    }
    let is_step_dir = path
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("step_"));
    if is_step_dir {
        bail!(
            "{}: not a complete checkpoint: no {META_FILE} (an interrupted or damaged save); it holds {}",
            path.display(),
            describe_dir(path)
        );
    }
    let root = if path.join("checkpoints").is_dir() {
        path.join("checkpoints")
    } else {
        path.to_path_buf()
    };
    let dirs = step_dirs(&root)?;
    if dirs.is_empty() {
        bail!(
            "{}: no checkpoint to resume from (no checkpoints/step_* folder); it holds {}. \
             A run writes checkpoints every checkpoint_every steps and at its end; this one \
             stopped before its first",
            path.display(),
            describe_dir(path)
        );
    }
    let mut newest_err: Option<(PathBuf, anyhow::Error)> = None;
    for (_, dir) in dirs.iter().rev() {
        if !dir.join(META_FILE).is_file() {
            tracing::warn!(
                "skipping checkpoint {}: no {META_FILE} (an interrupted or damaged save)",
                dir.display()
            );
            continue;
        }
        match Checkpoint::load_leaving(dir, leave) {
            Ok(ck) => {
                if let Some((bad, e)) = newest_err {
                    bail!(
                        "newest checkpoint {} is damaged: {e:#}; the newest intact checkpoint \
                         is {} (step {}): resume from it with --resume {}",
                        bad.display(),
                        ck.dir.display(),
                        ck.meta.step,
                        ck.dir.display()
                    );
                }
                return Ok(ck);
            }
            Err(e) => {
                if newest_err.is_none() {
                    newest_err = Some((dir.clone(), e));
                }
            }
        }
    }
    match newest_err {
        Some((bad, e)) => bail!(
            "newest checkpoint {} is damaged: {e:#}; no older checkpoint under {} is intact",
            bad.display(),
            root.display()
        ),
        None => bail!(
            "{}: none of the checkpoints has a {META_FILE} (all interrupted saves)",
            root.display()
        ),
    }
}

/// Precision conversions on resume that keep the saved state meaningful: fp32 <-> bf16
/// (same f32 master weights and AdamW state) and fp8-o2 <-> fp8-o3 (same FP8 optimizer
/// state; o3 only distributes it across ranks).
pub fn conversion_supported(from: Precision, to: Precision) -> bool {
    use Precision::*;
    matches!(
        (from, to),
        (Fp32, Bf16) | (Bf16, Fp32) | (Fp8O2, Fp8O3) | (Fp8O3, Fp8O2)
    )
}

/// Check the resumed config against the checkpoint's: precision (refused unless
/// `convert` and supported), seed and data.path (warnings naming old and new).
pub fn check_config_change(ck: &Checkpoint, cfg: &RunConfig, convert: bool) -> Result<()> {
    let old = &ck.meta.config;
    let (from, to) = (old.precision, cfg.precision);
    if from != to {
        let supported = "fp32 <-> bf16 and fp8-o2 <-> fp8-o3";
        if !convert {
            bail!(
                "{}: checkpoint is {}, config says {}: resume with precision={} or pass \
                 --convert-precision (supported: {supported})",
                ck.dir.display(),
                from.name(),
                to.name(),
                from.name()
            );
        }
        if !conversion_supported(from, to) {
            bail!(
                "{}: checkpoint is {}, config says {}: no conversion between them (its \
                 optimizer state has another layout; supported: {supported})",
                ck.dir.display(),
                from.name(),
                to.name()
            );
        }
        tracing::warn!(
            "--convert-precision: converting checkpoint {} from {} to {}",
            ck.dir.display(),
            from.name(),
            to.name()
        );
    } else if convert {
        tracing::info!(
            "--convert-precision: nothing to convert, checkpoint and config are both {}",
            to.name()
        );
    }
    if old.seed != cfg.seed {
        tracing::warn!(
            "resuming with seed {} but the checkpoint's run used seed {} (data order and \
             dropout continue from the checkpoint's state; the embedded corpus depends on \
             the seed)",
            cfg.seed,
            old.seed
        );
    }
    if old.data.path != cfg.data.path {
        tracing::warn!(
            "resuming with data.path {:?} but the checkpoint's run used {:?} (the data \
             position is carried over to the new data)",
            cfg.data.path,
            old.data.path
        );
    }
    Ok(())
}

/// Steps in `1..=step` that `metrics` lacks, as ranges ("1-10, 15"; at most 20 listed);
/// `None` when all are there. Reads the file line by line (read-only, constant memory:
/// the file is in step order); an unreadable file is an error.
pub fn missing_metric_steps(metrics: &Path, step: u64) -> Result<Option<String>> {
    let mut gaps: Vec<(u64, u64)> = Vec::new();
    let mut n_gaps = 0usize;
    let mut next = 1u64;
    let mut gap = |a: u64, b: u64| {
        n_gaps += 1;
        if gaps.len() < 20 {
            gaps.push((a, b));
        }
    };
    if metrics.exists() {
        for_each_metric(metrics, |r| {
            if r.step > step || r.step < next {
                return;
            }
            if r.step > next {
                gap(next, r.step - 1);
            }
            next = r.step + 1;
        })?;
    }
    if next <= step {
        gap(next, step);
    }
    if n_gaps == 0 {
        return Ok(None);
    }
    let mut list: Vec<String> = gaps
        .iter()
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect();
    if n_gaps > gaps.len() {
        list.push(format!("... ({n_gaps} gaps in all)"));
    }
    Ok(Some(list.join(", ")))
}

/// Remove leftovers of interrupted or failed saves in a run directory: `.step_N.tmp-*` /
/// `.step_N.old-*` under `checkpoints/` and `.<file>.tmp-*` of atomic file writes. A
/// failed save (disk full) would otherwise keep the space it took, and the next save fail
/// again. Each removal is logged; returns what was removed.
pub fn remove_stale_temporaries(run_dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for (dir, is_ckpt) in [
        (run_dir.join("checkpoints"), true),
        (run_dir.to_path_buf(), false),
    ] {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            let stale = if is_ckpt {
                n.starts_with(".step_") && (n.contains(".tmp-") || n.contains(".old-"))
            } else {
                n.starts_with('.') && n.contains(".tmp-")
            };
            if !stale {
                continue;
            }
            let p = e.path();
            let r = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            match r {
                Ok(()) => {
                    tracing::warn!(
                        "removed {}: left by an interrupted or failed save",
                        p.display()
                    );
                    removed.push(p);
                }
                Err(e) => tracing::warn!("{}: stale temporary, cannot remove: {e}", p.display()),
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{CheckpointMeta, CkptTensor, FORMAT};

    fn sample_checkpoint(step: u64) -> Checkpoint {
        let mut ck = Checkpoint::new(CheckpointMeta {
            format: FORMAT.into(),
            step,
            config: RunConfig::default(),
            rng_state: step,
            data_position: step,
            scaling: serde_json::json!({}),
            extra: serde_json::json!({}),
            files: Default::default(),
            optimizer_shards: None,
            tp_shards: None,
        });
        let w: Vec<f32> = (0..64).map(|i| i as f32 * 0.5).collect();
        ck.groups
            .insert("model".into(), vec![CkptTensor::f32("wte", &[8, 8], &w)]);
        ck
    }

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("fp8lm-resume-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn newest_without_meta_is_skipped_and_corrupt_newest_names_the_intact_one() {
        let run = tmpdir("find");
        let root = run.join("checkpoints");
        for s in [10, 20] {
            sample_checkpoint(s).save(&root, 0).unwrap();
        }
        assert_eq!(find_checkpoint(&run).unwrap().meta.step, 20);
        // step_30 without checkpoint.json: skipped (warned), step_20 used.
        std::fs::create_dir_all(root.join("step_00000030")).unwrap();
        std::fs::write(root.join("step_00000030/model.safetensors"), b"x").unwrap();
        assert_eq!(find_checkpoint(&run).unwrap().meta.step, 20);
        // ... and named when resumed explicitly.
        let e = format!(
            "{:#}",
            find_checkpoint(&root.join("step_00000030")).unwrap_err()
        );
        assert!(
            e.contains("no checkpoint.json") && e.contains("model.safetensors"),
            "{e}"
        );
        // A corrupt step_20: refused, naming step_10 as the newest intact checkpoint.
        let m = root.join("step_00000020/model.safetensors");
        let mut b = std::fs::read(&m).unwrap();
        let n = b.len();
        b[n - 2] ^= 1;
        std::fs::write(&m, b).unwrap();
        let e = format!("{:#}", find_checkpoint(&run).unwrap_err());
        assert!(
            e.contains("step_00000020") && e.contains("corrupted") && e.contains("step_00000010"),
            "{e}"
        );
        // A run directory without checkpoints says what it holds.
        let empty = tmpdir("find-empty");
        std::fs::write(empty.join("metrics.jsonl"), b"").unwrap();
        let e = format!("{:#}", find_checkpoint(&empty).unwrap_err());
        assert!(
            e.contains("no checkpoint") && e.contains("metrics.jsonl"),
            "{e}"
        );
    }

    #[test]
    fn precision_change_needs_the_flag_and_a_supported_pair() {
        let mut ck = sample_checkpoint(5);
        ck.meta.config.precision = Precision::Fp8O2;
        let mut cfg = ck.meta.config.clone();
        assert!(check_config_change(&ck, &cfg, false).is_ok());
        cfg.precision = Precision::Fp32;
        let e = check_config_change(&ck, &cfg, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("checkpoint is fp8-o2, config says fp32")
                && e.contains("--convert-precision"),
            "{e}"
        );
        let e = check_config_change(&ck, &cfg, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no conversion"), "{e}");
        cfg.precision = Precision::Fp8O3;
        assert!(check_config_change(&ck, &cfg, true).is_ok());
        assert!(check_config_change(&ck, &cfg, false).is_err());
    }

    #[test]
    fn missing_metric_steps_are_named_as_ranges() {
        let d = tmpdir("metrics");
        let p = d.join("metrics.jsonl");
        assert_eq!(missing_metric_steps(&p, 3).unwrap().as_deref(), Some("1-3"));
        let lines: String = [1u64, 2, 3, 5, 9]
            .iter()
            .map(|s| format!("{{\"step\":{s}}}\n"))
            .collect();
        std::fs::write(&p, lines).unwrap();
        assert_eq!(
            missing_metric_steps(&p, 10).unwrap().as_deref(),
            Some("4, 6-8, 10")
        );
        assert_eq!(missing_metric_steps(&p, 3).unwrap(), None);
    }

    #[test]
    fn stale_temporaries_are_removed() {
        let run = tmpdir("stale");
        let root = run.join("checkpoints");
        sample_checkpoint(10).save(&root, 0).unwrap();
        std::fs::create_dir_all(root.join(".step_00000020.tmp-999")).unwrap();
        std::fs::write(root.join(".step_00000020.tmp-999/model.safetensors"), b"x").unwrap();
        std::fs::write(run.join(".summary.json.tmp-999"), b"x").unwrap();
        let removed = remove_stale_temporaries(&run);
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(!root.join(".step_00000020.tmp-999").exists());
        assert!(!run.join(".summary.json.tmp-999").exists());
        assert!(root.join("step_00000010").join(META_FILE).is_file());
    }
}
