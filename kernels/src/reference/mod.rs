//! `Reference`: the deliberately simple backend, the oracle the fast [`crate::Cpu`] one
//! is tested against (and a second implementation that proves the model is written
//! against [`crate::Backend`] only: `trainer/tests/backends.rs` trains on both).
//!
//! Everything runs on one thread (a one-thread rayon pool, so that no op this backend
//! calls fans out), with the plainest numerics available:
//! - [`gemm`]: every operand decoded element by element with the scalar, bit-exact
//!   decode of `fp8lm_fp8` (`Fp8Format::decode`, `bf16::to_f32`) and divided by its
//!   scale, then a triple loop that accumulates each output in f32 in plain k order
//!   (`acc += a * b`, k = 0, 1, ...). No packing, blocking, matrix units or FMA.
//! - [`layers`]: the layer ops evaluated in **f64** by the generic code of
//!   [`crate::layers`] (the same code whose f64 instantiation the finite-difference
//!   tests check), inputs widened exactly, outputs rounded to f32 once. So the
//!   reference of each layer op is its f32 result correctly rounded up to the f64
//!   evaluation error, not another f32 evaluation with the same rounding pattern.
//! - [`casts`]: scalar loops over `Fp8Format::encode_mode` (the reference cast the
//!   bulk SIMD casts are tested against exhaustively), `bf16::from_f32`, plain amax and
//!   sums of squares in f64.
//!
//! - [`update`]: the optimizer updates ([`fp8lm_optim::UpdateOps`]: fp32 AdamW and the
//!   FP8-LM update's chunks, the FP8 compute-weight cast) element by element with the
//!   scalar casts, in f32: the update rule is defined in f32, so these must equal the
//!   host kernels bit for bit. The optimizer calls them chunk by chunk, from its own
//!   rayon tasks; each call is a scalar loop (results do not depend on the threads).
//!
//! Slow (a scalar O(mnk) GEMM): meant for tiny models, tests and debugging
//! (`backend = "reference"`).

mod casts;
pub mod gemm;
mod layers;
pub mod update;

pub use update::update_calls;

/// The scalar, single-threaded oracle backend (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct Reference;

/// Run `f` on a one-thread rayon pool (built once), so any rayon use inside stays on
/// one thread.
pub(crate) fn single<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    use std::sync::OnceLock;
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .thread_name(|_| "fp8lm-reference".into())
            .build()
            .expect("building the reference backend's one-thread pool")
    })
    .install(f)
}
