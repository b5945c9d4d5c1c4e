//! The memory ledger: every large buffer of a run, by category, in bytes.
//!
//! FP8-LM's memory claim is about the *optimizer-facing* state: master weights,
//! gradients (as the optimizer receives them), first and second moments. In fp32 that is
//! 4 + 4 + 4 + 4 = 16 bytes per parameter; in fp8-o2, 2 + 1 + 1 + 2 = 6. The ledger keeps
//! those four categories apart from everything else a step allocates (compute copies of
//! the weights, activations, backward workspace, communication buffers), so the claim
//! can be checked on a real run ([`MemoryLedger::state_bytes_per_param`]) and the whole
//! ledger checked against the process's resident memory ([`resident_bytes`]).
//!
//! Classification rules (applied by whoever fills the ledger):
//! - the buffer the layers read is *compute weights*, unless it is itself the master
//!   (fp32, bf16 and fp8-o1 keep f32 weights that the optimizer updates in place);
//! - a *gradient* is the buffer the optimizer reads (E5M2 for FP8 linears); the one-layer
//!   f32 scratch their dW GEMM writes before the cast is *workspace* (it is sized by the
//!   largest layer, not by the model);
//! - [`measure_peak`] checks the whole ledger against the process's peak resident set.

use crate::config::{Precision, RunConfig};
use crate::train::Trainer;
use fp8lm_optim::Optimizer;
use std::fmt::Write as _;

/// What a buffer is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Category {
    /// Weights as the layers read them (FP8 copies for the GEMMs, an f32 view of a
    /// low-precision master).
    ComputeWeights,
    MasterWeights,
    /// Gradients as the optimizer receives them.
    Gradients,
    FirstMoment,
    SecondMoment,
    Activations,
    /// Scratch of forward/backward (e.g. the f32 gradient accumulation an FP8 run casts
    /// from, GEMM packing buffers).
    Workspace,
    CommunicationBuffers,
}

impl Category {
    pub const ALL: [Category; 8] = [
        Category::ComputeWeights,
        Category::MasterWeights,
        Category::Gradients,
        Category::FirstMoment,
        Category::SecondMoment,
        Category::Activations,
        Category::Workspace,
        Category::CommunicationBuffers,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Category::ComputeWeights => "compute weights",
            Category::MasterWeights => "master weights",
            Category::Gradients => "gradients",
            Category::FirstMoment => "first moment",
            Category::SecondMoment => "second moment",
            Category::Activations => "activations",
            Category::Workspace => "workspace",
            Category::CommunicationBuffers => "communication buffers",
        }
    }
    /// Part of the optimizer+gradient+master state FP8-LM's 6 B/param counts.
    pub fn is_optimizer_state(self) -> bool {
        matches!(
            self,
            Category::MasterWeights
                | Category::Gradients
                | Category::FirstMoment
                | Category::SecondMoment
        )
    }
}

/// One buffer (or group of like buffers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub category: Category,
    /// What and in which format, e.g. "f32 weights", "E4M3 first moment".
    pub label: String,
    pub bytes: usize,
}

/// Bytes by category for a model of `params` parameters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryLedger {
    pub params: usize,
    pub entries: Vec<Entry>,
}

impl MemoryLedger {
    pub fn new(params: usize) -> Self {
        MemoryLedger {
            params,
            entries: Vec::new(),
        }
    }

    /// Record a buffer; zero-byte entries are skipped.
    pub fn add(&mut self, category: Category, label: impl Into<String>, bytes: usize) {
        if bytes > 0 {
            self.entries.push(Entry {
                category,
                label: label.into(),
                bytes,
            });
        }
    }

    /// Record an optimizer's state: master weights, moments, and its per-tensor scalars
    /// (counted with the master, which they mostly scale).
    pub fn add_optimizer(&mut self, opt: &dyn Optimizer, formats: [&str; 3]) {
        self.add_state_bytes(opt.state_breakdown(), formats);
    }

