//! Sequence parallelism in the model (Megatron-LM's SP with FP8-LM's FP8 converter): what
//! [`crate::model::Model`] does on the sequence-parallel region (norms, residual adds, on
//! this rank's `n / T` token rows) besides the linears at its boundaries with the
//! tensor-parallel region (linears, attention, on all `n` rows), which
//! [`super::layers`]' column- and row-parallel linears own:
//!
//! ```text
//!   residual shard ─ norm ─ g ─ column-parallel ─ ... ─ row-parallel ─ ḡ ─ + residual shard
//!   g  (forward):  all-gather of the norm output: E4M3 bytes with the group's shared scale
//!                  in FP8 (`Linear::forward_sp`), f32 otherwise;
//!   g  (backward): reduce-scatter (f32) of the column-parallel input gradient;
//!   ḡ  (forward):  reduce-scatter (f32) of the row-parallel partial output, bias added once
//!                  on the shard;
//!   ḡ  (backward): all-gather of the output-gradient shard: E5M2 bytes with a shared scale
//!                  in FP8 (`Linear::backward_sp`), f32 otherwise.
//! ```
//! The norms' and row-parallel biases' gradients are then sums over this rank's rows only:
//! [`reduce_partial_grads`] all-reduces them over the group (so every rank holds the
//! whole model's, as without SP). Without SP (`comm` `None` here) every function is a
//! no-op or the plain buffer, so the T = 1 model runs exactly the code it always ran.

use crate::model::Layout;
use fp8lm_collectives::{BufMut, Communicator, ReduceOp, Result};

/// Where a norm writes: this rank's shard buffer with SP, the linear's input otherwise.
/// (`shard`'s first `len` elements: `n / T` rows.)
pub fn norm_out<'a>(
    sp: bool,
    full: &'a mut [f32],
    shard: &'a mut [f32],
    len: usize,
) -> &'a mut [f32] {
    if sp {
        &mut shard[..len]
    } else {
        full
    }
}

/// Under SP: all-reduce over the group the gradients that are sums over this rank's
/// token rows only (norm gains and shifts, row-parallel biases). A no-op otherwise.
/// `ranges`: the tensors' ranges inside `grads` (`None`s, e.g. LLaMA's absent biases, are
/// skipped).
pub fn reduce_partial_grads(
    sp: Option<&dyn Communicator>,
    grads: &mut [f32],
    ranges: &[Option<std::ops::Range<usize>>],
) -> Result<()> {
    if let Some(comm) = sp {
        for r in ranges.iter().flatten() {
            comm.all_reduce(BufMut::F32(&mut grads[r.clone()]), ReduceOp::Sum)?;
        }
    }
    Ok(())
}

/// The tensors whose gradients are partial sums over this rank's token rows under SP
/// (what the backward hands to [`reduce_partial_grads`]): the norms' gains and shifts
/// and the row-parallel linears' biases.
pub fn partial_grad_tensors(lay: &Layout) -> Vec<usize> {
    let blocks = lay.blocks.iter().flat_map(|bp| {
        [
            Some(bp.n1w),
            bp.n1b,
            Some(bp.n2w),
            bp.n2b,
            bp.projb,
            bp.fprojb,
        ]
    });
    [Some(lay.nfw), lay.nfb]
        .into_iter()
        .chain(blocks)
        .flatten()
        .collect()
}

/// Under SP, before the backward of a micro-batch after the first (`grad_accum`): the
/// partial-sum tensors' gradients hold the earlier micro-batches' sum, already reduced
/// and so the same on every rank; every rank but rank 0 zeroes it, so the all-reduce
/// after this backward adds it once to the group's new partial sums (not T times). A
/// no-op otherwise.
pub fn count_accumulated_once(sp: Option<&dyn Communicator>, grads: &mut [f32], lay: &Layout) {
    if sp.is_some_and(|c| c.rank() > 0) {
        for i in partial_grad_tensors(lay) {
            grads[lay.range(i)].fill(0.0);
        }
    }
}

/// Under SP: the f32 all-gather of this rank's rows `shard` into `full` (the embedding's
/// backward needs every token's gradient: its vocabulary shard is looked up by all of
/// them); otherwise `shard` is already whole.
pub fn gather_rows<'a>(
    sp: Option<&dyn Communicator>,
    shard: &'a [f32],
    full: &'a mut [f32],
) -> Result<&'a [f32]> {
    match sp {
        Some(comm) => {
            let n = shard.len() * comm.size();
            fp8lm_collectives::mappings::gather_from_sp(comm, shard, &mut full[..n])?;
            Ok(&full[..n])
        }
        None => Ok(shard),
    }
}
