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
    /// Every precision level, lowest-bit state last.
    pub const ALL: [Precision; 5] = [
        Precision::Fp32,
        Precision::Bf16,
        Precision::Fp8O1,
        Precision::Fp8O2,
        Precision::Fp8O3,
    ];

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
            context: 16,
            vocab: 0,
        }
    }
}

/// FP8 scaling keys (`fp8.*`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Fp8Config {
    /// "delayed", "current" or "block" (one scale per 1x128 / 128x128 tile).
    pub recipe: String,
    /// Block recipe: tile scales "power-of-two" (exact multiply) or "exact" (the ratio).
    pub block_rounding: String,
    /// Amax history length of the delayed recipe.
    pub amax_history: usize,
    /// Scale margin in binades.
    pub margin: i32,
}

impl Default for Fp8Config {
    fn default() -> Self {
        Fp8Config {
            recipe: "delayed".into(),
            block_rounding: "power-of-two".into(),
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

impl OptimConfig {
    /// The AdamW hyper-parameters these keys set (the update rule of every optimizer).
    pub fn hyper(&self) -> fp8lm_optim::AdamWHyper {
        fp8lm_optim::AdamWHyper {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 2e-3,
            min_lr: 2e-4,
            warmup_steps: 5,
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

/// `dist.overlap`: when gradient reductions run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Overlap {
    /// `on`, unless the communicator busy-waits (MPI) and the host has no core to spare
    /// beyond the ranks' compute threads: there the reducing thread would slow the
    /// backward more than it hides (measured: up to 2x on 2 cores).
    #[default]
    Auto,
    /// Reduce each layer's gradients while the backward goes on with the earlier layers.
    On,
    /// Reduce only once the whole backward is done (same reductions, same results bit
    /// for bit; for comparison and debugging).
    Off,
}

impl Overlap {
    pub fn name(self) -> &'static str {
        match self {
            Overlap::Auto => "auto",
            Overlap::On => "on",
            Overlap::Off => "off",
        }
    }

    /// Whether to overlap, on a communicator of `backend` (`"mpi"` busy-waits) for a rank
    /// with `rank_cores` cores running `compute_threads` compute threads.
    pub fn resolve(self, backend: &str, rank_cores: usize, compute_threads: usize) -> bool {
        match self {
            Overlap::On => true,
            Overlap::Off => false,
            Overlap::Auto => backend != "mpi" || rank_cores > compute_threads || rank_cores >= 8,
        }
    }
}

/// `dist.fp8_allreduce.*`: the all-reduce of FP8 weight gradients (FP8-LM §3) and its
/// automatic scaling factor mu (see `fp8lm_collectives::grad`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Fp8AllReduceConfig {
    /// "fp8lm" (adaptive mu), "fp8-prescale" (mu fixed at 1/N), "fp8-postscale" (mu
    /// fixed at 1).
    pub method: String,
    /// Halve mu when more than this fraction of a tensor's summed values saturate.
    pub overflow_fraction: f64,
    /// Without overflow, mu doubles over this many steps.
    pub growth_steps: usize,
    /// Upper bound of mu. 1 by default: every rank's gradient is cast with the scale of
    /// the largest current amax (`s_g`, power of two), so the largest value already sits
    /// in the top binade; mu > 1 would push it past fmt_max on that rank before any sum.
    pub max_mu: f32,
}

impl Default for Fp8AllReduceConfig {
    fn default() -> Self {
        let d = fp8lm_collectives::GradAllReduceConfig::default();
        Fp8AllReduceConfig {
            method: "fp8lm".into(),
            overflow_fraction: d.overflow_fraction,
            growth_steps: d.growth_steps as usize,
            max_mu: d.max_mu,
        }
    }
}

impl Fp8AllReduceConfig {
    /// The collectives configuration (format: the weight gradients' E5M2).
    pub fn reducer_config(&self) -> fp8lm_collectives::GradAllReduceConfig {
        fp8lm_collectives::GradAllReduceConfig {
            method: fp8lm_collectives::GradMethod::parse(&self.method)
                .unwrap_or(fp8lm_collectives::GradMethod::Fp8Lm),
            format: fp8lm_fp8::Fp8Format::E5M2,
            overflow_fraction: self.overflow_fraction,
            growth_steps: self.growth_steps.min(u32::MAX as usize) as u32,
            max_mu: self.max_mu,
            ..Default::default()
        }
    }
}

/// `dist.zero_partition`: how fp8-o3 assigns optimizer state to ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ZeroPartition {
    /// Tensors larger than 1/(8N) of the model are cut into row blocks (one scale each)
    /// before the greedy assignment: balanced even when one tensor (GPT-2's wte) exceeds
    /// a rank's share.
    #[default]
    RowBlocks,
    /// The recipe's strict greedy over whole tensors (one scale per tensor, as FP8-LM
    /// describes it); unbalanced when a tensor exceeds a rank's share.
    WholeTensor,
}

impl ZeroPartition {
    pub fn name(self) -> &'static str {
        match self {
            ZeroPartition::RowBlocks => "row-blocks",
            ZeroPartition::WholeTensor => "whole-tensor",
        }
    }
}

/// Parallelism keys (`dist.*`): data-parallel ones are ignored on a single rank.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistConfig {
    /// Data-parallel replicas D. 0 (default): as many as the job has ranks. Set, it must
    /// equal them (checked at start-up, naming both), and `fp8lm plan` plans for it.
    pub data_parallel: usize,
    /// Tensor-parallel size T (Megatron layout, `crate::tensor_parallel`): the world is
    /// D x T ranks, T consecutive ranks share one model replica. 1 = off.
    pub tensor_parallel: usize,
    /// Sequence parallelism inside each tensor-parallel group (needs T > 1).
    pub sequence_parallel: bool,
    /// `auto` (default), `on` or `off`: see [`Overlap`].
    pub overlap: Overlap,
    /// Seconds a rank may wait in one collective before the watchdog ends the job, naming
    /// the rank it waited for and the collective (0 = wait forever).
    pub timeout_s: u64,
    /// fp8-o3's partition of optimizer state: see [`ZeroPartition`].
    pub zero_partition: ZeroPartition,
    pub fp8_allreduce: Fp8AllReduceConfig,
}