    /// [`MemoryLedger::add_optimizer`] from the figures alone.
    pub fn add_state_bytes(&mut self, s: fp8lm_optim::StateBytes, formats: [&str; 3]) {
        self.add(
            Category::MasterWeights,
            format!("{} master weights (optimizer)", formats[0]),
            s.master,
        );
        self.add(
            Category::FirstMoment,
            format!("{} first moment", formats[1]),
            s.exp_avg,
        );
        self.add(
            Category::SecondMoment,
            format!("{} second moment", formats[2]),
            s.exp_avg_sq,
        );
        self.add(
            Category::MasterWeights,
            "per-tensor scales, amaxes, step",
            s.scalars,
        );
    }

    pub fn category_bytes(&self, c: Category) -> usize {
        self.entries
            .iter()
            .filter(|e| e.category == c)
            .map(|e| e.bytes)
            .sum()
    }

    pub fn total(&self) -> usize {
        self.entries.iter().map(|e| e.bytes).sum()
    }

    /// Master + gradients + both moments.
    pub fn state_bytes(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| e.category.is_optimizer_state())
            .map(|e| e.bytes)
            .sum()
    }

    /// [`MemoryLedger::state_bytes`] per parameter (16 in fp32, 6 + scalars in fp8-o2).
    pub fn state_bytes_per_param(&self) -> f64 {
        self.state_bytes() as f64 / self.params.max(1) as f64
    }

    /// A table: every entry under its category, category totals, bytes/param.
    pub fn report(&self, title: &str) -> String {
        let mb = |b: usize| b as f64 / (1 << 20) as f64;
        let per = |b: usize| b as f64 / self.params.max(1) as f64;
        let mut s = String::new();
        let _ = writeln!(s, "{title}: {} parameters", self.params);
        let _ = writeln!(
            s,
            "  {:<52} {:>11} {:>9}",
            "category / buffer", "MiB", "B/param"
        );
        for c in Category::ALL {
            let tot = self.category_bytes(c);
            let _ = writeln!(s, "  {:<52} {:>11.1} {:>9.3}", c.name(), mb(tot), per(tot));
            for e in self.entries.iter().filter(|e| e.category == c) {
                let _ = writeln!(
                    s,
                    "    {:<50} {:>11.1} {:>9.3}",
                    e.label,
                    mb(e.bytes),
                    per(e.bytes)
                );
            }
        }
        let _ = writeln!(
            s,
            "  {:<52} {:>11.1} {:>9.3}",
            "optimizer + gradient + master state",
            mb(self.state_bytes()),
            self.state_bytes_per_param()
        );
        let _ = writeln!(
            s,
            "  {:<52} {:>11.1} {:>9.3}",
            "total",
            mb(self.total()),
            per(self.total())
        );
        s
    }
}

/// The sizes the ledger is made of, one figure per entry, in bytes. Filled either from
/// a constructed trainer's buffers ([`LedgerSizes::of_trainer`]) or from the config alone
/// without allocating (`crate::plan`); [`LedgerSizes::ledger`] turns either into the same
/// [`MemoryLedger`], so a planned ledger and a measured one are the same code and can be
/// compared entry by entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LedgerSizes {
    pub precision: Precision,
    pub params: usize,
    /// f32 weights in the model (every tensor, except fp8-o2's linear weights and
    /// those of fp8-o3's E4M3 storage).
    pub f32_params: usize,
    /// fp8-o3 with E4M3 weight storage: the tied token embedding's FP16 masters every
    /// rank holds for the lookup (shared by their owners).
    pub wte_f16: usize,
    /// E5M2 weight gradients of the FP8 linears, and the f32 gradients of the rest.
    pub fp8_grads: usize,
    pub f32_grads: usize,
    /// The FP8 linears' one-layer f32 dW scratch (tied head + largest block linear).
    pub wgrad_scratch: usize,
    pub e4m3_weights: usize,
    pub activations: usize,
    pub backward_scratch: usize,
    pub e4m3_inputs: usize,
    /// The shared E5M2 output gradient of the widest FP8 linear.
    pub e5m2_dy: usize,
    /// FP8 with sequence parallelism: the shared gathered E4M3 input `[n, C]` of the
    /// column-parallel linear running (each keeps only its shard in `e4m3_inputs`).
    pub e4m3_gathered: usize,
    /// fp32 with sequence parallelism: the column-parallel linears' f32 input shards
    /// `[n / T, C]` (kept for the dW GEMM), and the shared gathered f32 input `[n, C]` of
    /// the one running.
    pub f32_input_shards: usize,
    pub f32_gathered: usize,
    /// bf16 with sequence parallelism: the shared gathered bf16 input `[n, C]` of the
    /// column-parallel linear running (each keeps only its shard in `bf16_inputs`).
    pub bf16_gathered: usize,
    pub bf16_inputs: usize,
    /// bf16 runs: the per-thread GEMM tiles of the largest layer.
    pub bf16_tiles: usize,
    pub optimizer: fp8lm_optim::StateBytes,
}

