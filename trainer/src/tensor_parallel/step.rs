//! A tensor-parallel rank ([`Trainer::new_tp`]) and its step ([`Trainer::train_step_tp`],
//! [`Trainer::train_step_dxt`]): the T ranks of a group each hold a [`TpShard`] of the
//! model, read the same batch (their datasets are seeded alike), run the forward and
//! backward with the group's collectives at the Megatron points, and update their own
//! shards. The step is the one step path, `crate::parallel::step` (these are
//! [`Trainer::train_step_on`] with the group's communicator); what is TP's own here is
//! the gradient norm (clipping, skip test), the whole model's:
//! [`super::shard::grad_norm`], in [`Trainer::tp_norm_and_update`].
//!
//! Data parallelism over such groups (a D x T grid, `fp8lm_collectives::grid`):
//! [`Trainer::train_step_dxt`] after [`Trainer::enable_data_parallel`] with the
//! data-parallel communicator. The replicas split the D*B-row batch as data parallelism
//! does, each gradient group is averaged over the replicas as the backward hands it out
//! (`parallel::grad_sync`, on the step's thread: the backward calls the TP collectives),
//! and the norm and update follow on the averaged gradients, so every replica applies the
//! same update to its bit-identical shards. fp8-o3 runs FP8 ZeRO over the replicas of
//! each shard (`parallel::zero_dxt`): the gradients are packed for their owners instead
//! of averaged, reduce-scattered over `dp`, the owners update and all-gather their new
//! masters over `dp`.

use super::shard::{grad_norm, TpShard};
use crate::data::Dataset;
use crate::model::Dims;
use crate::train::{grad_sum_squares_on, wte_master, StepStats, Trainer};
use crate::RunConfig;
use anyhow::{bail, Result};
use fp8lm_collectives::Communicator;
use fp8lm_optim::Grad;

impl Trainer {
    /// Rank `rank` of a `cfg.dist.tensor_parallel`-way group: its shard of the model (the
    /// slice of the whole model's initial values from `cfg.seed`) and an optimizer over
    /// its shard. Every precision; fp8-o3 computes as fp8-o2 with f32 weights here, and
    /// with D > 1 replicas `enable_data_parallel(dp)` replaces its optimizer by the
    /// rank's ZeRO share of the shard's state (`parallel::zero_dxt`). With
    /// `dist.sequence_parallel` the rank runs norms and residuals on its token shard
    /// (`crate::tensor_parallel::sp`).
    pub fn new_tp(cfg: &RunConfig, vocab: usize, rank: usize) -> Result<Trainer> {
        let t = cfg.dist.tensor_parallel;
        if rank >= t {
            bail!("tensor-parallel rank {rank} is outside dist.tensor_parallel = {t}");
        }
        let sp = cfg.dist.sequence_parallel;
        if sp && cfg.fp8.recipe == "block" && cfg.precision.is_fp8() {
            bail!(
                "dist.sequence_parallel = true with fp8.recipe = \"block\": the FP8 \
                 all-gather shares one per-tensor scale; use \"delayed\" or \"current\""
            );
        }
        let dims = Dims::from_config(cfg, vocab)?;
        let mut shard = TpShard::new(&dims, rank, t).map_err(anyhow::Error::msg)?;
        shard.sp = sp;
        Self::with_shard(cfg, vocab, Some(shard), Self::backend_of(cfg)?, 1)
    }

    /// This rank's shard, when the trainer is one rank of a tensor-parallel group.
    pub fn tp_shard(&self) -> Option<TpShard> {
        self.model.tp
    }

    /// Which tensors of the layout are split over the group (the others are replicated).
    pub fn tp_sharded(&self) -> Vec<bool> {
        let m = &self.model;
        let full = crate::model::Layout::new(&m.dims);
        (0..m.layout.metas.len())
            .map(|i| m.tp.is_some_and(|s| s.is_sharded(&m.dims, &full, i)))
            .collect()
    }

    /// One optimizer step on the next training batch, on a tensor-parallel rank whose
    /// group is `comm` (every rank of the group calls it, with the same data order): the
    /// one step path ([`Trainer::train_step_on`], `crate::parallel::step`) with the
    /// group's collectives inside the model, `grad_accum` micro-batches included.
    pub fn train_step_tp(
        &mut self,
        data: &mut dyn Dataset,
        comm: &dyn Communicator,
    ) -> Result<StepStats> {
        if let Some(dist) = &self.dist {
            bail!(
                "train_step_tp: this trainer is data-parallel rank {} of {}; call \
                 train_step_dxt with the tensor-parallel and data-parallel communicators",
                dist.rank,
                dist.size
            );
        }
        self.run_step(data, None, Some(comm))
    }

