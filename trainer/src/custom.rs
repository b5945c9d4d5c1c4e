//! # Building blocks for custom training loops
//!
//! [`Trainer`](crate::Trainer) is one fixed loop (the one `fp8lm train` runs). A library
//! user who wants another loop (another schedule, loss, data pipeline or parallel
//! layout) drives the same pieces directly; this module is the small facade over them
//! that hides the parts which are awkward to get right by hand:
//!
//! | piece | entry point |
//! |---|---|
//! | the model (explicit forward/backward) | [`Model::new`] (f32 weights), [`fp8_o2`] (fp8-o2: weights held by the optimizer) |
//! | one FP8 layer | [`Linear::new`] with [`FP8`] precision ([`Linear::forward`], [`Linear::backward`], [`Linear::quantize_wgrad`]) |
//! | forward with loss | [`forward_loss`] (checks the batch; feeds fp8-o2's tied embedding from the optimizer's FP16 master) |
//! | backward | [`Model::backward`] |
//! | norm, clip, update | [`optimizer_step`] (any [`Optimizer`]: `Fp8Adam`, `AdamW`); [`skip_update`] for a step skipped by the loop |
//! | evaluation | [`evaluate`] |
//! | data-parallel gradients | [`GradSync`] (FP8-LM all-reduce of the FP8 weight gradients, f32 mean of the rest) over any [`Communicator`] |
//! | checkpoints | [`save_checkpoint`] / [`load_checkpoint`] (the same files as `fp8lm train`'s) |
//!
//! Why a facade rather than the internals: in fp8-o2 no f32 copy of the linears'
//! weights exists. The optimizer holds the FP16 master and writes each layer's E4M3
//! weight in its update pass, so an update is "hand the optimizer the model's write
//! targets, then give the model back the scales it wrote" ([`Model::outs_and_grads`],
//! [`Model::accept_written`]); a skipped step must still re-cast the weights; the tied
//! embedding is looked up from the master; a checkpoint must store the master in place
//! of the weight. Each function here does one of these the way [`crate::Trainer`] does,
//! so a custom loop keeps the memory savings and bit-exact resumes of the stock one.
//!
//! A whole loop is `examples/custom_loop.rs` (one process) and
//! `examples/custom_loop_dp.rs` (under `mpirun -n 2`), at the repository root.
//!
//! ```
//! use fp8lm_trainer::prelude::*;
//!
//! # fn main() -> anyhow::Result<()> {
//! // A 1-layer GPT-2, fp8-o2: FP8 GEMMs, FP8 weight gradients, the 6-byte FP8 optimizer.
//! let mut cfg = RunConfig::default();
//! cfg.model.layers = 1;
//! cfg.model.channels = 32;
//! cfg.batch = 4;
//! let dims = Dims::from_config(&cfg, 32)?;
//! let hyper = AdamWHyper::default();
//! let (mut model, mut opt) = fp8_o2(dims, FP8, 7, Fp8AdamConfig::fp8_lm(hyper))?;
//!
//! // One fixed batch: token i is followed by i + 1 (learnable).
//! let (b, t) = (dims.b, dims.t);
//! let inputs: Vec<u32> = (0..b * t).map(|i| (i % 31) as u32).collect();
//! let targets: Vec<u32> = inputs.iter().map(|&x| x + 1).collect();
//! let first = forward_loss(&mut model, &opt, &inputs, &targets, b, t, true)?;
//! let mut last = first;
//! for _ in 0..40 {
//!     last = forward_loss(&mut model, &opt, &inputs, &targets, b, t, true)?;
//!     model.backward();
//!     let step = optimizer_step(&mut model, &mut opt, 1e-2, 1.0);
//!     assert!(!step.skipped && step.grad_norm.is_finite());
//! }
//! assert!(first > 3.0, "starts near ln(32) = 3.47: {first}");
//! assert!(last < 0.5 * first, "the FP8 model learns the batch: {first} -> {last}");
//! # Ok(())
//! # }
//! ```

