//! Soak: a long run's resident memory stays flat after warm-up (issue 10, item 5).
//!
//! 12 000 steps of a tiny model (about 15 s on 2 loaded cores) with checkpoints
//! (`checkpoint_every = 500`, `checkpoint_keep = 3`) and evaluations with plot redraws
//! every 500 steps. The RSS of the `fp8lm` process is sampled from `/proc/<pid>/statm`
//! while it runs. Warm-up: the first 2 000 steps (four checkpoints, four evaluations and
//! plots, so every buffer they use has been allocated at least once). Bound: the RSS may
//! not grow by more than 2 MiB over the remaining 10 000 steps, i.e. about 210 bytes per
//! step. Before the fix every step kept its metrics record (with per-tensor FP8 stats,
//! about 1.4 KB here) for the plot: ~14 MB over those steps, 7x the bound; the bound
//! leaves room for allocator noise (glibc keeps freed chunks, page granularity 4 KiB).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    Some(s.split_whitespace().nth(1)?.parse::<u64>().ok()? * 4096)
}

#[test]
fn rss_is_flat_after_warm_up() {
    let d = std::env::temp_dir().join(format!("fp8lm-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let run = d.join("run");
    let (steps, warm) = (12_000usize, 2_000usize);
    let sets = [
        format!("run_dir={}", run.display()),
        "model.layers=1".into(),
        "model.channels=32".into(),
        "model.heads=2".into(),
        "batch=2".into(),
        format!("max_steps={steps}"),
        "eval_every=500".into(),
        "eval_tokens=64".into(),
        "checkpoint_every=500".into(),
        "checkpoint_keep=3".into(),
        "precision=fp8-o2".into(),
    ];
    let mut args = vec!["train".to_string()];
    for s in &sets {
        args.push("--set".into());
        args.push(s.clone());
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_fp8lm"))
        .args(&args)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let metrics = run.join("metrics.jsonl");
    let t0 = Instant::now();
    let (mut at_warm, mut peak_after) = (None::<u64>, 0u64);
    let mut samples = 0;
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "soak run did not finish in 300 s"
        );
        let done = std::fs::read(&metrics)
            .map(|b| b.iter().filter(|&&c| c == b'\n').count())
            .unwrap_or(0);
        if let Some(rss) = rss_bytes(pid) {
            if done >= warm {
                match at_warm {
                    None => at_warm = Some(rss),
                    Some(_) => {
                        peak_after = peak_after.max(rss);
                        samples += 1;
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let st = child.wait().unwrap();
    assert!(st.success(), "soak run failed: {st:?}");
    let warm_rss = at_warm.expect("no sample after warm-up");
    assert!(samples >= 5, "too few samples ({samples}) to judge");
    let growth = peak_after.saturating_sub(warm_rss);
    eprintln!(
        "soak: RSS {:.1} MiB at step {warm}, peak {:.1} MiB after ({samples} samples): growth {:.2} MiB over {} steps",
        warm_rss as f64 / 1048576.0,
        peak_after as f64 / 1048576.0,
        growth as f64 / 1048576.0,
        steps - warm
    );
    assert!(
        growth < 2 << 20,
        "RSS grew by {growth} bytes after warm-up (bound 2 MiB)"
    );
    let lines = std::fs::read_to_string(&metrics).unwrap().lines().count();
    assert_eq!(lines, steps);
}