impl LedgerSizes {
    /// The sizes of a constructed trainer's buffers: the model's flat weights and
    /// gradients, each linear layer's precision buffers, the activation arena and the
    /// optimizer's state. (Small buffers, e.g. token ids and the rotary table, are not
    /// listed.)
    pub fn of_trainer(tr: &Trainer) -> LedgerSizes {
        let model = tr.model();
        let precision = tr.cfg.precision;
        let f32_params: usize = (0..model.layout.metas.len())
            .filter(|&i| model.param_is_f32(i))
            .map(|i| 4 * model.layout.metas[i].numel())
            .sum();
        let (mut fp8_grads, mut f32_grads) = (0usize, 0usize);
        for (i, lin) in model.linear_of_tensor.iter().enumerate() {
            let numel = model.layout.metas[i].numel();
            match lin.map(|li| model.linears[li].memory().fp8_wgrad) {
                Some(b) if b > 0 => fp8_grads += b,
                _ => f32_grads += 4 * numel,
            }
        }
        let (mut w8, mut a8, mut b16) = (0, 0, 0);
        for lin in &model.linears {
            let m = lin.memory();
            (w8, a8, b16) = (
                w8 + m.fp8_weight,
                a8 + m.fp8_activations,
                b16 + m.bf16_cache,
            );
        }
        let rows = model.dims.b * model.dims.t;
        let bf16_tiles = if precision == Precision::Bf16 {
            model
                .linears
                .iter()
                .map(|li| crate::model::linear::bf16_tile_bytes(rows, li.c, li.oc))
                .max()
                .unwrap_or(0)
        } else {
            0
        };
        LedgerSizes {
            precision,
            params: model.num_params(),
            f32_params,
            wte_f16: model.wte_f16_bytes(),
            fp8_grads,
            f32_grads,
            wgrad_scratch: model.wgrad_scratch_bytes(),
            e4m3_weights: w8,
            activations: model.activation_bytes(),
            backward_scratch: model.backward_scratch_bytes(),
            e4m3_inputs: a8,
            e5m2_dy: model
                .linears
                .iter()
                .map(|li| li.fp8_dy_bytes(rows))
                .max()
                .unwrap_or(0),
            e4m3_gathered: model
                .linears
                .iter()
                .map(|li| li.e4m3_gathered_bytes(rows))
                .max()
                .unwrap_or(0),
            f32_input_shards: model
                .linears
                .iter()
                .map(|li| li.f32_input_shard_bytes())
                .sum(),
            f32_gathered: model
                .linears
                .iter()
                .map(|li| li.f32_gathered_bytes(rows))
                .max()
                .unwrap_or(0),
            bf16_gathered: model
                .linears
                .iter()
                .map(|li| li.bf16_gathered_bytes(rows))
                .max()
                .unwrap_or(0),
            bf16_inputs: b16,
            bf16_tiles,
            optimizer: tr.optimizer().state_breakdown(),
        }
    }

