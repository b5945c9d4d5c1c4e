//! The one training step, on one rank or many, with or without tensor parallelism.
//! [`Trainer::train_step`] is this step with no communicator, [`Trainer::train_step_dist`]
//! with a data-parallel one, [`Trainer::train_step_tp`] / [`Trainer::train_step_dxt`]
//! (`crate::tensor_parallel::step`) with a tensor-parallel group (and a data-parallel
//! one); all four are [`Trainer::train_step_on`], i.e. `Trainer::run_step`:
//!
//! 1. batch: one rank draws `B` rows; N data-parallel ranks each draw the same
//!    `N*B`-row global batch and keep their rows (so the token stream is a single-rank
//!    run's with `N*B` rows); the T ranks of a tensor-parallel group keep the same rows;
//! 2. forward (`Trainer::forward_train`; under TP the model calls the group's
//!    collectives at the Megatron points);
//! 3. backward, and with several data-parallel ranks the gradient reduction of each group
//!    as the backward finishes it (`grad_sync`: replicated precisions; `zero`:
//!    fp8-o3's scale agreement and packing), overlapped or not (`overlap`; under TP on
//!    the step's thread, between the backward's TP collectives);
//!    steps 1-3 run `grad_accum` times (each backward adds to the gradients);
//! 4. the loss, averaged over the data-parallel ranks (one scalar all-reduce); under TP
//!    the FP8 scale agreements' non-finite flags are shared over the group as well;
//! 5. a device backend's error ends the step; then norm, skip, clip and update:
//!    `Trainer::norm_and_update` for replicated optimizers (under TP the norm adds the
//!    sharded tensors' squares over the group, `Trainer::tp_norm_and_update`),
//!    `Trainer::zero_update` (reduce-scatter to the owners, owner update, master
//!    all-gather) for fp8-o3.

use super::overlap::run_backward;
use super::zero::ZeroPacked;
use super::{comm_err, DistState};
use crate::data::Dataset;
use crate::model::FinalGrads;
use crate::train::{lr_at, StepStats, Trainer};
use anyhow::{bail, Result};
use fp8lm_collectives::{Communicator, ReduceOp};
use std::time::{Duration, Instant};

/// What the backward of one micro-batch did (step 3).
struct BackwardDone {
    end: Instant,
    /// Time in the group reductions, and the part after the backward ended.
    comm: Duration,
    exposed: Duration,
    /// The FP8 scale agreement saw a non-finite gradient (replicated FP8 modes).
    nonfinite: bool,
    /// fp8-o3: the gradients packed for the reduce-scatter to the owners.
    packed: Option<ZeroPacked>,
}

impl Trainer {
    /// One optimizer step on the next training batch (a single-rank run; a trainer set
    /// up for data parallelism refuses it, naming its rank: use
    /// [`Trainer::train_step_dist`]).
    pub fn train_step(&mut self, data: &mut dyn Dataset) -> Result<StepStats> {
        if let Some(dist) = &self.dist {
            bail!(
                "train_step: this trainer is rank {} of {} data-parallel ranks; call \
                 train_step_dist with the communicator",
                dist.rank,
                dist.size
            );
        }
        self.run_step(data, None, None)
    }

    /// One data-parallel optimizer step: this rank's shard of the next global batch,
    /// forward, backward, gradient reduction, then the update (replicated, or ZeRO's
    /// owner update + all-gather of the new weights). Every rank must call it with its
    /// communicator. The loss and gradient norm in the result are global. Needs
    /// [`Trainer::enable_data_parallel`] first.
    pub fn train_step_dist(
        &mut self,
        data: &mut dyn Dataset,
        comm: &dyn Communicator,
    ) -> Result<StepStats> {
        if self.dist.is_none() {
            bail!("train_step_dist: call enable_data_parallel first");
        }
        self.run_step(data, Some(comm), None)
    }

    /// One optimizer step of any grid (the module's step): `tp` is this rank's
    /// tensor-parallel group, given exactly when the trainer holds a shard
    /// ([`Trainer::new_tp`]); `dp` its data-parallel group, given exactly when the
    /// trainer is set up for data parallelism ([`Trainer::enable_data_parallel`]). The
    /// four named steps are this call with the communicators they take.
    pub fn train_step_on(
        &mut self,
        data: &mut dyn Dataset,
        tp: Option<&dyn Communicator>,
        dp: Option<&dyn Communicator>,
    ) -> Result<StepStats> {
        match (&self.dist, dp) {
            (Some(dist), None) => bail!(
                "train_step: this trainer is data-parallel rank {} of {}; pass the \
                 data-parallel communicator",
                dist.rank,
                dist.size
            ),
            (None, Some(_)) => bail!("train_step: call enable_data_parallel first"),
            _ => {}
        }
        self.run_step(data, dp, tp)
    }

