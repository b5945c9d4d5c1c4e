//! # fp8lm-trainer: model, data, training loop
//!
//! Owns the GPT model (explicit forward and backward per layer, written once against the
//! `fp8lm-kernels` op set), the precision modes (fp32, bf16, FP8 O1/O2/O3), data sources
//! and tokenizers, the training loop, checkpoints and metrics.

pub mod config;
pub mod config_file;
pub mod data;
pub mod distributed;
pub mod model;
pub mod rng;
pub mod train;

pub use config::{Arch, ConfigError, ModelConfig, Precision, RunConfig};
pub use config_file::{load_config, load_config_str};
pub mod checkpoint;
pub mod memory;
pub mod metrics;
pub mod plot;
pub mod tokenizer;
pub use train::{StepStats, Trainer};