use crate::checkpoint::{save_streamed, Checkpoint, CheckpointMeta, CkptDtype, FORMAT};
use crate::ckpt_stream::{StreamTensor, TensorData};
use crate::config::{Precision, RunConfig};
use crate::data::Dataset;
use crate::model::gpt::written_of;
use crate::model::{Dims, Linear, LinearPrecision, Model};
use crate::train::{clip_scale, global_grad_norm_on, wte_master};
use anyhow::{bail, Context, Result};
use fp8lm_collectives::{
    BufMut, Communicator, GradAllReduceConfig, GradAllReducer, GradMethod, GradReport, ReduceOp,
};
use fp8lm_fp8::{ScaleState, ScaledFp8, ScalingRecipe};
use fp8lm_optim::{Fp8Adam, Fp8AdamConfig, Optimizer};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// FP8-LM's default linear precision: E4M3 inputs and weights, E5M2 output gradients,
/// delayed scaling over the last 16 amaxes, no margin (the config defaults
/// `fp8.recipe = "delayed"`, `fp8.amax_history = 16`, `fp8.margin = 0`).
///
/// One FP8 layer on its own: its forward is close to the f32 product, and its weight
/// gradient leaves the backward as E5M2 with a scale, which is what the FP8 optimizer and
/// the FP8 all-reduce take.
///
/// ```
/// use fp8lm_trainer::prelude::*;
///
/// let (n, c, oc) = (8, 16, 4);
/// let mut lin = Linear::new("demo".into(), c, oc, n, FP8);
/// let x: Vec<f32> = (0..n * c).map(|i| ((i * 7 % 13) as f32 - 6.0) / 6.0).collect();
/// let w: Vec<f32> = (0..oc * c).map(|i| ((i * 5 % 11) as f32 - 5.0) / 20.0).collect();
/// let mut y = vec![0f32; n * oc];
/// lin.forward(&mut y, &x, &w, None, n, true);
/// // The f32 reference: y = x @ w^T.
/// let exact: Vec<f32> = (0..n * oc)
///     .map(|i| (0..c).map(|k| x[i / oc * c + k] * w[i % oc * c + k]).sum())
///     .collect();
/// let err = y.iter().zip(&exact).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
/// let amax = exact.iter().fold(0f32, |m, v| m.max(v.abs()));
/// assert!(err < 0.1 * amax, "E4M3 x E4M3 within 10% of the largest output: {err} vs {amax}");
///
/// // Backward: dx in f32, dW through an f32 scratch, then stored as E5M2 + scale.
/// let dy = vec![0.1f32; n * oc];
/// let (mut dx, mut dw) = (vec![0f32; n * c], vec![0f32; oc * c]);
/// lin.backward(&mut dx, &mut dw, None, &dy, &x, &w, n);
/// lin.quantize_wgrad(&dw);
/// let g = &lin.fp8.as_ref().unwrap().wgrad;
/// assert_eq!(g.format, fp8lm_trainer::model::WGRAD_FORMAT);
/// let decoded = g.dequantize();
/// for (a, b) in decoded.iter().zip(&dw) {
///     assert!((a - b).abs() <= 0.13 * b.abs() + 1e-6, "E5M2 keeps 2 mantissa bits: {a} vs {b}");
/// }
/// ```
pub const FP8: LinearPrecision = LinearPrecision::Fp8 {
    recipe: ScalingRecipe::Delayed { history_len: 16 },
    margin: 0,
};

