//! The `Communicator` trait and the ring algorithms every backend shares.
//!
//! A backend supplies only point-to-point exchange, broadcast and barrier; all reductions
//! are the ring algorithms below, written once over [`Communicator::sendrecv_bytes`]. So
//! the in-process and the MPI backend perform the same hops in the same order and produce
//! bit-identical results for the same rank count, in every element type.
//!
//! ## Summation order (all element types, all ops)
//! A buffer of `len` elements is cut into `N` chunks, chunk `c` being
//! [`chunk_range`]`(len, N, c)` = `c*len/N .. (c+1)*len/N`. Reduce-scatter runs `N-1`
//! steps around the ring `r -> r+1`; chunk `c` starts at rank `c+1` and each rank on
//! its way adds its own value to the partial result it received, so an element of chunk
//! `c` is
//!
//! ```text
//! (((x[c+1] + x[c+2]) + x[c+3]) + ... ) + x[c]        (indices mod N)
//! ```
//!
//! with each `+` rounded to the buffer's type (see [`crate::buf`]). Rank `c` then holds
//! the finished chunk `c`, and the all-gather passes finished chunks around unchanged.
//! [`reference_all_reduce`] computes the same thing serially; tests compare against it.
//!
//! Bytes sent per rank by an all-reduce: `2 (N-1)/N * len * sizeof(T)` (plus nothing
//! else), the bandwidth-optimal figure.

use crate::buf::{
    combine_bf16, combine_f16, combine_f32, combine_fp8, elem_bytes, elem_bytes_mut, BufMut, Pod,
    ReduceOp,
};
use crate::error::{CommError, Result};
use crate::fp8sum::{requant_in_place, sum_hop, HopCounts, Requant};
use fp8lm_fp8::Fp8Format;
use std::ops::Range;

/// Elements `c*len/n .. (c+1)*len/n`: chunk `c` of `n` (sizes differ by at most one).
pub fn chunk_range(len: usize, n: usize, c: usize) -> Range<usize> {
    (c * len / n)..((c + 1) * len / n)
}

/// A group of ranks that can exchange buffers. Object safe: use `&dyn Communicator`.
///
/// Every collective must be called by all ranks of the group, in the same order, with
/// buffers of the same length and type. Failures are `Err(CommError)` naming the rank and
/// the operation; a peer that failed or left makes the waiting ranks fail too, rather than
/// hang (in-process: through the group's abort flag; MPI: through `MPI_Abort`).
pub trait Communicator {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// "local" (threads in one process) or "mpi".
    fn backend(&self) -> &'static str;

    /// Send `send` to rank `to` while receiving exactly `recv.len()` bytes from rank
    /// `from` (deadlock-free when every rank does it at once, as the ring does).
    fn sendrecv_bytes(
        &self,
        op: &str,
        to: usize,
        send: &[u8],
        from: usize,
        recv: &mut [u8],
    ) -> Result<()>;

    /// Copy `root`'s `buf` into every other rank's `buf` (same length everywhere).
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()>;

    /// Wait until every rank has reached the barrier.
    fn barrier(&self) -> Result<()>;

    /// Total payload bytes this rank has sent so far (point-to-point and broadcast).
    fn bytes_sent(&self) -> u64;

    /// Tear the whole job down with `reason` (MPI: `MPI_Abort`, exit code 1 on every
    /// rank; in-process: mark the group failed and panic this thread).
    fn abort(&self, reason: &str) -> !;

    // ---- provided: the ring algorithms -------------------------------------------

    /// In-place all-reduce. Summation order: see the module docs.
    fn all_reduce(&self, mut buf: BufMut, op: ReduceOp) -> Result<()> {
        self.reduce_scatter(buf.reborrow(), op)?;
        self.all_gather(buf)
    }

    /// In-place reduce-scatter: afterwards `buf[chunk_range(len, N, rank)]` holds the
    /// reduced values of this rank's chunk (the rest of `buf` is scratch). Returns that range.
    fn reduce_scatter(&self, buf: BufMut, op: ReduceOp) -> Result<Range<usize>> {
        let what = "reduce_scatter";
        match buf {
            BufMut::F32(b) => ring_reduce_scatter(self, what, b, |a, x| combine_f32(op, a, x)),
            BufMut::Bf16(b) => ring_reduce_scatter(self, what, b, |a, x| combine_bf16(op, a, x)),
            BufMut::F16(b) => ring_reduce_scatter(self, what, b, |a, x| combine_f16(op, a, x)),
            BufMut::Fp8(b, f) => {
                ring_reduce_scatter(self, what, b, |a, x| combine_fp8(f, op, a, x))
            }
        }
    }

