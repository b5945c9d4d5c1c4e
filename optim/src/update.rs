//! The update kernels behind the backend seam: [`UpdateOps`].
//!
//! The optimizers ([`crate::AdamW`], [`crate::Fp8Adam`]) own the update *rule* and its
//! state (scales, amax predictions, deferral and re-scale fix-ups, checkpoints); the
//! per-chunk arithmetic they run is one of these trait methods, so that a backend can
//! run it. `fp8lm-kernels` implements the trait for its backends (`kernels::Backend:
//! GemmOps + LayerOps + UpdateOps`): `Cpu` by [`HostUpdate`] (the fused SIMD host code
//! of this crate), `Reference` by plain scalar loops over the `fp8` crate's scalar
//! casts. The trait lives here, where the rule lives, so `optim` does not depend on
//! `kernels` (which depends on `optim`).
//!
//! Every method works on one chunk (at most [`crate::fp8_adam::CHUNK`] elements for
//! the FP8 update, any length for AdamW) and may be called from several threads at
//! once on disjoint chunks.

use fp8lm_fp8::cast::CastCounts;
use fp8lm_fp8::Fp8Format;

pub use crate::fp8_adam::state::{ChunkMut, GradChunk};

/// Per-step constants of the AdamW update of one tensor (both optimizers).
#[derive(Clone, Copy, Debug)]
pub struct StepConsts {
    pub b1: f32,
    pub b2: f32,
    pub one_minus_b1: f32,
    pub one_minus_b2: f32,
    /// 1 / (1 - b1^t) and 1 / (1 - b2^t), computed in f64 (as the fp32 AdamW does).
    pub inv_bc1: f32,
    pub inv_bc2: f32,
    pub eps: f32,
    pub lr: f32,
    /// Weight decay of this tensor (0 when ParamMeta.weight_decay is false).
    pub wd: f32,
}

/// What one chunk of the FP8 update measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct ChunkOut {
    /// amax of the new (pre-encode) values of master, exp_avg, exp_avg_sq.
    pub amax: [f32; 3],
    pub saw_nan: bool,
    /// max |u| (the Adam direction before lr).
    pub ratio: f32,
    /// The provisional scales would have overflowed: nothing was written.
    pub deferred: bool,
}

/// The gradient of one chunk of the fp32 AdamW: f32, or FP8 codes with their scale
/// (`real = decode(code) / scale`, a division, as the AdamW has always decoded).
#[derive(Clone, Copy, Debug)]
pub enum AdamWGrad<'a> {
    F32(&'a [f32]),
    Fp8 {
        codes: &'a [u8],
        format: Fp8Format,
        scale: f32,
    },
}

