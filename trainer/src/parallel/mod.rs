//! Data-parallel training and FP8 ZeRO (`precision = "fp8-o3"`), over any
//! [`Communicator`](fp8lm_collectives::Communicator) (threads in one process, or MPI under `mpirun`).
//!
//! ## Data parallelism (every precision)
//! With N ranks and `batch = B`, the global batch is N*B rows: every rank draws the same
//! N*B-row batch from its (identical) data stream and keeps rows `r*B..(r+1)*B`. So the
//! token stream equals a single-rank run with `batch = N*B`, and so does the loss (the
//! mean of the ranks' means, which are over equal row counts). Gradients are reduced
//! group by group as the backward finishes them (see *Overlap* below):
//! - f32 gradients (all of them in fp32/bf16; the non-linear ones in FP8 modes) are
//!   averaged with the communicator's f32 ring all-reduce: a fixed summation order
//!   (`fp8lm_collectives::comm`), so every rank gets bit-identical gradients;
//! - in FP8 modes the linear layers' weight gradients, already FP8 E5M2 with a per-tensor
//!   scale when they leave the backward, are averaged by the FP8-LM all-reduce
//!   (automatic factor mu, shared minimum scale, FP8 sum, scale `N * mu * s_g`). mu is
//!   per tensor and lives in one list in tensor order (`fp8_reducer.mu`, what
//!   checkpoints store); each group's reduction borrows its tensors' entries.
//!
//! ## Overlap of the reduction with the backward
//! [`Model::backward_with`] hands out each group of gradients the moment it is final:
//! the final norm (with LLaMA's untied LM head), then block L-1 down to block 0, then
//! the embeddings (with GPT-2's tied LM head: the embedding lookup adds to its gradient
//! last, so it is final only at the very end). A group is a disjoint `&mut` borrow of
//! the flat gradient buffer (split up front with `split_at_mut`) plus the group's
//! linears, whose FP8 weight gradients are quantised before the hand-out; the backward
//! never touches it again. With overlap (`dist.overlap = "on"`, or `"auto"`, the default,
//! when it resolves to on) the backward runs
//! on a scoped thread and sends the groups over a channel to the step's own thread,
//! which owns the communicator and reduces each group (fp8-o3: agrees its scales and
//! packs it, see below) while the backward computes the earlier layers. All MPI calls stay on the thread that initialised MPI; the
//! in-process communicator (not `Sync`) never leaves its thread. The order of the
//! groups is fixed by the model, so it is the same on every rank. With
//! `dist.overlap = "off"` the same groups are reduced in the same order after the
//! backward: the same calls on the same bytes, so on and off are bit-identical (a test
//! checks it). Against the previous all-at-once reduction, only the bucketing changes:
//! each group is its own set of buckets; on 2 ranks the sums are bit-identical (two
//! addends commute), on more ranks the ring's per-element summation order may differ.
//!
//! Cost: the reducing thread competes with the backward for cores. The in-process
//! communicator sleeps while it waits; MPI busy-polls, so under `mpirun` on a host whose
//! cores the ranks' compute threads already fill, overlap can lengthen the step even
//! though it hides most of the communication (`fp8lm bench train --dist` reports both;
//! `--mca mpi_yield_when_idle 1` and fewer compute threads per rank help). Hence `auto`:
//! on for the in-process communicator, and under MPI only when the host has a core
//! beyond `local ranks x compute threads` ([`crate::config::Overlap::resolve`]; rank 0
//! logs the decision).
//!
//! What the step waits for (`StepStats::comm_exposed`) is the reduction still running
//! when the backward ends (at least the embedding group, final only then), the loss
//! all-reduce, and for fp8-o3 everything after the packing. A panic in the backward
//! thread closes the channel; the step returns an error naming the rank (under MPI the
//! panic hook aborts the job first); a failed reduction stops the reducing, lets the
//! backward finish and returns the error: no rank waits forever.
//!
//! The global gradient norm, the skip decision and clipping then use the reduced
//! gradients, and every rank runs the same optimizer on the same inputs, so the
//! replicas stay bit-identical without broadcasting weights.
//!
//! ## FP8 ZeRO (fp8-o3)
//! Master weights and optimizer state (the FP8-LM optimizer's 6 bytes/param) are
//! partitioned: [`fp8lm_optim::zero`] cuts tensors larger than 1/(8N) of the model into
//! row blocks (each keeps one scale) and assigns whole units greedily, largest first, to
//! the least-loaded rank. Every rank computes the same partition without communication.
//! A step then does:
//! 1. scale agreement for the FP8 weight gradients (one vector all-reduce, Min, per
//!    group of final gradients, overlapped with the backward like the replicated
//!    reduction), and re-quantisation to `mu * s_g` (FP8-LM);
//! 2. *reduce to the owner*: each rank packs the gradients of the units owned by rank q
//!    into segment q of one buffer (segments padded to the largest; packing, too, is
//!    done group by group during the backward), and after the backward one ring
//!    reduce-scatter leaves each rank exactly its own segment, summed: FP8 bytes for the
//!    linear weights, f32 for the rest. This sends `(N-1)/N` of a buffer per rank, half
//!    of an all-reduce;
//! 3. saturation counts of the FP8 sums (one small all-reduce) so every rank updates the
//!    same mu; the global gradient norm (one scalar all-reduce);
//! 4. each owner runs `Fp8Adam` on its units only;
//! 5. the owners share what the compute reads, through one all-gather of per-owner
//!    segments: each FP8 linear unit's E4M3 bytes, which the owner's update wrote from
//!    the new FP16 master in the same fused pass (as fp8-o2's optimizer writes them),
//!    with their scale, amax and counts; GPT-2's tied embedding also as its FP16 master
//!    (the lookup reads it); f32 for the rest. Every rank (the owner included) copies
//!    the same bytes in, so the replicas stay bit-identical, and no rank holds an f32
//!    copy of the masters (`Zero::update_and_share_e4m3`). With the block recipe
//!    (weights cast tile by tile in the forward) and on a D x T grid the owners
//!    instead all-gather the FP16 masters (power-of-two per-unit scale, exact) into
//!    every rank's f32 view (`Zero::share_weights`).
//!
//! ## Not done
//! fp8-o3 overlaps only its steps 1 and 2 (scale agreement and packing, group by group as
//! the backward finishes them); the reduce-scatter to the owners still starts when the
//! whole backward is done. Per-group reduce-scatters would give the same bits (the ring
//! sums each owner's segment in the same order whatever the buffer length), but a
//! group's units are not balanced across owners, so padding each group's segments to
//! its most loaded owner would send up to N times the bytes; that needs a
//! reduce-to-owner primitive or a partition balanced within each group first.
//!
//! ## Checkpoints
//! Replicated precisions checkpoint rank 0's state (all ranks hold the same). fp8-o3
//! checkpoints are sharded ([`crate::checkpoint::shard`]): every rank streams its own
//! units' state to its own file, rank 0 adds the model and the index; a resume reads,
//! per rank, only the ranges of the units it owns under its partition, re-partitioned
//! when the rank count changed ([`crate::repartition`]). At start-up
//! ([`Trainer::new_for_ranks`](crate::Trainer::new_for_ranks)) a rank builds only its own share, so no rank ever holds
//! the whole optimizer state, nor (`zero_start`) the whole model in f32: fresh, it draws
//! each tensor in turn and keeps its units' masters; resumed, it reads the model group's
//! f32 tensors only, by range, the linears' weights being the owners' masters. ([`Trainer::gather_optimizer_state`](crate::Trainer::gather_optimizer_state) still gathers it, for
//! tests and tools; `fp8lm train` does not call it.)
//!
//! ## Map
//! - [`step`]: the one step path (`Trainer::train_step` on one rank,
//!   `Trainer::train_step_dist` on many, `Trainer::train_step_tp` / `train_step_dxt` on
//!   a tensor-parallel rank: all `Trainer::train_step_on`);
//! - `grad_sync`: replicated precisions' per-group reduction (FP8-LM all-reduce, f32
//!   ring mean);
//! - `zero`: fp8-o3's partition, packing of owner segments, reduce-scatter, owner update,
//!   master all-gather;
//! - `zero_dxt`: fp8-o3 on a D x T grid (ZeRO over each data-parallel subgroup of
//!   tensor-parallel shards);
//! - `overlap`: the backward on a scoped thread handing finished groups to the
//!   communicator's thread; `dist.overlap = "auto"`;
//! - `setup`: `enable_data_parallel*` (config agreement, plans, this rank's share, resume
//!   from whole or sharded state), accessors, the checkpointed `extra` state;
//! - `zero_start`: what an fp8-o3 rank built for several ranks draws at a fresh start
//!   (each tensor in turn, keeping only its units' masters) and reads on resume (only
//!   the f32 tensors of the model group, by range): no whole f32 model on any rank;
//! - `bench`: the whole data-parallel loop and `fp8lm bench train --dist`.

