//! The training engine: one optimizer step at a time, as the CLI's run loop drives it.
//!
//! [`Trainer::train_step`]: next batch -> forward -> backward -> global gradient norm ->
//! skip if non-finite -> clip -> AdamW with the scheduled learning rate. A step whose loss
//! or gradient norm is non-finite never reaches the weights or the optimizer's moments;
//! it is counted ([`Trainer::skipped_steps`]), reported in [`StepStats::skipped`], and the
//! FP8 scaling states have already recorded the non-finite amax (they keep their previous
//! scale, see `fp8lm_fp8::ScaleState`).

use crate::config::{OptimConfig, Precision, RunConfig};
use crate::data::Dataset;
use crate::model::{CastStats, Dims, LinearPrecision, Model};
use crate::rng::Rng;
use anyhow::{bail, Result};
use fp8lm_fp8::{ScaleState, ScalingRecipe};
use fp8lm_kernels::Backend;
use fp8lm_optim::{AdamW, Fp8Adam, Fp8AdamConfig, Grad, Optimizer};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What one step did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepStats {
    /// Index of this step (0-based; the trainer's step counter before it ran).
    pub step: u64,
    /// Mean training loss of the batch (nats/token).
    pub loss: f32,
    /// Global L2 norm of the gradients, before clipping.
    pub grad_norm: f32,
    pub lr: f32,
    /// True when the update was skipped (non-finite loss or gradients).
    pub skipped: bool,
    /// Tokens processed (B * T).
    pub tokens: usize,
    pub forward: Duration,
    pub backward: Duration,
    pub optimizer: Duration,
    /// Time inside GEMMs (part of forward + backward).
    pub gemm: Duration,
    /// Time in collectives (loss, gradient reduction, weight broadcast; zero on a
    /// single-rank run), including packing and FP8 re-quantisation for the reduction and
    /// waiting for slower ranks.
    pub comm: Duration,
    /// The part of `comm` the step waited for: communication not hidden behind the
    /// backward (equal to `comm` without overlap; zero on a single-rank run).
    pub comm_exposed: Duration,
}

/// Learning rate at `step`: linear warmup to `lr` over `warmup_steps`, then cosine decay
/// to `min_lr` at `max_steps` (and `min_lr` after).
pub fn lr_at(o: &OptimConfig, step: u64, max_steps: usize) -> f32 {
    let (s, w, m) = (step as f64, o.warmup_steps as f64, max_steps as f64);
    if s < w {
        return (o.lr as f64 * (s + 1.0) / w) as f32;
    }
    if s >= m || m <= w {
        return o.min_lr;
    }
    let frac = (s - w) / (m - w);
    let coeff = 0.5 * (1.0 + (std::f64::consts::PI * frac).cos());
    (o.min_lr as f64 + coeff * (o.lr as f64 - o.min_lr as f64)) as f32
}

