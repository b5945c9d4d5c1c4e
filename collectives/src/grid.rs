//! The 2-D process grid (data parallel × tensor parallel) and its sub-communicators.
//!
//! World = D × T ranks. Tensor-parallel ranks are innermost (consecutive world ranks, so
//! on a multi-host job the T ranks that exchange activations every layer share a host):
//!
//! ```text
//!   world rank w  ->  (dp, tp) = (w / T, w % T)
//!   tensor-parallel group of w: { dp*T + t : t in 0..T }     (one row of the grid)
//!   data-parallel group of w:   { d*T + tp : d in 0..D }     (one column)
//! ```
//!
//! [`GroupComm`] is a sub-communicator: a view of a parent [`Communicator`] restricted to
//! some of its ranks, renumbered `0..len`. It forwards point-to-point exchange to the
//! parent with the ranks mapped, and every collective is the same ring code as on the
//! parent ([`crate::comm`]), so a group of the in-process backend and a group of the MPI
//! backend give bit-identical results, exactly as the world communicators do. Why a view
//! rather than `MPI_Comm_split`: the reductions are our own rings over point-to-point
//! exchange (per-hop FP8 rounding, fixed order), so a split communicator would add
//! nothing but a second code path; two ranks of a D × T grid share at most one group
//! besides the world (a row or a column, never both), and every rank issues its
//! collectives in program order, so FIFO order per pair of ranks (MPI's non-overtaking
//! rule; the in-process channels) is all the matching needed, as on the world.
//!
//! Bytes are counted per group ([`Communicator::bytes_sent`] of the group) on top of the
//! parent's count, so a step can report what each kind of collective moved.

use crate::comm::Communicator;
use crate::error::{CommError, Result};
use std::cell::Cell;

/// Shape of the process grid. Invariant: `data_parallel * tensor_parallel == world`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    pub data_parallel: usize,
    pub tensor_parallel: usize,
}

impl Grid {
    /// The grid of `world` ranks with `tensor_parallel` ranks per tensor-parallel group.
    /// Errors (naming both figures) when `tensor_parallel` is 0 or does not divide `world`.
    pub fn new(world: usize, tensor_parallel: usize) -> std::result::Result<Grid, String> {
        if tensor_parallel == 0 || world == 0 {
            return Err(format!(
                "dist.tensor_parallel = {tensor_parallel} on {world} ranks: both must be at least 1"
            ));
        }
        if !world.is_multiple_of(tensor_parallel) {
            return Err(format!(
                "dist.tensor_parallel = {tensor_parallel} does not divide the {world} ranks of \
                 the job (world = data_parallel x tensor_parallel)"
            ));
        }
        Ok(Grid {
            data_parallel: world / tensor_parallel,
            tensor_parallel,
        })
    }

    pub fn world(&self) -> usize {
        self.data_parallel * self.tensor_parallel
    }

    /// `(dp_rank, tp_rank)` of world rank `w`.
    pub fn coords(&self, w: usize) -> (usize, usize) {
        (w / self.tensor_parallel, w % self.tensor_parallel)
    }

    /// World rank at grid position `(dp, tp)`.
    pub fn rank_at(&self, dp: usize, tp: usize) -> usize {
        dp * self.tensor_parallel + tp
    }

    /// World ranks of `w`'s tensor-parallel group, in tp-rank order.
    pub fn tp_members(&self, w: usize) -> Vec<usize> {
        let (dp, _) = self.coords(w);
        (0..self.tensor_parallel)
            .map(|t| self.rank_at(dp, t))
            .collect()
    }

    /// World ranks of `w`'s data-parallel group, in dp-rank order.
    pub fn dp_members(&self, w: usize) -> Vec<usize> {
        let (_, tp) = self.coords(w);
        (0..self.data_parallel)
            .map(|d| self.rank_at(d, tp))
            .collect()
    }

    /// This rank's tensor-parallel and data-parallel sub-communicators of `world`.
    pub fn groups<'a>(
        &self,
        world: &'a dyn Communicator,
    ) -> Result<(GroupComm<'a>, GroupComm<'a>)> {
        if world.size() != self.world() {
            return Err(CommError::new(
                world.rank(),
                "grid",
                format!(
                    "grid {} x {} needs {} ranks, the communicator has {}",
                    self.data_parallel,
                    self.tensor_parallel,
                    self.world(),
                    world.size()
                ),
            ));
        }
        let w = world.rank();
        Ok((
            GroupComm::new(world, "tensor-parallel", self.tp_members(w))?,
            GroupComm::new(world, "data-parallel", self.dp_members(w))?,
        ))
    }
}

