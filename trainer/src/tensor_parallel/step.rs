//! The training step of one tensor-parallel rank ([`Trainer::new_tp`],
//! [`Trainer::train_step_tp`]): the T ranks of a group each hold a [`TpShard`] of the
//! model, read the same batch (their datasets are seeded alike), run the forward and
//! backward with the group's collectives at the Megatron points, and update their own
//! shards. The gradient norm (clipping, skip test) is the whole model's:
//! [`super::shard::grad_norm`].
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
use crate::parallel::DistState;
use crate::train::{grad_sum_squares_on, lr_at, wte_master, StepStats, Trainer};
use crate::RunConfig;
use anyhow::{bail, Result};
use fp8lm_collectives::{CommError, Communicator, ReduceOp};
use fp8lm_optim::Grad;
use std::time::{Duration, Instant};

fn cerr(e: CommError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

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
        if sp && cfg.grad_accum > 1 {
            // (the norms' partial gradients are all-reduced at each backward's end: with
            // several micro-batches the sum held would be reduced again each time)
            bail!(
                "dist.sequence_parallel = true with grad_accum = {}: gradient accumulation \
                 under sequence parallelism is not supported yet; set grad_accum = 1",
                cfg.grad_accum
            );
        }
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
    /// group is `comm` (every rank of the group calls it, with the same data order).
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
        self.tp_step(data, comm, None)
    }

    /// One optimizer step of a D x T grid (`fp8lm_collectives::grid::Grid::groups`):
    /// this rank is tensor-parallel rank `tp.rank()` of its replica and the replica is
    /// data-parallel rank `dp.rank()` of D. The D replicas draw the same D*B-row batch
    /// and keep their B rows (as data parallelism does, `crate::parallel`), shared by
    /// the T ranks of a replica; after the backward every gradient group is averaged
    /// over `dp` as the backward finishes it (FP8-LM all-reduce for the FP8 weight
    /// gradients, f32 ring mean for the rest: `parallel::grad_sync`), then the norm
    /// (over `tp`, of the reduced gradients), skip, clip and update as
    /// [`Trainer::train_step_tp`]. The reported loss is the mean over `dp` of the
    /// replicas' losses. fp8-o3: ZeRO over `dp` instead of the averaging
    /// (`parallel::zero_dxt`). Needs [`Trainer::enable_data_parallel`]`(dp)` first (which
    /// refuses `grad_accum > 1`).
    pub fn train_step_dxt(
        &mut self,
        data: &mut dyn Dataset,
        tp: &dyn Communicator,
        dp: &dyn Communicator,
    ) -> Result<StepStats> {
        let Some(dist) = &self.dist else {
            bail!("train_step_dxt: call enable_data_parallel with the data-parallel communicator first");
        };
        if dp.size() != dist.size || dp.rank() != dist.rank {
            bail!(
                "train_step_dxt: the data-parallel communicator is rank {} of {}, the trainer \
                 was set up as rank {} of {}",
                dp.rank(),
                dp.size(),
                dist.rank,
                dist.size
            );
        }
        let mut dist = self.dist.take();
        let r = self.tp_step(data, tp, dist.as_deref_mut().map(|s| (s, dp)));
        self.dist = dist;
        r
    }

    fn tp_step(
        &mut self,
        data: &mut dyn Dataset,
        comm: &dyn Communicator,
        mut dp: Option<(&mut DistState, &dyn Communicator)>,
    ) -> Result<StepStats> {
        let Some(shard) = self.model.tp else {
            bail!("train_step_tp: this trainer holds the whole model; call train_step");
        };
        if comm.size() != shard.size || comm.rank() != shard.rank {
            bail!(
                "train_step_tp: the tensor-parallel communicator is rank {} of {}, the \
                 trainer holds shard {} of dist.tensor_parallel = {}",
                comm.rank(),
                comm.size(),
                shard.rank,
                shard.size
            );
        }
        let d = self.model.dims;
        let k = self.cfg.grad_accum.max(1);
        let t0 = Instant::now();
        let (mut loss_sum, mut fwd, mut bwd, mut gemm) =
            (0f64, Duration::ZERO, Duration::ZERO, Duration::ZERO);
        let mut nonfinite = false;
        // fp8-o3: the gradients packed for the owners (ZeRO over the replicas of a shard).
        let mut packed = None;
        for micro in 0..k {
            let ts = Instant::now();
            match dp.as_mut() {
                None => data.next_train_batch(d.b, d.t, &mut self.inputs, &mut self.targets),
                Some((dist, _)) => {
                    dist.draw_rows(data, d.b, d.t, &mut self.inputs, &mut self.targets)
                }
            }
            self.check_tokens("training batch")?;
            self.model.set_accumulate(micro > 0);
            self.model.take_gemm_time();
            let wte = wte_master(&self.model, self.optimizer.as_ref());
            let r = self.model.forward_tp(
                &self.inputs,
                Some(&self.targets),
                d.b,
                d.t,
                true,
                wte,
                Some(comm),
            );
            let loss = r?.expect("targets given");
            let t1 = Instant::now();
            let r = match dp.as_mut() {
                None => self
                    .model
                    .backward_tp(Some(comm), &mut |_| {})
                    .map_err(anyhow::Error::from),
                Some((dist, dpc)) if dist.zero_on() => dist
                    .tp_backward_and_pack(&mut self.model, comm, *dpc)
                    .map(|p| packed = Some(p)),
                Some((dist, dpc)) => dist
                    .tp_backward_and_reduce(&mut self.model, comm, *dpc)
                    .map(|nf| nonfinite |= nf),
            };
            self.model.set_accumulate(false);
            r?;
            let t2 = Instant::now();
            loss_sum += loss as f64;
            (fwd, bwd, gemm) = (
                fwd + (t1 - ts),
                bwd + (t2 - t1),
                gemm + self.model.take_gemm_time(),
            );
        }
        let mut loss = (loss_sum / k as f64) as f32;
        let n = dp.as_ref().map_or(1, |(s, _)| s.size);
        if let Some((_, dpc)) = &dp {
            // The replicas' losses (each the same on all ranks of its group) averaged;
            // and the FP8 scale agreements' non-finite flags, which only the replicas of
            // one shard saw, shared with the other shards so the whole grid skips.
            loss = dpc.all_reduce_scalar(loss, ReduceOp::Sum).map_err(cerr)? / n as f32;
            let nf = comm
                .all_reduce_scalar(if nonfinite { 1.0 } else { 0.0 }, ReduceOp::Max)
                .map_err(cerr)?;
            nonfinite = nf > 0.0;
        }
        let lr = lr_at(&self.cfg.optim, self.step, self.cfg.max_steps);
        let sharded = self.tp_sharded();
        let (grad_norm, skipped, comm_time) = match (dp, packed) {
            (Some((dist, dpc)), Some(packed)) => {
                // fp8-o3: reduce-scatter to the owners over `dp`, owner update, master
                // all-gather over `dp`; the norm over the whole grid.
                let mut comm_time = Duration::ZERO;
                let (norm, skipped) = self.zero_update(
                    dist,
                    dpc,
                    loss,
                    &mut comm_time,
                    packed,
                    Some((comm, &sharded)),
                )?;
                (norm, skipped, comm_time)
            }
            _ => {
                let (norm, skipped) =
                    self.tp_norm_and_update(comm, &sharded, loss, k, nonfinite)?;
                (norm, skipped, Duration::ZERO)
            }
        };
        if skipped {
            self.skipped += 1;
        }
        let t3 = Instant::now();
        let stats = StepStats {
            step: self.step,
            loss,
            grad_norm,
            lr,
            skipped,
            tokens: n * k * d.b * d.t,
            forward: fwd,
            backward: bwd,
            optimizer: t3 - (t0 + fwd + bwd),
            gemm,
            comm: comm_time,
            comm_exposed: comm_time,
        };
        self.step += 1;
        Ok(stats)
    }

    /// Norm (over the TP group), skip, clip and update of a replicated optimizer on this
    /// rank's shard; returns (norm, skipped).
    fn tp_norm_and_update(
        &mut self,
        comm: &dyn Communicator,
        sharded: &[bool],
        loss: f32,
        k: usize,
        nonfinite: bool,
    ) -> Result<(f32, bool)> {
        let lr = lr_at(&self.cfg.optim, self.step, self.cfg.max_steps);
        let clip = self.cfg.optim.grad_clip;
        let be = self.model.backend().clone();
        let sum_squares = |g: &[Grad<'_>]| grad_sum_squares_on(&*be, g);
        let norm = |g: &[Grad<'_>]| Ok(grad_norm(comm, g, sharded, sum_squares)?);
        // Every rank sees the same loss (the cross-entropy's reductions) and norm, so the
        // group skips or steps together.
        let skip = |norm: f32| nonfinite || !loss.is_finite() || !norm.is_finite();
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
