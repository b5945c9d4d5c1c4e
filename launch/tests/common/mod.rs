//! Helpers shared by the end-to-end tests of the `fp8lm` binary.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// Run the binary under test with `args` (RUST_LOG unset, so logs are the defaults).
pub fn fp8lm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fp8lm"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run fp8lm")
}

/// stdout then stderr.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A fresh, empty temporary directory `fp8lm-<suite>-<name>-<pid>`.
pub fn tmp_dir(suite: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fp8lm-{suite}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A tiny model that trains in well under a second in release mode: 12 steps, an
/// evaluation (1024 validation tokens) and a checkpoint every 6.
pub const TINY: &[&str] = &[
    "--set",
    "model.layers=1",
    "--set",
    "model.channels=32",
    "--set",
    "model.heads=2",
    "--set",
    "model.context=16",
    "--set",
    "batch=2",
    "--set",
    "max_steps=12",
    "--set",
    "eval_every=6",
    "--set",
    "eval_tokens=1024",
    "--set",
    "checkpoint_every=6",
    "--set",
    "optim.warmup_steps=2",
];

/// `(step, loss, val_loss)` of every line of a run's `metrics.jsonl`.
pub fn losses(run: &Path) -> Vec<(u64, f32, Option<f32>)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap() as f32,
                v["val_loss"].as_f64().map(|x| x as f32),
            )
        })
        .collect()
}

/// Copy a directory tree (a run directory, to resume a copy of it).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

/// `mpirun -n n fp8lm args...` with one rayon thread per rank; panics (naming the
/// command and its output) unless every rank succeeded within `timeout`. Returns the
/// output text.
pub fn mpirun_ok(n: usize, args: &[String], timeout: Duration) -> String {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = fp8lm_collectives::mpirun::run_mpirun(
        env!("CARGO_BIN_EXE_fp8lm"),
        n,
        &a,
        &[("RAYON_NUM_THREADS", "1")],
        timeout,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(o.success, "mpirun -n {n} {args:?} failed:\n{}", o.text);
    o.text
}
