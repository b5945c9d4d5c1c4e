//! # fp8lm-optim: optimizers and the ZeRO partitioner
//!
//! Owns the parameter update and everything it keeps between steps:
//! - [`adamw`]: the fp32 AdamW reference (16 bytes/parameter with f32 weights and
//!   gradients);
//! - [`fp8_adam`]: the FP8-LM optimizer (FP16 master weights, FP8 E4M3 first moment,
//!   FP16 second moment, FP8 gradients: 6 bytes/parameter), each state with a per-tensor
//!   power-of-two scale from its new amax, updated in one fused, vectorised pass; its
//!   formats are configurable for ablations;
//! - [`lanes`]: the branch-free FP8/FP16 casts that pass is built from (bit-identical to
//!   the `fp8` crate's and `half`'s);
//! - [`zero`]: the greedy whole-tensor partitioner FP8-LM's ZeRO uses (tensors are not
//!   split across ranks, so each keeps its own scale; oversized ones can be cut into row
//!   blocks with a scale each);
//! - [`update`]: [`UpdateOps`], the seam between the rule and the arithmetic: every
//!   chunk of an update (AdamW's, the FP8-LM fused pass, its re-scale pass, the E4M3
//!   compute-weight cast) is one call on the backend given to [`Optimizer::step_on`]
//!   (the trainer gives its model's `kernels::Backend`, which includes this trait);
//!   [`HostUpdate`] is this crate's fused SIMD implementation (what the `Cpu` backend
//!   runs, and what [`Optimizer::step`] / [`Optimizer::step_to`] use). The rule's own
//!   bookkeeping (amax predictions, scales, deferral, checkpoints) stays here;
//! - [`experiment`] and [`bench`](mod@bench): the convex problems the numerics tests and ablation
//!   example share, and the step-time benchmark (`examples/bench_optim.rs`).
//!
//! The trainer owns the model's compute weights; an optimizer reads gradients, updates
//! its own state and writes new compute weights where the model keeps them
//! ([`ParamOut`]): f32 buffers (for the FP8 optimizer exactly the f32 view of its FP16
//! master) or, for fp8-o2's linears, an FP8 E4M3 copy the optimizer casts from each
//! chunk of the new master in the same fused pass (no f32 copy of the weights exists).

pub mod adamw;
pub mod api;
pub mod bench;
pub mod experiment;
pub mod fp8_adam;
pub mod lanes;
pub mod update;
pub mod zero;

pub use adamw::AdamW;
pub use api::{
    AdamWHyper, Fp8Out, Fp8Written, Grad, Optimizer, ParamMeta, ParamOut, StateBytes, StateRef,
    StateTensor,
};
pub use fp8_adam::{Fp8Adam, Fp8AdamConfig, Fp8AdamStats, StateFormat};
pub use update::{HostUpdate, UpdateOps};
