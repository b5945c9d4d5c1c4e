//! The optimizer interface shared by the trainer, checkpoints and ZeRO.

use fp8lm_fp8::ScaledFp8;
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

/// One piece of optimizer state, as checkpoints store it.
#[derive(Clone, Debug, PartialEq)]
pub enum StateTensor {
    F32(Vec<f32>),
    F16 { data: Vec<f16>, scale: f32 },
    Fp8(ScaledFp8),
    Scalar(f64),
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
    /// Update every tensor: `params[i]` are the model's compute weights (f32), updated in
    /// place; `grads[i]` the matching gradients. Every gradient is multiplied by
    /// `grad_scale` first (clipping and loss-scale undo are folded into it).
    fn step(&mut self, params: &mut [&mut [f32]], grads: &[Grad<'_>], lr: f32, grad_scale: f32);
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
    /// Restore state written by [`Optimizer::export_state`]; errors name the offending entry.
    fn import_state(&mut self, state: Vec<(String, StateTensor)>) -> Result<(), String>;
}
