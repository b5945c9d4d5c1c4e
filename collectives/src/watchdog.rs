//! A watchdog for collectives: a rank that waits too long for a peer ends the job,
//! naming the peer it waited for and the collective, instead of spinning forever.
//!
//! [`Watchdog`] wraps a communicator. Every blocking call (`sendrecv_bytes`, which all
//! ring reductions are made of, `broadcast_bytes`, `barrier`) records what it waits for
//! and since when; a background thread checks every `timeout / 20` (at most 100 ms)
//! and, once one call has waited longer than the timeout, calls `on_timeout` with a
//! message such as
//!
//! ```text
//! rank 0 of 2: no answer from rank 1 for 300 s in collective `reduce_scatter` (dist.timeout_s = 300); ...
//! ```
//!
//! The caller decides what a timeout does: `fp8lm train` prints the message and ends the
//! process (under `mpirun` the launcher then tears the job down); tests record it. A
//! blocked MPI call cannot be interrupted from another thread, so the action must not
//! return control to the waiting thread.
//!
//! A process that was itself stopped (its watchdog thread woke far later than asked)
//! restarts the clock of its current wait instead of blaming the peer.
//!
//! Which peer: in a ring step a rank waits for its predecessor, so with a stopped rank
//! `k` the first rank to time out is `k + 1`, which names `k`; others, waiting on ranks
//! that are themselves stuck, time out a little later and name their own predecessor.

use crate::comm::Communicator;
use crate::error::Result;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What a timeout does with its message.
pub type OnTimeout = Box<dyn Fn(&str) + Send + 'static>;

struct Waiting {
    op: String,
    /// The rank this call waits for (None: every other rank, e.g. a barrier).
    peer: Option<usize>,
    since: Instant,
}

#[derive(Default)]
struct State {
    waiting: Mutex<Option<Waiting>>,
    done: Mutex<bool>,
}

/// A communicator whose blocking calls are watched (module docs).
pub struct Watchdog<'a> {
    inner: &'a dyn Communicator,
    state: Arc<State>,
    thread: Option<JoinHandle<()>>,
}

impl<'a> Watchdog<'a> {
    /// Watch `inner`'s calls; `timeout` zero disables the watchdog (no thread).
    pub fn new(inner: &'a dyn Communicator, timeout: Duration, on_timeout: OnTimeout) -> Self {
        let state = Arc::new(State::default());
        let thread = (!timeout.is_zero()).then(|| {
            let st = state.clone();
            let (rank, size) = (inner.rank(), inner.size());
            let poll = (timeout / 20).clamp(Duration::from_millis(1), Duration::from_millis(100));
            std::thread::Builder::new()
                .name(format!("fp8lm-watchdog-{rank}"))
                .spawn(move || {
                    let mut last_poll = Instant::now();
                    loop {
                        std::thread::park_timeout(poll);
                        if *st.done.lock().unwrap_or_else(|e| e.into_inner()) {
                            return;
                        }
                        let msg = {
                            let mut w = st.waiting.lock().unwrap_or_else(|e| e.into_inner());
                            // A poll far later than asked for: this process itself was stopped
                            // (SIGSTOP, a suspended VM), not its peer. Restart the clock of
                            // the current wait rather than blame a peer for our own pause.
                            if last_poll.elapsed() > poll * 5 + timeout / 2 {
                                if let Some(w) = w.as_mut() {
                                    w.since = Instant::now();
                                }
                            }
                            last_poll = Instant::now();
                            match &*w {
                                Some(w) if w.since.elapsed() > timeout => Some(timeout_message(
                                    rank,
                                    size,
                                    w.peer,
                                    &w.op,
                                    w.since.elapsed(),
                                    timeout,
                                )),
                                _ => None,
                            }
                        };
                        if let Some(m) = msg {
                            on_timeout(&m);
                            return;
                        }
                    }
                })
                .expect("spawn the watchdog thread")
        });
        Watchdog {
            inner,
            state,
            thread,
        }
    }

    fn watch<T>(&self, op: &str, peer: Option<usize>, f: impl FnOnce() -> T) -> T {
        if self.thread.is_none() {
            return f();
        }
        let set = |w: Option<Waiting>| {
            *self.state.waiting.lock().unwrap_or_else(|e| e.into_inner()) = w;
        };
        set(Some(Waiting {
            op: op.to_string(),
            peer,
            since: Instant::now(),
        }));
        let r = f();
        set(None);
        r
    }
}

fn timeout_message(
    rank: usize,
    size: usize,
    peer: Option<usize>,
    op: &str,
    waited: Duration,
    timeout: Duration,
) -> String {
    let who = match peer {
        Some(p) => format!("rank {p}"),
        None if size == 2 => format!("rank {}", 1 - rank),
        None => "the other ranks".to_string(),
    };
    format!(
        "rank {rank} of {size}: no answer from {who} for {:.0} s in collective `{op}` \
         (dist.timeout_s = {}); {who} stopped, hung or lost its connection; ending the job",
        waited.as_secs_f64(),
        timeout.as_secs_f64()
    )
}

impl Drop for Watchdog<'_> {
    fn drop(&mut self) {
        *self.state.done.lock().unwrap_or_else(|e| e.into_inner()) = true;
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            t.join().ok();
        }
    }
}

impl Communicator for Watchdog<'_> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn sendrecv_bytes(
        &self,
        op: &str,
        to: usize,
        send: &[u8],
        from: usize,
        recv: &mut [u8],
    ) -> Result<()> {
        self.watch(op, Some(from), || {
            self.inner.sendrecv_bytes(op, to, send, from, recv)
        })
    }
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        let peer = (root != self.rank()).then_some(root);
        self.watch("broadcast", peer, || self.inner.broadcast_bytes(buf, root))
    }
    fn barrier(&self) -> Result<()> {
        self.watch("barrier", None, || self.inner.barrier())
    }
    fn bytes_sent(&self) -> u64 {
        self.inner.bytes_sent()
    }
    fn abort(&self, reason: &str) -> ! {
        self.inner.abort(reason)
    }
}
