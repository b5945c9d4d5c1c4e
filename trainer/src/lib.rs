//! # fp8lm-trainer: model, data, training loop
//!
//! Owns the GPT model (explicit forward and backward per layer, written once against the
//! `fp8lm-kernels` op set), the precision modes (fp32, bf16, FP8 O1/O2/O3), data sources
//! and tokenizers, the training loop, checkpoints and metrics.
//!
//! ## Two ways in
//! - **Your own training loop**: [`custom`] (and [`prelude`], which imports everything
//!   a loop needs): build a [`Model`](model::Model) or a single FP8
//!   [`Linear`](model::Linear), run forward/backward, update with the FP8-LM optimizer
//!   (`fp8lm_optim::Fp8Adam`), synchronise gradients across ranks with the FP8 all-reduce
//!   (`fp8lm_collectives::GradAllReducer`, wrapped by [`custom::GradSync`]), save and
//!   load checkpoints. Whole loops: `examples/custom_loop.rs` and
//!   `examples/custom_loop_dp.rs` at the repository root.
//! - **The stock loop** ([`Trainer`]), which `fp8lm train` drives.
//!
//! ## The training engine, for the run loop, checkpoints and metrics
//! - [`Trainer::new`]`(&cfg, vocab)` builds the model (seeded init) and the precision's
//!   optimizer:
//!   - fp32, bf16, fp8-o1: f32 weights, the fp32 `AdamW`;
//!   - fp8-o2 (delayed or current scaling): `Fp8Adam` built tensor by tensor with the
//!     model ([`Model::new_fp8_compute`](model::Model::new_fp8_compute)); its linears
//!     keep no f32 weights and compute with the E4M3 copies the optimizer writes from
//!     its FP16 master, and the tied embedding is read from that master;
//!   - fp8-o2 with the block recipe, and fp8-o3: f32 compute weights (the block recipe
//!     casts them tile by tile in the forward) and an `Fp8Adam` over them
//!     (`Fp8Adam::with_low_precision`: FP8-LM formats for the linears' weights, f32
//!     state for norms, biases and positions); under data parallelism fp8-o3's
//!     optimizer is then replaced by the rank's ZeRO share
//!     ([`Trainer::enable_data_parallel`]).
//!
//!   Config errors name the key. [`Trainer::set_optimizer`] swaps in another optimizer.
//! - [`Trainer::train_step`]`(&mut dyn Dataset)` -> [`StepStats`] (loss, grad norm, lr,
//!   skipped, tokens, forward/backward/optimizer/GEMM times). Non-finite steps are
//!   skipped, never applied.
//! - [`Trainer::evaluate`]`(&dyn Dataset, batches)`: mean validation loss.
//! - [`Trainer::sample`]`(prompt, n, temperature, seed)`: continuation tokens.
//! - State: [`Trainer::model`] (`named_params`, `set_param`), `optimizer().export_state()`,
//!   [`Trainer::step`]/[`Trainer::set_step`], [`Trainer::rng`], and the FP8 scaling states
//!   with their cast statistics ([`Trainer::fp8_tensors`], [`Trainer::fp8_scale_states_mut`]).
//! - [`bench::bench_train`]: the `fp8lm bench train` measurements.
//! - Data parallelism and FP8 ZeRO ([`parallel`], formerly `distributed`):
//!   [`Trainer::new_for_ranks`] (fp8-o3 on several ranks builds no optimizer state yet),
//!   [`Trainer::enable_data_parallel`]`(&dyn Communicator)` (config hash agreement;
//!   fp8-o3 partitions the optimizer and builds this rank's share), then
//!   [`Trainer::train_step_dist`]`(data, comm)` on every rank (the same step path as
//!   [`Trainer::train_step`], `parallel::step`); [`Trainer::rank`], [`Trainer::is_root`],
//!   [`Trainer::zero_rank_bytes`]. fp8-o3 checkpoints are sharded, one optimizer file per
//!   rank ([`snapshot::save_trainer_sharded`], [`checkpoint::shard`]), resumed with
//!   [`Trainer::enable_data_parallel_from_checkpoint`]. [`parallel::train_data_parallel`]
//!   is the whole loop `fp8lm train` runs under `mpirun`.

pub mod compare;
pub mod config;
pub mod config_file;
pub mod custom;
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
pub mod plan;
pub mod plot;
pub mod plot_fp8;
pub mod preflight;
pub mod repartition;
pub mod resume;
pub mod snapshot;
pub mod tensor_parallel;
pub mod tokenizer;
pub use train::{StepStats, Trainer};

/// Everything a custom training loop usually needs, in one import
/// (`use fp8lm_trainer::prelude::*;`): the model and its layers, configs and data, the
/// optimizers, the communicators and FP8 all-reduce, checkpoints, and the [`custom`]
/// facade's functions. See [`custom`] for how they fit together.
pub mod prelude {
    pub use crate::checkpoint::Checkpoint;
    pub use crate::config::{Arch, Precision, RunConfig};
    pub use crate::custom::{
        evaluate, forward_loss, fp8_o2, grad_norm, load_checkpoint, mean_over_ranks,
        optimizer_step, save_checkpoint, skip_update, weights_f32, GradSync, StepOutcome, FP8,
    };
    pub use crate::data::synthetic::MarkovCorpus;
    pub use crate::data::Dataset;
    pub use crate::model::{Dims, Linear, LinearPrecision, Model};
    pub use crate::train::lr_at;
    pub use fp8lm_collectives::{
        run_ranks, Communicator, GradAllReduceConfig, GradAllReducer, GradMethod, ReduceOp,
    };
    pub use fp8lm_fp8::ScalingRecipe;
    pub use fp8lm_optim::{AdamW, AdamWHyper, Fp8Adam, Fp8AdamConfig, Optimizer};
}
