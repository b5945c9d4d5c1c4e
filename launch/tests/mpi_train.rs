//! `mpirun -n 2 fp8lm train` trains data-parallel: the global losses rank 0 prints match
//! the same run on 2 in-process ranks. (Failure injection on one rank is tested with the
//! `fp8lm-dp` binary in tests/tests/mpi_dp.rs.) Built only with the `mpi` feature; FAILS
//! (never skips) when `mpirun` is missing.

#![cfg(feature = "mpi")]

use fp8lm_collectives::{run_ranks, LocalComm};
use fp8lm_trainer::config_file::load_config;
use fp8lm_trainer::distributed::train_data_parallel;
use std::process::Command;
use std::time::{Duration, Instant};

const SETS: [&str; 4] = [
    "model.channels=32",
    "batch=4",
    "max_steps=4",
    "precision=fp8-o3",
];

#[test]
fn mpirun_fp8lm_train_matches_in_process_ranks() {
    let exe = env!("CARGO_BIN_EXE_fp8lm");
    let mut cmd = Command::new("mpirun");
    cmd.args(["-n", "2", "--oversubscribe", exe, "train"]);
    for s in SETS {
        cmd.args(["--set", s]);
    }
    let t = Instant::now();
    let out = cmd
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `mpirun` ({e}); install OpenMPI (openmpi-bin libopenmpi-dev)")
        });
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(t.elapsed() < Duration::from_secs(60), "{text}");
    // `step     1/4: loss 4.1234, ...` from rank 0 only.
    let printed: Vec<f32> = text
        .lines()
        .filter(|l| l.starts_with("step "))
        .map(|l| {
            let v = l.split("loss ").nth(1).unwrap().split(',').next().unwrap();
            v.parse().unwrap()
        })
        .collect();
    assert_eq!(
        printed.len(),
        4,
        "one line per step, from rank 0 only:\n{text}"
    );
    assert!(text.contains("2 data-parallel ranks (mpi)"), "{text}");
    let sets: Vec<String> = SETS.iter().map(|s| s.to_string()).collect();
    let cfg = load_config(None, &sets).unwrap();
    let local = run_ranks(2, |c: &LocalComm| {
        let mut l = vec![];
        train_data_parallel(&cfg, c, 4, |_, st| l.push(st.loss)).map(|_| l)
    })
    .unwrap();
    for (p, l) in printed.iter().zip(&local[0]) {
        // Printed with 4 decimals.
        assert!(
            (p - l).abs() <= 6e-5,
            "mpirun {printed:?} vs in-process {:?}",
            local[0]
        );
    }
}