    /// The step path of all of them (module docs): `comm` is given exactly when the
    /// trainer is set up for data parallelism, `tp` exactly when it holds a
    /// tensor-parallel shard.
    pub(crate) fn run_step(
        &mut self,
        data: &mut dyn Dataset,
        comm: Option<&dyn Communicator>,
        tp: Option<&dyn Communicator>,
    ) -> Result<StepStats> {
        match (self.model.tp, tp) {
            (Some(s), None) => bail!(
                "train_step: this trainer holds shard {} of dist.tensor_parallel = {}; \
                 call train_step_tp (or train_step_dxt) with the tensor-parallel communicator",
                s.rank,
                s.size
            ),
            (None, Some(_)) => {
                bail!("train_step_tp: this trainer holds the whole model; call train_step")
            }
            (Some(s), Some(c)) if c.size() != s.size || c.rank() != s.rank => bail!(
                "train_step_tp: the tensor-parallel communicator is rank {} of {}, the \
                 trainer holds shard {} of dist.tensor_parallel = {}",
                c.rank(),
                c.size(),
                s.rank,
                s.size
            ),
            _ => {}
        }
        let mut dist = self.dist.take();
        let r = self.run_step_with(data, dist.as_deref_mut().zip(comm), tp);
        self.dist = dist;
        r
    }

    fn run_step_with(
        &mut self,
        data: &mut dyn Dataset,
        mut dp: Option<(&mut DistState, &dyn Communicator)>,
        tp: Option<&dyn Communicator>,
    ) -> Result<StepStats> {
        if self.zero_deferred && dp.is_none() {
            bail!(
                "train_step: this fp8-o3 trainer was built for several ranks \
                 (Trainer::new_for_ranks) and holds no optimizer state yet; call \
                 enable_data_parallel first"
            );
        }
        if let Some((dist, comm)) = &dp {
            if comm.size() != dist.size || comm.rank() != dist.rank {
                bail!(
                    "train_step_dist: communicator is rank {} of {}, the trainer was set up as rank {} of {}",
                    comm.rank(),
                    comm.size(),
                    dist.rank,
                    dist.size
                );
            }
        }
        let d = self.model.dims;
        let (n, rank) = dp.as_ref().map_or((1, 0), |(s, _)| (s.size, s.rank));
        let rows = d.b * d.t;
        // `grad_accum` micro-batches: each backward (of its own mean loss) adds to the
        // gradients held, and only the last one's reduces them over the data-parallel
        // replicas (FP8-LM all-reduce, or fp8-o3's reduce-scatter, of the sums); the sum
        // is scaled by 1/k in the update (folded into grad_scale with the clip factor),
        // so no buffer is rescaled. FP8 weight gradients accumulate in E5M2 (see
        // `Linear::quantize_wgrad_acc`).
        let k = self.cfg.grad_accum.max(1);
        let label = match dp {
            Some(_) => format!("training batch (rank {rank})"),
            None => "training batch".to_string(),
        };
        let t0 = Instant::now();
        let (mut loss_sum, mut fwd, mut bwd, mut gemm) =
            (0f64, Duration::ZERO, Duration::ZERO, Duration::ZERO);
        let (mut comm_time, mut exposed) = (Duration::ZERO, Duration::ZERO);
        let (mut nonfinite, mut packed) = (false, None);
        for micro in 0..k {
            let ts = Instant::now();
            // 1. The batch.
            match dp.as_mut() {
                None => data.next_train_batch(d.b, d.t, &mut self.inputs, &mut self.targets),
                Some((dist, _)) => {
                    dist.draw_rows(data, d.b, d.t, &mut self.inputs, &mut self.targets)
                }
            }
            // 2-3. Forward, backward (+ reduction).
            self.model.set_accumulate(micro > 0);
            // Only the last micro-batch's backward reduces over the replicas: the ones
            // before it only add into this rank's gradients.
            let reduce = dp.as_mut().filter(|_| micro + 1 == k);
            let r = self.forward_train(&label, tp).and_then(|(l, t1)| {
                let b = self.backward_phase(reduce.map(|(s, c)| (&mut **s, *c)), tp)?;
                Ok((l, t1, b))
            });
            self.model.set_accumulate(false);
            let (l, t1, b) = r?;
            loss_sum += l as f64;
            fwd += t1 - ts;
            bwd += b.end - t1;
            gemm += self.model.take_gemm_time();
            comm_time += b.comm;
            exposed += b.exposed;
            nonfinite |= b.nonfinite;
            packed = b.packed;
        }
        // A device backend's failed op (kept by the backend, `Backend::take_error`) ends
        // the step here, before any update, naming the op.
        if let Some(e) = self.model.backend().take_error() {
            bail!("step {}: {e}", self.step);
        }
        let (t1, t2) = (t0 + fwd, t0 + fwd + bwd);
        let mut loss = (loss_sum / k as f64) as f32;

        // 4. The global loss.
        if let Some((_, comm)) = &dp {
            let tc = Instant::now();
            loss = comm
                .all_reduce_scalar(loss, ReduceOp::Sum)
                .map_err(comm_err)?
                / n as f32;
            if let Some(tp) = tp {
                // The FP8 scale agreements' non-finite flags: only the replicas of one
                // shard saw each, so the group shares them and the whole grid skips.
                let nf = tp
                    .all_reduce_scalar(if nonfinite { 1.0 } else { 0.0 }, ReduceOp::Max)
                    .map_err(comm_err)?;
                nonfinite = nf > 0.0;
            }
            let dt = tc.elapsed();
            comm_time += dt;
            exposed += dt;
        }

        // 5. Norm, skip, clip, update.
        let lr = lr_at(&self.cfg.optim, self.step, self.cfg.max_steps);
        let clip = self.cfg.optim.grad_clip;
        // Under TP every rank of the group sees the same loss (the cross-entropy's
        // reductions) and norm, so the group skips or steps together.
        let skip = |g: f32| nonfinite || !loss.is_finite() || !g.is_finite();
        let sharded = tp.map(|_| self.tp_sharded());
        let tp_sharded = tp.zip(sharded.as_deref());
        let (grad_norm, skipped) = match (dp, packed) {
            (Some((dist, comm)), Some(packed)) => {
                let before = comm_time;
                let r = self.zero_update(dist, comm, loss, &mut comm_time, packed, tp_sharded)?;
                exposed += comm_time - before;
                r
            }
            _ => match tp_sharded {
                Some((tp, sharded)) => self.tp_norm_and_update(tp, sharded, lr, clip, k, skip)?,
                None => self.norm_and_update(lr, clip, k, skip),
            },
        };
        if skipped {
            self.skipped += 1;
            tracing::warn!(
                step = self.step,
                loss,
                grad_norm,
                "non-finite loss or gradients: step skipped{}",
                if n > 1 { " on all ranks" } else { "" }
            );
        }
        let t3 = Instant::now();
        let stats = StepStats {
            step: self.step,
            loss,
            grad_norm,
            lr,
            skipped,
            tokens: n * k * rows,
            forward: t1 - t0,
            backward: t2 - t1,
            optimizer: t3 - t2,
            gemm,
            comm: comm_time,
            comm_exposed: exposed,
        };
        self.step += 1;
        Ok(stats)
    }