/// fp8-o2's model and its optimizer, built together as [`crate::Trainer`] builds them:
/// every tensor is initialised (seeded by `seed`, the same values as [`Model::new`]) and
/// handed to the FP8-LM optimizer, which keeps the FP16 master (linear weights) or f32
/// state (norms, biases, positions); the linears then compute with the E4M3 weights the
/// optimizer writes, and no f32 copy of them is ever allocated. Drive it with
/// [`forward_loss`] and [`optimizer_step`] (the module's example).
///
/// `precision` must be an FP8 precision with per-tensor scaling ([`FP8`], or
/// `LinearPrecision::Fp8` with the current recipe): the block recipe casts its weights
/// tile by tile in the forward, so it needs f32 weights ([`Model::new`] with
/// [`Fp8Adam::with_low_precision`]).
pub fn fp8_o2(
    dims: Dims,
    precision: LinearPrecision,
    seed: u64,
    cfg: Fp8AdamConfig,
) -> Result<(Model, Fp8Adam)> {
    let be = fp8lm_kernels::default_backend();
    fp8_o2_on(be, dims, precision, seed, None, cfg).context("fp8_o2")
}

/// [`fp8_o2`] on backend `be`, for the whole model or tensor-parallel rank `shard`
/// (what `Trainer::new` builds for fp8-o2).
pub(crate) fn fp8_o2_on(
    be: std::sync::Arc<dyn fp8lm_kernels::Backend>,
    dims: Dims,
    precision: LinearPrecision,
    seed: u64,
    shard: Option<crate::tensor_parallel::TpShard>,
    cfg: Fp8AdamConfig,
) -> Result<(Model, Fp8Adam)> {
    let layout = Model::layout_of(&dims, shard);
    let mut opt = Fp8Adam::empty(cfg);
    let mut model =
        Model::new_fp8_compute_tp_on(be, dims, precision, seed, shard, &mut |i, values, low| {
            opt.push_tensor(&layout.metas[i], values, low)
        })
        .map_err(anyhow::Error::msg)?;
    model
        .write_compute_weights(&opt)
        .map_err(|e| anyhow::anyhow!("writing the E4M3 weights: {e}"))?;
    Ok((model, opt))
}

fn check_batch(model: &Model, inputs: &[u32], targets: &[u32], b: usize, t: usize) -> Result<()> {
    let d = &model.dims;
    if b == 0 || t == 0 || b > d.b || t > d.t {
        bail!(
            "batch {b} x {t} does not fit the model, built for at most {} x {} (Dims::b x Dims::t)",
            d.b,
            d.t
        );
    }
    if inputs.len() != b * t || targets.len() != b * t {
        bail!(
            "batch {b} x {t} needs {} inputs and targets, got {} and {}",
            b * t,
            inputs.len(),
            targets.len()
        );
    }
    if let Some((i, &x)) = inputs
        .iter()
        .chain(targets)
        .enumerate()
        .find(|(_, &x)| x as usize >= d.v)
    {
        let (what, pos) = if i < inputs.len() {
            ("input", i)
        } else {
            ("target", i - inputs.len())
        };
        bail!(
            "{what} token id {x} at position {pos} is outside the model's vocabulary of {}",
            d.v
        );
    }
    Ok(())
}

/// Forward of a `b x t` batch (`b`, `t` at most the model's `Dims::b`, `Dims::t`) with
/// targets: the mean cross-entropy (nats/token), and the model is ready for
/// [`Model::backward`]. `train`: advance the FP8 scaling histories (a training step);
/// pass `false` for evaluation, which then changes no state. `opt` is the optimizer the
/// model was built with: fp8-o2's tied embedding has no f32 copy and is looked up from
/// its FP16 master. Errors name a batch that does not fit or a token outside the
/// vocabulary (the model itself would index out of bounds).
pub fn forward_loss(
    model: &mut Model,
    opt: &dyn Optimizer,
    inputs: &[u32],
    targets: &[u32],
    b: usize,
    t: usize,
    train: bool,
) -> Result<f32> {
    check_batch(model, inputs, targets, b, t)?;
    let wte = wte_master(model, opt);
    Ok(model
        .forward_ext(inputs, Some(targets), b, t, train, wte)
        .expect("targets given"))
}

