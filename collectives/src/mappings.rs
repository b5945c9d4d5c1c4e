//! The four tensor-parallel region operators (Megatron-LM's `mappings.py`), over a
//! tensor-parallel group, on row-major activations `[rows, cols]` whose rows are tokens.
//!
//! | operator | forward | backward | where |
//! |---|---|---|---|
//! | f  [`copy_to_tp`] | identity | all-reduce | input of a column-parallel linear (no SP) |
//! | f̄  [`reduce_from_tp`] | all-reduce | identity | output of a row-parallel linear (no SP) |
//! | g  [`gather_from_sp`] | all-gather rows | reduce-scatter rows | SP region -> column-parallel linear |
//! | ḡ  [`reduce_scatter_to_sp`] | reduce-scatter rows | all-gather rows | row-parallel linear -> SP region |
//!
//! Sequence parallelism shards the *token* rows: rank `t` of the group holds rows
//! `t*R/T .. (t+1)*R/T` of the `R = B*T_seq` tokens (a contiguous block, which is exactly
//! the ring's chunk `t`, [`crate::chunk_range`], when `T` divides `R`). Only token-wise ops
//! (norms, residual adds, dropout) run on shards, so which tokens a rank holds does not
//! matter to them; the attention runs after g on all rows.
//!
//! FP8 (FP8-LM §5, the recipe's O3 note on SP): [`gather_from_sp_fp8`] casts the shard to
//! FP8 *before* g so the all-gather moves one byte per element. The scale must be the same
//! on every rank, so the amax is all-reduced (MAX) over the group first, with NaN turned
//! into +inf (a MAX reduction may drop NaN; MS-AMP does the same) — then
//! `gather(cast(shard_t))` equals `cast(gather(x))` byte for byte (tested). The backward of
//! ḡ (an all-gather of the output gradient) uses the same function in E5M2. The model's
//! FP8 linears (`fp8lm-trainer`'s `model/linear_sp.rs`) run its two steps,
//! [`sp_group_amax`] and [`gather_from_sp_fp8_cast`], with their own scaling state
//! (delayed or current) choosing the scale and their backend casting.
//! Reductions (f's backward, f̄, ḡ, g's backward) stay in f32: a sum of partial products
//! needs the precision (MS-AMP reduce-scatters the data gradient in high precision too).

use crate::buf::BufMut;
use crate::comm::{chunk_range, Communicator};
use crate::error::{CommError, Result};
use crate::ReduceOp;
use fp8lm_fp8::cast::{amax_f32, f32_to_fp8_counted, CastCounts};
use fp8lm_fp8::{scale_for_amax, Fp8Format, ScaleRounding};

fn check_rows(comm: &dyn Communicator, op: &str, full: usize, shard: usize) -> Result<()> {
    let n = comm.size();
    if full != shard * n {
        return Err(CommError::new(
            comm.rank(),
            op,
            format!(
                "shard of {shard} elements x {n} ranks != full tensor of {full} elements \
                 (the token count must divide by the tensor-parallel size)"
            ),
        ));
    }
    Ok(())
}

/// f, backward: sum the input gradient over the group (in place). Forward is identity.
pub fn copy_to_tp(comm: &dyn Communicator, grad: &mut [f32]) -> Result<()> {
    comm.all_reduce(BufMut::F32(grad), ReduceOp::Sum)
}

/// f̄, forward: sum the partial outputs of a row-parallel linear (in place). Backward is
/// identity.
pub fn reduce_from_tp(comm: &dyn Communicator, partial: &mut [f32]) -> Result<()> {
    comm.all_reduce(BufMut::F32(partial), ReduceOp::Sum)
}

/// g, forward (f32): every rank's `shard` rows, concatenated in rank order, into `full`.
pub fn gather_from_sp(comm: &dyn Communicator, shard: &[f32], full: &mut [f32]) -> Result<()> {
    check_rows(comm, "sp all_gather", full.len(), shard.len())?;
    let r = chunk_range(full.len(), comm.size(), comm.rank());
    full[r].copy_from_slice(shard);
    comm.all_gather(BufMut::F32(full))
}

/// ḡ, forward (and g's backward): sum `full` over the group and keep this rank's rows in
/// `shard`. `full` is used as scratch.
pub fn reduce_scatter_to_sp(
    comm: &dyn Communicator,
    full: &mut [f32],
    shard: &mut [f32],
) -> Result<()> {
    check_rows(comm, "sp reduce_scatter", full.len(), shard.len())?;
    let r = comm.reduce_scatter(BufMut::F32(full), ReduceOp::Sum)?;
    shard.copy_from_slice(&full[r]);
    Ok(())
}

/// What [`gather_from_sp_fp8`] did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fp8Gather {
    /// The group's shared scale (`stored = real * scale`).
    pub scale: f32,
    /// The group's amax (NaN reported as +inf).
    pub amax: f32,
    /// This rank's cast counts (its own shard only).
    pub counts: CastCounts,
}

/// g in FP8: cast this rank's `shard` with the group's shared scale and all-gather the
/// bytes into `full_fp8` (`T * shard.len()` bytes). The scale is
/// `scale_for_amax(fmt.max(), amax_group, margin, rounding)`; when the group amax is 0 or
/// not finite, `fallback_scale` (the tensor's previous scale) is used on every rank.
/// (The model's FP8 linears run the same two steps, [`sp_group_amax`] and
/// [`gather_from_sp_fp8_cast`], with their own scaling state and the backend's cast.)
pub fn gather_from_sp_fp8(
    comm: &dyn Communicator,
    fmt: Fp8Format,
    shard: &[f32],
    margin: i32,
    rounding: ScaleRounding,
    fallback_scale: f32,
    full_fp8: &mut [u8],
) -> Result<Fp8Gather> {
    check_rows(comm, "sp fp8 all_gather", full_fp8.len(), shard.len())?;
    let amax = sp_group_amax(comm, amax_f32(shard))?;
    let scale = scale_for_amax(fmt.max(), amax, margin, rounding).unwrap_or(fallback_scale);
    let counts = gather_from_sp_fp8_cast(comm, fmt, full_fp8, shard.len(), |dst| {
        f32_to_fp8_counted(fmt, shard, scale, dst).1
    })?;
    Ok(Fp8Gather {
        scale,
        amax,
        counts,
    })
}

/// g in FP8, step 1: the group's amax from each rank's shard amax `local` (MAX over the
/// group; NaN made +inf first, since a MAX may drop NaN while it keeps +inf, which then
/// selects the fallback scale). Every rank gets the whole tensor's amax, hence the same
/// scale.
pub fn sp_group_amax(comm: &dyn Communicator, local: f32) -> Result<f32> {
    let local = if local.is_nan() { f32::INFINITY } else { local };
    comm.all_reduce_scalar(local, ReduceOp::Max)
}

/// g in FP8, step 2: `cast` writes this rank's `shard_len` FP8 bytes (cast with the
/// group's scale) into its rows of `full_fp8`, then the bytes are all-gathered, one byte
/// per element. Returns what `cast` returned.
pub fn gather_from_sp_fp8_cast<R>(
    comm: &dyn Communicator,
    fmt: Fp8Format,
    full_fp8: &mut [u8],
    shard_len: usize,
    cast: impl FnOnce(&mut [u8]) -> R,
) -> Result<R> {
    check_rows(comm, "sp fp8 all_gather", full_fp8.len(), shard_len)?;
    let r = chunk_range(full_fp8.len(), comm.size(), comm.rank());
    let out = cast(&mut full_fp8[r]);
    comm.all_gather(BufMut::Fp8(full_fp8, fmt))?;
    Ok(out)
}
