//! Running a program under `mpirun` with a deadline: the integration tests of the
//! collectives, the trainer and the CLI launch real MPI jobs this way.
//!
//! Stdout and stderr are drained on threads (a chatty job must not block on a full pipe),
//! the job is polled against its deadline and killed when it passes it, so a hang shows
//! up as an error instead of a stuck test. It runs as root when it must (CI containers),
//! and with `--oversubscribe` (more ranks than cores).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What an `mpirun` job did.
#[derive(Clone, Debug)]
pub struct MpirunOutput {
    /// Exit status zero.
    pub success: bool,
    /// stdout, then stderr.
    pub text: String,
    pub elapsed: Duration,
}

/// `mpirun` ready for a test job: allowed to run as root, with its own OpenMPI session
/// directory. Why the directory: OpenMPI 4 creates `/tmp/ompi.<host>.<uid>` at start-up,
/// and two `mpirun`s starting at the same moment (parallel tests, or two test binaries)
/// race on it and one fails with "mkdir ... File exists" in `orte_init`; a fresh
/// `orte_tmpdir_base` per job removes the race. The directory is left in the system's
/// temporary folder (OpenMPI removes its session tree when the job ends).
pub fn mpirun_command() -> Command {
    use std::sync::atomic::{AtomicU64, Ordering};
    static JOB: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "fp8lm-mpirun-{}-{}",
        std::process::id(),
        JOB.fetch_add(1, Ordering::Relaxed)
    ));
    // If it cannot be created, OpenMPI reports the problem itself when it starts.
    let _ = std::fs::create_dir_all(&dir);
    let mut cmd = Command::new("mpirun");
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_orte_tmpdir_base", &dir);
    cmd
}

/// `mpirun -n <n> --oversubscribe <exe> <args>` with `envs` set (and `RUST_LOG` unset).
/// Errors when `mpirun` cannot be started (OpenMPI missing) or the job runs past `limit`
/// (then it is killed first).
pub fn run_mpirun(
    exe: &str,
    n: usize,
    args: &[&str],
    envs: &[(&str, &str)],
    limit: Duration,
) -> Result<MpirunOutput, String> {
    let t = Instant::now();
    let mut cmd = mpirun_command();
    cmd.args(["-n", &n.to_string(), "--oversubscribe", exe])
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().map_err(|e| {
        format!("cannot run `mpirun` ({e}); install OpenMPI (openmpi-bin libopenmpi-dev)")
    })?;
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            r.read_to_string(&mut s).ok();
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let err = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) => {}
            Err(e) => return Err(format!("waiting for mpirun {args:?}: {e}")),
        }
        if t.elapsed() > limit {
            child.kill().ok();
            child.wait().ok();
            return Err(format!(
                "mpirun {args:?} did not finish within {limit:?} (hang)"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = t.elapsed();
    let text = out.join().unwrap_or_default() + &err.join().unwrap_or_default();
    Ok(MpirunOutput {
        success: status.success(),
        text,
        elapsed,
    })
}