/// What [`optimizer_step`] did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepOutcome {
    /// Global L2 norm of the gradients before clipping (FP8 ones decoded, f64 sum).
    pub grad_norm: f32,
    /// The factor the gradients were multiplied by (`clip / grad_norm` when clipped).
    pub clip_scale: f32,
    /// The norm was not finite: nothing was updated (weights and moments unchanged).
    pub skipped: bool,
}

/// Global gradient norm of the last backward (FP8 weight gradients decoded exactly).
pub fn grad_norm(model: &Model) -> f32 {
    global_grad_norm_on(&**model.backend(), &model.grad_views())
}

/// Global norm, clip to `clip` (0 = no clipping), and one update of `opt` with learning
/// rate `lr`, writing the new compute weights where `model` keeps them (f32, or fp8-o2's
/// E4M3 copies, cast in the optimizer's fused pass). A non-finite norm (an overflowed
/// backward) skips the update, as `Trainer` does; the compute weights are then re-cast
/// from the unchanged master with the scale the forward may have moved.
pub fn optimizer_step(
    model: &mut Model,
    opt: &mut dyn Optimizer,
    lr: f32,
    clip: f32,
) -> StepOutcome {
    let be = model.backend().clone();
    let (mut outs, grads) = model.outs_and_grads();
    let norm = global_grad_norm_on(&*be, &grads);
    let skipped = !norm.is_finite();
    let scale = if skipped { 1.0 } else { clip_scale(norm, clip) };
    if !skipped {
        opt.step_on(&*be, &mut outs, &grads, lr, scale);
    }
    let written = written_of(&outs);
    drop((outs, grads));
    model.accept_written(&written);
    if skipped {
        skip_update(model, opt);
    }
    StepOutcome {
        grad_norm: norm,
        clip_scale: scale,
        skipped,
    }
}

/// What a step that skips its update must still do (instead of [`optimizer_step`], e.g.
/// when [`GradSync::all_reduce`] reports a non-finite gradient on some rank): re-cast
/// fp8-o2's E4M3 compute weights from the unchanged master, because the forward may have
/// moved their delayed scale (a forward casting its own weights would have cast them
/// with it). Nothing to do for models whose f32 weights are the master.
pub fn skip_update(model: &mut Model, opt: &dyn Optimizer) {
    model
        .write_compute_weights(opt)
        .expect("the optimizer wrote these compute weights before");
}

/// Mean loss over validation batches `0..batches` of `data`, each `Dims::b x Dims::t`
/// (no state changes: the FP8 scaling histories do not advance).
pub fn evaluate(
    model: &mut Model,
    opt: &dyn Optimizer,
    data: &dyn Dataset,
    batches: usize,
) -> Result<f32> {
    if batches == 0 {
        bail!("evaluate: batches must be at least 1");
    }
    let (b, t) = (model.dims.b, model.dims.t);
    let (mut x, mut y) = (vec![0u32; b * t], vec![0u32; b * t]);
    let mut sum = 0f64;
    for i in 0..batches {
        data.val_batch(i, b, t, &mut x, &mut y);
        sum += forward_loss(model, opt, &x, &y, b, t, false)
            .with_context(|| format!("validation batch {i}"))? as f64;
    }
    Ok((sum / batches as f64) as f32)
}

