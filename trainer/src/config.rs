//! Run configuration: the single place every key is defined (TOML via serde).
//!
//! `launch/` parses files and `--set key=value` overrides into [`RunConfig`]; the trainer
//! only ever sees a validated config. Unknown keys are rejected (`deny_unknown_fields`).

use serde::{Deserialize, Serialize};

/// Numeric precision of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Precision {
    #[serde(rename = "fp32")]
    #[default]
    Fp32,
    #[serde(rename = "bf16")]
    Bf16,
    #[serde(rename = "fp8-o1")]
    Fp8O1,
    #[serde(rename = "fp8-o2")]
    Fp8O2,
    #[serde(rename = "fp8-o3")]
    Fp8O3,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp8O1 => "fp8-o1",
            Precision::Fp8O2 => "fp8-o2",
            Precision::Fp8O3 => "fp8-o3",
        }
    }
    pub fn is_fp8(self) -> bool {
        matches!(self, Precision::Fp8O1 | Precision::Fp8O2 | Precision::Fp8O3)
    }
}

/// Block architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// LayerNorm, learned positions, GELU MLP, tied LM head.
    #[default]
    Gpt2,
    /// RMSNorm, rotary positions, SwiGLU MLP, untied LM head.
    Llama,
}

/// Model shape (`model.*` keys).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub arch: Arch,
    /// Number of blocks L.
    pub layers: usize,
    /// Attention heads H.
    pub heads: usize,
    /// Width C.
    pub channels: usize,
    /// Context length T (max sequence length).
    pub context: usize,
    /// Vocabulary size V (set from the tokenizer when 0).
    pub vocab: usize,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            arch: Arch::Gpt2,
            layers: 2,
            heads: 4,
            channels: 64,
            context: 64,
            vocab: 0,
        }
    }
}

/// FP8 scaling keys (`fp8.*`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Fp8Config {
    /// "delayed" or "current".
    pub recipe: String,
    /// Amax history length of the delayed recipe.
    pub amax_history: usize,
    /// Scale margin in binades.
    pub margin: i32,
}

impl Default for Fp8Config {
    fn default() -> Self {
        Fp8Config {
            recipe: "delayed".into(),
            amax_history: 16,
            margin: 0,
        }
    }
}

/// Optimizer and schedule keys (`optim.*`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub lr: f32,
    pub min_lr: f32,
    pub warmup_steps: usize,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Global gradient-norm clip (0 disables).
    pub grad_clip: f32,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 3e-3,
            min_lr: 3e-4,
            warmup_steps: 20,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
        }
    }
}

/// Data keys (`data.*`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Text file, folder of text files, or llm.c `.bin` shard(s); empty = the embedded
    /// synthetic corpus.
    pub path: String,
    /// Fraction of the data held out for validation.
    pub val_fraction: f32,
}

/// A whole run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    pub precision: Precision,
    pub max_steps: usize,
    pub seed: u64,
    pub run_dir: String,
    pub checkpoint_every: usize,
    pub eval_every: usize,
    /// Batches averaged per evaluation.
    pub eval_batches: usize,
    /// "byte" or "gpt2".
    pub tokenizer: String,
    /// Sequences per step B (per rank).
    pub batch: usize,
    pub model: ModelConfig,
    pub optim: OptimConfig,
    pub fp8: Fp8Config,
    pub data: DataConfig,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            precision: Precision::Fp32,
            max_steps: 300,
            seed: 1337,
            run_dir: "runs/default".into(),
            checkpoint_every: 0,
            eval_every: 50,
            eval_batches: 8,
            tokenizer: "byte".into(),
            batch: 8,
            model: ModelConfig::default(),
            optim: OptimConfig::default(),
            fp8: Fp8Config::default(),
            data: DataConfig {
                path: String::new(),
                val_fraction: 0.1,
            },
        }
    }
}