mod bench;
mod grad_sync;
mod overlap;
mod setup;
pub mod step;
mod zero;
mod zero_dxt;
pub(crate) mod zero_start;

pub use bench::{
    bench_train_dist, bench_train_dist_table, bench_train_grid, bench_train_grid_table,
    train_data_parallel, DistBench, GridBench,
};
pub use overlap::{mpi_local_ranks, rank_cores};
pub use setup::ZeroState;
pub use zero::{zero_imbalance_table, zero_partition, zero_partition_with};

use crate::model::Model;
use anyhow::anyhow;
use fp8lm_collectives::{GradAllReducer, GradTally};
use fp8lm_fp8::{Fp8Format, ScaledFp8};
use grad_sync::GroupPlan;
use std::ops::Range;
use zero::Zero;

/// Per-rank data-parallel state held by the [`Trainer`](crate::Trainer) (the communicator itself is
/// passed to each call: it is not `Send`, and tests borrow it from `run_ranks`).
pub struct DistState {
    pub rank: usize,
    pub size: usize,
    /// The global batch `[N*B, T]`, of which this rank keeps its rows.
    global_inputs: Vec<u32>,
    global_targets: Vec<u32>,
    /// FP8-LM all-reduce of the FP8 weight gradients (holds mu per tensor).
    fp8_reducer: GradAllReducer,
    /// f32 all-reduce of the other gradients.
    f32_reducer: GradAllReducer,
    /// What to reduce for each group of gradients, in the order the backward finishes
    /// them (`Model::grad_groups`).
    groups: Vec<GroupPlan>,
    /// `dist.overlap`: reduce groups while the backward runs.
    overlap: bool,
    /// Test hook: the backward panics when it finishes this many groups
    /// ([`Trainer::inject_backward_panic`]).
    panic_after_groups: Option<usize>,
    zero: Option<Zero>,
    /// The last step's FP8 gradient reductions: mu, overflow, underflow (metrics).
    tally: GradTally,
}

const WGRAD: Fp8Format = crate::model::WGRAD_FORMAT;
const F16_MAX: f32 = 65504.0;

fn comm_err(e: fp8lm_collectives::CommError) -> anyhow::Error {
    anyhow!("{e}")
}

/// The FP8 weight gradient of tensor `t`, if it has one.
fn fp8_wgrad(model: &Model, t: usize) -> Option<&ScaledFp8> {
    model.linear_of_tensor[t]
        .and_then(|li| model.linears[li].fp8.as_ref())
        .map(|f| &f.wgrad)
}

/// Disjoint mutable views `buf[r]` for ascending, non-overlapping `ranges`.
fn slices_mut<'a>(buf: &'a mut [f32], ranges: &[Range<usize>]) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(ranges.len());
    let (mut rest, mut base) = (buf, 0);
    for r in ranges {
        let (_, tail) = rest.split_at_mut(r.start - base);
        let (mid, tail) = tail.split_at_mut(r.len());
        out.push(mid);
        rest = tail;
        base = r.end;
    }
    out
}