impl AdamWGrad<'_> {
    pub fn len(&self) -> usize {
        match self {
            AdamWGrad::F32(g) => g.len(),
            AdamWGrad::Fp8 { codes, .. } => codes.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One chunk of the FP8-LM update ([`UpdateOps::fp8_adam_chunk`]).
///
/// `w`, `m`, `v`: master, first and second moment as stored (f32, f16 bits or FP8
/// codes); `p`: the compute weights written as the f32 view of the new master
/// (`stored / scale`); `g`: the gradient with 1/scale and grad_scale folded in
/// ([`GradChunk`]); `old_scale`: the scales the state was stored with; `scale`: the
/// (provisional) scales to store with; `limits`: when set, the formats' largest finite
/// values, and a chunk whose new amax times `scale` exceeds one is deferred (its state
/// left as it was, `p` unspecified).
pub struct Fp8AdamChunk<'a, 'b> {
    pub w: &'a mut ChunkMut<'b>,
    pub m: &'a mut ChunkMut<'b>,
    pub v: &'a mut ChunkMut<'b>,
    pub p: &'a mut [f32],
    pub g: GradChunk<'a>,
    pub k: &'a StepConsts,
    pub old_scale: [f32; 3],
    pub scale: [f32; 3],
    pub limits: Option<[f32; 3]>,
}

/// The optimizer updates a backend runs. See the module docs.
///
/// Lengths of one call's slices must agree (`assert!`: a programming error of the
/// optimizer, not an input error). Results must be those of the documented f32
/// expressions in the documented order without FMA contraction: both implementations
/// give the same bits (`kernels/tests/update.rs`), so a run's numbers do not depend on
/// its backend.
pub trait UpdateOps: Send + Sync {
    /// Name of the implementation (`host`, `reference`), for tests and logs.
    fn update_name(&self) -> &'static str;

    /// fp32 AdamW over one chunk, in place, per element in this order:
    /// ```text
    /// g = grad * grad_scale            (an FP8 grad: (decode(code) / scale) * grad_scale)
    /// m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g g
    /// u = (m inv_bc1) / (sqrt(v inv_bc2) + eps);  p = p - lr (u + wd p)
    /// ```
    fn adamw_chunk(
        &self,
        p: &mut [f32],
        m: &mut [f32],
        v: &mut [f32],
        g: AdamWGrad<'_>,
        k: &StepConsts,
        grad_scale: f32,
    );

    /// The FP8-LM fused update of one chunk ([`Fp8AdamChunk`]): decode `w, m, v, g`,
    /// the AdamW expressions of [`UpdateOps::adamw_chunk`] in f32, the chunk's amaxes,
    /// then (unless deferred) encode each state with `scale` (FP8: round to nearest
    /// even, saturating infinities too; f16: IEEE RNE) and `p = stored_w / scale`.
    fn fp8_adam_chunk(&self, c: Fp8AdamChunk<'_, '_>) -> ChunkOut;

    /// `stored = encode(decode(stored) * factor)` over one state chunk (the re-scale
    /// pass after the amax left the predicted binade; f32 states are left as they are).
    fn rescale_state(&self, c: &mut ChunkMut<'_>, factor: f32);

    /// `dst = stored * inv_scale` (f32 states: copied), the f32 view of a stored chunk
    /// (the compute weights after a re-scale of the master).
    fn decode_state(&self, c: &ChunkMut<'_>, inv_scale: f32, dst: &mut [f32]);

    /// The FP8 compute weights of one chunk: `dst = fp8(view * scale)` (RNE, finite
    /// overflow saturates: the training cast), with the amax of `view` and the counts.
    fn cast_weights_fp8(
        &self,
        format: Fp8Format,
        view: &[f32],
        scale: f32,
        dst: &mut [u8],
    ) -> (f32, CastCounts);
}

/// The host implementation: this crate's fused, vectorised update (AVX-512 / AVX2 +
/// F16C picked at run time, else bulk casts around a plain loop), what the `Cpu`
/// backend runs and what [`crate::Optimizer::step`] / [`crate::Optimizer::step_to`]
/// use when no backend is given.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostUpdate;

impl UpdateOps for HostUpdate {
    fn update_name(&self) -> &'static str {
        "host"
    }

    fn adamw_chunk(
        &self,
        p: &mut [f32],
        m: &mut [f32],
        v: &mut [f32],
        g: AdamWGrad<'_>,
        k: &StepConsts,
        grad_scale: f32,
    ) {
        crate::adamw::host_chunk(p, m, v, g, k, grad_scale)
    }

    fn fp8_adam_chunk(&self, c: Fp8AdamChunk<'_, '_>) -> ChunkOut {
        crate::fp8_adam::kernel::update_chunk(
            c.w,
            c.m,
            c.v,
            c.p,
            c.g,
            c.k,
            c.old_scale,
            c.scale,
            c.limits,
        )
    }

    fn rescale_state(&self, c: &mut ChunkMut<'_>, factor: f32) {
        c.rescale(factor)
    }

    fn decode_state(&self, c: &ChunkMut<'_>, inv_scale: f32, dst: &mut [f32]) {
        c.decode(inv_scale, dst)
    }

    fn cast_weights_fp8(
        &self,
        format: Fp8Format,
        view: &[f32],
        scale: f32,
        dst: &mut [u8],
    ) -> (f32, CastCounts) {
        fp8lm_fp8::cast::f32_to_fp8_counted(format, view, scale, dst)
    }
}
