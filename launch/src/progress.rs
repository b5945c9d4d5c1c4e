//! Progress while training: an indicatif bar when stderr is a terminal, plain log lines
//! (through tracing) otherwise, so logs piped to a file stay readable.
//!
//! Log output goes through [`LogWriter`], which hides the bar while a line is printed
//! so that log lines and the bar never overwrite each other.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// tracing writer that cooperates with the progress bar.
pub struct LogWriter;

pub struct LogLine(Vec<u8>);

impl Write for LogLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        let bytes = std::mem::take(&mut self.0);
        let print = || {
            let _ = std::io::stderr().write_all(&bytes);
        };
        match BAR.lock().ok().and_then(|g| g.clone()) {
            Some(bar) => bar.suspend(print),
            None => print(),
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogLine;
    fn make_writer(&'a self) -> LogLine {
        LogLine(Vec::new())
    }
}

/// Remove the bar (before printing an error or the summary).
pub fn finish_all() {
    if let Some(bar) = BAR.lock().ok().and_then(|mut g| g.take()) {
        bar.finish_and_clear();
    }
}

/// Step progress for one training run.
pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    last_log: Instant,
    every: u64,
}

impl Progress {
    /// `log_every`: a log line every N steps when stderr is not a terminal (0: about 20
    /// per run); a line at least every 30 s either way.
    pub fn new(start_step: u64, total: u64, log_every: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b =
                ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr_with_hz(8));
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} steps (eta {eta}) {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b.set_position(start_step);
            b
        });
        if let Ok(mut g) = BAR.lock() {
            *g = bar.clone();
        }
        Progress {
            bar,
            total,
            last_log: Instant::now(),
            every: if log_every > 0 {
                log_every
            } else {
                (total / 20).max(1)
            },
        }
    }

    /// After step `done` (1-based count of completed steps).
    pub fn step(&mut self, done: u64, loss: f32, lr: f32, tokens_per_s: f64) {
        match &self.bar {
            Some(b) => {
                b.set_position(done);
                b.set_message(format!(
                    "loss {loss:.4} | lr {lr:.2e} | {tokens_per_s:.0} tok/s"
                ));
            }
            None => {
                if done == 1
                    || done.is_multiple_of(self.every)
                    || done == self.total
                    || self.last_log.elapsed() > Duration::from_secs(30)
                {
                    self.last_log = Instant::now();
                    tracing::info!(
                        "step {done:>6}/{} | loss {loss:.4} | lr {lr:.2e} | {tokens_per_s:.0} tok/s",
                        self.total
                    );
                }
            }
        }
    }

    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        finish_all();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