    /// One optimizer step of a D x T grid (`fp8lm_collectives::grid::Grid::groups`):
    /// this rank is tensor-parallel rank `tp.rank()` of its replica and the replica is
    /// data-parallel rank `dp.rank()` of D. The one step path
    /// ([`Trainer::train_step_on`]): the D replicas draw the same D*B-row batch and keep
    /// their B rows (as data parallelism does, `crate::parallel`), shared by the T ranks
    /// of a replica; every gradient group is averaged over `dp` as the backward finishes
    /// it (FP8-LM all-reduce for the FP8 weight gradients, f32 ring mean for the rest:
    /// `parallel::grad_sync`), then the norm (over `tp`, of the reduced gradients), skip,
    /// clip and update as [`Trainer::train_step_tp`]. The reported loss is the mean over
    /// `dp` of the replicas' losses. fp8-o3: ZeRO over `dp` instead of the averaging
    /// (`parallel::zero_dxt`). Needs [`Trainer::enable_data_parallel`]`(dp)` first.
    pub fn train_step_dxt(
        &mut self,
        data: &mut dyn Dataset,
        tp: &dyn Communicator,
        dp: &dyn Communicator,
    ) -> Result<StepStats> {
        if self.dist.is_none() {
            bail!("train_step_dxt: call enable_data_parallel with the data-parallel communicator first");
        }
        self.run_step(data, Some(dp), Some(tp))
    }

    /// Step 5 of the step path on a tensor-parallel rank with a replicated optimizer:
    /// the norm of the whole model's gradients (the sharded tensors' squares added over
    /// `comm`, [`grad_norm`]), skip, clip and update of this rank's shard; returns
    /// (norm, skipped).
    pub(crate) fn tp_norm_and_update(
        &mut self,
        comm: &dyn Communicator,
        sharded: &[bool],
        lr: f32,
        clip: f32,
        k: usize,
        skip: impl FnOnce(f32) -> bool,
    ) -> Result<(f32, bool)> {
        let be = self.model.backend().clone();
        let sum_squares = |g: &[Grad<'_>]| grad_sum_squares_on(&*be, g);
        let norm = |g: &[Grad<'_>]| Ok(grad_norm(comm, g, sharded, sum_squares)?);
        self.norm_and_update_with(lr, clip, k, norm, skip)
    }
}

impl Trainer {
    /// Mean loss of one given batch on a tensor-parallel rank (no update; every rank of
    /// the group calls it with the same batch and gets the same figure).
    pub fn loss_on_tp(
        &mut self,
        inputs: &[u32],
        targets: &[u32],
        b: usize,
        t: usize,
        comm: &dyn Communicator,
    ) -> Result<f32> {
        let d = self.model.dims;
        if b == 0 || t == 0 || b > d.b || t > d.t || inputs.len() != b * t || targets.len() != b * t
        {
            bail!(
                "loss_on_tp: batch {b}x{t} does not fit the model (B={}, T={})",
                d.b,
                d.t
            );
        }
        if let Some(&bad) = inputs.iter().chain(targets).find(|&&x| x as usize >= d.v) {
            bail!(
                "loss_on_tp: token id {bad} is outside the model's vocabulary of {}",
                d.v
            );
        }
        let wte = wte_master(&self.model, self.optimizer.as_ref());
        let loss = self
            .model
            .forward_tp(inputs, Some(targets), b, t, false, wte, Some(comm))?;
        Ok(loss.expect("targets given"))
    }

    /// [`Trainer::evaluate_tokens`] on a tensor-parallel rank: the whole group evaluates
    /// every sequence of the fixed validation set together (`comm`: the group).
    pub fn evaluate_tokens_tp(
        &mut self,
        data: &dyn Dataset,
        eval_tokens: usize,
        comm: &dyn Communicator,
    ) -> Result<f32> {
        let d = self.model.dims;
        let (b, t) = (d.b, d.t);
        let seqs = crate::eval::eval_sequences(eval_tokens, t, data.val_sequence_count(t));
        if seqs.is_empty() {
            bail!("evaluation: the validation split holds no sequence of {t} tokens");
        }
        let (mut inputs, mut targets) = (vec![0u32; b * t], vec![0u32; b * t]);
        let mut sum = 0f64;
        for batch in seqs.chunks(b) {
            let n = batch.len() * t;
            data.val_rows(batch, t, &mut inputs[..n], &mut targets[..n]);
            let mean = self.loss_on_tp(&inputs[..n], &targets[..n], batch.len(), t, comm)?;
            sum += mean as f64 * n as f64;
        }
        self.model.take_gemm_time();
        Ok((sum / (seqs.len() * t) as f64) as f32)
    }
}
