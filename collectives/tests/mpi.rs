//! MPI integration tests: run `fp8lm-mpi-check` under `mpirun -n 2`. Built only with the
//! `mpi` feature; they FAIL (never skip) when `mpirun` is missing.

#![cfg(feature = "mpi")]

use fp8lm_collectives::mpirun::run_mpirun;
use std::time::Duration;

/// Run `mpirun -n <n> fp8lm-mpi-check <args>`; returns (exit success, combined output,
/// elapsed). Fails the test if the job exceeds `limit` (it is killed first).
fn mpirun(n: usize, args: &[&str], limit: Duration) -> (bool, String, Duration) {
    let exe = env!("CARGO_BIN_EXE_fp8lm-mpi-check");
    let o = run_mpirun(exe, n, args, &[], limit).unwrap_or_else(|e| panic!("{e}"));
    (o.success, o.text, o.elapsed)
}

#[test]
fn mpi_collectives_match_the_reference_and_the_in_process_backend() {
    let (ok, out, _) = mpirun(2, &["selftest"], Duration::from_secs(60));
    assert!(ok, "selftest failed:\n{out}");
    for r in 0..2 {
        assert!(
            out.contains(&format!("rank {r}: selftest ok (2 ranks)")),
            "{out}"
        );
    }
}

#[test]
fn a_failing_rank_aborts_the_whole_job_quickly_with_its_cause() {
    for (how, cause) in [
        ("error", "cannot open data file /nonexistent/shard.bin"),
        ("panic", "injected panic on rank 1"),
    ] {
        let (ok, out, dt) = mpirun(2, &["fail", "1", how], Duration::from_secs(30));
        assert!(!ok, "job with a failing rank exited 0:\n{out}");
        assert!(dt < Duration::from_secs(10), "took {dt:?} to abort:\n{out}");
        assert!(
            out.contains("rank 1:"),
            "message does not name the rank:\n{out}"
        );
        assert!(
            out.contains(cause),
            "message does not name the cause:\n{out}"
        );
        assert!(!out.contains("not aborted"), "{out}");
    }
}
