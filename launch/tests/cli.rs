//! End-to-end tests of the `fp8lm` binary: config errors, a short training run with its
//! run directory, bit-identical resume, inspect / eval / sample, tokenize.
//! The model is tiny so that every run takes well under a second in release mode.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::{fp8lm, text, TINY};

fn tmp(name: &str) -> PathBuf {
    common::tmp_dir("cli", name)
}

fn train(run_dir: &Path, extra: &[&str]) -> Output {
    let rd = format!("run_dir={}", run_dir.display());
    let mut args = vec!["train", "--set", rd.as_str()];
    args.extend_from_slice(TINY);
    args.extend_from_slice(extra);
    fp8lm(&args)
}

fn losses(run_dir: &Path) -> Vec<(u64, String)> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            // Compare the printed f32 (shortest round-trip form): equal text = equal bits.
            (v["step"].as_u64().unwrap(), v["loss"].to_string())
        })
        .collect()
}

#[test]
fn config_errors_exit_2_naming_key_and_value() {
    let o = fp8lm(&["train", "--set", "model.heads=5"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("model.heads") && t.contains('5') && t.contains("divisor"),
        "{t}"
    );
    let o = fp8lm(&["train", "--set", "batch=0"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("`batch`"), "{}", text(&o));
    let o = fp8lm(&["train", "--set", "data.path=/nonexistent/corpus.txt"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("/nonexistent/corpus.txt"), "{}", text(&o));
    let d = tmp("cfg");
    let f = d.join("bad.toml");
    std::fs::write(&f, "[model]\nlayers = \"two\"\n").unwrap();
    let o = fp8lm(&["train", "--config", f.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let t = text(&o);
    assert!(
        t.contains("bad.toml") && t.contains("model.layers") && t.contains("\"two\""),
        "{t}"
    );
}

#[test]
fn train_writes_run_dir_and_resume_is_bit_identical() {
    let d = tmp("resume");
    let run = d.join("run");
    let o = train(&run, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("run summary"), "{}", text(&o));
    for f in ["config.toml", "metrics.jsonl", "loss.svg", "summary.json"] {
        assert!(run.join(f).is_file(), "missing {f}");
    }
    let full = losses(&run);
    assert_eq!(full.len(), 12);
    assert!(std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .contains("\"val_loss\""));
    let ck6 = run.join("checkpoints/step_00000006");
    assert!(ck6.join("checkpoint.json").is_file());

    // Resume from step 6: steps 7..12 must reproduce the uninterrupted run exactly.
    let o = fp8lm(&["train", "--resume", ck6.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let resumed = losses(&run);
    assert_eq!(
        resumed, full,
        "losses after resume differ from the uninterrupted run"
    );
    // The old timeline's step-12 checkpoint was moved aside, the new one is in place.
    let aside: Vec<_> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("superseded-"))
        .collect();
    assert_eq!(aside.len(), 1);
    assert!(aside[0]
        .path()
        .join("step_00000012/checkpoint.json")
        .is_file());
    assert!(run
        .join("checkpoints/step_00000012/checkpoint.json")
        .is_file());

    // inspect / eval / sample on the final checkpoint.
    let o = fp8lm(&["inspect", run.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("step          12") && t.contains("wte") && t.contains("F32"),
        "{t}"
    );
    let o = fp8lm(&["eval", "--checkpoint", run.to_str().unwrap()]);
    assert!(
        o.status.success() && text(&o).contains("val loss"),
        "{}",
        text(&o)
    );
    let o = fp8lm(&[
        "sample",
        "--checkpoint",
        run.to_str().unwrap(),
        "--prompt",
        "the ",
        "--tokens",
        "20",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("the "));

    // A second fresh run with the same run_dir goes elsewhere instead of overwriting.
    let o = train(&run, &["--set", "max_steps=2"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(d.join("run-2/metrics.jsonl").is_file());
    assert_eq!(losses(&run), full);
}

#[test]
fn fp8_resume_restores_scaling_state_bit_identically() {
    for p in ["fp8-o1", "fp8-o2"] {
        fp8_resume(p);
    }
}

fn fp8_resume(precision: &str) {
    let d = tmp(&format!("resume-{precision}"));
    let run = d.join("run");
    let o = train(
        &run,
        &[
            "--set",
            &format!("precision={precision}"),
            "--set",
            "fp8_stats_every=1",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let full = losses(&run);
    let m = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(
        m.contains("\"fp8\"") && m.contains("\"underflow\""),
        "per-tensor FP8 stats missing"
    );
    let meta =
        std::fs::read_to_string(run.join("checkpoints/step_00000006/checkpoint.json")).unwrap();
    assert!(
        meta.contains("amax_history"),
        "scaling state missing from checkpoint.json"
    );
    let o = fp8lm(&[
        "train",
        "--resume",
        run.join("checkpoints/step_00000006").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        losses(&run),
        full,
        "FP8 losses after resume differ from the uninterrupted run"
    );
}

#[test]
fn resume_refuses_other_model_shape_and_corruption() {
    let d = tmp("refuse");
    let run = d.join("run");
    assert!(train(&run, &["--set", "max_steps=6"]).status.success());
    let cfg = d.join("other.toml");
    std::fs::write(
        &cfg,
        "max_steps = 12\n[model]\nlayers = 2\nchannels = 32\nheads = 2\ncontext = 16\n",
    )
    .unwrap();
    let o = fp8lm(&[
        "train",
        "--resume",
        run.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("model.layers is 1 in the checkpoint but 2"),
        "{}",
        text(&o)
    );

    let model = run.join("checkpoints/step_00000006/model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    bytes.truncate(bytes.len() - 100);
    std::fs::write(&model, &bytes).unwrap();
    let o = fp8lm(&[
        "train",
        "--resume",
        run.to_str().unwrap(),
        "--set",
        "max_steps=12",
    ]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("model.safetensors") && t.contains("truncated"),
        "{t}"
    );
}

#[test]
fn tokenize_writes_shards_that_train_reads() {
    let d = tmp("tok");
    let txt = d.join("corpus.txt");
    let body: String = (0..400)
        .map(|i| format!("The quick brown fox {i} jumps over the lazy dog.\n"))
        .collect();
    std::fs::write(&txt, body).unwrap();
    let out = d.join("shards");
    let o = fp8lm(&[
        "tokenize",
        "--input",
        txt.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--tokenizer",
        "gpt2",
        "--shard-tokens",
        "2000",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(out.join("shard_000000.bin").is_file());
    let dp = format!("data.path={}", out.display());
    let o = train(
        &d.join("run"),
        &[
            "--set",
            "tokenizer=gpt2",
            "--set",
            &dp,
            "--set",
            "max_steps=2",
            "--set",
            "eval_every=2",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn benches_print_figures() {
    let o = fp8lm(&["bench", "--help"]);
    assert!(o.status.success());
    for b in ["gemm", "cast", "train", "memory", "allreduce"] {
        assert!(text(&o).contains(b), "bench {b} missing from help");
    }
    // Smoke runs at toy sizes: they must print their tables, not numbers we assert on.
    let o = fp8lm(&["bench", "cast", "--elements", "4096", "--reps", "1"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).to_lowercase().contains("e4m3"), "{}", text(&o));
    let o = fp8lm(&["bench", "allreduce", "--elements", "4096", "--reps", "1"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = fp8lm(&[
        "bench",
        "memory",
        "--set",
        "model.layers=1",
        "--set",
        "model.channels=32",
        "--set",
        "model.heads=2",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("first moment") && text(&o).contains("B/param"),
        "{}",
        text(&o)
    );
    let o = fp8lm(&[
        "bench",
        "optim",
        "--steps",
        "1",
        "--layers",
        "1",
        "--channels",
        "32",
    ]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn kill_9_during_training_leaves_a_loadable_checkpoint() {
    let d = tmp("kill");
    let run = d.join("run");
    let rd = format!("run_dir={}", run.display());
    let mut args = vec!["train", "--set", rd.as_str()];
    args.extend_from_slice(TINY);
    args.extend_from_slice(&[
        "--set",
        "max_steps=1000000",
        "--set",
        "checkpoint_every=1",
        "--set",
        "eval_every=0",
    ]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_fp8lm"))
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Saves happen every step, so a kill lands inside one sooner or later; wait for a few.
    let ckdir = run.join("checkpoints");
    let t0 = std::time::Instant::now();
    while checkpoint_steps(&ckdir) < 5 && t0.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    assert!(
        checkpoint_steps(&ckdir) >= 5,
        "training made no progress in 60 s"
    );
    let o = fp8lm(&["inspect", run.to_str().unwrap()]);
    assert!(
        o.status.success(),
        "newest checkpoint not loadable after kill -9: {}",
        text(&o)
    );
    let target = format!("max_steps={}", checkpoint_steps(&ckdir) + 5);
    let o = fp8lm(&[
        "train",
        "--resume",
        run.to_str().unwrap(),
        "--set",
        &target,
        "--set",
        "checkpoint_every=0",
    ]);
    assert!(o.status.success(), "{}", text(&o));
}

fn checkpoint_steps(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .strip_prefix("step_")
                        .and_then(|n| n.parse().ok())
                })
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}
