//! The GPT model (GPT-2 and LLaMA-style blocks) with explicit forward and backward passes.
//!
//! - [`params`]: shapes ([`Dims`]), the flat parameter layout and GPT-2 init;
//! - [`linear`]: the single linear layer every GEMM goes through, per precision mode;
//! - [`gpt`]: the network (`gpt/mod.rs`: the `Model` and its construction), its
//!   activation arena (`acts.rs`), the forward (`forward.rs`) and backward
//!   (`backward.rs`) passes, and the gradients the rest of the step sees (`grads.rs`).
//!
//! Every op (GEMMs, the non-GEMM layer ops of `fp8lm_kernels::layers`, casts, amax,
//! decodes) is a backend op: the model and its linears hold one `Arc<dyn
//! fp8lm_kernels::Backend>` ([`Model::new_on`]; the default is the fast CPU backend) and
//! call nothing else, so no backend type is named in this module. It wires the ops
//! together.

pub mod gpt;
pub mod linear;
pub mod params;

pub use gpt::{FinalGrads, GradGroup, GradGroupSpec, Model};
pub use linear::{
    CastStats, Fp8Linear, Fp8Operand, Linear, LinearMemory, LinearPrecision, OperandBytes,
    WGRAD_FORMAT,
};
pub use params::{Dims, Layout};
