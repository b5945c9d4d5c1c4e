//! Data-parallel training under `mpirun -n 2` (the `fp8lm-dp` binary): the losses match the
//! same run on 2 in-process ranks, and a rank that fails makes the job exit non-zero
//! promptly, naming the rank. Built only with the `mpi` feature; the tests FAIL (never
//! skip) when `mpirun` is missing.

#![cfg(feature = "mpi")]

use fp8lm_collectives::mpirun::run_mpirun;
use fp8lm_collectives::{run_ranks, LocalComm};
use fp8lm_trainer::config_file::load_config;
use fp8lm_trainer::distributed::train_data_parallel;
use std::time::Duration;

const SETS: [&str; 3] = ["model.channels=32", "batch=2", "max_steps=20"];

/// `mpirun -n <n> fp8lm-dp <args>` with `envs` (one compute thread per rank);
/// (success, stdout + stderr, elapsed). Fails the test on a hang past `limit`.
fn mpirun(
    n: usize,
    args: &[&str],
    envs: &[(&str, &str)],
    limit: Duration,
) -> (bool, String, Duration) {
    let exe = env!("CARGO_BIN_EXE_fp8lm-dp");
    let mut all = vec![("RAYON_NUM_THREADS", "1")];
    all.extend_from_slice(envs);
    let o = run_mpirun(exe, n, args, &all, limit).unwrap_or_else(|e| panic!("{e}"));
    (o.success, o.text, o.elapsed)
}

fn set_args() -> Vec<&'static str> {
    SETS.iter().flat_map(|s| ["--set", s]).collect()
}

#[test]
fn mpirun_two_ranks_train_like_two_in_process_ranks() {
    let sets: Vec<String> = SETS.iter().map(|s| s.to_string()).collect();
    for precision in ["fp32", "fp8-o3"] {
        let mut sets = sets.clone();
        sets.push(format!("precision={precision}"));
        let cfg = load_config(None, &sets).unwrap();
        let steps = 4;
        let local = run_ranks(2, |c: &LocalComm| {
            let mut losses = vec![];
            train_data_parallel(&cfg, c, steps, |_, st| losses.push(st.loss)).map(|_| losses)
        })
        .unwrap();
        let mut args = vec!["train", "--steps", "4"];
        args.extend(set_args());
        let p = format!("precision={precision}");
        args.extend(["--set", &p]);
        let (ok, out, _) = mpirun(2, &args, &[], Duration::from_secs(120));
        assert!(ok, "mpirun failed:\n{out}");
        let mpi: Vec<f32> = out
            .lines()
            .filter(|l| l.starts_with("step "))
            .map(|l| {
                let bits = l.rsplit(' ').next().unwrap();
                f32::from_bits(u32::from_str_radix(bits, 16).unwrap())
            })
            .collect();
        assert_eq!(mpi.len(), steps, "{out}");
        // Same ring order on both backends: bit-identical unless the GEMMs' thread count
        // changes their summation order (RAYON_NUM_THREADS=1 under mpirun); allow 1e-6.
        for (a, b) in mpi.iter().zip(&local[0]) {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs(),
                "{precision}: mpirun {mpi:?} vs in-process {:?}",
                local[0]
            );
        }
        assert!(
            out.contains("rank 0 done") && out.contains("rank 1 done"),
            "{out}"
        );
    }
}

#[test]
fn a_rank_with_a_missing_data_file_fails_the_job_within_10s_naming_the_rank() {
    let mut args = vec!["train", "--steps", "50"];
    args.extend(set_args());
    let (ok, out, elapsed) = mpirun(
        2,
        &args,
        &[
            ("FP8LM_FAULT_RANK", "1"),
            ("FP8LM_FAULT_SET", "data.path=/nonexistent/fp8lm-shards"),
        ],
        Duration::from_secs(30),
    );
    assert!(!ok, "the job succeeded although rank 1 had no data:\n{out}");
    assert!(
        elapsed < Duration::from_secs(10),
        "took {elapsed:?}:\n{out}"
    );
    assert!(out.contains("rank 1"), "{out}");
    assert!(out.contains("data.path"), "{out}");
    assert!(!out.contains("rank 1 done"), "{out}");
}

#[test]
fn a_backward_that_panics_mid_step_on_one_rank_fails_the_job_within_10s_naming_the_rank() {
    // Overlapped step (the default): rank 1's backward panics after handing out two
    // gradient groups, while rank 0 is reducing them.
    let mut args = vec!["train", "--steps", "50"];
    args.extend(set_args());
    let (ok, out, elapsed) = mpirun(
        2,
        &args,
        &[("FP8LM_FAULT_RANK", "1"), ("FP8LM_FAULT_BACKWARD", "2")],
        Duration::from_secs(30),
    );
    assert!(
        !ok,
        "the job succeeded although rank 1's backward panicked:\n{out}"
    );
    assert!(
        elapsed < Duration::from_secs(10),
        "took {elapsed:?}:\n{out}"
    );
    assert!(out.contains("rank 1"), "{out}");
    assert!(out.contains("injected failure in the backward"), "{out}");
    assert!(!out.contains("rank 1 done"), "{out}");
}

#[test]
fn a_config_that_differs_on_one_rank_is_refused_at_start_up() {
    let mut args = vec!["train", "--steps", "50"];
    args.extend(set_args());
    let (ok, out, elapsed) = mpirun(
        2,
        &args,
        &[
            ("FP8LM_FAULT_RANK", "1"),
            ("FP8LM_FAULT_SET", "optim.lr=0.5"),
        ],
        Duration::from_secs(30),
    );
    assert!(!ok, "the job ran with differing configs:\n{out}");
    assert!(
        elapsed < Duration::from_secs(10),
        "took {elapsed:?}:\n{out}"
    );
    assert!(
        out.contains("training config differs between ranks"),
        "{out}"
    );
    assert!(out.contains("rank 1 has"), "{out}");
    assert!(!out.contains("step 0 loss"), "a step ran:\n{out}");
}
