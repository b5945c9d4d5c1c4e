//! The optimizer interface shared by the trainer, checkpoints and ZeRO.

use crate::update::{HostUpdate, UpdateOps};
use fp8lm_fp8::{Fp8Format, ScaleRounding, ScaledFp8};
use half::f16;

/// What the optimizer needs to know about one parameter tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamMeta {
    pub name: String,
    pub shape: Vec<usize>,
    /// Weight decay applies (matrices yes; biases, norms' gains no).
    pub weight_decay: bool,
}

impl ParamMeta {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// AdamW hyper-parameters (the learning rate comes per step from the schedule).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWHyper {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWHyper {
    fn default() -> Self {
        AdamWHyper {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// A gradient as the backward pass left it.
#[derive(Clone, Copy, Debug)]
pub enum Grad<'a> {
    F32(&'a [f32]),
    /// FP8 with its scale (`real = stored / scale`).
    Fp8(&'a ScaledFp8),
}

/// Where an optimizer writes one tensor's new compute weights.
pub enum ParamOut<'a> {
    /// f32 weights: the master itself (fp32 AdamW) or the f32 view of a low-precision
    /// master.
    F32(&'a mut [f32]),
    /// An FP8 copy the layers compute with directly (fp8-o2's linear weights): no f32
    /// copy of the weights exists; the optimizer casts each chunk of the new master as it
    /// writes it.
    Fp8(Fp8Out<'a>),
}

/// An FP8 compute-weight target: `data[i] = cast(w[i] * scale)` (saturating RNE).
pub struct Fp8Out<'a> {
    pub data: &'a mut [u8],
    pub format: Fp8Format,
    /// The scale to cast with (delayed scaling: known before the update). `None`: from
    /// the new weights' own amax, `scale_for_amax(format.max(), amax, margin, rounding)`,
    /// keeping `fallback` when that has none (zero or non-finite amax).
    pub scale: Option<f32>,
    pub margin: i32,
    pub rounding: ScaleRounding,
    pub fallback: f32,
    /// Filled by the optimizer: what the cast did.
    pub written: Option<Fp8Written>,
}

/// What writing an [`Fp8Out`] did: the scale used, the amax of the (unscaled) f32
/// weights, values that saturated and nonzero values that flushed to zero.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Fp8Written {
    pub scale: f32,
    pub amax: f32,
    pub saturated: u64,
    pub flushed: u64,
}

/// One piece of optimizer state, as checkpoints store it.
#[derive(Clone, Debug, PartialEq)]
pub enum StateTensor {
    F32(Vec<f32>),
    F16 { data: Vec<f16>, scale: f32 },
    Fp8(ScaledFp8),
    Scalar(f64),
}

/// A borrowed view of one piece of optimizer state ([`Optimizer::visit_state`]).
#[derive(Clone, Copy, Debug)]
pub enum StateRef<'a> {
    F32(&'a [f32]),
    F16 { data: &'a [f16], scale: f32 },
    Fp8(&'a ScaledFp8),
    Scalar(f64),
}

impl StateTensor {
    pub fn as_ref(&self) -> StateRef<'_> {
        match self {
            StateTensor::F32(v) => StateRef::F32(v),
            StateTensor::F16 { data, scale } => StateRef::F16 {
                data,
                scale: *scale,
            },
            StateTensor::Fp8(t) => StateRef::Fp8(t),
            StateTensor::Scalar(x) => StateRef::Scalar(*x),
        }
    }
}

/// Bytes of optimizer state by kind, for memory ledgers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateBytes {
    /// Master weights held by the optimizer (0 when the model's f32 weights are the master).
    pub master: usize,
    pub exp_avg: usize,
    pub exp_avg_sq: usize,
    /// Per-tensor scales, amaxes, step counters.
    pub scalars: usize,
}

impl StateBytes {
    pub fn total(&self) -> usize {
        self.master + self.exp_avg + self.exp_avg_sq + self.scalars
    }
}

/// A parameter update rule with its state.
pub trait Optimizer: Send {
    /// Update every tensor on the backend `ops` runs the update kernels on
    /// ([`crate::UpdateOps`]; the trainer passes its model's backend): `outs[i]`
    /// receives tensor `i`'s new compute weights (f32, updated in place, or an FP8 copy),
    /// `grads[i]` is its gradient. Every gradient is multiplied by `grad_scale` first
    /// (clipping and loss-scale undo are folded into it). Only optimizers that hold a
    /// master of their own can write FP8 compute weights; the others panic on an FP8
    /// target (a programming error of the caller).
    fn step_on(
        &mut self,
        ops: &dyn UpdateOps,
        outs: &mut [ParamOut<'_>],
        grads: &[Grad<'_>],
        lr: f32,
        grad_scale: f32,
    );
    /// [`Optimizer::step_on`] on the host kernels ([`HostUpdate`]) with f32 weights.
    fn step(&mut self, params: &mut [&mut [f32]], grads: &[Grad<'_>], lr: f32, grad_scale: f32) {
        let mut outs: Vec<ParamOut<'_>> = params.iter_mut().map(|p| ParamOut::F32(p)).collect();
        self.step_on(&HostUpdate, &mut outs, grads, lr, grad_scale)
    }
    /// [`Optimizer::step_on`] on the host kernels ([`HostUpdate`]).
    fn step_to(&mut self, outs: &mut [ParamOut<'_>], grads: &[Grad<'_>], lr: f32, grad_scale: f32) {
        self.step_on(&HostUpdate, outs, grads, lr, grad_scale)
    }
    /// Write the FP8 compute weights (`ParamOut::Fp8` targets; f32 targets are left as
    /// they are) from the current master without updating it (after construction, a
    /// checkpoint restore, or a skipped step whose forward moved a delayed scale).
    /// Optimizers whose f32 weights are the master have nothing to do.
    fn write_compute_weights(&self, outs: &mut [ParamOut<'_>]) -> Result<(), String> {
        self.write_compute_weights_on(&HostUpdate, outs)
    }
    /// [`Optimizer::write_compute_weights`] with the FP8 casts on the backend `ops`
    /// (the model passes its own, `Model::write_compute_weights`).
    fn write_compute_weights_on(
        &self,
        ops: &dyn UpdateOps,
        outs: &mut [ParamOut<'_>],
    ) -> Result<(), String> {
        let _ = (ops, outs);
        Ok(())
    }
    /// The FP16 master of tensor `i` and its scale (`real = stored / scale`), when the
    /// optimizer keeps one (the layers read it where no compute copy exists, e.g. the
    /// embedding lookup of fp8-o2's tied embedding).
    fn master_f16(&self, i: usize) -> Option<(&[f16], f32)> {
        let _ = i;
        None
    }
    /// Set tensor `i`'s master from f32 values (loading weights only, e.g. for
    /// evaluation), when the optimizer keeps the master.
    fn load_master(&mut self, i: usize, values: &[f32]) -> Result<(), String> {
        let _ = (i, values);
        Err("this optimizer keeps no master of its own".into())
    }
    /// Bytes of state held (master weights, moments), excluding the model's own buffers.
    fn state_bytes(&self) -> usize;
    /// [`Optimizer::state_bytes`] by kind. The default suits optimizers holding two
    /// equal-sized moments and nothing else (the fp32 AdamW).
    fn state_breakdown(&self) -> StateBytes {
        let b = self.state_bytes();
        StateBytes {
            master: 0,
            exp_avg: b / 2,
            exp_avg_sq: b - b / 2,
            scalars: 0,
        }
    }
    /// Named state for checkpoints, in a stable order.
    fn export_state(&self) -> Vec<(String, StateTensor)>;
    /// [`Optimizer::export_state`]'s entries, borrowed, in the same order (checkpoints
    /// stream them to disk without copying the state).
    fn visit_state<'a>(&'a self, f: &mut dyn FnMut(&str, StateRef<'a>));
    /// Restore state written by [`Optimizer::export_state`]; errors name the offending entry.
    fn import_state(&mut self, state: Vec<(String, StateTensor)>) -> Result<(), String>;
}