    /// The ledger: every size filed under its category, with its format in the label.
    pub fn ledger(&self) -> MemoryLedger {
        let s = self;
        let mut l = MemoryLedger::new(s.params);
        match s.precision {
            Precision::Fp8O2 => l.add(
                Category::ComputeWeights,
                "f32 weights of norms/biases/positions (layers' copy)",
                s.f32_params,
            ),
            // fp8-o3 holds the same kinds of state as o2; its optimizer holds only this
            // rank's ZeRO share (after `Trainer::enable_data_parallel`). Over several
            // ranks (not block-scaled, no tensor parallelism) the linears are the E4M3
            // bytes the owners share and the f32 entry is the norms/biases/positions;
            // else (one rank, block recipe, D x T) it is the f32 view of every master.
            Precision::Fp8O3 if s.f32_params < 4 * s.params => l.add(
                Category::ComputeWeights,
                "f32 weights of norms/biases/positions (shared by the owners)",
                s.f32_params,
            ),
            Precision::Fp8O3 => l.add(
                Category::ComputeWeights,
                "f32 view of the masters (shared by the owners)",
                s.f32_params,
            ),
            _ => l.add(
                Category::MasterWeights,
                "f32 weights (the master, read by the layers)",
                s.f32_params,
            ),
        }
        l.add(
            Category::ComputeWeights,
            "FP16 token embedding for the lookup (owners' masters)",
            s.wte_f16,
        );
        l.add(
            Category::Gradients,
            "FP8 E5M2 weight gradients (linears)",
            s.fp8_grads,
        );
        l.add(Category::Gradients, "f32 gradients", s.f32_grads);
        l.add(
            Category::Workspace,
            "f32 dW scratch, cast to E5M2 (tied head + largest block linear)",
            s.wgrad_scratch,
        );
        l.add(
            Category::ComputeWeights,
            "E4M3 weight copies (linears)",
            s.e4m3_weights,
        );
        l.add(
            Category::Activations,
            "f32 activations kept for the backward (and logits)",
            s.activations,
        );
        l.add(
            Category::Workspace,
            "f32 one-layer scratch (activation gradients, row-parallel outputs)",
            s.backward_scratch,
        );
        l.add(
            Category::Activations,
            "E4M3 linear inputs (for dW)",
            s.e4m3_inputs,
        );
        l.add(
            Category::Workspace,
            "E5M2 output gradient of one linear (shared)",
            s.e5m2_dy,
        );
        l.add(
            Category::Workspace,
            "E4M3 gathered input of one column-parallel linear (SP, shared)",
            s.e4m3_gathered,
        );
        l.add(
            Category::Activations,
            "f32 input shards of the column-parallel linears (SP, for dW)",
            s.f32_input_shards,
        );
        l.add(
            Category::Workspace,
            "f32 gathered input of one column-parallel linear (SP, shared)",
            s.f32_gathered,
        );
        l.add(
            Category::Activations,
            "bf16 linear inputs (for dW)",
            s.bf16_inputs,
        );
        l.add(
            Category::Workspace,
            "bf16 gathered input of one column-parallel linear (SP, shared)",
            s.bf16_gathered,
        );
        l.add(
            Category::Workspace,
            "bf16 GEMM tiles (weight, dy, output; one thread)",
            s.bf16_tiles,
        );
        let formats = if matches!(s.precision, Precision::Fp8O2 | Precision::Fp8O3) {
            [
                "f16 (linears) / f32",
                "e4m3 (linears) / f32",
                "f16 (linears) / f32",
            ]
        } else {
            ["-", "f32", "f32"]
        };
        l.add_state_bytes(s.optimizer, formats);
        l
    }
}

impl MemoryLedger {
    /// The ledger of a constructed trainer ([`LedgerSizes::of_trainer`]).
    pub fn for_trainer(tr: &Trainer) -> MemoryLedger {
        LedgerSizes::of_trainer(tr).ledger()
    }
}

