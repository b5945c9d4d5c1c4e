//! # fp8lm-kernels: the op set, per backend
//!
//! The model (in `fp8lm-trainer`: `model::gpt`, `model::linear`) and the trainer's step
//! are written once against [`Backend`]; they hold an `Arc<dyn Backend>` chosen when
//! the model is built (`Model::new_on`, the run config's `backend` key) and never name
//! a backend type. Two backends implement it:
//! - [`Cpu`], the default: rayon, AVX-512/AVX2/portable picked at run time, FP8/bf16
//!   GEMMs on AMX or AVX512-BF16 when present;
//! - [`Reference`]: scalar loops on one thread, the oracle the fast one is tested
//!   against (`tests/backends.rs` here op by op, `trainer/tests/backends.rs` by
//!   training the model on both).
//!
//! The CUDA backend (`cuda` module, cargo feature `cuda`): device op methods shaped like
//! these traits, and `cuda::CudaStaged`, which implements [`Backend`] with them by
//! staging each op's host slices through device memory (`device = "cuda[:N]"` runs the
//! model on it). It has never run on a GPU (see its module docs for what is checked
//! without one).
//!
//! - [`Backend`] ([`backend`]): [`GemmOps`] + [`LayerOps`] + [`UpdateOps`] + the rest of
//!   a step: FP8 / bf16 casts returning amax and saturation / underflow counts, FP8 and
//!   FP16 decodes, sums of squares for the global gradient norm, block-scaled GEMMs.
//! - [`UpdateOps`] (defined in `fp8lm-optim`, next to the update rule; this crate
//!   depends on it, not the reverse): the optimizer updates per chunk (fp32 AdamW, the
//!   FP8-LM update with its fused E4M3 compute-weight cast, the re-scale pass). `Cpu`
//!   runs `optim`'s fused SIMD kernels ([`fp8lm_optim::HostUpdate`]), `Reference`
//!   scalar f32 loops (`reference::update`); `tests/update.rs` checks them bit for bit.
//!   The trainer passes the model's backend to `Optimizer::step_on`.
//! - [`GemmOps`]: matrix products with f32 accumulation whose operands may be f32, bf16 or
//!   scaled FP8 ([`MatRef`]). FP8 operands are decoded while packing, so the decode costs
//!   O(mk + kn), not O(mnk). Outputs f32 ([`GemmOps::gemm`], optionally `C +=`), bf16
//!   ([`GemmOps::gemm_bf16_out`]) or FP8 with the result's amax and cast counts
//!   ([`GemmOps::gemm_fp8_out`]; on the matrix units, with K in one K-block, the cast is
//!   fused into the tile store and no f32 result is written). The CPU kernel is picked at run time ([`Isa`]:
//!   AVX-512F, AVX2+FMA, or portable).
//! - [`LayerOps`]: the non-GEMM ops (embeddings, LayerNorm/RMSNorm, GELU/SwiGLU, bias,
//!   residual, rotary embeddings, causal attention, softmax cross-entropy), f32 at every
//!   precision level, forward and backward side by side in [`layers`]; generic over f32/f64
//!   so every backward is checked against finite differences in f64.
//! - [`Tensor`] ([`tensor`]): storage, shape, dtype and scaling together, so an FP8
//!   tensor's scale and amax stay with its bytes (what `Linear` keeps in FP8).
//! - [`bench`](mod@bench): GEMM throughput of ours against the `gemm` and `matrixmultiply` crates
//!   (`cargo run --release -p fp8lm-kernels --example bench_gemm`).
//!
//! Storage is host memory today (both backends run on the CPU): op arguments are host
//! slices with explicit shapes; [`tensor::Storage`] has room for a device variant.

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

pub use fp8lm_optim::UpdateOps;
pub use gemm::{
    path_calls, set_path_override, GemmOps, GemmPath, GemmShape, Isa, MatRef, PathCalls,
};
pub use layers::LayerOps;

/// The CPU backend (multithreaded with rayon).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;