impl Default for DistConfig {
    fn default() -> Self {
        DistConfig {
            data_parallel: 0,
            tensor_parallel: 1,
            sequence_parallel: false,
            overlap: Overlap::Auto,
            timeout_s: 300,
            zero_partition: ZeroPartition::default(),
            fp8_allreduce: Fp8AllReduceConfig::default(),
        }
    }
}

/// Where the model runs (`device`): the CPU backend, or CUDA GPU N (feature `cuda`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl Device {
    /// `"cpu"`, `"cuda"` (= GPU 0) or `"cuda:N"`; `Err` holds what is allowed. Whether the
    /// binary has CUDA support and the GPU exists is checked when a run starts
    /// (`fp8lm devices` shows what is there).
    pub fn parse(s: &str) -> Result<Device, &'static str> {
        const ALLOWED: &str =
            "\"cpu\", \"cuda\" or \"cuda:N\" (N = GPU index, see `fp8lm devices`)";
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                    n.parse().map(Device::Cuda).map_err(|_| ALLOWED)
                }
                _ => Err(ALLOWED),
            },
        }
    }
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
    /// Checkpoints kept (the newest ones); 0 keeps all.
    pub checkpoint_keep: usize,
    pub eval_every: usize,
    /// Batches of [`crate::Trainer::evaluate`] (the library's per-batch evaluation);
    /// `fp8lm train`/`eval` evaluate `eval_tokens` instead.
    pub eval_batches: usize,
    /// Training-loss log line every N steps (0 = about 20 lines per run, and at least
    /// every 30 s).
    pub log_every: usize,
    /// Per-tensor FP8 statistics in `metrics.jsonl` every N steps, and at any step with
    /// an overflow or a skipped update (0 = only those steps).
    pub fp8_stats_every: usize,
    /// Stop with an error when more than this fraction of the last 100 steps were
    /// skipped for non-finite gradients (a diverged run); 1 = never stop.
    pub max_skipped_fraction: f32,
    /// Validation tokens per evaluation, a fixed set independent of batch and rank count
    /// (see [`crate::eval`]); 0 = the whole validation split up to 32 Ki tokens.
    pub eval_tokens: usize,
    /// "byte" or "gpt2".
    pub tokenizer: String,
    /// Sequences per step B (per rank).
    pub batch: usize,
    /// "cpu", "cuda" or "cuda:N" (see [`Device::parse`]).
    pub device: String,
    /// The host backend the model's ops run on: "cpu" (fast, the default) or
    /// "reference" (the scalar oracle; see `fp8lm_kernels::BackendKind`).
    pub backend: String,
    /// Micro-batches of `batch` sequences per optimizer step (gradients accumulated
    /// over them; see `Trainer::train_step`). 1 = no accumulation.
    pub grad_accum: usize,
    pub model: ModelConfig,
    pub optim: OptimConfig,
    pub fp8: Fp8Config,
    pub data: DataConfig,
    pub dist: DistConfig,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            precision: Precision::Fp32,
            max_steps: 300,
            seed: 1337,
            run_dir: "runs/default".into(),
            checkpoint_every: 0,
            checkpoint_keep: 3,
            eval_every: 50,
            eval_batches: 8,
            log_every: 0,
            fp8_stats_every: 50,
            max_skipped_fraction: 0.25,
            eval_tokens: 0,
            tokenizer: "byte".into(),
            batch: 32,
            device: "cpu".into(),
            backend: "cpu".into(),
            grad_accum: 1,
            model: ModelConfig::default(),
            optim: OptimConfig::default(),
            fp8: Fp8Config::default(),
            data: DataConfig {
                path: String::new(),
                val_fraction: 0.1,
            },
            dist: DistConfig::default(),
        }
    }
}

