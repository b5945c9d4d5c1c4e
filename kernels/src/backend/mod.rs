//! The backend seam: one trait, [`Backend`], that the model, its linear layers and the
//! trainer's step are written against, so that a backend is chosen once (at model
//! construction) and never named in model code.
//!
//! [`Backend`] is [`GemmOps`] + [`LayerOps`] + [`UpdateOps`] (the optimizer updates;
//! the trait lives in `fp8lm-optim`, next to the update rule, which is why this crate
//! depends on `optim` and not the reverse) plus what a training step needs besides
//! GEMMs and layer ops: FP8 / bf16 casts that return the amax (and the saturation and
//! underflow counts the FP8 health metrics report), FP8 and FP16 decodes, and the
//! reductions of the step (amax, sum of squares for the global gradient norm).
//!
//! # How the model holds it: `Arc<dyn Backend>`
//! Every method is object safe (no generics, no `Self` by value), so the model and each
//! `Linear` hold an `Arc<dyn Backend>` ([`BackendKind::instance`], [`default_backend`]).
//! A generic parameter (`Model<B: Backend = Cpu>`) was the alternative; it was not
//! taken because it would spread a type parameter through every type that holds a
//! model (Trainer, the data-parallel step, checkpoints, the tensor-parallel layers) for
//! no measurable gain: each call is one whole op over a tensor (microseconds to
//! milliseconds), so one indirect call per op is noise, and a run picks its backend
//! from the config at run time (`backend = "cpu" | "reference"`), which a type
//! parameter could only do through a `match` at the top of every entry point.
//!
//! # Storage
//! Today every backend works on host slices (the two CPU backends). Tensors that carry
//! their scaling live in [`crate::tensor`]: a scale and an amax stay with the bytes they
//! describe, so that a device backend can keep both on the device (a GPU backend must
//! not synchronise with the host for each tensor's amax; the host reads them only when
//! it reports metrics).
//!
//! Backends:
//! - [`crate::Cpu`]: the fast one (rayon, AVX-512/AVX2, AMX / AVX512-BF16 GEMMs);
//! - [`crate::reference::Reference`]: scalar loops on one thread, the oracle the fast
//!   one is tested against (`trainer/tests/backends.rs`, `kernels/tests/backends.rs`).

mod cpu;

use crate::gemm::blockscaled::{gemm_block_scaled_on, BlockOperand};
use crate::{GemmOps, GemmShape, LayerOps, Scaling, Tensor};
use fp8lm_fp8::block::BlockCastStats;
use fp8lm_fp8::cast::CastCounts;
use fp8lm_fp8::{Fp8Format, ScaleRounding};
use fp8lm_optim::UpdateOps;
use half::{bf16, f16};
use std::sync::Arc;

/// What an FP8 cast did: the amax of its input (unscaled, NaN if the input holds a NaN)
/// and how many values saturated / flushed to zero ([`CastCounts`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Fp8CastResult {
    pub amax: f32,
    pub counts: CastCounts,
}

/// The op set the model, `Linear` and the trainer's step call. See the module docs.
///
/// Slice lengths must match the shapes (checked with `assert!`: a programming error,
/// not an input error), as in [`GemmOps`] and [`LayerOps`].
pub trait Backend: GemmOps + LayerOps + UpdateOps + std::fmt::Debug {
    /// Short name (`cpu`, `reference`), for logs and errors.
    fn name(&self) -> &'static str;

    /// The first failure of an op since the last call, taken (a device backend's ops
    /// can fail, but the seam's methods return no `Result`: like CUDA's sticky errors,
    /// the backend keeps the first one, does nothing after it, and the trainer ends the
    /// step with it). The host backends never fail: `None`.
    fn take_error(&self) -> Option<String> {
        None
    }

    // ---- casts ----

    /// max |x| over `src` (0 for an empty slice; NaN if any element is NaN).
    fn amax_f32(&self, src: &[f32]) -> f32;

    /// `dst = fp8(src * scale)`: round to nearest even, saturating finite overflow and
    /// infinities to +-max (`CastMode::SatFinite`, the training cast), NaN stays NaN.
    /// Returns the amax of `src` and the saturation / flush counts.
    fn cast_fp8(&self, format: Fp8Format, src: &[f32], scale: f32, dst: &mut [u8])
        -> Fp8CastResult;

    /// [`Backend::cast_fp8`] into an FP8 [`Tensor`] (`dst`'s dtype gives the format;
    /// its first `src.len()` elements are written): the scale and the amax are stored
    /// with the bytes ([`crate::Scaling::PerTensor`]), where this backend keeps them.
    fn cast_fp8_tensor(&self, src: &[f32], scale: f32, dst: &mut Tensor) -> Fp8CastResult {
        let format = dst
            .dtype()
            .fp8()
            .unwrap_or_else(|| panic!("cast_fp8_tensor: tensor is {}", dst.dtype().name()));
        let (bytes, scaling) = dst.fp8_parts_mut();
        let r = self.cast_fp8(format, src, scale, &mut bytes[..src.len()]);
        *scaling = Scaling::PerTensor {
            scale,
            amax: r.amax,
        };
        r
    }

