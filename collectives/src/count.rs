//! Bytes moved, by collective kind: [`CountingComm`] wraps any communicator (a world, a
//! tensor-parallel group) and runs the shared ring algorithms on itself, so every byte a
//! rank sends passes its `sendrecv_bytes` and is charged to the collective that sent it.
//!
//! What is counted is what this rank *sends* (payload bytes, per rank): a ring all-gather
//! of an `N`-byte tensor over `T` ranks sends `(T - 1) / T * N`, a reduce-scatter the same,
//! an all-reduce twice that. All-gathers are split by element type, so the FP8 gathers of
//! sequence parallelism (one byte per element) can be set beside f32 ones (four).

use crate::buf::{combine_bf16, combine_f16, combine_f32, combine_fp8};
use crate::comm::{ring_all_gather, ring_reduce_scatter};
use crate::{BufMut, Communicator, ReduceOp, Result};
use std::cell::Cell;
use std::ops::Range;

/// Bytes this rank sent, per collective kind (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CollectiveBytes {
    pub all_reduce: u64,
    pub reduce_scatter: u64,
    /// All-gathers of f32 (or bf16 / f16) tensors.
    pub all_gather: u64,
    /// All-gathers of FP8 tensors (E4M3 / E5M2 bytes).
    pub all_gather_fp8: u64,
    /// Everything else: broadcasts, byte gathers (agreement checks, partial norms).
    pub other: u64,
}

impl CollectiveBytes {
    pub fn total(&self) -> u64 {
        self.all_reduce + self.reduce_scatter + self.all_gather + self.all_gather_fp8 + self.other
    }

    /// `self - earlier`, kind by kind (the bytes of one step from two readings).
    pub fn since(&self, earlier: &CollectiveBytes) -> CollectiveBytes {
        CollectiveBytes {
            all_reduce: self.all_reduce - earlier.all_reduce,
            reduce_scatter: self.reduce_scatter - earlier.reduce_scatter,
            all_gather: self.all_gather - earlier.all_gather,
            all_gather_fp8: self.all_gather_fp8 - earlier.all_gather_fp8,
            other: self.other - earlier.other,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    AllReduce,
    ReduceScatter,
    AllGather,
    AllGatherFp8,
    Other,
}

/// A communicator that counts what it sends by collective kind (module docs).
pub struct CountingComm<'a> {
    inner: &'a dyn Communicator,
    bytes: Cell<CollectiveBytes>,
    /// The collective being run (an all-reduce is a reduce-scatter then an all-gather,
    /// charged to the all-reduce).
    current: Cell<Kind>,
}

impl<'a> CountingComm<'a> {
    pub fn new(inner: &'a dyn Communicator) -> Self {
        CountingComm {
            inner,
            bytes: Cell::new(CollectiveBytes::default()),
            current: Cell::new(Kind::Other),
        }
    }

    /// Bytes sent since construction.
    pub fn bytes(&self) -> CollectiveBytes {
        self.bytes.get()
    }

    fn during<R>(&self, kind: Kind, f: impl FnOnce() -> R) -> R {
        let outer = self.current.get();
        // The outermost collective is charged (an all-reduce's halves are its own).
        if outer == Kind::Other {
            self.current.set(kind);
        }
        let r = f();
        self.current.set(outer);
        r
    }
}

impl Communicator for CountingComm<'_> {
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
        self.inner.sendrecv_bytes(op, to, send, from, recv)?;
        let mut b = self.bytes.get();
        let n = send.len() as u64;
        match self.current.get() {
            Kind::AllReduce => b.all_reduce += n,
            Kind::ReduceScatter => b.reduce_scatter += n,
            Kind::AllGather => b.all_gather += n,
            Kind::AllGatherFp8 => b.all_gather_fp8 += n,
            Kind::Other => b.other += n,
        }
        self.bytes.set(b);
        Ok(())
    }

    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        // Counted as "other" by size (the inner communicator moves it its own way).
        let n = self.size() as u64;
        let mut b = self.bytes.get();
        if self.rank() == root {
            b.other += buf.len() as u64 * n.saturating_sub(1);
        }
        self.bytes.set(b);
        self.inner.broadcast_bytes(buf, root)
    }

    fn barrier(&self) -> Result<()> {
        self.inner.barrier()
    }

    fn bytes_sent(&self) -> u64 {
        self.bytes.get().total()
    }

    fn abort(&self, reason: &str) -> ! {
        self.inner.abort(reason)
    }

    fn all_reduce(&self, mut buf: BufMut, op: ReduceOp) -> Result<()> {
        self.during(Kind::AllReduce, || {
            self.reduce_scatter(buf.reborrow(), op)?;
            self.all_gather(buf)
        })
    }

    fn reduce_scatter(&self, buf: BufMut, op: ReduceOp) -> Result<Range<usize>> {
        let what = "reduce_scatter";
        self.during(Kind::ReduceScatter, || match buf {
            BufMut::F32(b) => ring_reduce_scatter(self, what, b, |a, x| combine_f32(op, a, x)),
            BufMut::Bf16(b) => ring_reduce_scatter(self, what, b, |a, x| combine_bf16(op, a, x)),
            BufMut::F16(b) => ring_reduce_scatter(self, what, b, |a, x| combine_f16(op, a, x)),
            BufMut::Fp8(b, f) => {
                ring_reduce_scatter(self, what, b, |a, x| combine_fp8(f, op, a, x))
            }
        })
    }

    fn all_gather(&self, buf: BufMut) -> Result<()> {
        let kind = match buf {
            BufMut::Fp8(..) => Kind::AllGatherFp8,
            _ => Kind::AllGather,
        };
        self.during(kind, || match buf {
            BufMut::F32(b) => ring_all_gather(self, "all_gather", b),
            BufMut::Bf16(b) => ring_all_gather(self, "all_gather", b),
            BufMut::F16(b) => ring_all_gather(self, "all_gather", b),
            BufMut::Fp8(b, _) => ring_all_gather(self, "all_gather", b),
        })
    }
}
