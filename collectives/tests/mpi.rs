//! MPI integration tests: run `fp8lm-mpi-check` under `mpirun -n 2`. Built only with the
//! `mpi` feature; they FAIL (never skip) when `mpirun` is missing.

#![cfg(feature = "mpi")]

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Run `mpirun -n <n> fp8lm-mpi-check <args>`; returns (exit success, combined output,
/// elapsed). Kills the job and fails the test if it exceeds `limit`.
fn mpirun(n: usize, args: &[&str], limit: Duration) -> (bool, String, Duration) {
    let exe = env!("CARGO_BIN_EXE_fp8lm-mpi-check");
    let t = Instant::now();
    let mut child = Command::new("mpirun")
        .args(["-n", &n.to_string(), "--oversubscribe", exe])
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run `mpirun` ({e}); install OpenMPI (openmpi-bin libopenmpi-dev)")
        });
    // Drain the pipes on threads so a chatty job cannot block on a full pipe.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let ho = std::thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).ok();
        s
    });
    let he = std::thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).ok();
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().expect("waiting for mpirun") {
            break st;
        }
        if t.elapsed() > limit {
            child.kill().ok();
            child.wait().ok();
            panic!("mpirun {args:?} did not finish within {limit:?} (hang)");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = t.elapsed();
    let text = ho.join().unwrap() + &he.join().unwrap();
    (status.success(), text, elapsed)
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