/// `fp8lm bench memory`: build the trainer `cfg` describes (its model and optimizer,
/// `vocab` tokens unless `model.vocab` is set) and print its ledger; with `all = true`,
/// once per single-process precision (fp32, bf16, fp8-o1, fp8-o2) for comparison.
pub fn bench_memory(cfg: &RunConfig, vocab: usize, all: bool) -> anyhow::Result<String> {
    let precisions = if all {
        vec![
            Precision::Fp32,
            Precision::Bf16,
            Precision::Fp8O1,
            Precision::Fp8O2,
        ]
    } else {
        vec![cfg.precision]
    };
    let mut out = String::new();
    for p in precisions {
        let mut c = cfg.clone();
        c.precision = p;
        let tr = Trainer::new(&c, vocab)?;
        let m = &c.model;
        let title = format!(
            "{} ({:?}, L={} C={} T={} B={})",
            p.name(),
            m.arch,
            m.layers,
            m.channels,
            m.context,
            c.batch
        );
        out += &MemoryLedger::for_trainer(&tr).report(&title);
    }
    Ok(out)
}

/// The peak resident set size of this process so far (Linux `VmHWM` in
/// `/proc/self/status`: start-up included), in bytes; `None` where unavailable.
pub fn peak_resident_bytes() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Uniformly random tokens (seeded): batches whose memory is a real run's, for
/// [`measure_peak`] (which must not depend on a data set being present).
struct RandomTokens {
    vocab: usize,
    state: u64,
}

impl RandomTokens {
    fn next(&mut self) -> u32 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        (self.state % self.vocab as u64) as u32
    }
}

impl crate::data::Dataset for RandomTokens {
    fn vocab_size(&self) -> usize {
        self.vocab
    }
    fn next_train_batch(&mut self, _b: usize, _t: usize, inputs: &mut [u32], targets: &mut [u32]) {
        for (x, y) in inputs.iter_mut().zip(targets.iter_mut()) {
            (*x, *y) = (self.next(), self.next());
        }
    }
    fn val_batch(&self, index: usize, b: usize, t: usize, inputs: &mut [u32], targets: &mut [u32]) {
        let mut r = RandomTokens {
            vocab: self.vocab,
            state: 0x9E37_79B9_7F4A_7C15 ^ index as u64,
        };
        r.next_train_batch(b, t, inputs, targets);
    }
    fn position(&self) -> u64 {
        self.state
    }
    fn set_position(&mut self, pos: u64) {
        self.state = pos;
    }
}

/// What [`measure_peak`] saw: the ledger's total and the process's peak resident set.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PeakReport {
    pub precision: String,
    pub params: usize,
    pub ledger_bytes: usize,
    pub state_bytes: usize,
    pub peak_bytes: usize,
}

/// Run what `fp8lm train` runs, in this process: build the trainer `cfg` describes,
/// take `steps` training steps and one evaluation on random tokens, and save a
/// checkpoint (into a temporary directory, removed after); then report the ledger and
/// the peak resident set of the whole process, start-up included. Run it in a fresh
/// process per precision (`fp8lm bench memory` does) so the peaks are separate.
pub fn measure_peak(cfg: &RunConfig, vocab: usize, steps: usize) -> anyhow::Result<PeakReport> {
    let mut tr = Trainer::new(cfg, vocab)?;
    let ledger = MemoryLedger::for_trainer(&tr);
    let mut data = RandomTokens {
        vocab: tr.model().dims.v.min(vocab.max(1)),
        state: 0x2545_F491_4F6C_DD1D,
    };
    for _ in 0..steps {
        tr.train_step(&mut data)?;
    }
    tr.evaluate(&data, 1)?;
    let dir = std::env::temp_dir().join(format!("fp8lm-bench-memory-{}", std::process::id()));
    let saved = crate::snapshot::save_trainer(&tr, &data, serde_json::Value::Null, None, &dir, 1);
    let _ = std::fs::remove_dir_all(&dir);
    saved?;
    Ok(PeakReport {
        precision: cfg.precision.name().to_string(),
        params: ledger.params,
        ledger_bytes: ledger.total(),
        state_bytes: ledger.state_bytes(),
        peak_bytes: peak_resident_bytes()
            .ok_or_else(|| anyhow::anyhow!("no /proc/self/status: peak resident memory unknown"))?,
    })
}