/// Data-parallel gradient synchronisation for a custom loop: after each rank's
/// [`Model::backward`], [`GradSync::all_reduce`] leaves every rank holding the mean
/// gradient, so the same [`optimizer_step`] on every rank keeps the replicas identical.
///
/// The FP8 weight gradients (E5M2 + scale) go through FP8-LM's all-reduce
/// ([`GradAllReducer::all_reduce_scaled_fp8`]: shared minimum scale, automatic factor
/// mu, FP8 sums; the data crosses the wire in FP8), everything else (norms, biases,
/// positions, f32 models' weights) through the f32 ring. Every reduction is a ring with a
/// fixed order, so all ranks get the same bits, and in-process ranks
/// ([`fp8lm_collectives::run_ranks`]) the same bits as MPI ones.
///
/// ```
/// use fp8lm_trainer::prelude::*;
///
/// # fn main() -> anyhow::Result<()> {
/// let mut cfg = RunConfig::default();
/// cfg.model.layers = 1;
/// cfg.model.channels = 32;
/// cfg.batch = 2;
/// let dims = Dims::from_config(&cfg, 32)?;
/// // Two in-process ranks (threads); under mpirun use `fp8lm_collectives::init()`.
/// let weights = run_ranks(2, |comm| -> anyhow::Result<Vec<f32>> {
///     let cfg8 = Fp8AdamConfig::fp8_lm(AdamWHyper::default());
///     let (mut model, mut opt) = fp8_o2(dims, FP8, 3, cfg8)?; // same seed: same start
///     let mut sync = GradSync::new(GradAllReduceConfig::default());
///     let (b, t) = (dims.b, dims.t);
///     for step in 0..3 {
///         // Each rank its own rows of the global batch.
///         let x: Vec<u32> = (0..b * t).map(|i| ((i + 7 * comm.rank() + step) % 31) as u32).collect();
///         let y: Vec<u32> = x.iter().map(|&v| v + 1).collect();
///         forward_loss(&mut model, &opt, &x, &y, b, t, true)?;
///         model.backward();
///         let report = sync.all_reduce(&mut model, comm)?;
///         assert!(report.bytes_sent > 0);
///         if report.nonfinite {
///             skip_update(&mut model, &opt); // an overflow on some rank: all skip
///         } else {
///             assert!(!optimizer_step(&mut model, &mut opt, 1e-2, 1.0).skipped);
///         }
///     }
///     Ok(weights_f32(&model, &opt))
/// })?;
/// assert_eq!(weights[0], weights[1], "both replicas hold the same weights, bit for bit");
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct GradSync {
    /// The FP8 weight gradients' reducer (FP8-LM by default; keeps mu per tensor).
    pub fp8: GradAllReducer,
    /// The f32 gradients' reducer.
    pub f32: GradAllReducer,
}

impl GradSync {
    /// `fp8`: the FP8 gradients' all-reduce (`GradAllReduceConfig::default()` is FP8-LM
    /// with E5M2 sums; `method` may be any of
    /// [`fp8lm_collectives::SCALED_FP8_METHODS`]). The f32 gradients are summed in f32.
    pub fn new(fp8: GradAllReduceConfig) -> Self {
        let f32_cfg = GradAllReduceConfig {
            method: GradMethod::F32,
            ..fp8.clone()
        };
        GradSync {
            fp8: GradAllReducer::new(fp8),
            f32: GradAllReducer::new(f32_cfg),
        }
    }

    /// Replace every gradient of `model`'s last backward by its mean over `comm`'s ranks.
    /// Returns the FP8 all-reduce's report (per FP8 tensor: saturated and flushed counts,
    /// scale, mu; `nonfinite`, the same on every rank, when some rank's gradient
    /// overflowed: then call [`skip_update`] instead of [`optimizer_step`] on every rank).
    /// Every rank must call it, with models of the same shape and precision.
    pub fn all_reduce(&mut self, model: &mut Model, comm: &dyn Communicator) -> Result<GradReport> {
        let fp8_linears: Vec<usize> = (0..model.linears.len())
            .filter(|&l| model.linears[l].fp8.is_some())
            .collect();
        let mut report = GradReport::default();
        if !fp8_linears.is_empty() {
            let mut taken: Vec<ScaledFp8> = fp8_linears
                .iter()
                .map(|&l| {
                    let f = model.linears[l].fp8.as_mut().expect("FP8 linear");
                    let empty = ScaledFp8::zeros(&[0], f.wgrad.format);
                    std::mem::replace(&mut f.wgrad, empty)
                })
                .collect();
            let res = self.fp8.all_reduce_scaled_fp8(comm, &mut taken);
            for (&l, t) in fp8_linears.iter().zip(taken) {
                model.linears[l].fp8.as_mut().expect("FP8 linear").wgrad = t;
            }
            report = res.context("FP8 gradient all-reduce")?;
        }
        let f32_tensors: Vec<usize> = (0..model.layout.metas.len())
            .filter(|&i| model.grad_is_f32(i))
            .collect();
        if !f32_tensors.is_empty() {
            let Model { grads, layout, .. } = model;
            let mut views: Vec<&mut [f32]> = Vec::with_capacity(f32_tensors.len());
            let mut rest: &mut [f32] = grads;
            let mut at = 0;
            for &i in &f32_tensors {
                let r = layout.range(i);
                let (_, tail) = rest.split_at_mut(r.start - at);
                let (g, tail) = tail.split_at_mut(r.len());
                views.push(g);
                rest = tail;
                at = r.end;
            }
            let r = self.f32.all_reduce_mean(comm, &mut views);
            let f = r.context("f32 gradient all-reduce")?;
            report.bytes_sent += f.bytes_sent;
        }
        Ok(report)
    }
}