    /// In-place all-gather: rank `r` contributes `buf[chunk_range(len, N, r)]`; afterwards
    /// every rank holds all chunks.
    fn all_gather(&self, buf: BufMut) -> Result<()> {
        match buf {
            BufMut::F32(b) => ring_all_gather(self, "all_gather", b),
            BufMut::Bf16(b) => ring_all_gather(self, "all_gather", b),
            BufMut::F16(b) => ring_all_gather(self, "all_gather", b),
            BufMut::Fp8(b, _) => ring_all_gather(self, "all_gather", b),
        }
    }

    /// Typed broadcast from `root`.
    fn broadcast(&self, mut buf: BufMut, root: usize) -> Result<()> {
        if root >= self.size() {
            return Err(CommError::new(
                self.rank(),
                "broadcast",
                format!("root rank {root} out of range for {} ranks", self.size()),
            ));
        }
        self.broadcast_bytes(buf.bytes_mut(), root)
    }

    /// All-reduce of one f32 (amax agreement: `Max`; shared scale: `Min`).
    fn all_reduce_scalar(&self, x: f32, op: ReduceOp) -> Result<f32> {
        let mut v = [x];
        self.all_reduce(BufMut::F32(&mut v), op)?;
        Ok(v[0])
    }

    /// Every rank's `mine` (all the same length), concatenated in rank order.
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<u8>> {
        let k = mine.len();
        let mut out = vec![0u8; k * self.size()];
        out[k * self.rank()..k * (self.rank() + 1)].copy_from_slice(mine);
        ring_all_gather(self, "all_gather_bytes", &mut out)?;
        Ok(out)
    }

    /// Check that every rank holds the same `value` (e.g. a config hash); the error names
    /// the ranks that disagree with rank 0, on every rank.
    fn agree_u64(&self, what: &str, value: u64) -> Result<()> {
        let all = self.all_gather_bytes(&value.to_le_bytes())?;
        let vals: Vec<u64> = all
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let odd: Vec<String> = vals
            .iter()
            .enumerate()
            .filter(|(_, &v)| v != vals[0])
            .map(|(r, v)| format!("rank {r} has {v:#018x}"))
            .collect();
        if odd.is_empty() {
            Ok(())
        } else {
            Err(CommError::new(
                self.rank(),
                format!("agree({what})"),
                format!(
                    "{what} differs between ranks: rank 0 has {:#018x}, {}",
                    vals[0],
                    odd.join(", ")
                ),
            ))
        }
    }
}

impl<'a> BufMut<'a> {
    /// A shorter-lived view of the same buffer (to pass it to two operations in turn).
    pub fn reborrow(&mut self) -> BufMut<'_> {
        match self {
            BufMut::F32(b) => BufMut::F32(b),
            BufMut::Bf16(b) => BufMut::Bf16(b),
            BufMut::F16(b) => BufMut::F16(b),
            BufMut::Fp8(b, f) => BufMut::Fp8(b, *f),
        }
    }
}

/// Ring reduce-scatter over `sendrecv_bytes`; `combine(acc, incoming)` sets
/// `acc = incoming op acc`. Rank `r` ends with chunk `r` reduced.
pub fn ring_reduce_scatter<T: Pod, C: Communicator + ?Sized>(
    comm: &C,
    what: &str,
    buf: &mut [T],
    combine: impl Fn(&mut [T], &[T]),
) -> Result<Range<usize>> {
    ring_reduce_scatter_with(comm, what, buf, |a, x, _, _| combine(a, x))
}

