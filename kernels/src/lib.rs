//! # fp8lm-kernels: the op set
//!
//! The model (in `fp8lm-trainer`) is written once against the traits here; each backend
//! implements them. Today the model runs on one backend, [`Cpu`]. The CUDA backend
//! (`cuda` module, cargo feature `cuda`) has device op methods shaped like these traits
//! but does not implement them yet, the model does not call it, and it has never run on
//! a GPU (see its module docs for what is checked without one).
//!
//! - [`GemmOps`]: matrix products with f32 accumulation whose operands may be f32, bf16 or
//!   scaled FP8 ([`MatRef`]). FP8 operands are decoded while packing, so the decode costs
//!   O(mk + kn), not O(mnk). Outputs f32 ([`GemmOps::gemm`], optionally `C +=`), bf16
//!   ([`GemmOps::gemm_bf16_out`]) or FP8 with the result's amax
//!   ([`GemmOps::gemm_fp8_out`]). The CPU kernel is picked at run time ([`Isa`]:
//!   AVX-512F, AVX2+FMA, or portable).
//! - [`LayerOps`]: the non-GEMM ops (embeddings, LayerNorm/RMSNorm, GELU/SwiGLU, bias,
//!   residual, rotary embeddings, causal attention, softmax cross-entropy), f32 at every
//!   precision level, forward and backward side by side in [`layers`]; generic over f32/f64
//!   so every backward is checked against finite differences in f64.
//! - [`bench`](mod@bench): GEMM throughput of ours against the `gemm` and `matrixmultiply` crates
//!   (`cargo run --release -p fp8lm-kernels --example bench_gemm`).
//!
//! The seam is deliberately narrow: host slices in, host slices out, shapes explicit.

pub mod backend;
pub mod bench;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod gemm;
pub mod layers;
pub mod reference;
pub mod tensor;

pub use backend::{default_backend, Backend, BackendKind, Fp8CastResult};
pub use reference::Reference;
pub use tensor::{DType, Scaling, Storage, Tensor};

pub use gemm::{
    path_calls, set_path_override, GemmOps, GemmPath, GemmShape, Isa, MatRef, PathCalls,
};
pub use layers::LayerOps;

/// The CPU backend (multithreaded with rayon).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;