    /// Step 3: the backward; with data parallelism, each group of final gradients is
    /// reduced (replicated precisions) or agreed and packed for its owners (fp8-o3) as
    /// the backward finishes it.
    fn backward_phase(
        &mut self,
        dp: Option<(&mut DistState, &dyn Communicator)>,
        tp: Option<&dyn Communicator>,
    ) -> Result<BackwardDone> {
        let Some((dist, comm)) = dp else {
            self.model.backward_tp(tp, &mut |_| {}).map_err(comm_err)?;
            return Ok(BackwardDone {
                end: Instant::now(),
                comm: Duration::ZERO,
                exposed: Duration::ZERO,
                nonfinite: false,
                packed: None,
            });
        };
        let (n, rank) = (dist.size, dist.rank);
        let Some(z) = dist.zero.as_ref() else {
            let r = self.backward_and_reduce(dist, comm, tp)?;
            return Ok(BackwardDone {
                end: r.backward_end,
                comm: r.comm,
                exposed: r.exposed,
                nonfinite: r.nonfinite,
                packed: None,
            });
        };
        let mut p = z.pack_buffers(n);
        let mut next = 0usize;
        let mut pack = |g: FinalGrads<'_>| -> Result<()> {
            let zg = match z.groups.get(next) {
                Some(zg) if zg.group == g.group => zg,
                zg => bail!(
                    "rank {rank}: the backward finished gradient group {:?} where group {:?} was due",
                    g.group,
                    zg.map(|x| x.group)
                ),
            };
            next += 1;
            z.pack_group(zg, &g, comm, &mut p)
        };
        let (end, spent, exposed) = run_backward(
            &mut self.model,
            rank,
            dist.overlap,
            dist.panic_after_groups,
            tp,
            &mut pack,
        )?;
        if next != z.groups.len() {
            bail!(
                "rank {rank}: the backward finished {next} gradient groups, {} expected",
                z.groups.len()
            );
        }
        Ok(BackwardDone {
            end,
            comm: spent,
            exposed,
            nonfinite: false,
            packed: Some(p),
        })
    }
}
