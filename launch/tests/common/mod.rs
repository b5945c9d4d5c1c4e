//! Helpers shared by the end-to-end tests of the `fp8lm` binary.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::PathBuf;
use std::process::{Command, Output};

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