/// The mean of `x` over `comm`'s ranks (e.g. the loss, for reporting).
pub fn mean_over_ranks(comm: &dyn Communicator, x: f32) -> Result<f32> {
    let mut v = [x];
    comm.all_reduce(BufMut::F32(&mut v), ReduceOp::Sum)
        .context("mean over ranks")?;
    Ok(v[0] / comm.size() as f32)
}

/// Every weight as f32, flat in layout order: the model's own, or (fp8-o2's linears,
/// which keep none) the exact f32 view of the optimizer's FP16 master. For comparing
/// replicas or exporting; it allocates the whole model.
pub fn weights_f32(model: &Model, opt: &dyn Optimizer) -> Vec<f32> {
    let mut out = Vec::with_capacity(model.layout.total);
    for i in 0..model.layout.metas.len() {
        match opt.master_f16(i) {
            Some((h, scale)) if !model.param_is_f32(i) => {
                let mut v = vec![0f32; h.len()];
                fp8lm_fp8::cast::f16_to_f32_amax(h, 1.0 / scale, &mut v);
                out.extend(v);
            }
            _ => out.extend_from_slice(&model.params[model.layout.range(i)]),
        }
    }
    out
}

/// Every FP8 operand's scaling state, named as `Trainer::fp8_tensors` names them
/// (`<linear>.x`, `.w`, `.dy`), the keys of `checkpoint.json`'s `scaling`.
fn scale_states(model: &Model) -> Vec<(String, &ScaleState)> {
    let mut out = Vec::new();
    for lin in &model.linears {
        if let Some(f) = &lin.fp8 {
            for (suffix, op) in [("x", &f.x), ("w", &f.w), ("dy", &f.dy)] {
                out.push((format!("{}.{suffix}", lin.name), &op.state));
            }
        }
    }
    out
}

/// The run config a custom loop's checkpoint records: the defaults, with the model's
/// shape, batch and precision (a custom loop's own settings are its own business; this
/// is what `fp8lm inspect` shows and `Checkpoint::check_model_shape` compares).
fn config_of(model: &Model) -> RunConfig {
    let d = &model.dims;
    let mut cfg = RunConfig::default();
    cfg.model.arch = d.arch;
    cfg.model.layers = d.l;
    cfg.model.heads = d.h;
    cfg.model.channels = d.c;
    cfg.model.context = d.t;
    cfg.model.vocab = d.v;
    cfg.batch = d.b;
    let lin: Option<&Linear> = model.linears.first();
    match lin.map(|l| l.precision) {
        Some(LinearPrecision::Bf16) => cfg.precision = Precision::Bf16,
        Some(LinearPrecision::Fp8 { recipe, margin }) => {
            cfg.precision = if model.weights_from_optimizer() {
                Precision::Fp8O2
            } else {
                Precision::Fp8O1
            };
            cfg.fp8.margin = margin;
            match recipe {
                ScalingRecipe::Delayed { history_len } => {
                    cfg.fp8.recipe = "delayed".into();
                    cfg.fp8.amax_history = history_len;
                }
                ScalingRecipe::Current => cfg.fp8.recipe = "current".into(),
                ScalingRecipe::Block { exact } => {
                    cfg.fp8.recipe = "block".into();
                    cfg.fp8.block_rounding = if exact { "exact" } else { "power-of-two" }.into();
                }
            }
        }
        _ => cfg.precision = Precision::Fp32,
    }
    cfg
}