/// [`ring_reduce_scatter`] with a combine hook that sees where it is, for reductions that
/// transform or inspect the operands on the way (FP8-LM's re-quantisation and counts,
/// [`fp8_all_reduce_fused`]): `combine(acc, incoming, range, step)` sets
/// `acc = incoming op acc` on `buf[range]` at ring step `step` (`0..N-1`). At step 0 the
/// incoming values are the previous rank's own values, sent unreduced; every own value of
/// this rank is either sent at step 0 (chunk `r-1`) or is `acc` of exactly one call; the
/// call at step `N-2` produces this rank's finished chunk.
pub fn ring_reduce_scatter_with<T: Pod, C: Communicator + ?Sized>(
    comm: &C,
    what: &str,
    buf: &mut [T],
    mut combine: impl FnMut(&mut [T], &[T], Range<usize>, usize),
) -> Result<Range<usize>> {
    let (n, r, len) = (comm.size(), comm.rank(), buf.len());
    if n == 1 {
        return Ok(0..len);
    }
    let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
    with_scratch::<T, _>(len.div_ceil(n), |scratch| {
        for s in 0..n - 1 {
            let send_c = (r + 2 * n - s - 1) % n;
            let recv_c = (r + 2 * n - s - 2) % n;
            let (sr, rr) = (chunk_range(len, n, send_c), chunk_range(len, n, recv_c));
            let recv = &mut scratch[..rr.len()];
            comm.sendrecv_bytes(what, next, elem_bytes(&buf[sr]), prev, elem_bytes_mut(recv))?;
            combine(&mut buf[rr.clone()], recv, rr, s);
        }
        Ok(())
    })?;
    Ok(chunk_range(len, n, r))
}

/// One tensor of a packed FP8 buffer for [`fp8_all_reduce_fused`]: its length, FP8-LM's
/// re-quantisation of this rank's own bytes, and that of the previous rank
/// (`(rank + N - 1) % N`, whose first chunk arrives raw). `None`: bytes used as they are.
/// The previous rank's `requant` must be this rank's `prev_requant`.
#[derive(Clone, Copy, Debug)]
pub struct Fp8Segment<'a> {
    pub len: usize,
    pub requant: Option<Requant<'a>>,
    pub prev_requant: Option<Requant<'a>>,
}

/// FP8 sum all-reduce of `buf` (in place), made of consecutive `segs`, with FP8-LM's
/// re-quantisation and counts fused into the ring, so they cost no pass of their own:
/// each own byte is re-quantised through its segment's table inside the one hop that
/// uses it, except the chunk a rank sends first (step 0), which goes out raw and is
/// re-quantised by the receiver, with the sender's table, inside its hop; the final
/// reduce-scatter step counts the finished sums at +-fmt_max. The result is bit for bit
/// that of re-quantising the whole buffer first and then calling
/// [`Communicator::all_reduce`] (same ring order, module docs; tested).
///
/// `counts[i]` (one per segment) receives this rank's share of the counts: `flushed` =
/// own codes of segment i, outside the chunk sent first, that the table sent to zero;
/// `flushed_incoming` = the same for the previous rank's first chunk; `saturated` =
/// saturated sums of segment i inside this rank's finished chunk. Every element is
/// finished on exactly one rank, so the sum of `saturated` over ranks is the count on the
/// whole result; a rank's own underflow is its `flushed` plus the next rank's
/// `flushed_incoming` (the caller gathers them).
pub fn fp8_all_reduce_fused<C: Communicator + ?Sized>(
    comm: &C,
    buf: &mut [u8],
    fmt: Fp8Format,
    segs: &[Fp8Segment],
    counts: &mut [HopCounts],
) -> Result<()> {
    let total: usize = segs.iter().map(|s| s.len).sum();
    if total != buf.len() || counts.len() != segs.len() {
        return Err(CommError::new(
            comm.rank(),
            "fp8_all_reduce_fused",
            format!(
                "segments cover {total} bytes of a {}-byte buffer ({} segments, {} counters)",
                buf.len(),
                segs.len(),
                counts.len()
            ),
        ));
    }
    // offs[i]..offs[i+1] is segment i.
    let mut offs = Vec::with_capacity(segs.len() + 1);
    offs.push(0usize);
    for s in segs {
        offs.push(offs.last().unwrap() + s.len);
    }
    // Calls f(segment, piece of `range` inside it), in order.
    let pieces = |range: Range<usize>, f: &mut dyn FnMut(usize, Range<usize>)| {
        let first = offs
            .partition_point(|&o| o <= range.start)
            .saturating_sub(1);
        for i in first..segs.len() {
            let (lo, hi) = (offs[i].max(range.start), offs[i + 1].min(range.end));
            if offs[i] >= range.end {
                break;
            }
            if lo < hi {
                f(i, lo..hi);
            }
        }
    };
    let n = comm.size();
    if n == 1 {
        pieces(0..buf.len(), &mut |i, p| {
            if let Some(rq) = segs[i].requant {
                counts[i].flushed += requant_in_place(&mut buf[p.clone()], rq);
            }
            let m = fmt.max_bits();
            counts[i].saturated += crate::buf::count_magnitude_in(&buf[p], m, m);
        });
        return Ok(());
    }
    ring_reduce_scatter_with(comm, "fp8_all_reduce", buf, |acc, incoming, range, step| {
        pieces(range.clone(), &mut |i, p| {
            let local = p.start - range.start..p.end - range.start;
            let incoming_requant = if step == 0 {
                segs[i].prev_requant
            } else {
                None
            };
            counts[i] += sum_hop(
                fmt,
                &mut acc[local.clone()],
                &incoming[local],
                segs[i].requant,
                incoming_requant,
                step == n - 2,
            );
        })
    })?;
    ring_all_gather(comm, "fp8_all_reduce", buf)
}