/// Global L2 norm over all gradient tensors (FP8 ones decoded), accumulated in f64 in a
/// fixed order, on the default backend ([`global_grad_norm_on`] takes one).
pub fn global_grad_norm(grads: &[Grad<'_>]) -> f32 {
    global_grad_norm_on(&*fp8lm_kernels::default_backend(), grads)
}

/// [`global_grad_norm`] with the sums of squares on `be`.
pub fn global_grad_norm_on(be: &dyn Backend, grads: &[Grad<'_>]) -> f32 {
    grad_sum_squares_on(be, grads).sqrt() as f32
}

/// `sum g^2` over all gradient tensors in f64 on the default backend
/// ([`global_grad_norm`] before its root).
pub fn grad_sum_squares(grads: &[Grad<'_>]) -> f64 {
    grad_sum_squares_on(&*fp8lm_kernels::default_backend(), grads)
}

/// [`grad_sum_squares`] on `be` ([`Backend::sum_squares_f32`]; FP8 gradients as
/// `sum decode^2 / scale^2`, [`Backend::sum_squares_fp8`]).
pub fn grad_sum_squares_on(be: &dyn Backend, grads: &[Grad<'_>]) -> f64 {
    grads
        .iter()
        .map(|g| match g {
            Grad::F32(s) => be.sum_squares_f32(s),
            Grad::Fp8(t) => {
                let inv = 1.0 / t.scale as f64;
                be.sum_squares_fp8(&t.data, t.format) * inv * inv
            }
        })
        .sum()
}

/// The optimizer's FP16 master of the token embedding when the model keeps no f32 copy
/// of it (fp8-o2's tied embedding / LM head).
pub(crate) fn wte_master<'a>(
    model: &Model,
    opt: &'a dyn Optimizer,
) -> Option<(&'a [half::f16], f32)> {
    let wte = model.layout.wte;
    // (fp8-o3's E4M3 storage holds its own FP16 units of the embedding.)
    if model.param_is_f32(wte) || model.wte_f16_bytes() > 0 {
        None
    } else {
        opt.master_f16(wte)
    }
}

/// Clip factor for a global norm (1 when clipping is off or not needed).
pub fn clip_scale(grad_norm: f32, clip: f32) -> f32 {
    if clip > 0.0 && grad_norm > clip {
        clip / grad_norm
    } else {
        1.0
    }
}

/// One named FP8 operand's state, for metrics and checkpoints.
pub struct Fp8TensorView<'a> {
    /// `<linear>.x`, `<linear>.w`, `<linear>.dy` (e.g. `h.0.attn.qkv.dy`).
    pub name: String,
    pub state: &'a ScaleState,
    pub stats: &'a CastStats,
}

/// The training engine: model, optimizer, schedule, step counter and RNG.
pub struct Trainer {
    pub cfg: RunConfig,
    pub(crate) model: Model,
    pub(crate) optimizer: Box<dyn Optimizer>,
    pub(crate) step: u64,
    pub(crate) skipped: u64,
    /// Sampling RNG state (checkpointed so `sample` after resume is reproducible).
    pub rng: Rng,
    pub(crate) inputs: Vec<u32>,
    pub(crate) targets: Vec<u32>,
    /// Data-parallel state (see [`crate::parallel`]); `None` on a single-rank run.
    pub(crate) dist: Option<Box<crate::parallel::DistState>>,
    /// fp8-o3 built for several ranks ([`Trainer::new_for_ranks`]): no optimizer state
    /// yet; `enable_data_parallel` builds this rank's share.
    pub(crate) zero_deferred: bool,
    /// fp8-o3: keep the f32 view of the masters on every rank instead of the E4M3
    /// weights (what fp8-o3 held before; [`Trainer::keep_zero_f32_view`], for tests).
    pub(crate) zero_f32_view: bool,
    /// fp8-o3 on several ranks: whether `params` holds the initial weights yet
    /// (`parallel::zero_start`: each rank draws or reads only what it keeps).
    pub(crate) zero_weights: crate::parallel::zero_start::ZeroWeights,
}

/// Overwrite `model`'s weights with the f32 view of the masters `Fp8Adam` would build
/// from them (per FP8 linear weight: the configured master format with the power-of-two
/// scale of the tensor's amax; the other tensors keep f32 masters, so stay unchanged),
/// without building the optimizer. FP16 masters (FP8-LM's) are rounded chunk by chunk
/// with the casts `Fp8Adam::push_tensor` uses (the same bits, tested); another format
/// falls back to a throw-away optimizer over one tensor at a time.
pub(crate) fn round_to_master_view(model: &mut Model, cfg: &Fp8AdamConfig) -> Result<()> {
    let metas = model.layout.metas.clone();
    for (i, meta) in metas.iter().enumerate() {
        if model.linear_of_tensor[i].is_some() {
            round_tensor_to_master_view(meta, &mut model.params[model.layout.range(i)], cfg)?;
        }
    }
    Ok(())
}

/// [`round_to_master_view`] for one FP8 linear weight `p` (`meta`'s values).
pub(crate) fn round_tensor_to_master_view(
    meta: &fp8lm_optim::ParamMeta,
    p: &mut [f32],
    cfg: &Fp8AdamConfig,
) -> Result<()> {
    use fp8lm_fp8::cast::{amax_f32, f16_to_f32_amax, f32_to_f16_amax};
    use fp8lm_fp8::scaling::{scale_for_amax, ScaleRounding};
    let [f_master, _, _] = cfg.formats();
    if f_master != fp8lm_optim::StateFormat::F16 {
        let mut one = Fp8Adam::empty(*cfg);
        return one.push_tensor(meta, p, true).map_err(anyhow::Error::msg);
    }
    let amax = amax_f32(p);
    if !amax.is_finite() {
        bail!("parameter {:?} has non-finite initial values", meta.name);
    }
    let s = scale_for_amax(65504.0, amax, 0, ScaleRounding::PowerOfTwo).unwrap_or(1.0);
    let mut h = [half::f16::ZERO; 1 << 12];
    for c in p.chunks_mut(h.len()) {
        let h = &mut h[..c.len()];
        f32_to_f16_amax(c, s, h);
        f16_to_f32_amax(h, 1.0 / s, c);
    }
    Ok(())
}

/// The linear precision a run's config asks for (fp8-o2 computes like fp8-o1; it differs
/// in the optimizer and, for O3, where its state lives).
pub fn linear_precision(cfg: &RunConfig) -> Result<LinearPrecision> {
    Ok(match cfg.precision {
        Precision::Fp32 => LinearPrecision::Fp32,
        Precision::Bf16 => LinearPrecision::Bf16,
        // fp8-o2/o3 compute like fp8-o1; they differ in the optimizer and where its state lives.
        Precision::Fp8O1 | Precision::Fp8O2 | Precision::Fp8O3 => {
            let recipe = match cfg.fp8.recipe.as_str() {
                "delayed" => {
                    if cfg.fp8.amax_history == 0 {
                        bail!("fp8.amax_history must be at least 1 for the delayed recipe, got 0");
                    }
                    ScalingRecipe::Delayed { history_len: cfg.fp8.amax_history }
                }
                "current" => ScalingRecipe::Current,
                "block" => ScalingRecipe::Block { exact: cfg.fp8.block_rounding == "exact" },
                other => bail!("fp8.recipe = {other:?} is not a scaling recipe; use \"delayed\", \"current\" or \"block\""),
            };
            LinearPrecision::Fp8 {
                recipe,
                margin: cfg.fp8.margin,
            }
        }
    })
}

impl Trainer {
    /// A freshly initialised model (seeded by `cfg.seed`) with fp32 AdamW, or with the
    /// FP8-LM optimizer for `precision = "fp8-o2"` (which also rounds the initial weights
    /// to its FP16 master, so the model computes with what the optimizer holds). `vocab` is the
    /// data's vocabulary size (used unless `model.vocab` is set). Errors name the config
    /// key at fault. The model runs on the backend `cfg.backend` names.
    pub fn new(cfg: &RunConfig, vocab: usize) -> Result<Trainer> {
        Self::new_for_ranks(cfg, vocab, 1)
    }

    /// The backend the config names: `device = "cuda[:N]"` is the CUDA backend
    /// (`fp8lm_kernels::cuda::CudaStaged`, feature `cuda`; `backend` must stay `"cpu"`),
    /// else `cfg.backend` (`"cpu"` or `"reference"`).
    pub(crate) fn backend_of(cfg: &RunConfig) -> Result<Arc<dyn Backend>> {
        let kind = fp8lm_kernels::BackendKind::parse(&cfg.backend).map_err(|allowed| {
            anyhow::anyhow!("backend = {:?}: expected {allowed}", cfg.backend)
        })?;
        match crate::config::Device::parse(&cfg.device) {
            Ok(crate::config::Device::Cuda(n)) => {
                if kind != fp8lm_kernels::BackendKind::Cpu {
                    anyhow::bail!(
                        "backend = {:?} with device = {:?}: the {} backend runs on the CPU; \
                         leave backend = \"cpu\" for a GPU run",
                        cfg.backend,
                        cfg.device,
                        kind.name()
                    );
                }
                cuda_backend(n, &cfg.device)
            }
            _ => Ok(kind.instance()),
        }
    }

    /// [`Trainer::new`] on backend `be` (any [`Backend`]; `cfg.backend` is ignored).
    pub fn new_on(cfg: &RunConfig, vocab: usize, be: Arc<dyn Backend>) -> Result<Trainer> {
        Self::new_on_for_ranks(cfg, vocab, be, 1)
    }

    /// [`Trainer::new`] for one of `ranks` data-parallel ranks. The same, except for
    /// fp8-o3 on several ranks: no optimizer state is built here (the whole state would
    /// be a transient the size of every rank's share together), and (without tensor
    /// parallelism) no weight is drawn either: `enable_data_parallel` draws them tensor
    /// by tensor, keeping this rank's units' masters, or a resume reads only the f32
    /// tensors (`parallel::zero_start`), so no rank holds the whole model in f32. Until
    /// then the trainer cannot step. (Under tensor parallelism the weights are rounded
    /// in place to the master's view, as the single-rank optimizer would leave them.)
    pub fn new_for_ranks(cfg: &RunConfig, vocab: usize, ranks: usize) -> Result<Trainer> {
        Self::new_on_for_ranks(cfg, vocab, Self::backend_of(cfg)?, ranks)
    }

    /// [`Trainer::new_for_ranks`] on backend `be`.
    pub fn new_on_for_ranks(
        cfg: &RunConfig,
        vocab: usize,
        be: Arc<dyn Backend>,
        ranks: usize,
    ) -> Result<Trainer> {
        if cfg.dist.tensor_parallel > 1 {
            bail!(
                "dist.tensor_parallel = {}: build each rank's trainer with \
                 Trainer::new_tp (crate::tensor_parallel::step)",
                cfg.dist.tensor_parallel
            );
        }
        Self::with_shard(cfg, vocab, None, be, ranks)
    }

    /// [`Trainer::new_on_for_ranks`] for the whole model (`None`) or tensor-parallel rank
    /// `shard`, as one of `ranks` data-parallel ranks.
    pub(crate) fn with_shard(
        cfg: &RunConfig,
        vocab: usize,
        shard: Option<crate::tensor_parallel::TpShard>,
        be: Arc<dyn Backend>,
        ranks: usize,
    ) -> Result<Trainer> {
        let dims = Dims::from_config(cfg, vocab)?;
        let precision = linear_precision(cfg)?;
        let o = &cfg.optim;
        if !(o.lr.is_finite() && o.lr >= 0.0 && o.min_lr.is_finite() && o.min_lr >= 0.0) {
            bail!(
                "optim.lr = {} / optim.min_lr = {} must be finite and non-negative",
                o.lr,
                o.min_lr
            );
        }
        if !(0.0..1.0).contains(&o.beta1) || !(0.0..1.0).contains(&o.beta2) {
            bail!(
                "optim.beta1 = {} and optim.beta2 = {} must lie in [0, 1)",
                o.beta1,
                o.beta2
            );
        }
        let hyper = o.hyper();
        let cfg8 = Fp8AdamConfig::fp8_lm(hyper);
        let (model, optimizer): (Model, Box<dyn Optimizer>) = match cfg.precision {
            // fp8-o2: low-precision state for the FP8 linears' weights, f32 for the rest;
            // the linears compute with the E4M3 copy the optimizer writes (no f32 weights).
            // The block recipe casts its weights tile by tile in the forward, so it keeps
            // f32 compute weights and takes the fp8-o3 path below (one rank = fp8-o2).
            Precision::Fp8O2 if cfg.fp8.recipe != "block" => {
                let (model, opt) =
                    crate::custom::fp8_o2_on(be, dims, precision, cfg.seed, shard, cfg8)?;
                (model, Box::new(opt))
            }
            // fp8-o3 on a single rank is fp8-o2 with f32 weights (one rank owns every
            // tensor); with several ranks `enable_data_parallel` replaces this optimizer
            // by the rank's ZeRO share and (`Model::hold_linear_weights_as_e4m3`) these
            // f32 weights by the E4M3 ones the owners cast and share (the f32 view of
            // the masters stays for the block recipe and tensor parallelism).
            // With E4M3 weight storage (no tensor parallelism, no block recipe, which
            // keep the f32 view) the weights are not even drawn here: each rank draws
            // (or reads from the checkpoint) only what it keeps (`parallel::zero_start`),
            // so no rank holds a full-precision model.
            Precision::Fp8O3 if ranks > 1 && shard.is_none() && cfg.fp8.recipe != "block" => {
                let model = Model::new_undrawn_on(be, dims, precision);
                (model, Box::new(Fp8Adam::empty(cfg8)))
            }
            Precision::Fp8O3 if ranks > 1 => {
                let mut model = Model::new_tp_on(be, dims, precision, cfg.seed, shard);
                round_to_master_view(&mut model, &cfg8)?;
                (model, Box::new(Fp8Adam::empty(cfg8)))
            }
            Precision::Fp8O2 | Precision::Fp8O3 => {
                let mut model = Model::new_tp_on(be, dims, precision, cfg.seed, shard);
                let metas = model.layout.metas.clone();
                let low: Vec<bool> = model.linear_of_tensor.iter().map(Option::is_some).collect();
                let (mut params, _) = model.params_and_grads();
                let opt = Fp8Adam::with_low_precision(&metas, &mut params, cfg8, &low)
                    .map_err(anyhow::Error::msg)?;
                (model, Box::new(opt))
            }
            _ => {
                let model = Model::new_tp_on(be, dims, precision, cfg.seed, shard);
                let opt = AdamW::new(&model.layout.metas, hyper);
                (model, Box::new(opt))
            }
        };
        let rows = dims.b * dims.t;
        Ok(Trainer {
            cfg: cfg.clone(),
            model,
            optimizer,
            step: 0,
            skipped: 0,
            rng: Rng::new(cfg.seed ^ 0x5A3D_1E00),
            inputs: vec![0; rows],
            targets: vec![0; rows],
            dist: None,
            zero_deferred: cfg.precision == Precision::Fp8O3 && ranks > 1,
            zero_f32_view: false,
            zero_weights: if cfg.precision == Precision::Fp8O3
                && ranks > 1
                && shard.is_none()
                && cfg.fp8.recipe != "block"
            {
                crate::parallel::zero_start::ZeroWeights::Undrawn
            } else {
                crate::parallel::zero_start::ZeroWeights::Held
            },
        })
    }

    /// fp8-o3 on several data-parallel ranks: whether `enable_data_parallel` gives this
    /// rank the E4M3 weight storage ([`Model::hold_linear_weights_as_e4m3`]): every
    /// FP8 recipe but the block one (cast tile by tile in the forward), without tensor
    /// parallelism (`parallel/zero_dxt.rs` shares f32 views), unless
    /// [`Trainer::keep_zero_f32_view`] asked for the f32 view.
    pub(crate) fn zero_e4m3_eligible(&self, ranks: usize) -> bool {
        self.cfg.precision == Precision::Fp8O3
            && ranks > 1
            && self.model.tp.is_none()
            && self.cfg.fp8.recipe != "block"
            && !self.zero_f32_view
    }

    /// fp8-o3, before `enable_data_parallel`: keep every rank's f32 view of the masters
    /// (the storage fp8-o3 had before the E4M3 weights), so tests can check that the
    /// E4M3 storage trains bit for bit like it.
    #[doc(hidden)]
    pub fn keep_zero_f32_view(&mut self) {
        self.zero_f32_view = true;
    }

    /// fp8-o3 with E4M3 weight storage: the linears' weights are the E4M3 bytes the
    /// ZeRO owners share, the masters live on their owners only.
    pub fn zero_holds_e4m3(&self) -> bool {
        self.cfg.precision == Precision::Fp8O3 && self.model.weights_from_optimizer()
    }

    /// Swap in another optimizer (e.g. the FP8 one), built over `model().layout.metas`.
    pub fn set_optimizer(&mut self, opt: Box<dyn Optimizer>) {
        self.optimizer = opt;
    }
    pub fn optimizer(&self) -> &dyn Optimizer {
        self.optimizer.as_ref()
    }
    pub fn optimizer_mut(&mut self) -> &mut dyn Optimizer {
        self.optimizer.as_mut()
    }
    pub fn model(&self) -> &Model {
        &self.model
    }
    /// Tensor `i`'s weights as f32: the model's own, or (fp8-o2's linears, which have
    /// no f32 copy) the f32 view of the optimizer's FP16 master, exactly.
    ///
    /// fp8-o3 with E4M3 weight storage ([`Trainer::zero_holds_e4m3`]): a rank holds no
    /// master but its own units', so this is what the rank computes with: the tied
    /// embedding's FP16 masters (exact), other linears' E4M3 bytes decoded (`e4m3 /
    /// scale`, not the master); [`Trainer::gather_weights_f32`] gathers the exact
    /// values from the owners.
    pub fn weight_f32(&self, i: usize) -> Vec<f32> {
        let m = &self.model;
        if self.zero_holds_e4m3() && !m.param_is_f32(i) {
            if i == m.layout.wte {
                if let Some(v) = m.wte_f16_view() {
                    return v;
                }
            }
            return m.e4m3_weight_view(i);
        }
        match self.optimizer.master_f16(i) {
            Some((h, scale)) if !m.param_is_f32(i) => {
                let mut v = vec![0f32; h.len()];
                fp8lm_fp8::cast::f16_to_f32_amax(h, 1.0 / scale, &mut v);
                v
            }
            _ => m.params[m.layout.range(i)].to_vec(),
        }
    }
    /// Every tensor's [`Trainer::weight_f32`], flat in layout order (what `params` holds
    /// where every weight is f32).
    pub fn weights_f32_all(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.model.layout.total);
        for i in 0..self.model.layout.metas.len() {
            out.extend(self.weight_f32(i));
        }
        out
    }
    /// The model and the optimizer, borrowed together.
    pub fn model_and_optimizer_mut(&mut self) -> (&mut Model, &dyn Optimizer) {
        (&mut self.model, self.optimizer.as_ref())
    }
    pub fn model_mut(&mut self) -> &mut Model {
        &mut self.model
    }
    /// Steps taken so far (including skipped ones); the next step's index.
    pub fn step(&self) -> u64 {
        self.step
    }
    /// Set the step counter (resume from a checkpoint).
    pub fn set_step(&mut self, step: u64) {
        self.step = step;
    }
    pub fn skipped_steps(&self) -> u64 {
        self.skipped
    }

    /// Every FP8 operand's scaling state and cast statistics, in a stable order (empty
    /// unless the precision is FP8).
    pub fn fp8_tensors(&self) -> Vec<Fp8TensorView<'_>> {
        let mut out = Vec::new();
        for lin in &self.model.linears {
            if let Some(f) = &lin.fp8 {
                for (suffix, op) in [("x", &f.x), ("w", &f.w), ("dy", &f.dy)] {
                    out.push(Fp8TensorView {
                        name: format!("{}.{suffix}", lin.name),
                        state: &op.state,
                        stats: &op.stats,
                    });
                }
            }
        }
        out
    }

    /// Mutable scaling states by the names of [`Trainer::fp8_tensors`] (checkpoint restore).
    pub fn fp8_scale_states_mut(&mut self) -> Vec<(String, &mut ScaleState)> {
        let mut out = Vec::new();
        for lin in &mut self.model.linears {
            let name = lin.name.clone();
            if let Some(f) = &mut lin.fp8 {
                out.push((format!("{name}.x"), &mut f.x.state));
                out.push((format!("{name}.w"), &mut f.w.state));
                out.push((format!("{name}.dy"), &mut f.dy.state));
            }
        }
        out
    }

    pub(crate) fn check_tokens(&self, what: &str) -> Result<()> {
        let v = self.model.dims.v;
        for (i, (&x, &y)) in self.inputs.iter().zip(&self.targets).enumerate() {
            if x as usize >= v || y as usize >= v {
                bail!(
                    "{what}: token id {} at position {i} is outside the model's vocabulary of {v}",
                    x.max(y)
                );
            }
        }
        Ok(())
    }

    /// The training forward (step 2 of `parallel::step`, which runs the backward itself,
    /// overlapped with the reduction under data parallelism): checks the tokens, resets
    /// the GEMM timer, returns the loss and the time the forward ended.
    /// `tp`: the tensor-parallel group, whose collectives the model calls (a failed one
    /// is returned).
    pub(crate) fn forward_train(
        &mut self,
        what: &str,
        tp: Option<&dyn fp8lm_collectives::Communicator>,
    ) -> Result<(f32, Instant)> {
        let d = self.model.dims;
        self.check_tokens(what)?;
        self.model.take_gemm_time();
        let wte = wte_master(&self.model, self.optimizer.as_ref());
        let loss = self
            .model
            .forward_tp(&self.inputs, Some(&self.targets), d.b, d.t, true, wte, tp)?
            .expect("targets given");
        Ok((loss, Instant::now()))
    }

    /// The global gradient norm, then (unless `skip(norm)`) the optimizer's update with
    /// the clip factor folded in, the optimizer writing the new compute weights where
    /// the model keeps them (f32, or fp8-o2's E4M3 copies). The gradients held are the
    /// sum over `micro` micro-batches: norm and update use that sum / `micro`. Returns
    /// (norm, skipped).
    pub(crate) fn norm_and_update(
        &mut self,
        lr: f32,
        clip: f32,
        micro: usize,
        skip: impl FnOnce(f32) -> bool,
    ) -> (f32, bool) {
        let be = self.model.backend().clone();
        let norm = |g: &[Grad<'_>]| Ok(global_grad_norm_on(&*be, g));
        self.norm_and_update_with(lr, clip, micro, norm, skip)
            .expect("the optimizer wrote these compute weights before")
    }

    /// [`Trainer::norm_and_update`] with the norm of the gradients held computed by
    /// `norm` (the tensor-parallel step sums the shards' squares over its group).
    pub(crate) fn norm_and_update_with(
        &mut self,
        lr: f32,
        clip: f32,
        micro: usize,
        norm: impl FnOnce(&[Grad<'_>]) -> Result<f32>,
        skip: impl FnOnce(f32) -> bool,
    ) -> Result<(f32, bool)> {
        let be = self.model.backend().clone();
        let (mut outs, grads) = self.model.outs_and_grads();
        let inv = 1.0 / micro.max(1) as f32;
        // (x * 1.0 == x: one micro-batch gives exactly the un-accumulated figures.)
        let grad_norm = norm(&grads)? * inv;
        let skipped = skip(grad_norm);
        if !skipped {
            let scale = clip_scale(grad_norm, clip) * inv;
            self.optimizer.step_on(&*be, &mut outs, &grads, lr, scale);
        }
        let written = crate::model::gpt::written_of(&outs);
        drop((outs, grads));
        self.model.accept_written(&written);
        if skipped {
            // A delayed scale may have moved in the forward: re-cast the unchanged
            // masters with it, as a forward casting its own weights would.
            self.model
                .write_compute_weights(self.optimizer.as_ref())
                .map_err(anyhow::Error::msg)?;
        }
        Ok((grad_norm, skipped))
    }

    /// Mean validation loss over validation batches `0..batches` (no state changes; FP8
    /// scaling histories are not advanced).
    pub fn evaluate(&mut self, data: &dyn Dataset, batches: usize) -> Result<f32> {
        if batches == 0 {
            bail!("evaluate: eval_batches must be at least 1");
        }
        let d = self.model.dims;
        let mut sum = 0f64;
        for i in 0..batches {
            data.val_batch(i, d.b, d.t, &mut self.inputs, &mut self.targets);
            self.check_tokens("validation batch")?;
            let wte = wte_master(&self.model, self.optimizer.as_ref());
            sum += self
                .model
                .forward_ext(&self.inputs, Some(&self.targets), d.b, d.t, false, wte)
                .expect("targets") as f64;
            self.model.take_gemm_time();
        }
        Ok((sum / batches as f64) as f32)
    }

    /// Mean loss of one given batch (`inputs`, `targets` each `b * t`), no update.
    pub fn loss_on(&mut self, inputs: &[u32], targets: &[u32], b: usize, t: usize) -> Result<f32> {
        let d = self.model.dims;
        if b == 0 || t == 0 || b > d.b || t > d.t || inputs.len() != b * t || targets.len() != b * t
        {
            bail!("loss_on: batch {b}x{t} with {} inputs / {} targets does not fit the model (B={}, T={})", inputs.len(), targets.len(), d.b, d.t);
        }
        if let Some(&bad) = inputs.iter().chain(targets).find(|&&x| x as usize >= d.v) {
            bail!(
                "loss_on: token id {bad} is outside the model's vocabulary of {}",
                d.v
            );
        }
        let wte = wte_master(&self.model, self.optimizer.as_ref());
        Ok(self
            .model
            .forward_ext(inputs, Some(targets), b, t, false, wte)
            .expect("targets"))
    }

    /// Continue `prompt` by `n` tokens. `temperature <= 0` is greedy; otherwise tokens are
    /// drawn from softmax(logits / temperature) with an RNG seeded by `seed`. The context
    /// is the last T tokens.
    pub fn sample(
        &mut self,
        prompt: &[u32],
        n: usize,
        temperature: f32,
        seed: u64,
    ) -> Result<Vec<u32>> {
        let d = self.model.dims;
        if prompt.is_empty() {
            bail!("sample: the prompt is empty; give at least one token");
        }
        if let Some(&bad) = prompt.iter().find(|&&x| x as usize >= d.v) {
            bail!(
                "sample: prompt token id {bad} is outside the model's vocabulary of {}",
                d.v
            );
        }
        if !temperature.is_finite() {
            bail!("sample: temperature {temperature} is not finite");
        }
        let mut rng = Rng::new(seed);
        let mut seq = prompt.to_vec();
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let ctx = &seq[seq.len().saturating_sub(d.t)..];
            let t = ctx.len();
            let wte = wte_master(&self.model, self.optimizer.as_ref());
            self.model.forward_ext(ctx, None, 1, t, false, wte);
            let logits = self.model.logits_row(t - 1);
            let next = if temperature <= 0.0 {
                logits
                    .iter()
                    .enumerate()
                    .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
                        if v > bv {
                            (i, v)
                        } else {
                            (bi, bv)
                        }
                    })
                    .0
            } else {
                let maxv = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let w: Vec<f64> = logits
                    .iter()
                    .map(|&x| ((x as f64 - maxv) / temperature as f64).exp())
                    .collect();
                let total: f64 = w.iter().sum();
                let mut u = rng.next_f64() * total;
                let mut pick = w.len() - 1;
                for (i, &wi) in w.iter().enumerate() {
                    if u < wi {
                        pick = i;
                        break;
                    }
                    u -= wi;
                }
                pick
            };
            seq.push(next as u32);
            out.push(next as u32);
        }
        self.model.take_gemm_time();
        Ok(out)
    }
}

/// GPU `n` as the model's backend (staged through host memory: see
/// `fp8lm_kernels::cuda::staged`).
#[cfg(feature = "cuda")]
fn cuda_backend(n: usize, device: &str) -> Result<Arc<dyn Backend>> {
    let be = fp8lm_kernels::cuda::CudaStaged::new(n)
        .map_err(|e| anyhow::anyhow!("device = {device:?}: {e}"))?;
    tracing::warn!(
        device,
        "the CUDA backend stages every op through host memory and has never been run on a \
         GPU by this project: check it with scripts/gpu-check.sh first"
    );
    Ok(Arc::new(be))
}

#[cfg(not(feature = "cuda"))]
fn cuda_backend(_n: usize, device: &str) -> Result<Arc<dyn Backend>> {
    anyhow::bail!(
        "device = {device:?}: this build has no CUDA support (rebuild with \
         `cargo build --release --features cuda`); use device = \"cpu\""
    )
}