/// A configuration problem, found before any work starts. Names the key, the offending
/// value and what would have been accepted, so the user can fix it without reading code.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// Where the value came from: a file name, `--set`, or `config`.
    pub origin: String,
    /// Dotted key path, e.g. `model.heads`.
    pub key: String,
    /// The value as the user wrote it.
    pub value: String,
    /// What is allowed instead.
    pub allowed: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: invalid value for key `{}`: {}; allowed: {}",
            self.origin, self.key, self.value, self.allowed
        )
    }
}

impl std::error::Error for ConfigError {}

fn bad(key: &str, value: impl std::fmt::Display, allowed: impl Into<String>) -> ConfigError {
    ConfigError {
        origin: "config".into(),
        key: key.into(),
        value: value.to_string(),
        allowed: allowed.into(),
    }
}

/// Vocabulary size of a tokenizer name (the only two this project ships).
pub fn tokenizer_vocab(name: &str) -> Option<usize> {
    match name {
        "byte" => Some(256),
        "gpt2" => Some(50257),
        _ => None,
    }
}

impl RunConfig {
    /// Reject impossible values. Called by the loader; call it again after editing a
    /// config by hand. Checks only the configuration itself plus the existence of
    /// `data.path` (a missing data file must fail before a model is allocated).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let pos = |key: &str, v: usize| {
            if v == 0 {
                Err(bad(key, v, "an integer >= 1"))
            } else {
                Ok(())
            }
        };
        pos("max_steps", self.max_steps)?;
        pos("batch", self.batch)?;
        Device::parse(&self.device)
            .map_err(|allowed| bad("device", format!("{:?}", self.device), allowed))?;
        fp8lm_kernels::BackendKind::parse(&self.backend)
            .map_err(|allowed| bad("backend", format!("{:?}", self.backend), allowed))?;
        pos("grad_accum", self.grad_accum)?;
        if self.eval_every > 0 {
            pos("eval_batches", self.eval_batches)?;
        }
        if self.run_dir.trim().is_empty() {
            return Err(bad("run_dir", "\"\"", "a directory path"));
        }
        if !(self.max_skipped_fraction > 0.0 && self.max_skipped_fraction <= 1.0) {
            return Err(bad(
                "max_skipped_fraction",
                self.max_skipped_fraction,
                "a number in (0, 1] (1 = never stop a diverging run)",
            ));
        }
        let tok_vocab = tokenizer_vocab(&self.tokenizer).ok_or_else(|| {
            bad(
                "tokenizer",
                format!("{:?}", self.tokenizer),
                "\"byte\" or \"gpt2\"",
            )
        })?;

        let m = &self.model;
        pos("model.layers", m.layers)?;
        pos("model.heads", m.heads)?;
        pos("model.channels", m.channels)?;
        if m.context < 2 {
            return Err(bad("model.context", m.context, "an integer >= 2"));
        }
        if !m.channels.is_multiple_of(m.heads) {
            return Err(bad(
                "model.heads",
                m.heads,
                format!(
                    "a divisor of model.channels = {} (e.g. {})",
                    m.channels,
                    divisors(m.channels)
                ),
            ));
        }
        if m.arch == Arch::Llama && !(m.channels / m.heads).is_multiple_of(2) {
            return Err(bad(
                "model.heads",
                m.heads,
                format!(
                    "for arch \"llama\" (rotary positions) the head size model.channels / model.heads \
                     must be even, here {} / {} = {}",
                    m.channels,
                    m.heads,
                    m.channels / m.heads
                ),
            ));
        }
        if m.vocab != 0 && m.vocab < tok_vocab {
            return Err(bad(
                "model.vocab",
                m.vocab,
                format!(
                    "0 (take it from the tokenizer) or >= {tok_vocab}, the vocabulary of tokenizer \"{}\"",
                    self.tokenizer
                ),
            ));
        }

        self.validate_tensor_parallel(tok_vocab)?;

        let o = &self.optim;
        let finite_pos = |key: &str, v: f32| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(bad(key, v, "a finite number > 0"))
            }
        };
        let finite_nonneg = |key: &str, v: f32| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(bad(key, v, "a finite number >= 0"))
            }
        };
        finite_pos("optim.lr", o.lr)?;
        if !(o.min_lr.is_finite() && o.min_lr >= 0.0 && o.min_lr <= o.lr) {
            return Err(bad(
                "optim.min_lr",
                o.min_lr,
                format!("a number in [0, optim.lr = {}]", o.lr),
            ));
        }
        for (key, b) in [("optim.beta1", o.beta1), ("optim.beta2", o.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(bad(key, b, "a number in [0, 1)"));
            }
        }
        finite_pos("optim.eps", o.eps)?;
        finite_nonneg("optim.weight_decay", o.weight_decay)?;
        finite_nonneg("optim.grad_clip", o.grad_clip)?;

        let f = &self.fp8;
        if !["delayed", "current", "block"].contains(&f.recipe.as_str()) {
            return Err(bad(
                "fp8.recipe",
                format!("{:?}", f.recipe),
                "\"delayed\", \"current\" or \"block\"",
            ));
        }
        if !["power-of-two", "exact"].contains(&f.block_rounding.as_str()) {
            return Err(bad(
                "fp8.block_rounding",
                format!("{:?}", f.block_rounding),
                "\"power-of-two\" or \"exact\"",
            ));
        }
        pos("fp8.amax_history", f.amax_history)?;
        if !(0..=16).contains(&f.margin) {
            return Err(bad(
                "fp8.margin",
                f.margin,
                "an integer in 0..=16 (binades)",
            ));
        }

        let a = &self.dist.fp8_allreduce;
        let names: Vec<String> = fp8lm_collectives::SCALED_FP8_METHODS
            .iter()
            .map(|m| format!("{:?}", m.name()))
            .collect();
        if !fp8lm_collectives::SCALED_FP8_METHODS
            .iter()
            .any(|m| m.name() == a.method)
        {
            return Err(bad(
                "dist.fp8_allreduce.method",
                format!("{:?}", a.method),
                names.join(", "),
            ));
        }
        if !(a.overflow_fraction.is_finite() && (0.0..1.0).contains(&a.overflow_fraction)) {
            return Err(bad(
                "dist.fp8_allreduce.overflow_fraction",
                a.overflow_fraction,
                "a number in [0, 1)",
            ));
        }
        pos("dist.fp8_allreduce.growth_steps", a.growth_steps)?;
        if !(a.max_mu.is_finite() && a.max_mu > 0.0 && a.max_mu.log2().fract() == 0.0) {
            return Err(bad(
                "dist.fp8_allreduce.max_mu",
                a.max_mu,
                "a power of two > 0 (e.g. 1, 0.5, 2)",
            ));
        }

        let d = &self.data;
        if !(d.val_fraction > 0.0 && d.val_fraction < 1.0) {
            return Err(bad(
                "data.val_fraction",
                d.val_fraction,
                "a number strictly between 0 and 1",
            ));
        }
        if d.path.is_empty() {
            if self.tokenizer != "byte" {
                return Err(bad(
                    "data.path",
                    "\"\" (the embedded corpus)",
                    format!(
                        "a text file, folder or .bin shard(s) for tokenizer {:?}; \
                         the embedded corpus is byte-level text (tokenizer = \"byte\")",
                        self.tokenizer
                    ),
                ));
            }
        } else if !std::path::Path::new(&d.path).exists() {
            return Err(bad(
                "data.path",
                format!("{:?} (no such file or directory)", d.path),
                "an existing text file, folder of .txt files, or llm.c .bin shard(s); \
                 empty for the embedded corpus",
            ));
        }
        Ok(())
    }

    /// `dist.tensor_parallel` / `dist.sequence_parallel` against the model's shape: every
    /// dimension the group splits must divide by T (heads, the MLP width, the vocabulary
    /// the model is built with; the context with SP, whose shards are token rows).
    fn validate_tensor_parallel(&self, tok_vocab: usize) -> Result<(), ConfigError> {
        let (t, m) = (self.dist.tensor_parallel, &self.model);
        if t == 0 {
            return Err(bad("dist.tensor_parallel", t, "an integer >= 1 (1 = off)"));
        }
        if self.dist.sequence_parallel && t == 1 {
            return Err(bad(
                "dist.sequence_parallel",
                true,
                "false with dist.tensor_parallel = 1 (sequence parallelism shards tokens \
                 over the tensor-parallel group)",
            ));
        }
        if t == 1 {
            return Ok(());
        }
        let ffn = crate::model::Dims::ffn_width(m.arch, m.channels);
        let vocab = if m.vocab != 0 { m.vocab } else { tok_vocab };
        let mut split = vec![
            ("model.heads", m.heads, String::new()),
            (
                "model.vocab",
                vocab,
                if m.vocab == 0 {
                    format!(
                        " (0 = the tokenizer's {tok_vocab}; set model.vocab to a padded \
                         size, e.g. {})",
                        tok_vocab.div_ceil(64 * t) * 64 * t
                    )
                } else {
                    String::new()
                },
            ),
            (
                "model.channels",
                m.channels,
                format!(" (MLP width {ffn} for arch {:?})", m.arch),
            ),
        ];
        if self.dist.sequence_parallel {
            split.push(("model.context", m.context, " (sequence parallelism)".into()));
        }
        for (key, v, why) in split {
            let n = if key == "model.channels" { ffn } else { v };
            if !n.is_multiple_of(t) {
                return Err(bad(
                    key,
                    v,
                    format!(
                        "a value whose split dimension divides by dist.tensor_parallel = \
                         {t}: {n} does not{why}"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Vocabulary size the model is built with.
    pub fn vocab(&self) -> usize {
        if self.model.vocab != 0 {
            self.model.vocab
        } else {
            tokenizer_vocab(&self.tokenizer).unwrap_or(256)
        }
    }
}

fn divisors(n: usize) -> String {
    let d: Vec<String> = (1..=n)
        .filter(|k| n.is_multiple_of(*k))
        .take(8)
        .map(|k| k.to_string())
        .collect();
    d.join(", ")
}
