//! SIGINT, SIGTERM and SIGHUP during `fp8lm train`: stop cleanly, as cluster schedulers
//! expect before they preempt a job.
//!
//! The first signal sets a flag and says so on stderr; the run loop finishes the step it
//! is in, writes a checkpoint (atomically), `metrics.jsonl` and `summary.json`, and the
//! process exits with `128 + signal` (SIGHUP 129, SIGINT 130, SIGTERM 143). A second
//! signal ends the process at once with the same code, saving nothing more.
//!
//! Under `mpirun` every rank must stop at the same step (else the checkpoint mixes
//! steps): each step the ranks all-reduce (max) the signal number, one f32, so the job
//! stops after the step in which any rank was signalled, on every rank together.
//!
//! The handler only stores an atomic and calls `write(2)` / `_exit(2)`, which are
//! async-signal-safe.

use std::sync::atomic::{AtomicI32, Ordering};

static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// The signals that stop a run cleanly.
#[cfg(unix)]
const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Name of a stop signal ("SIGTERM").
pub fn name(sig: i32) -> &'static str {
    #[cfg(unix)]
    {
        match sig {
            libc::SIGINT => return "SIGINT",
            libc::SIGTERM => return "SIGTERM",
            libc::SIGHUP => return "SIGHUP",
            _ => {}
        }
    }
    let _ = sig;
    "signal"
}

/// Exit code of a run stopped by `sig`: the shell's convention, 128 + signal number.
pub fn exit_code(sig: i32) -> i32 {
    128 + sig
}

#[cfg(unix)]
extern "C" fn on_signal(sig: libc::c_int) {
    let first = RECEIVED
        .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok();
    let msg: &[u8] = match (first, sig) {
        (true, libc::SIGINT) => b"\nfp8lm: SIGINT received: finishing this step, then saving a checkpoint, metrics and summary (send it again to abort at once)\n",
        (true, libc::SIGTERM) => b"\nfp8lm: SIGTERM received: finishing this step, then saving a checkpoint, metrics and summary (send it again to abort at once)\n",
        (true, _) => b"\nfp8lm: SIGHUP received: finishing this step, then saving a checkpoint, metrics and summary (send it again to abort at once)\n",
        (false, _) => b"\nfp8lm: second stop signal: aborting at once, without saving\n",
    };
    // SAFETY: write(2) and _exit(2) are async-signal-safe; msg is a static buffer.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        if !first {
            libc::_exit(exit_code(sig));
        }
    }
}

/// Install the handlers (once, at the start of `fp8lm train`).
pub fn install() {
    #[cfg(unix)]
    for sig in SIGNALS {
        // SAFETY: a zeroed sigaction with a plain handler; SA_RESTART so that blocking
        // system calls (file writes, MPI's polling) resume instead of failing with EINTR.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                tracing::warn!(
                    "cannot install the {} handler: {}",
                    name(sig),
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

/// The first stop signal received so far, if any.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// A run that stopped after a signal, with its state saved: `main` exits with
/// [`exit_code`] after printing it.
#[derive(Debug)]
pub struct Stopped {
    pub signal: i32,
    pub step: u64,
    pub checkpoint: Option<std::path::PathBuf>,
    pub run_dir: std::path::PathBuf,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "stopped by {} after step {}: ",
            name(self.signal),
            self.step
        )?;
        match &self.checkpoint {
            Some(c) => write!(
                f,
                "checkpoint {}, metrics.jsonl and summary.json written; continue with --resume {} (exit code {})",
                c.display(),
                self.run_dir.display(),
                exit_code(self.signal)
            ),
            None => write!(f, "exit code {}", exit_code(self.signal)),
        }
    }
}

impl std::error::Error for Stopped {}
