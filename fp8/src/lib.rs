//! # fp8lm-fp8: the numbers
//!
//! Owns everything about FP8 as a number format, independent of any kernel or model:
//!
//! - [`E4M3`] and [`E5M2`]: the OCP 8-bit float formats, with scalar casts that are the
//!   bit-exact reference for the whole project (round to nearest, ties to even; NaN
//!   stays NaN, keeping its sign). `from_f32` saturates finite overflow to +-max, and
//!   +-inf to +-max for E4M3 (no infinity) but keeps +-inf for E5M2;
//!   `from_f32_nonsaturating` turns overflow into NaN (E4M3) / +-inf (E5M2). The three
//!   overflow behaviours are named by [`CastMode`].
//! - [`cast`]: bulk casts over slices (f32/bf16/f16 -> FP8 with a scale multiply, FP8 ->
//!   f32, f32 <-> f16) that return the input's amax from the same pass
//!   (`cast::*_counted` also the saturated and flushed counts). AVX-512 (the encodes)
//!   and AVX2 (+F16C) on x86-64, chosen at run time, else a portable loop; all are
//!   bit-identical to the scalar casts on every input. Single-threaded by default (a training step casts
//!   many tensors, callers parallelise over them); `cast::par_*` split one large slice
//!   over rayon.
//! - [`ScaledFp8`] / [`ScaledF16`]: tensors of low-precision values with one f32 scale,
//!   `real = stored / scale`.
//! - [`scaling`]: how scales are chosen (current or delayed amax, power-of-two or exact
//!   ratio, margin), with counters of unusable (zero / non-finite) amax values.
//! - [`bench`](mod@bench): bulk-cast throughput rows for `fp8lm bench` and `examples/bench_cast.rs`.
//!
//! Why a crate of its own: every other crate (GEMM packing, the FP8 all-reduce, the
//! optimizer's FP8 moments, checkpoints) must agree on these bits exactly, so they are
//! defined once here and tested exhaustively (`tests/exhaustive.rs`): all 256 codes of
//! both formats against a decoder written from the spec's field definitions, and every
//! f16 and bf16 bit pattern plus a seeded f32 set (every rounding boundary of every
//! binade and its f32 neighbours, subnormals, -0, the overflow midpoints 464 and 61440,
//! inf, NaN payloads, random bits) against an encoder that picks the nearest of the 256
//! values — through the scalar API and the bulk casts on every backend.
//!
//! ## Third-party numerics, checked (`tests/float8_crate.rs`, `tests/f16_casts.rs`)
//! - `float8` 0.7: `F8E4M3/F8E5M2::from_f32` round every finite input exactly as we do;
//!   they equal our [`CastMode::SatAll`] on all non-NaN inputs, so E5M2 +-inf becomes
//!   +-max there (our `E5M2::from_f32` keeps +-inf, as the project specifies), and E5M2
//!   NaN codes carry f32 payload bits. No non-saturating cast is exposed. `to_f32` is
//!   exact on every non-NaN code; NaN codes decode to a positive NaN (sign dropped). We
//!   need our own codec anyway as the scalar twin of the SIMD kernels, so `float8` is a
//!   test-only second opinion.
//! - `half` 2.x: `f16::from_f32` rounds to nearest even with IEEE overflow to inf on the
//!   whole seeded set and at every f16 rounding boundary; F16C's `vcvtps2ph` agrees with
//!   it bit for bit, NaN payloads included. We use `half` for all f16/bf16 scalar work.

pub mod bench;
pub mod block;
pub mod cast;
pub mod format;
pub mod scaled;
pub mod scaling;

pub use format::{CastMode, Fp8Format, E4M3, E5M2};
pub use scaled::{ScaledError, ScaledF16, ScaledFp8};
pub use scaling::{
    merge_amax, scale_for_amax, Quantized, ScaleRounding, ScaleState, ScalingRecipe,
};
