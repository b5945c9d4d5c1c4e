//! A run that survives its user (issue 10), end to end on the `fp8lm` binary: resume
//! after skipped FP8 steps, resumes that fail without touching the run directory, stale
//! temporaries, skipped / damaged newest checkpoints, precision changes, stop signals,
//! divergence, memory refusal, tokenize --force, eval caps. Tiny models: each run takes
//! well under a second in release mode.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{fp8lm, text, TINY};

fn tmp(name: &str) -> PathBuf {
    common::tmp_dir("rel", name)
}

fn train_args(run_dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = vec![
        "train".to_string(),
        "--set".into(),
        format!("run_dir={}", run_dir.display()),
    ];
    a.extend(TINY.iter().map(|s| s.to_string()));
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn train(run_dir: &Path, extra: &[&str]) -> Output {
    let a = train_args(run_dir, extra);
    fp8lm(&a.iter().map(String::as_str).collect::<Vec<_>>())
}

fn resume(from: &Path, extra: &[&str]) -> Output {
    let mut a = vec!["train", "--resume", from.to_str().unwrap()];
    a.extend_from_slice(extra);
    fp8lm(&a)
}

/// Every path under `dir` with its length and content hash: "nothing changed" means
/// this listing is equal before and after.
fn tree(dir: &Path) -> Vec<(String, u64, u32)> {
    let mut out = Vec::new();
    fn walk(d: &Path, base: &Path, out: &mut Vec<(String, u64, u32)>) {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(base).unwrap().display().to_string();
            if p.is_dir() {
                out.push((rel + "/", 0, 0));
                walk(&p, base, out);
            } else {
                let b = std::fs::read(&p).unwrap();
                out.push((rel, b.len() as u64, crc32fast::hash(&b)));
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// The reproduction: an FP8 run at lr = 100 skips steps (their metrics carry
/// `"amax": null`); resuming it must work.
#[test]
fn fp8_run_with_skipped_steps_resumes() {
    let d = tmp("skipped");
    let run = d.join("D");
    let o = train(
        &run,
        &[
            "--set",
            "precision=fp8-o2",
            "--set",
            "optim.lr=100",
            "--set",
            "max_steps=20",
            "--set",
            "checkpoint_every=10",
            "--set",
            "max_skipped_fraction=1",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let m = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(m.contains("\"amax\":null"), "no skipped step logged: {m}");
    let o = resume(&run, &["--set", "max_steps=30"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        30
    );
}

/// A resume that fails leaves the run directory byte for byte as it was (before: later
/// checkpoints were moved to `superseded-*` before metrics.jsonl was found unreadable).
#[test]
fn failed_resume_changes_nothing() {
    let d = tmp("nochange");
    let run = d.join("run");
    assert!(train(&run, &[]).status.success());
    // A damaged line in the middle of metrics.jsonl (not a torn last line).
    let mp = run.join("metrics.jsonl");
    let m = std::fs::read_to_string(&mp).unwrap();
    let mut lines: Vec<&str> = m.lines().collect();
    lines[2] = "{\"step\": 3, garbage";
    std::fs::write(&mp, lines.join("\n") + "\n").unwrap();
    let before = tree(&run);
    let o = resume(&run.join("checkpoints/step_00000006"), &[]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("line 3"), "{}", text(&o));
    assert_eq!(
        tree(&run),
        before,
        "a failed resume changed the run directory"
    );
    // The same for a refused precision change.
    let o = resume(
        &run.join("checkpoints/step_00000006"),
        &["--set", "precision=bf16"],
    );
    assert!(!o.status.success());
    assert_eq!(tree(&run), before);
}

#[test]
fn stale_temporaries_are_removed_when_the_run_opens_its_directory() {
    let d = tmp("stale");
    let run = d.join("run");
    assert!(train(&run, &[]).status.success());
    let stale = run.join("checkpoints/.step_00000018.tmp-4242");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("model.safetensors"), vec![0u8; 4096]).unwrap();
    let o = resume(&run, &["--set", "max_steps=14"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!stale.exists());
    assert!(
        text(&o).contains("removed") && text(&o).contains(".step_00000018.tmp-4242"),
        "{}",
        text(&o)
    );
}

#[test]
fn newest_checkpoint_skipped_or_damaged_is_named() {
    let d = tmp("newest");
    let run = d.join("run");
    assert!(train(&run, &[]).status.success());
    let ck12 = run.join("checkpoints/step_00000012");
    // Damaged: refused, naming the newest intact checkpoint.
    let mp = ck12.join("model.safetensors");
    let good = std::fs::read(&mp).unwrap();
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 5] ^= 0x40;
    std::fs::write(&mp, &bad).unwrap();
    let o = resume(&run, &["--set", "max_steps=14"]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("step_00000012") && t.contains("corrupted") && t.contains("step_00000006"),
        "{t}"
    );
    std::fs::write(&mp, &good).unwrap();
    // Without checkpoint.json: skipped, saying which and why, and step 6 is used.
    std::fs::remove_file(ck12.join("checkpoint.json")).unwrap();
    let o = resume(&run, &["--set", "max_steps=8"]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("skipping checkpoint")
            && t.contains("step_00000012")
            && t.contains("no checkpoint.json"),
        "{t}"
    );
    assert!(t.contains("resuming at step 6"), "{t}");
}

#[test]
fn precision_change_names_both_and_converts_only_when_asked() {
    let d = tmp("precision");
    let run = d.join("run");
    assert!(train(&run, &["--set", "precision=fp8-o2"]).status.success());
    let o = resume(&run, &["--set", "precision=fp32", "--set", "max_steps=14"]);
    assert_eq!(code(&o), 1, "{}", text(&o));
    assert!(
        text(&o).contains("checkpoint is fp8-o2, config says fp32")
            && text(&o).contains("--convert-precision"),
        "{}",
        text(&o)
    );
    let o = resume(
        &run,
        &[
            "--set",
            "precision=fp32",
            "--set",
            "max_steps=14",
            "--convert-precision",
        ],
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("no conversion"), "{}", text(&o));
    let o = resume(
        &run,
        &[
            "--set",
            "precision=fp8-o3",
            "--set",
            "max_steps=14",
            "--convert-precision",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("converting checkpoint") && text(&o).contains("from fp8-o2 to fp8-o3"),
        "{}",
        text(&o)
    );
}

#[test]
fn changed_seed_and_data_and_short_metrics_warn() {
    let d = tmp("warn");
    let run = d.join("run");
    assert!(train(&run, &[]).status.success());
    let txt = d.join("t.txt");
    std::fs::write(&txt, "some text for the model to read. ".repeat(200)).unwrap();
    // metrics.jsonl cut to its first 3 records.
    let mp = run.join("metrics.jsonl");
    let m = std::fs::read_to_string(&mp).unwrap();
    let head: String = m.lines().take(3).map(|l| format!("{l}\n")).collect();
    std::fs::write(&mp, head).unwrap();
    let dp = format!("data.path={}", txt.display());
    let o = resume(
        &run.join("checkpoints/step_00000006"),
        &["--set", "seed=7", "--set", &dp],
    );
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("seed 7") && t.contains("seed 1337"), "{t}");
    assert!(
        t.contains(&format!("{:?}", txt.display().to_string())) && t.contains("\"\""),
        "{t}"
    );
    assert!(t.contains("no records for steps 4-6"), "{t}");
}

/// Wait until `path` has at least `n` lines (or `limit` passes).
fn wait_lines(path: &Path, n: usize, limit: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if std::fs::read_to_string(path).is_ok_and(|s| s.lines().count() >= n) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

fn wait_exit(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if t0.elapsed() > limit {
            child.kill().ok();
            panic!("fp8lm did not exit within {limit:?} after the signal");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn kill(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// SIGTERM / SIGINT / SIGHUP: the step finishes, a checkpoint, the metrics and the
/// summary are written, the exit code is 128 + signal, and the run resumes from there.
#[test]
fn stop_signal_saves_checkpoint_and_resumes() {
    for (sig, want) in [("TERM", 143), ("INT", 130), ("HUP", 129)] {
        let d = tmp(&format!("sig{sig}"));
        let run = d.join("run");
        let a = train_args(
            &run,
            &[
                "--set",
                "max_steps=1000000",
                "--set",
                "checkpoint_every=0",
                "--set",
                "eval_every=0",
            ],
        );
        let errf = d.join("stderr.txt");
        let mut child = Command::new(env!("CARGO_BIN_EXE_fp8lm"))
            .args(&a)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&errf).unwrap())
            .spawn()
            .unwrap();
        assert!(wait_lines(
            &run.join("metrics.jsonl"),
            3,
            Duration::from_secs(60)
        ));
        kill(child.id(), sig);
        let st = wait_exit(&mut child, Duration::from_secs(30));
        let err = std::fs::read_to_string(&errf).unwrap();
        assert_eq!(st.code(), Some(want), "SIG{sig}: {err}");
        assert!(err.contains(&format!("SIG{sig} received")), "{err}");
        let steps = std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count() as u64;
        assert!(
            err.contains(&format!("stopped by SIG{sig} after step {steps}")),
            "{err}"
        );
        let ck = run.join(format!("checkpoints/step_{steps:08}"));
        assert!(ck.join("checkpoint.json").is_file(), "{err}");
        let summary = std::fs::read_to_string(run.join("summary.json")).unwrap();
        assert!(
            summary.contains(&format!("\"stopped_by\": \"SIG{sig}\"")),
            "{summary}"
        );
        let target = format!("max_steps={}", steps + 2);
        let o = resume(&run, &["--set", &target]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(text(&o).contains(&format!("resuming at step {steps}")));
    }
}

/// A second signal aborts at once: sent while the first is still waiting for a long
/// evaluation to finish, the process ends without writing a checkpoint.
#[test]
fn second_signal_aborts_at_once() {
    let d = tmp("sig2");
    let run = d.join("run");
    let a = train_args(
        &run,
        &[
            "--set",
            "max_steps=1000000",
            "--set",
            "checkpoint_every=0",
            "--set",
            "eval_every=3",
            "--set",
            "eval_tokens=50000000",
        ],
    );
    let errf = d.join("stderr.txt");
    let mut child = Command::new(env!("CARGO_BIN_EXE_fp8lm"))
        .args(&a)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&errf).unwrap())
        .spawn()
        .unwrap();
    // Steps 1 and 2 are logged; step 3's evaluation runs for many seconds.
    assert!(wait_lines(
        &run.join("metrics.jsonl"),
        2,
        Duration::from_secs(60)
    ));
    std::thread::sleep(Duration::from_millis(100));
    kill(child.id(), "INT");
    let t0 = Instant::now();
    while !std::fs::read_to_string(&errf)
        .unwrap()
        .contains("SIGINT received")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "first signal not acknowledged"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    kill(child.id(), "INT");
    let st = wait_exit(&mut child, Duration::from_secs(10));
    let err = std::fs::read_to_string(&errf).unwrap();
    assert_eq!(st.code(), Some(130), "{err}");
    assert!(
        err.contains("second stop signal: aborting at once"),
        "{err}"
    );
    assert!(!run.join("checkpoints").exists(), "{err}");
}

#[test]
fn diverged_run_stops_with_exit_code_3() {
    let d = tmp("diverge");
    let o = train(
        &d.join("run"),
        &[
            "--set",
            "precision=fp8-o2",
            "--set",
            "optim.lr=100",
            "--set",
            "max_steps=20",
        ],
    );
    assert_eq!(code(&o), 3, "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("the run diverged") && t.contains("max_skipped_fraction = 0.25"),
        "{t}"
    );
    let summary = std::fs::read_to_string(d.join("run/summary.json")).unwrap();
    assert!(
        summary.contains("\"diverged\": \"the run diverged"),
        "{summary}"
    );
}

#[test]
fn model_too_large_for_memory_is_refused_up_front() {
    let d = tmp("huge");
    // Neither fits in any precision: 1e6 layers of width 32 hold 1.2e10 parameters (the
    // 8 B/param floor alone is 98 GB); a context of 1e6 needs T^2 attention probabilities.
    // (1e5 layers, 1.2e9 parameters, would fit in fp8-o2's ~10 B/param on a 24 GiB host.)
    for set in ["model.layers=1000000", "model.context=1000000"] {
        let o = train(&d.join("run"), &["--set", set]);
        let t = text(&o);
        assert_eq!(code(&o), 1, "{t}");
        assert!(
            t.contains("GiB") && t.contains("available") && t.contains("needs"),
            "{t}"
        );
        assert!(!d.join("run").exists(), "nothing written: {t}");
    }
}

#[test]
fn tokenize_refuses_a_folder_with_shards_unless_forced() {
    let d = tmp("tokforce");
    let txt = d.join("a.txt");
    std::fs::write(&txt, "hello world. ".repeat(300)).unwrap();
    let out = d.join("shards");
    let run = |force: bool| {
        let mut a = vec![
            "tokenize",
            "--input",
            txt.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--tokenizer",
            "byte",
            "--shard-tokens",
            "1000",
        ];
        if force {
            a.push("--force");
        }
        fp8lm(&a)
    };
    assert!(run(false).status.success());
    // A stale extra shard a later run would read.
    std::fs::write(out.join("shard_000099.bin"), b"old").unwrap();
    let o = run(false);
    assert_eq!(code(&o), 2, "{}", text(&o));
    assert!(
        text(&o).contains("--force") && text(&o).contains("shard_000000.bin"),
        "{}",
        text(&o)
    );
    assert!(out.join("shard_000099.bin").exists());
    let o = run(true);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!out.join("shard_000099.bin").exists());
}

#[test]
fn eval_tokens_beyond_the_validation_set_are_capped() {
    let d = tmp("evalcap");
    let txt = d.join("a.txt");
    // 4000 bytes, 10% validation = 400 tokens = 25 sequences of 16.
    std::fs::write(&txt, "abcdefghij".repeat(400)).unwrap();
    let dp = format!("data.path={}", txt.display());
    let run = d.join("run");
    assert!(train(&run, &["--set", &dp, "--set", "max_steps=2"])
        .status
        .success());
    let o = fp8lm(&[
        "eval",
        "--checkpoint",
        run.to_str().unwrap(),
        "--set",
        "eval_tokens=100000",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("eval_tokens = 100000 is beyond the validation set"),
        "{t}"
    );
    let capped: usize = t
        .split("evaluating all ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{t}"));
    assert!((20..=26).contains(&capped), "{t}");
    assert!(
        t.contains(&format!("over {capped} validation sequences")),
        "{t}"
    );
}

#[test]
fn run_dir_without_checkpoints_is_described_not_offered_for_resume() {
    let d = tmp("hint");
    let run = d.join("run");
    assert!(train(&run, &["--set", "max_steps=2"]).status.success());
    std::fs::remove_dir_all(run.join("checkpoints")).unwrap();
    let o = train(&run, &["--set", "max_steps=2"]);
    assert!(o.status.success());
    let t = text(&o);
    assert!(!t.contains("use --resume"), "{t}");
    assert!(
        t.contains("without a complete checkpoint") && t.contains("metrics.jsonl"),
        "{t}"
    );
    let o = resume(&run, &[]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("no checkpoint to resume from"),
        "{}",
        text(&o)
    );
}

/// fp8_stats_every: per-tensor FP8 stats only every N steps (and at skipped steps).
#[test]
fn fp8_stats_every_thins_the_metrics() {
    let d = tmp("fp8every");
    let run = d.join("run");
    let o = train(
        &run,
        &["--set", "precision=fp8-o2", "--set", "fp8_stats_every=4"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let recs: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let with: Vec<&serde_json::Value> = recs.iter().filter(|v| v.get("fp8").is_some()).collect();
    let steps: Vec<u64> = with.iter().map(|v| v["step"].as_u64().unwrap()).collect();
    for s in [4, 8, 12] {
        assert!(steps.contains(&s), "{steps:?}");
    }
    // Any other step carrying stats had an overflow or a non-finite amax.
    for v in with.iter().filter(|v| v["step"].as_u64().unwrap() % 4 != 0) {
        let hot = v["fp8"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["overflow"].as_u64().unwrap() > 0 || t["amax"].is_null());
        assert!(
            hot,
            "step {} logged FP8 stats without cause: {v}",
            v["step"]
        );
    }
    assert!(steps.len() < recs.len(), "{steps:?}");
}

/// A long evaluation shows its progress (at every tenth for 100 batches or more): 200
/// batches of the test's 2 x 16 tokens on the (unbounded) embedded corpus.
#[test]
fn long_eval_shows_progress() {
    let d = tmp("evalprog");
    let run = d.join("run");
    assert!(train(&run, &["--set", "max_steps=2"]).status.success());
    let o = fp8lm(&[
        "eval",
        "--checkpoint",
        run.to_str().unwrap(),
        "--set",
        "eval_tokens=6400",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    for k in [20, 100, 180] {
        assert!(t.contains(&format!("eval: batch {k}/200")), "{t}");
    }
    assert!(t.contains("in 200 batches"), "{t}");
}

/// log_every: a training-loss line every N steps (stderr piped, so no progress bar).
#[test]
fn log_every_sets_the_loss_lines() {
    let d = tmp("logevery");
    let o = train(
        &d.join("run"),
        &["--set", "log_every=5", "--set", "eval_every=0"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    let logged: Vec<u64> = t
        .lines()
        .filter_map(|l| l.split("step ").nth(1))
        .filter_map(|r| r.split('/').next()?.trim().parse().ok())
        .collect();
    // Step 1 (the first), every 5th, and the last.
    assert_eq!(logged, vec![1, 5, 10, 12], "{t}");
}

/// fp32 <-> bf16 share their state layout: converted on request, both ways.
#[test]
fn fp32_and_bf16_convert_both_ways() {
    let d = tmp("fp32bf16");
    let run = d.join("run");
    assert!(
        train(&run, &["--set", "max_steps=6", "--set", "precision=fp32"])
            .status
            .success()
    );
    let o = resume(
        &run,
        &[
            "--set",
            "precision=bf16",
            "--set",
            "max_steps=8",
            "--convert-precision",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("from fp32 to bf16"), "{}", text(&o));
    let o = resume(
        &run,
        &[
            "--set",
            "precision=fp32",
            "--set",
            "max_steps=10",
            "--convert-precision",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("from bf16 to fp32"), "{}", text(&o));
}
