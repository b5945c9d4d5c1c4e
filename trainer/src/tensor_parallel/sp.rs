//! Sequence parallelism in the model (Megatron-LM's SP with FP8-LM's FP8 converter): the
//! functions [`crate::model::Model`] calls at the boundaries between the sequence-parallel
//! region (norms, residual adds, on this rank's `n / T` token rows) and the
//! tensor-parallel region (linears, attention, on all `n` rows).
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
//! whole model's, as without SP). Without SP (`comm` `None` here) every function is the
//! plain layer or a no-op, so the T = 1 model runs exactly the code it always ran.

use crate::model::linear::Linear;
use fp8lm_collectives::mappings::{copy_to_tp, reduce_from_tp, reduce_scatter_to_sp};
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

/// A column-parallel linear's forward: under SP (`sp`: the group) the input is the shard
/// and g gathers it ([`Linear::forward_sp`]; `full` receives the f32 gather in fp32);
/// otherwise `full` is the input, as always.
#[allow(clippy::too_many_arguments)]
pub fn column_forward(
    lin: &mut Linear,
    sp: Option<&dyn Communicator>,
    out: &mut [f32],
    full: &mut [f32],
    shard: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    record: bool,
) -> Result<()> {
    match sp {
        Some(comm) => lin.forward_sp(out, shard, full, w, bias, n, record, comm),
        None => {
            lin.forward(out, full, w, bias, n, record);
            Ok(())
        }
    }
}

/// A row-parallel linear's output: f̄ (all-reduce of `partial`, then the bias once) under
/// TP; ḡ (reduce-scatter into `shard`, then the bias on it) under SP; the GEMM's own
/// output (which already holds the bias) without TP. Returns the output the residual
/// adds: `partial` or, under SP, `shard`.
pub fn row_output<'a>(
    comm: Option<&dyn Communicator>,
    sp: bool,
    partial: &'a mut [f32],
    shard: &'a mut [f32],
    bias: Option<&[f32]>,
) -> Result<&'a [f32]> {
    let Some(comm) = comm else {
        return Ok(partial);
    };
    let out = if sp {
        let k = partial.len() / comm.size();
        reduce_scatter_to_sp(comm, partial, &mut shard[..k])?;
        &mut shard[..k]
    } else {
        reduce_from_tp(comm, partial)?;
        partial
    };
    if let Some(b) = bias {
        for row in out.chunks_exact_mut(b.len()) {
            for (o, &x) in row.iter_mut().zip(b) {
                *o += x;
            }
        }
    }
    Ok(out)
}

/// A column-parallel linear's input gradient (`partial`, summed over the group): f's
/// backward (all-reduce, in place) under TP, g's backward (reduce-scatter into `shard`)
/// under SP, nothing without TP. Returns the gradient the norm below reads.
pub fn input_grad<'a>(
    comm: Option<&dyn Communicator>,
    sp: bool,
    partial: &'a mut [f32],
    shard: &'a mut [f32],
) -> Result<&'a mut [f32]> {
    match comm {
        None => Ok(partial),
        Some(comm) if sp => {
            let k = partial.len() / comm.size();
            reduce_scatter_to_sp(comm, partial, &mut shard[..k])?;
            Ok(&mut shard[..k])
        }
        Some(comm) => {
            copy_to_tp(comm, partial)?;
            Ok(partial)
        }
    }
}

/// A row-parallel linear's backward: under SP the output gradient is this rank's shard
/// `dout`, gathered by [`Linear::backward_sp`] (`scratch`: room for the f32 gather);
/// otherwise `dout` is the whole (replicated) gradient, as always.
#[allow(clippy::too_many_arguments)]
pub fn row_backward(
    lin: &mut Linear,
    sp: Option<&dyn Communicator>,
    dinp: &mut [f32],
    dw: &mut [f32],
    db: Option<&mut [f32]>,
    dout: &[f32],
    scratch: &mut [f32],
    inp: &[f32],
    w: &[f32],
    n: usize,
) -> Result<()> {
    match sp {
        Some(comm) => lin.backward_sp(dinp, dw, db, dout, scratch, inp, w, n, comm),
        None => {
            lin.backward(dinp, dw, db, dout, inp, w, n);
            Ok(())
        }
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