/// What [`measure_peak_zero`] saw on one fp8-o3 data-parallel rank.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ZeroPeakReport {
    pub rank: usize,
    pub ranks: usize,
    pub params: usize,
    /// This rank's optimizer + master state (`Optimizer::state_bytes`).
    pub state_bytes: usize,
    /// The whole optimizer state, every rank's share together (the partition's figures).
    pub total_state_bytes: usize,
    /// Peak resident set of the start-up: the trainer built and data parallelism
    /// enabled, before the first step.
    pub peak_start_bytes: usize,
    /// Peak resident set after start-up, the training steps and the evaluation.
    pub peak_train_bytes: usize,
    /// Peak resident set after the sharded checkpoint save too.
    pub peak_bytes: usize,
    /// Peak resident set of a resume from that checkpoint (a fresh trainer, the peak
    /// counter reset first: `/proc/self/clear_refs`) and one step; `None` where the
    /// counter cannot be reset.
    pub peak_resume_bytes: Option<usize>,
}

impl ZeroPeakReport {
    /// This rank's state over an even share of the whole (`state / N`).
    pub fn share_ratio(&self) -> f64 {
        self.state_bytes as f64 * self.ranks as f64 / self.total_state_bytes.max(1) as f64
    }
}

/// [`measure_peak`] for fp8-o3 on one of `comm.size()` data-parallel ranks, as `fp8lm
/// train` runs under `mpirun`: the trainer built for its rank count (no whole-state
/// transient, no whole f32 model: `parallel::zero_start`) and its start-up's peak,
/// `steps` steps and one evaluation, then a sharded checkpoint save into
/// `dir` (every rank writes its own shard), then a resume from it on a fresh trainer and
/// one step (the checkpoint removed after). Every rank must call it; run
/// each rank in its own process (`fp8lm bench memory --ranks N` runs `mpirun` children)
/// so each peak is the rank's own.
pub fn measure_peak_zero(
    cfg: &RunConfig,
    vocab: usize,
    steps: usize,
    comm: &dyn fp8lm_collectives::Communicator,
    dir: &std::path::Path,
) -> anyhow::Result<ZeroPeakReport> {
    let mut c = cfg.clone();
    c.precision = crate::config::Precision::Fp8O3;
    // `FP8LM_ZERO_START=whole`: the start-up and resume before `parallel::zero_start`
    // (the whole f32 model drawn, the whole model group loaded), for before/after
    // figures from one binary.
    let whole = std::env::var("FP8LM_ZERO_START").is_ok_and(|v| v == "whole");
    let mut tr = Trainer::new_for_ranks(&c, vocab, comm.size())?;
    if whole {
        tr.zero_draw_whole_model()?;
    }
    tr.enable_data_parallel(comm)?;
    let no_peak = || anyhow::anyhow!("no /proc/self/status: peak resident memory unknown");
    let peak_start_bytes = peak_resident_bytes().ok_or_else(no_peak)?;
    let mut data = RandomTokens {
        vocab: tr.model().dims.v.min(vocab.max(1)),
        state: 0x2545_F491_4F6C_DD1D,
    };
    for _ in 0..steps {
        tr.train_step_dist(&mut data, comm)?;
    }
    tr.evaluate(&data, 1)?;
    let peak_train_bytes = peak_resident_bytes().ok_or_else(no_peak)?;
    let saved = crate::snapshot::save_trainer_sharded(
        &tr,
        &data,
        serde_json::Value::Null,
        comm,
        dir,
        1,
        &mut |_| Ok(()),
    );
    let resumed = saved.and_then(|ck_dir| {
        let peak_bytes = peak_resident_bytes().ok_or_else(no_peak)?;
        let shares = tr.zero_rank_bytes().unwrap_or_default();
        let report = ZeroPeakReport {
            rank: comm.rank(),
            ranks: comm.size(),
            params: tr.model().num_params(),
            state_bytes: tr.optimizer().state_bytes(),
            total_state_bytes: shares.iter().sum(),
            peak_start_bytes,
            peak_train_bytes,
            peak_bytes,
            peak_resume_bytes: None,
        };
        // The resume, as `fp8lm train --resume` under mpirun does it, from a fresh
        // trainer (the old one freed) with the peak counter reset where Linux allows it.
        drop(tr);
        let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        // The model group stays on disk: a rank reads only the tensors it keeps in f32.
        let leave: &[&str] = if whole { &[] } else { &["model"] };
        let ck = crate::checkpoint::Checkpoint::load_leaving(&ck_dir, leave)?;
        let mut tr = Trainer::new_for_ranks(&c, vocab, comm.size())?;
        if whole {
            tr.zero_draw_whole_model()?;
        }
        crate::snapshot::restore_except_optimizer(&mut tr, &mut data, &ck)?;
        tr.enable_data_parallel_from_checkpoint(comm, Some(&ck))?;
        drop(ck);
        tr.train_step_dist(&mut data, comm)?;
        Ok(ZeroPeakReport {
            peak_resume_bytes: if reset { peak_resident_bytes() } else { None },
            ..report
        })
    });
    comm.barrier().map_err(|e| anyhow::anyhow!("{e}"))?;
    if comm.rank() == 0 {
        let _ = std::fs::remove_dir_all(dir);
    }
    resumed
}

