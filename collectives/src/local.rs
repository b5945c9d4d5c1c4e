//! In-process backend: N ranks as threads of one process, talking through channels.
//!
//! Used by tests and by one-host runs without an MPI launcher. Each ordered pair of ranks
//! has its own FIFO channel; collectives are called in the same order on every rank, so
//! FIFO order is all the matching that is needed. Sends never block (the channels are
//! unbounded), which makes the ring's "send then receive" deadlock-free.
//!
//! Failure: the group shares an abort flag. [`run_ranks`] sets it when a rank's closure
//! returns an error or panics; every rank blocked in a receive polls the flag and fails
//! with an error naming the rank that failed first and its cause, so no rank hangs.

use crate::comm::{ring_all_gather, Communicator};
use crate::error::{CommError, Result};
use std::cell::Cell;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct Shared {
    /// (rank, cause) of the first failure in the group.
    failure: Mutex<Option<(usize, String)>>,
}

impl Shared {
    fn fail(&self, rank: usize, cause: String) {
        let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some((rank, cause));
        }
    }
    fn failed(&self) -> Option<(usize, String)> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// One rank of an in-process group. Move it to its own thread.
pub struct LocalComm {
    rank: usize,
    size: usize,
    to: Vec<Sender<Vec<u8>>>,
    from: Vec<Receiver<Vec<u8>>>,
    shared: Arc<Shared>,
    sent: Cell<u64>,
}

impl LocalComm {
    /// A fully connected group of `n` ranks (index = rank).
    pub fn group(n: usize) -> Vec<LocalComm> {
        assert!(n > 0, "LocalComm::group: need at least one rank");
        let shared = Arc::new(Shared::default());
        // chans[src][dst]
        let mut txs: Vec<Vec<Option<Sender<Vec<u8>>>>> = (0..n).map(|_| vec![]).collect();
        let mut rxs: Vec<Vec<Option<Receiver<Vec<u8>>>>> =
            (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
        for (src, tx_row) in txs.iter_mut().enumerate() {
            for rx_row in rxs.iter_mut() {
                let (tx, rx) = channel();
                tx_row.push(Some(tx));
                rx_row[src] = Some(rx);
            }
        }
        (0..n)
            .map(|r| LocalComm {
                rank: r,
                size: n,
                to: txs[r].iter_mut().map(|t| t.take().unwrap()).collect(),
                from: rxs[r].iter_mut().map(|t| t.take().unwrap()).collect(),
                shared: shared.clone(),
                sent: Cell::new(0),
            })
            .collect()
    }

    fn check_peer(&self, op: &str, peer: usize) -> Result<()> {
        if peer >= self.size {
            return Err(CommError::new(
                self.rank,
                op,
                format!("peer rank {peer} out of range for {} ranks", self.size),
            ));
        }
        Ok(())
    }

    fn send(&self, op: &str, to: usize, data: &[u8]) -> Result<()> {
        self.check_peer(op, to)?;
        self.to[to]
            .send(data.to_vec())
            .map_err(|_| CommError::new(self.rank, op, format!("rank {to} has left the group")))?;
        self.sent.set(self.sent.get() + data.len() as u64);
        Ok(())
    }

    fn recv(&self, op: &str, from: usize, out: &mut [u8]) -> Result<()> {
        self.check_peer(op, from)?;
        let msg = loop {
            match self.from[from].recv_timeout(Duration::from_millis(20)) {
                Ok(m) => break m,
                Err(RecvTimeoutError::Timeout) => {
                    if let Some((r, cause)) = self.shared.failed() {
                        return Err(CommError::new(
                            self.rank,
                            op,
                            format!("aborted because rank {r} failed: {cause}"),
                        ));
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let why = match self.shared.failed() {
                        Some((r, cause)) => format!("; rank {r} failed: {cause}"),
                        None => " (did the ranks call different collectives?)".into(),
                    };
                    return Err(CommError::new(
                        self.rank,
                        op,
                        format!("rank {from} has left the group{why}"),
                    ));
                }
            }
        };
        if msg.len() != out.len() {
            return Err(CommError::new(
                self.rank,
                op,
                format!(
                    "received {} bytes from rank {from}, expected {} (buffers of different \
                     lengths on different ranks?)",
                    msg.len(),
                    out.len()
                ),
            ));
        }
        out.copy_from_slice(&msg);
        Ok(())
    }
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn backend(&self) -> &'static str {
        "local"
    }

    fn sendrecv_bytes(
        &self,
        op: &str,
        to: usize,
        send: &[u8],
        from: usize,
        recv: &mut [u8],
    ) -> Result<()> {
        self.send(op, to, send)?;
        self.recv(op, from, recv)
    }

    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        self.check_peer("broadcast", root)?;
        if self.rank == root {
            for peer in (0..self.size).filter(|&p| p != root) {
                self.send("broadcast", peer, buf)?;
            }
            Ok(())
        } else {
            self.recv("broadcast", root, buf)
        }
    }

    fn barrier(&self) -> Result<()> {
        // A ring all-gather of one byte per rank: nobody leaves before hearing from all.
        let mut tokens = vec![0u8; self.size];
        ring_all_gather(self, "barrier", &mut tokens)
    }

    fn bytes_sent(&self) -> u64 {
        self.sent.get()
    }

    fn abort(&self, reason: &str) -> ! {
        self.shared.fail(self.rank, reason.to_string());
        panic!("rank {}: abort: {reason}", self.rank);
    }
}

/// The text of a caught panic's payload (`&str` or `String`), for error messages that
/// name what went wrong on a rank.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".into()
    }
}

/// Run `f` on `n` in-process ranks (one thread each) and collect the results in rank
/// order. If any rank returns `Err` or panics, the other ranks' pending communication
/// fails promptly and the error returned names the rank that failed first and its cause.
pub fn run_ranks<T, E, F>(n: usize, f: F) -> Result<Vec<T>>
where
    T: Send,
    E: std::fmt::Display,
    F: Fn(&LocalComm) -> std::result::Result<T, E> + Sync,
{
    let comms = LocalComm::group(n);
    let shared = comms[0].shared.clone();
    let results: Vec<Option<T>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let f = &f;
                s.spawn(move || {
                    let r = c.rank;
                    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&c)));
                    match out {
                        Ok(Ok(v)) => Some(v),
                        Ok(Err(e)) => {
                            c.shared.fail(r, e.to_string());
                            None
                        }
                        Err(p) => {
                            c.shared
                                .fail(r, format!("panicked: {}", panic_message(&*p)));
                            None
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(None))
            .collect()
    });
    if let Some((rank, cause)) = shared.failed() {
        return Err(CommError::new(rank, "run_ranks", cause));
    }
    Ok(results
        .into_iter()
        .map(|r| r.expect("no failure recorded"))
        .collect())
}