    /// [`Backend::cast_fp8_blocks`] into an FP8 [`Tensor`]: the tile scales and the amax
    /// are stored with the bytes ([`Scaling::Blocks`]).
    #[allow(clippy::too_many_arguments)]
    fn cast_fp8_blocks_tensor(
        &self,
        src: &[f32],
        rows: usize,
        cols: usize,
        tile: (usize, usize),
        rounding: ScaleRounding,
        margin: i32,
        dst: &mut Tensor,
    ) -> BlockCastStats {
        let format = dst
            .dtype()
            .fp8()
            .unwrap_or_else(|| panic!("cast_fp8_blocks_tensor: tensor is {}", dst.dtype().name()));
        let (gr, gc) = fp8lm_fp8::block::grid(rows, cols, tile);
        let (bytes, scaling) = dst.fp8_parts_mut();
        let mut scales = match std::mem::replace(scaling, Scaling::None) {
            Scaling::Blocks { scales, .. } => scales,
            _ => Vec::new(),
        };
        scales.resize(gr * gc, 1.0);
        let b = self.cast_fp8_blocks(
            format,
            src,
            rows,
            cols,
            tile,
            rounding,
            margin,
            &mut bytes[..src.len()],
            &mut scales,
        );
        *scaling = Scaling::Blocks {
            cols,
            tile,
            scales,
            amax: b.amax,
        };
        b
    }

    /// The block recipe's cast: `src[rows, cols]` to `format` with one current scale per
    /// `tile` (scales written row-major into `scales`), as `fp8lm_fp8::block`. The
    /// default runs the fp8 crate's host implementation, which every host backend shares.
    #[allow(clippy::too_many_arguments)]
    fn cast_fp8_blocks(
        &self,
        format: Fp8Format,
        src: &[f32],
        rows: usize,
        cols: usize,
        tile: (usize, usize),
        rounding: ScaleRounding,
        margin: i32,
        dst: &mut [u8],
        scales: &mut [f32],
    ) -> BlockCastStats {
        fp8lm_fp8::block::quantize_blocks(
            format, src, rows, cols, tile, rounding, margin, dst, scales,
        )
    }

    /// `dst = bf16(src)`, round to nearest even.
    fn cast_bf16(&self, src: &[f32], dst: &mut [bf16]);

    /// `dst += decode(src) / scale` (FP8 decode, e.g. an E5M2 gradient held, added to the
    /// next micro-batch's f32 gradient). With a power-of-two scale `1 / scale` is exact.
    fn add_decoded_fp8(&self, dst: &mut [f32], src: &[u8], format: Fp8Format, scale: f32);

    /// `out[r] = wte[tok] / scale (+ wpe[pos])` from an FP16 embedding table (fp8-o2's
    /// tied embedding, whose only copy is the optimizer's FP16 master); `tokens[b*t]`.
    #[allow(clippy::too_many_arguments)]
    fn encoder_forward_f16(
        &self,
        out: &mut [f32],
        tokens: &[u32],
        wte: &[f16],
        scale: f32,
        wpe: Option<&[f32]>,
        t: usize,
        c: usize,
    );

    // ---- reductions ----

    /// `sum x^2` accumulated in f64 (the global gradient norm).
    fn sum_squares_f32(&self, src: &[f32]) -> f64;

    /// `sum decode(code)^2` over FP8 codes, in f64, unscaled (divide by `scale^2`).
    /// Codes whose value is NaN or infinite make the sum NaN / infinite.
    fn sum_squares_fp8(&self, src: &[u8], format: Fp8Format) -> f64;

    /// Mean of `losses` accumulated in f64 (the step's loss).
    fn mean_f64(&self, losses: &[f32]) -> f64 {
        losses.iter().map(|&x| x as f64).sum::<f64>() / losses.len().max(1) as f64
    }

    // ---- GEMM with block-scaled operands ----

    /// [`GemmOps::gemm`] where either operand may carry one scale per tile (the block
    /// recipe). The default decodes each block-scaled operand to f32 and runs this
    /// backend's [`GemmOps::gemm`] (`gemm::blockscaled`).
    fn gemm_blocks(
        &self,
        shape: GemmShape,
        a: BlockOperand<'_>,
        b: BlockOperand<'_>,
        c: &mut [f32],
        accumulate: bool,
    ) {
        gemm_block_scaled_on(self, shape, a, b, c, accumulate)
    }
}

/// The backends a run can choose (`backend` in the run config).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendKind {
    /// [`crate::Cpu`], the default.
    #[default]
    Cpu,
    /// [`crate::reference::Reference`], the scalar oracle (slow: tests and debugging).
    Reference,
}

impl BackendKind {
    /// The accepted names, for error messages.
    pub const ALLOWED: &'static str =
        "\"cpu\" (the default, fast) or \"reference\" (scalar oracle, slow)";

    /// `"cpu"` or `"reference"`; `Err` says what is allowed.
    pub fn parse(s: &str) -> Result<BackendKind, &'static str> {
        match s {
            "cpu" => Ok(BackendKind::Cpu),
            "reference" => Ok(BackendKind::Reference),
            _ => Err(Self::ALLOWED),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Reference => "reference",
        }
    }

    /// A handle to this backend (both are stateless, so handles are cheap).
    pub fn instance(self) -> Arc<dyn Backend> {
        match self {
            BackendKind::Cpu => Arc::new(crate::Cpu),
            BackendKind::Reference => Arc::new(crate::reference::Reference),
        }
    }
}

/// The default backend ([`BackendKind::Cpu`]): what every constructor that takes no
/// backend uses.
pub fn default_backend() -> Arc<dyn Backend> {
    static DEFAULT: std::sync::OnceLock<Arc<dyn Backend>> = std::sync::OnceLock::new();
    DEFAULT
        .get_or_init(|| BackendKind::default().instance())
        .clone()
}
