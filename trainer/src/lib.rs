//! # fp8lm-trainer: model, data, training loop
//!
//! Owns the GPT model (explicit forward and backward per layer, written once against the
//! `fp8lm-kernels` op set), the precision modes (fp32, bf16, FP8 O1/O2/O3), data sources
//! and tokenizers, the training loop, checkpoints and metrics.
//!
//! ## The training engine, for the run loop, checkpoints and metrics
//! - [`Trainer::new`]`(&cfg, vocab)` builds the model (seeded init) and the precision's
//!   optimizer: fp32 AdamW (fp32, bf16, fp8-o1), `Fp8Adam` (fp8-o2: built tensor by
//!   tensor with the model, whose linears then compute with the E4M3 weights it writes;
//!   fp8-o3: over f32 weights, replaced by the rank's ZeRO share under data
//!   parallelism). Config errors name the key. [`Trainer::set_optimizer`] swaps in
//!   another optimizer.
//! - [`Trainer::train_step`]`(&mut dyn Dataset)` -> [`StepStats`] (loss, grad norm, lr,
//!   skipped, tokens, forward/backward/optimizer/GEMM times). Non-finite steps are
//!   skipped, never applied.
//! - [`Trainer::evaluate`]`(&dyn Dataset, batches)`: mean validation loss.
//! - [`Trainer::sample`]`(prompt, n, temperature, seed)`: continuation tokens.
//! - State: [`Trainer::model`] (`named_params`, `set_param`), `optimizer().export_state()`,
//!   [`Trainer::step`]/[`Trainer::set_step`], [`Trainer::rng`], and the FP8 scaling states
//!   with their cast statistics ([`Trainer::fp8_tensors`], [`Trainer::fp8_scale_states_mut`]).
//! - [`bench::bench_train`]: the `fp8lm bench train` measurements.
//! - Data parallelism and FP8 ZeRO ([`distributed`]): [`Trainer::enable_data_parallel`]
//!   `(&dyn Communicator)` (config hash agreement; fp8-o3 partitions the optimizer),
//!   then [`Trainer::train_step_dist`]`(data, comm)` on every rank; [`Trainer::rank`],
//!   [`Trainer::is_root`], [`Trainer::zero_rank_bytes`]. [`distributed::train_data_parallel`]
//!   is the whole loop `fp8lm train` runs under `mpirun`.

pub mod compare;
pub mod config;
pub mod config_file;
pub mod data;
pub mod parallel;
/// The former name of [`parallel`], kept so existing paths resolve.
pub use parallel as distributed;
pub mod eval;
pub mod model;
pub mod rng;
pub mod train;

pub use config::{Arch, ConfigError, ModelConfig, Precision, RunConfig};
pub use config_file::{load_config, load_config_str};
pub mod agreement;
pub mod bench;
pub mod block_scales;
pub mod checkpoint;
/// The former path of [`checkpoint::stream`], kept so existing paths resolve.
pub use checkpoint::stream as ckpt_stream;
pub mod memory;
pub mod metrics;
pub mod plot;
pub mod plot_fp8;
pub mod preflight;
pub mod repartition;
pub mod resume;
pub mod snapshot;
pub mod tensor_parallel;
pub mod tokenizer;
pub use train::{StepStats, Trainer};