/// Save `model` and `opt` after `step` steps as `<root>/step_<step>/` (atomically: a
/// temporary directory, fsync, rename), in the format `fp8lm train` writes
/// (`model.safetensors`: f32 weights, fp8-o2's linears as their FP16 master with its
/// scale; `optimizer.safetensors`: the optimizer's state in its own formats;
/// `checkpoint.json`: the model's shape and precision, `data_position`, every FP8 scaling
/// state and the CRC-32 of each file). Tensors are streamed from where they live, so
/// saving allocates no copy of the state. `data_position` is the loop's
/// [`Dataset::position`] (0 if it has none). Returns the checkpoint's directory.
///
/// ```
/// use fp8lm_trainer::prelude::*;
///
/// # fn main() -> anyhow::Result<()> {
/// let mut cfg = RunConfig::default();
/// cfg.model.layers = 1;
/// cfg.model.channels = 32;
/// cfg.batch = 2;
/// let dims = Dims::from_config(&cfg, 32)?;
/// let cfg8 = Fp8AdamConfig::fp8_lm(AdamWHyper::default());
/// let (mut model, mut opt) = fp8_o2(dims, FP8, 1, cfg8)?;
/// let (b, t) = (dims.b, dims.t);
/// let x: Vec<u32> = (0..b * t).map(|i| (i % 31) as u32).collect();
/// let y: Vec<u32> = x.iter().map(|&v| v + 1).collect();
/// for _ in 0..3 {
///     forward_loss(&mut model, &opt, &x, &y, b, t, true)?;
///     model.backward();
///     optimizer_step(&mut model, &mut opt, 1e-2, 1.0);
/// }
/// let root = std::env::temp_dir().join(format!("fp8lm-doc-ckpt-{}", std::process::id()));
/// let dir = save_checkpoint(&root, 3, 0, &model, &opt)?;
///
/// // A fresh model of the same shape (another seed), then the checkpoint.
/// let (mut fresh, mut fresh_opt) = fp8_o2(dims, FP8, 99, cfg8)?;
/// let ck = load_checkpoint(&dir, &mut fresh, &mut fresh_opt)?;
/// std::fs::remove_dir_all(&root)?;
/// assert_eq!(ck.meta.step, 3);
/// let a = forward_loss(&mut model, &opt, &x, &y, b, t, false)?;
/// let c = forward_loss(&mut fresh, &fresh_opt, &x, &y, b, t, false)?;
/// assert_eq!(a.to_bits(), c.to_bits(), "the reloaded model gives the same loss, bit for bit");
/// # Ok(())
/// # }
/// ```
pub fn save_checkpoint(
    root: &Path,
    step: u64,
    data_position: u64,
    model: &Model,
    opt: &dyn Optimizer,
) -> Result<PathBuf> {
    let mut scaling = serde_json::Map::new();
    for (name, st) in scale_states(model) {
        scaling.insert(name, crate::snapshot::scale_state_json(st));
    }
    let meta = CheckpointMeta {
        format: FORMAT.into(),
        step,
        config: config_of(model),
        rng_state: 0,
        data_position,
        scaling: Value::Object(scaling),
        extra: serde_json::json!({ "written_by": "fp8lm_trainer::custom::save_checkpoint" }),
        files: BTreeMap::new(),
        optimizer_shards: None,
        tp_shards: None,
    };
    let tensors: Vec<StreamTensor<'_>> = model
        .named_params()
        .enumerate()
        .map(|(i, (m, p))| match opt.master_f16(i) {
            Some((h, scale)) if !model.param_is_f32(i) => StreamTensor {
                name: m.name.clone(),
                dtype: CkptDtype::F16,
                shape: m.shape.clone(),
                scale: Some(scale),
                data: TensorData::F16(h),
            },
            _ => StreamTensor {
                name: m.name.clone(),
                dtype: CkptDtype::F32,
                shape: m.shape.clone(),
                scale: None,
                data: TensorData::F32(p),
            },
        })
        .collect();
    let mut state: Vec<StreamTensor<'_>> = Vec::new();
    opt.visit_state(&mut |n, s| state.push(StreamTensor::from_state(n, s)));
    let groups = vec![
        ("model".to_string(), tensors),
        ("optimizer".to_string(), state),
    ];
    save_streamed(&meta, &groups, root, 0, &mut |_| Ok(())).with_context(|| {
        format!(
            "saving the checkpoint of step {step} under {}",
            root.display()
        )
    })
}

