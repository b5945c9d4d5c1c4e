//! # fp8lm-optim: optimizers and the ZeRO partitioner
//!
//! Owns the parameter update and everything it keeps between steps:
//! - the fp32 AdamW reference (16 bytes/parameter with f32 weights and gradients);
//! - the FP8-LM optimizer (FP16 master weights, FP8 E4M3 first moment, FP16 second
//!   moment, FP8 gradients: 6 bytes/parameter), each state with a per-tensor scale;
//! - the greedy whole-tensor partitioner FP8-LM's ZeRO uses (tensors are never split, so
//!   each keeps its own scale).
//!
//! The trainer owns the model's compute weights (f32 buffers the layers read); an
//! optimizer reads gradients, updates its own state and writes new compute weights back.

pub mod adamw;
pub mod api;

pub use adamw::AdamW;
pub use api::{AdamWHyper, Grad, Optimizer, ParamMeta, StateBytes, StateTensor};
pub mod experiment;
pub mod fp8_adam;
pub mod lanes;

pub use fp8_adam::{Fp8Adam, Fp8AdamConfig, Fp8AdamStats, StateFormat};
pub mod bench;
pub mod zero;