/// The per-rank table of [`ZeroPeakReport`]s: optimizer + master state against an even
/// share, and the peak resident set while training and after the checkpoint save.
pub fn zero_peak_table(rows: &[ZeroPeakReport]) -> String {
    let mb = |b: usize| b as f64 / 1e6;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "  {:>4} {:>11} {:>13} {:>11} {:>16} {:>16} {:>16} {:>17}",
        "rank",
        "state (MB)",
        "state/N (MB)",
        "state/(s/N)",
        "peak start (MB)",
        "peak train (MB)",
        "peak +ckpt (MB)",
        "peak resume (MB)"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "  {:>4} {:>11.1} {:>13.1} {:>11.3} {:>16.1} {:>16.1} {:>16.1} {:>17}",
            r.rank,
            mb(r.state_bytes),
            mb(r.total_state_bytes) / r.ranks.max(1) as f64,
            r.share_ratio(),
            mb(r.peak_start_bytes),
            mb(r.peak_train_bytes),
            mb(r.peak_bytes),
            r.peak_resume_bytes
                .map_or("-".to_string(), |b| format!("{:.1}", mb(b)))
        );
    }
    s
}

/// The side-by-side table of [`PeakReport`]s: ledger total, measured peak, and the
/// ledger's share of the peak.
pub fn peak_table(rows: &[PeakReport]) -> String {
    let mb = |b: usize| b as f64 / 1e6;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "  {:<8} {:>12} {:>14} {:>16} {:>15} {:>8}",
        "precision", "state B/par", "ledger (MB)", "ledger B/param", "peak RSS (MB)", "ledger/peak"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "  {:<8} {:>12.2} {:>14.1} {:>16.2} {:>15.1} {:>8.3}",
            r.precision,
            r.state_bytes as f64 / r.params.max(1) as f64,
            mb(r.ledger_bytes),
            r.ledger_bytes as f64 / r.params.max(1) as f64,
            mb(r.peak_bytes),
            r.ledger_bytes as f64 / r.peak_bytes.max(1) as f64
        );
    }
    s
}