/// Load a checkpoint written by [`save_checkpoint`] (or by `fp8lm train` with the same
/// precision and a replicated optimizer) into `model` and `opt`, which must have the
/// checkpoint's shape and precision (a fresh [`fp8_o2`] / [`Model::new`] pair): weights,
/// optimizer state (master, moments, step count), every FP8 scaling state, then the
/// compute weights re-cast from the restored master. Training continues bit for bit as
/// if it had never stopped. `path` may be the checkpoint's directory, a folder of
/// checkpoints (the newest is taken) or a run directory. Files are checked against their
/// CRC-32 first; a tensor of another shape, a missing state entry or scaling state, or
/// another optimizer's state are refused naming it. Returns the checkpoint (its
/// `meta.step` and `meta.data_position` are for the loop to restore).
pub fn load_checkpoint(
    path: &Path,
    model: &mut Model,
    opt: &mut dyn Optimizer,
) -> Result<Checkpoint> {
    let ck = Checkpoint::load(path)?;
    let dir = ck.dir.display().to_string();
    let metas = model.layout.metas.clone();
    for (i, m) in metas.iter().enumerate() {
        let v = ck.tensor("model", &m.name, &m.shape)?.to_f32()?;
        if model.param_is_f32(i) {
            model
                .set_param(&m.name, &v)
                .map_err(|e| anyhow::anyhow!("{dir}: {e}"))?;
        } else {
            opt.load_master(i, &v)
                .map_err(|e| anyhow::anyhow!("{dir}: {}: {e}", m.name))?;
        }
    }
    let stored = ck
        .groups
        .get("optimizer")
        .with_context(|| format!("{dir}: no optimizer.safetensors"))?;
    let mut state = Vec::new();
    for (name, tmpl) in opt.export_state() {
        let t = stored.iter().find(|t| t.name == name).with_context(|| {
            format!(
                "{dir}/optimizer.safetensors: no state tensor {name} (written by another \
                 optimizer or precision?)"
            )
        })?;
        state.push((name, crate::snapshot::tensor_to_state(t, &tmpl)?));
    }
    opt.import_state(state)
        .map_err(|e| anyhow::anyhow!("{dir}/optimizer.safetensors: {e}"))?;
    let scaling = ck.meta.scaling.as_object().cloned().unwrap_or_default();
    for lin in &mut model.linears {
        let name = lin.name.clone();
        if let Some(f) = &mut lin.fp8 {
            for (suffix, st) in [
                ("x", &mut f.x.state),
                ("w", &mut f.w.state),
                ("dy", &mut f.dy.state),
            ] {
                let key = format!("{name}.{suffix}");
                let v = scaling.get(&key).with_context(|| {
                    format!("{dir}: no FP8 scaling state for {key} (checkpoint precision differs?)")
                })?;
                crate::snapshot::restore_scale_state(&key, st, v)?;
            }
        }
    }
    model
        .write_compute_weights(opt)
        .map_err(|e| anyhow::anyhow!("{dir}: re-casting the compute weights: {e}"))?;
    Ok(ck)
}
