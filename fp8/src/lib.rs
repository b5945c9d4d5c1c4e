//! # fp8lm-fp8: the numbers
//!
//! Owns everything about FP8 as a number format, independent of any kernel or model:
//!
//! - [`E4M3`] and [`E5M2`]: the OCP 8-bit float formats, with scalar casts that are the
//!   bit-exact reference for the whole project (round to nearest even; saturating and
//!   non-saturating variants; NaN preserved).
//! - [`cast`]: bulk casts over slices that also return the amax in the same pass.
//! - [`ScaledFp8`] / [`ScaledF16`]: tensors of low-precision values with one f32 scale,
//!   `real = stored / scale`.
//! - [`scaling`]: how scales are chosen (current or delayed amax, power-of-two or exact).
//!
//! Why a crate of its own: every other crate (GEMM packing, the FP8 all-reduce, the
//! optimizer's FP8 moments, checkpoints) must agree on these bits exactly, so they are
//! defined once here and tested exhaustively.

pub mod cast;
pub mod format;
pub mod scaled;
pub mod scaling;

pub use format::{CastMode, Fp8Format, E4M3, E5M2};
pub use scaled::{ScaledF16, ScaledFp8};
pub use scaling::{scale_for_amax, Quantized, ScaleRounding, ScaleState, ScalingRecipe};