/// A sub-group of a parent communicator (see the module docs). Every member must build
/// the same group (same `members`, same order) and call its collectives in the same
/// order, as with any communicator.
pub struct GroupComm<'a> {
    parent: &'a dyn Communicator,
    name: &'static str,
    /// Parent ranks of the members; index = rank in the group.
    members: Vec<usize>,
    rank: usize,
    sent: Cell<u64>,
}

impl<'a> GroupComm<'a> {
    /// The group of `members` (parent ranks, distinct, the caller among them).
    pub fn new(
        parent: &'a dyn Communicator,
        name: &'static str,
        members: Vec<usize>,
    ) -> Result<Self> {
        let me = parent.rank();
        let err = |msg: String| CommError::new(me, format!("{name} group"), msg);
        if let Some(&bad) = members.iter().find(|&&m| m >= parent.size()) {
            return Err(err(format!(
                "member rank {bad} out of range for {} ranks",
                parent.size()
            )));
        }
        let mut sorted = members.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != members.len() {
            return Err(err(format!("members {members:?} repeat a rank")));
        }
        let rank = members
            .iter()
            .position(|&m| m == me)
            .ok_or_else(|| err(format!("rank {me} is not among the members {members:?}")))?;
        Ok(GroupComm {
            parent,
            name,
            members,
            rank,
            sent: Cell::new(0),
        })
    }

    /// Parent rank of group rank `r`.
    pub fn parent_rank(&self, r: usize) -> usize {
        self.members[r]
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    fn map(&self, op: &str, r: usize) -> Result<usize> {
        self.members.get(r).copied().ok_or_else(|| {
            CommError::new(
                self.parent.rank(),
                format!("{} {op}", self.name),
                format!(
                    "peer rank {r} out of range for a group of {}",
                    self.members.len()
                ),
            )
        })
    }
}

impl Communicator for GroupComm<'_> {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.members.len()
    }
    fn backend(&self) -> &'static str {
        self.parent.backend()
    }

    fn sendrecv_bytes(
        &self,
        op: &str,
        to: usize,
        send: &[u8],
        from: usize,
        recv: &mut [u8],
    ) -> Result<()> {
        let (pt, pf) = (self.map(op, to)?, self.map(op, from)?);
        self.parent
            .sendrecv_bytes(op, pt, send, pf, recv)
            .map_err(|mut e| {
                // Name the group, keep the world rank the parent reported.
                e.op = format!("{} group: {}", self.name, e.op);
                e
            })?;
        self.sent.set(self.sent.get() + send.len() as u64);
        Ok(())
    }

    /// A ring pass from `root` over point-to-point exchange: at step `s` the data moves
    /// from group rank `root + s` to `root + s + 1`; every other edge of the ring carries
    /// an empty message, so each step is one deadlock-free `sendrecv` on every rank.
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        let n = self.size();
        if root >= n {
            return Err(CommError::new(
                self.parent.rank(),
                format!("{} broadcast", self.name),
                format!("root rank {root} out of range for a group of {n}"),
            ));
        }
        let (next, prev) = ((self.rank + 1) % n, (self.rank + n - 1) % n);
        let pos = (self.rank + n - root) % n; // steps from the root
        for s in 0..n.saturating_sub(1) {
            let sending = pos == s;
            let receiving = pos == s + 1;
            let send: Vec<u8> = if sending { buf.to_vec() } else { Vec::new() };
            let mut empty = [0u8; 0];
            if receiving {
                self.sendrecv_bytes("broadcast", next, &send, prev, buf)?;
            } else {
                self.sendrecv_bytes("broadcast", next, &send, prev, &mut empty)?;
            }
        }
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.all_reduce_scalar(0.0, crate::ReduceOp::Sum)
            .map(|_| ())
    }

    fn bytes_sent(&self) -> u64 {
        self.sent.get()
    }

    fn abort(&self, reason: &str) -> ! {
        self.parent.abort(&format!("{} group: {reason}", self.name))
    }
}
