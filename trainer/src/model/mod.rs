//! The GPT model (GPT-2 and LLaMA-style blocks) with explicit forward and backward passes.
//!
//! - [`params`]: shapes ([`Dims`]), the flat parameter layout and GPT-2 init;
//! - [`linear`]: the single linear layer every GEMM goes through, per precision mode;
//! - [`gpt`]: the network, its activation arena and the forward/backward passes.
//!
//! The non-GEMM ops live in `fp8lm_kernels::layers` (they are backend ops); this module
//! wires them together.

pub mod gpt;
pub mod linear;
pub mod params;

pub use gpt::{FinalGrads, GradGroup, GradGroupSpec, Model};
pub use linear::{
    CastStats, Fp8Linear, Fp8Operand, Linear, LinearMemory, LinearPrecision, OperandBytes,
    WGRAD_FORMAT,
};
pub use params::{Dims, Layout};