thread_local! {
    /// The receive buffer of the reduce-scatter, kept per thread: a fresh allocation per
    /// call costs a page fault per 4 KiB, as much as the reduction itself on large buffers.
    static SCRATCH: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Run `f` on a reused per-thread buffer of `n` elements of `T` (contents unspecified).
fn with_scratch<T: Pod, R>(n: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    assert!(std::mem::align_of::<T>() <= 8);
    let words = (n * std::mem::size_of::<T>()).div_ceil(8);
    SCRATCH.with(|cell| {
        // A nested use (not done by this crate) would get a fresh buffer instead.
        let mut taken = cell.take();
        if taken.len() < words {
            taken = vec![0u64; words];
        }
        // SAFETY: u64 storage is 8-aligned and large enough; T is Pod, any bits are valid.
        let view = unsafe { std::slice::from_raw_parts_mut(taken.as_mut_ptr().cast::<T>(), n) };
        let r = f(view);
        cell.replace(taken);
        r
    })
}

/// Ring all-gather over `sendrecv_bytes`: rank `r` contributes chunk `r`.
pub fn ring_all_gather<T: Pod, C: Communicator + ?Sized>(
    comm: &C,
    what: &str,
    buf: &mut [T],
) -> Result<()> {
    let (n, r, len) = (comm.size(), comm.rank(), buf.len());
    if n == 1 {
        return Ok(());
    }
    let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
    for s in 0..n - 1 {
        let send_c = (r + n - s) % n;
        let recv_c = (r + 2 * n - s - 1) % n;
        let (sr, rr) = (chunk_range(len, n, send_c), chunk_range(len, n, recv_c));
        // Different chunks never overlap: receive straight into place.
        let (send, recv) = disjoint(buf, sr, rr);
        comm.sendrecv_bytes(what, next, elem_bytes(send), prev, elem_bytes_mut(recv))?;
    }
    Ok(())
}

/// `(&buf[a], &mut buf[b])` for non-overlapping ranges.
fn disjoint<T>(buf: &mut [T], a: Range<usize>, b: Range<usize>) -> (&[T], &mut [T]) {
    assert!(a.end <= b.start || b.end <= a.start, "overlapping chunks");
    if a.end <= b.start {
        let (lo, hi) = buf.split_at_mut(b.start);
        (&lo[a], &mut hi[..b.end - b.start])
    } else {
        let (lo, hi) = buf.split_at_mut(a.start);
        (&hi[..a.end - a.start], &mut lo[b])
    }
}

/// Serial reference of the ring all-reduce: the exact order of the module docs, for
/// `inputs[rank]`. Used by tests to check backends bit for bit.
pub fn reference_all_reduce<T: Pod>(inputs: &[Vec<T>], combine: impl Fn(&mut [T], &[T])) -> Vec<T> {
    let n = inputs.len();
    let len = inputs[0].len();
    let mut out = vec![T::default(); len];
    for c in 0..n {
        let range = chunk_range(len, n, c);
        let mut acc = inputs[(c + 1) % n][range.clone()].to_vec();
        for k in 2..=n {
            let own = &inputs[(c + k) % n][range.clone()];
            // The hop's combine is op(incoming partial, own value) written into `own`'s slot.
            let mut slot = own.to_vec();
            combine(&mut slot, &acc);
            acc = slot;
        }
        out[range].copy_from_slice(&acc);
    }
    out
}
