//! Tensor parallelism (Megatron-LM layout, FP8 as in FP8-LM §5): the sharded layers.
//!
//! - [`layers`]: [`ColumnParallelLinear`] (output features split over the group: qkv with
//!   its heads, the MLP's fc, the LM head) and [`RowParallelLinear`] (input features
//!   split: attention and MLP output projections): the model's own `Linear` (every
//!   precision) with its region operators, forward and backward side by side; the only
//!   tensor-parallel linears there are.
//! - [`vocab`]: [`vocab_parallel_cross_entropy`] (the LM head's logits stay sharded over
//!   the vocabulary; max and sum-exp are all-reduced); the vocabulary-parallel
//!   embedding lookup itself is [`shard::embed_forward`] / [`shard::embed_backward`].
//! - The region operators themselves (f, f̄, g, ḡ) and the FP8 all-gather of sequence
//!   parallelism are in `fp8lm_collectives::mappings`; the process grid and its
//!   sub-communicators in `fp8lm_collectives::grid`.
//!
//! A transformer block under tensor parallelism (no SP), as Megatron writes it:
//! ```text
//!   x ─ LN ─ f ─ qkv (column, heads/T) ─ attention (local heads) ─ proj (row) ─ f̄ ─ + x
//!   x ─ LN ─ f ─ fc (column, 4C/T) ─ GELU ─ proj (row) ─ f̄ ─ + x
//! ```
//! With SP, LN and the residual run on token shards, f becomes g (all-gather of the
//! E4M3 bytes of the LN output after a group amax agreement) and f̄ becomes ḡ
//! (reduce-scatter). A row-parallel layer's bias is added once, after the reduction.
//!
//! The model ([`crate::model::Model`] with a [`TpShard`]) keeps its flat parameter buffer
//! of shards and, at the Megatron points, runs its linears as [`layers`]' column- and
//! row-parallel linears and calls
//! - [`shard`]: which slice of each tensor a rank holds ([`TpShard::split`]), the
//!   vocabulary-parallel embedding (f̄), and the whole model's gradient norm;
//! - [`sp`]: the rest of sequence parallelism (norms on shards, the all-reduce of the
//!   norms' partial gradients, the gather for the embedding's backward);
//! - [`step`]: `Trainer::new_tp`; `train_step_tp` / `train_step_dxt`, the one step path
//!   (`crate::parallel::step`) with the group's communicator; the whole model's gradient
//!   norm; `evaluate_tokens_tp`;
//! - [`ckpt`]: checkpoints of the grid (one file per shard, an index) and loading them
//!   into any other layout (file layout and re-sharding rules: `crate::checkpoint::tp`).
//!
//! Status: T-way tensor parallelism with and without SP, every precision, GPT-2 and LLaMA,
//! on in-process ranks and under `mpirun -n D*T fp8lm train` (D replicas; fp8-o3 runs
//! ZeRO over each shard's D replicas), with checkpoints re-sharded on resume for any
//! D x T (one process included). With SP the column-parallel linears keep only their
//! rank's shard of their input (E4M3, f32 or bf16: the format their dW GEMM reads) and
//! all-gather it again in that format in the backward (Megatron's SP;
//! `model/linear_sp.rs`), so a rank's activations are 1/T of the T = 1 run's within 10%
//! in every precision (`plan/tests.rs`, GPT-2 C = 768, context 1024: fp32 1.015 x at
//! T = 2 and 4; bf16 and FP8 1.008 x at T = 2, 1.023 x at T = 4). Gradient accumulation
//! works on one replica, SP included (`sp::count_accumulated_once`). Not yet: resuming an
//! fp8-o3 whole-model checkpoint with T > 1.

pub mod ckpt;
pub mod layers;
pub mod shard;
pub mod sp;
pub mod step;
pub mod vocab;

pub use layers::{ColumnParallelLinear, RowParallelLinear};
pub use shard::TpShard;
pub use vocab::vocab_parallel_cross_entropy;

use std::ops::Range;

/// Part `rank` of `n` items split evenly over `size` ranks. Errors, naming the values,
/// when `size` does not divide `n` (what: e.g. "heads", "vocabulary").
pub fn even_part(what: &str, n: usize, size: usize, rank: usize) -> Result<Range<usize>, String> {
    if size == 0 || !n.is_multiple_of(size) {
        return Err(format!(
            "{what} = {n} is not divisible by dist.tensor_parallel = {size}"
        ));
    }
    let k = n / size;
    Ok(rank * k..(rank + 1) * k)
}

/// The rows of a fused qkv weight `[3C, C]` that rank `rank` of `size` holds: its heads'
/// rows of the q, k and v blocks (`heads` heads of width `C / heads`).
pub fn qkv_rows(
    c: usize,
    heads: usize,
    size: usize,
    rank: usize,
) -> Result<Vec<Range<usize>>, String> {
    let h = even_part("model.heads", heads, size, rank)?;
    let hs = c / heads;
    Ok((0..3)
        .map(|blk| blk * c + h.start * hs..blk * c + h.end * hs)
        .collect())
}