/// Resident set size of this process in bytes (Linux `/proc/self/statm`, 4 KiB pages);
/// `None` where that file does not exist.
pub fn resident_bytes() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: usize = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Precision, RunConfig};
    use fp8lm_optim::zero::gpt2_metas;
    use fp8lm_optim::{AdamW, AdamWHyper, Fp8Adam, Fp8AdamConfig};

    #[test]
    fn categories_and_per_param_figures() {
        let metas = gpt2_metas(2, 64, 64, 256);
        let n: usize = metas.iter().map(|m| m.numel()).sum();
        let h = AdamWHyper::default();
        // fp32: the f32 weights are the master.
        let mut l = MemoryLedger::new(n);
        l.add(Category::MasterWeights, "f32 weights", 4 * n);
        l.add(Category::Gradients, "f32 gradients", 4 * n);
        l.add_optimizer(&AdamW::new(&metas, h), ["-", "f32", "f32"]);
        l.add(Category::Activations, "acts", 1000);
        assert_eq!(l.state_bytes_per_param(), 16.0);
        assert_eq!(l.total(), 16 * n + 1000);
        // fp8-o2.
        let mut p: Vec<Vec<f32>> = metas.iter().map(|m| vec![0.01; m.numel()]).collect();
        let mut ps: Vec<&mut [f32]> = p.iter_mut().map(|v| v.as_mut_slice()).collect();
        let opt = Fp8Adam::new(&metas, &mut ps, Fp8AdamConfig::fp8_lm(h)).unwrap();
        let mut l = MemoryLedger::new(n);
        l.add(Category::ComputeWeights, "f32 view of the master", 4 * n);
        l.add(Category::Gradients, "E5M2 gradients", n);
        l.add(Category::Workspace, "f32 gradient accumulation", 4 * n);
        l.add_optimizer(&opt, ["f16", "e4m3", "f16"]);
        let scalars = metas.len() * fp8lm_optim::fp8_adam::SCALAR_BYTES_PER_TENSOR + 8;
        assert_eq!(l.state_bytes(), 6 * n + scalars);
        assert_eq!(l.category_bytes(Category::MasterWeights), 2 * n + scalars);
        assert_eq!(l.category_bytes(Category::FirstMoment), n);
        assert_eq!(l.category_bytes(Category::SecondMoment), 2 * n);
        let r = l.report("fp8-o2");
        assert!(
            r.contains("e4m3 first moment") && r.contains("communication buffers"),
            "{r}"
        );
    }

    #[test]
    fn trainer_ledger_per_precision() {
        let mut cfg = RunConfig::default();
        let n = {
            let tr = Trainer::new(&cfg, 64).unwrap();
            tr.model().num_params()
        };
        for p in [Precision::Fp32, Precision::Fp8O1, Precision::Fp8O2] {
            cfg.precision = p;
            let tr = Trainer::new(&cfg, 64).unwrap();
            let l = MemoryLedger::for_trainer(&tr);
            let bpp = l.state_bytes_per_param();
            match p {
                Precision::Fp32 => assert_eq!(bpp, 16.0),
                // f32 master and moments, FP8 gradients for the linears.
                Precision::Fp8O1 => assert!(bpp > 12.0 && bpp < 16.0, "{bpp}"),
                // 6 for the linears' weights, 16 for norms/biases/positions, + scalars.
                _ => assert!(bpp > 6.0 && bpp < 9.0, "{bpp}"),
            }
            assert!(l.category_bytes(Category::Activations) > 0);
            assert_eq!(l.params, n);
        }
        let r = bench_memory(&cfg, 64, true).unwrap();
        assert!(
            r.contains("fp8-o2") && r.contains("bf16") && r.contains("e4m3"),
            "{r}"
        );
    }

    #[test]
    fn zero_peak_rows_compare_each_rank_with_an_even_share() {
        let row = |rank, state_bytes| ZeroPeakReport {
            rank,
            ranks: 4,
            params: 100,
            state_bytes,
            total_state_bytes: 4_000_000,
            peak_start_bytes: 5_000_000,
            peak_train_bytes: 9_000_000,
            peak_bytes: 9_500_000,
            peak_resume_bytes: None,
        };
        assert_eq!(row(0, 1_000_000).share_ratio(), 1.0);
        assert_eq!(row(1, 1_150_000).share_ratio(), 1.15);
        let t = zero_peak_table(&[row(0, 1_000_000), row(1, 1_150_000)]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[0].contains("peak resume (MB)"), "{t}");
        let cells: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(
            cells,
            ["1", "1.1", "1.0", "1.150", "5.0", "9.0", "9.5", "-"],
            "{t}"
        );
    }

    #[test]
    fn resident_bytes_reads_statm() {
        let r = resident_bytes().expect("/proc/self/statm on Linux");
        assert!(r > 0);
    }
}
