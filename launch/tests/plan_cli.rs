//! `fp8lm plan` end to end: the 175B table the README shows, and the start-up check of
//! `dist.data_parallel` against the ranks a job has.

mod common;
use common::{fp8lm, text, TINY};

#[test]
fn plans_gpt3_175b_on_1024_ranks_for_every_precision() {
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/gpt3-175b.toml");
    let o = fp8lm(&[
        "plan",
        "--config",
        cfg,
        "--set",
        "dist.data_parallel=1024",
        "--all",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    let row = |p: &str| -> Vec<f64> {
        let line = t
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with(p))
            .unwrap_or_else(|| panic!("no summary row for {p}:\n{t}"));
        line.split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap())
            .collect()
    };
    // state B/param: fp32 16, fp8-o2 6 (+ f32 norms/biases), fp8-o3 on 1024 ranks ~1
    // (the replicated E5M2 gradients; 5 B/param of optimizer state / 1024).
    assert_eq!(row("fp32")[0], 16.0, "{t}");
    assert!((row("fp8-o2")[0] - 6.0).abs() < 0.01, "{t}");
    assert!(row("fp8-o3")[0] < 1.02, "{t}");
    assert!(t.contains("174604836864 parameters"), "{t}");
}

#[test]
fn train_refuses_a_data_parallel_size_the_job_does_not_have() {
    let dir = common::tmp_dir("plan", "dp");
    let rd = format!("run_dir={}", dir.display());
    let mut args = vec!["train", "--set", rd.as_str()];
    args.extend_from_slice(TINY);
    args.extend_from_slice(&["--set", "dist.data_parallel=4"]);
    let o = fp8lm(&args);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("dist.data_parallel = 4")
            && t.contains("1 rank(s)")
            && t.contains("mpirun -n 4"),
        "{t}"
    );
}
