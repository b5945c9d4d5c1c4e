//! Replicated precisions: the gradients of each group the backward finishes are
//! averaged over the ranks (FP8-LM all-reduce for the FP8 weight gradients, f32 ring
//! mean for the rest), then every rank runs the same update.

use super::overlap::run_backward;
use super::{comm_err, fp8_wgrad, slices_mut, DistState, WGRAD};
use crate::data::Dataset;
use crate::model::{FinalGrads, GradGroup, Model};
use crate::train::Trainer;
use anyhow::{bail, Result};
use fp8lm_collectives::{Communicator, GradAllReducer, GradTally};
use fp8lm_fp8::ScaledFp8;
use std::ops::Range;
use std::time::{Duration, Instant};

/// The reductions of one group of finished gradients (replicated precisions).
pub(super) struct GroupPlan {
    pub(super) group: GradGroup,
    /// Tensors reduced in f32, as ranges inside the group (ascending).
    pub(super) f32: Vec<Range<usize>>,
    /// FP8 weight gradients: (index into the group's linears, index into the model's
    /// FP8 tensor list, where `fp8_reducer.mu` keeps its mu).
    pub(super) fp8: Vec<(usize, usize)>,
}

/// The group plans of `model`; FP8 tensors are numbered in tensor order (the order of
/// `fp8_reducer.mu`, which checkpoints store).
pub(super) fn group_plans(model: &Model) -> Result<Vec<GroupPlan>> {
    let lay = &model.layout;
    let fp8_t: Vec<usize> = (0..lay.metas.len())
        .filter(|&t| fp8_wgrad(model, t).is_some())
        .collect();
    let mut seen = vec![false; lay.metas.len()];
    let mut plans = Vec::new();
    for spec in model.grad_groups() {
        let mut plan = GroupPlan {
            group: spec.group,
            f32: Vec::new(),
            fp8: Vec::new(),
        };
        for (t, seen_t) in seen.iter_mut().enumerate() {
            let r = lay.range(t);
            if r.start < spec.range.start || r.end > spec.range.end || r.is_empty() {
                continue;
            }
            *seen_t = true;
            match fp8_t.iter().position(|&x| x == t) {
                Some(j) => {
                    let li = model.linear_of_tensor[t].expect("an FP8 gradient has a linear");
                    if !spec.linears.contains(&li) {
                        bail!(
                            "gradient group {:?}: tensor {} belongs to linear {li}, outside the group's linears {:?}",
                            spec.group,
                            lay.metas[t].name,
                            spec.linears
                        );
                    }
                    plan.fp8.push((li - spec.linears.start, j));
                }
                None => plan
                    .f32
                    .push(r.start - spec.range.start..r.end - spec.range.start),
            }
        }
        plans.push(plan);
    }
    if let Some(t) = (0..lay.metas.len()).find(|&t| !seen[t] && !lay.range(t).is_empty()) {
        bail!("gradient groups do not cover tensor {}", lay.metas[t].name);
    }
    Ok(plans)
}

fn wgrad_mut(l: &mut crate::model::Linear) -> Result<&mut ScaledFp8> {
    match l.fp8.as_mut() {
        Some(f) => Ok(&mut f.wgrad),
        None => bail!("linear {} has no FP8 state in an FP8 run", l.name),
    }
}

/// Reduce one finished group: FP8-LM all-reduce of its FP8 weight gradients (with their
/// own mu, kept in `fp8_reducer.mu`), then the f32 mean of the rest. Returns whether the
/// FP8 scale agreement saw a non-finite gradient.
fn reduce_group(
    plan: &GroupPlan,
    g: FinalGrads<'_>,
    fp8_reducer: &mut GradAllReducer,
    f32_reducer: &mut GradAllReducer,
    comm: &dyn Communicator,
    tally: &mut GradTally,
) -> Result<bool> {
    let mut nonfinite = false;
    if !plan.fp8.is_empty() {
        let placeholder = || ScaledFp8 {
            data: Vec::new(),
            shape: vec![0],
            format: WGRAD,
            scale: 1.0,
        };
        let mut taken = Vec::with_capacity(plan.fp8.len());
        for &(k, _) in &plan.fp8 {
            taken.push(std::mem::replace(
                wgrad_mut(&mut g.linears[k])?,
                placeholder(),
            ));
        }
        // One reducer call per group: mu is per tensor, so it is lent out and taken back.
        let mut r = GradAllReducer {
            cfg: fp8_reducer.cfg.clone(),
            mu: plan.fp8.iter().map(|&(_, j)| fp8_reducer.mu[j]).collect(),
            steps: fp8_reducer.steps,
        };
        let res = r.all_reduce_scaled_fp8(comm, &mut taken);
        let lens: Vec<usize> = taken.iter().map(|t| t.len()).collect();
        for (&(k, j), (t, mu)) in plan.fp8.iter().zip(taken.into_iter().zip(r.mu)) {
            *wgrad_mut(&mut g.linears[k])? = t;
            fp8_reducer.mu[j] = mu;
        }
        let report = res.map_err(comm_err)?;
        tally.add(&report, &lens);
        nonfinite |= report.nonfinite;
    }
    if !plan.f32.is_empty() {
        let mut views = slices_mut(g.grads, &plan.f32);
        f32_reducer
            .all_reduce_mean(comm, &mut views)
            .map_err(comm_err)?;
    }
    Ok(nonfinite)
}

/// Timing of an overlapped backward + reduction.
pub(super) struct Reduced {
    /// When the backward's compute ended.
    pub(super) backward_end: Instant,
    /// Time inside the group reductions.
    pub(super) comm: Duration,
    /// The part of it after the backward ended (what the step waited for).
    pub(super) exposed: Duration,
    pub(super) nonfinite: bool,
}

impl Trainer {
    /// The backward, with every group of gradients reduced as the backward finishes it
    /// (FP8-LM all-reduce for FP8 weight gradients, f32 mean for the rest), in the fixed
    /// order of [`Model::grad_groups`] on every rank (see [`run_backward`]). On a
    /// tensor-parallel rank `comm` is its data-parallel group and `tp` its
    /// tensor-parallel group (whose collectives the backward calls).
    pub(super) fn backward_and_reduce(
        &mut self,
        dist: &mut DistState,
        comm: &dyn Communicator,
        tp: Option<&dyn Communicator>,
    ) -> Result<Reduced> {
        let DistState {
            rank,
            fp8_reducer,
            f32_reducer,
            groups,
            overlap,
            panic_after_groups,
            tally,
            ..
        } = dist;
        *tally = GradTally::default();
        let rank = *rank;
        let nfp8 = groups.iter().map(|g| g.fp8.len()).sum::<usize>();
        let initial_mu = fp8_reducer.cfg.initial_mu;
        fp8_reducer.mu.resize(nfp8, initial_mu);
        let mut next = 0usize;
        let mut nonfinite = false;
        let mut reduce = |g: FinalGrads<'_>| -> Result<()> {
            let plan = match groups.get(next) {
                Some(plan) if plan.group == g.group => plan,
                plan => bail!(
                    "rank {rank}: the backward finished gradient group {:?} where group {:?} was due",
                    g.group,
                    plan.map(|p| p.group)
                ),
            };
            next += 1;
            nonfinite |= reduce_group(plan, g, fp8_reducer, f32_reducer, comm, tally)?;
            Ok(())
        };
        let (backward_end, comm_time, exposed) = run_backward(
            &mut self.model,
            rank,
            *overlap,
            *panic_after_groups,
            tp,
            &mut reduce,
        )?;
        if next != groups.len() {
            bail!(
                "rank {rank}: the backward finished {next} gradient groups, {} expected",
                groups.len()
            );
        }
        fp8_reducer.steps += 1;
        Ok(Reduced {
            backward_end,
            comm: comm_time,
            exposed,
            nonfinite,
        })
    }
}

impl DistState {
    /// Step 1 for a data-parallel rank: draw the next `size * b`-row global batch and
    /// keep this rank's rows `rank*b..(rank+1)*b` in `inputs`/`targets` (`b * t` each).
    /// Under tensor parallelism `rank` is the replica's data-parallel rank, so the ranks
    /// of one tensor-parallel group keep the same rows.
    pub(crate) fn draw_rows(
        &mut self,
        data: &mut dyn Dataset,
        b: usize,
        t: usize,
        inputs: &mut [u32],
        targets: &mut [u32],
    ) {
        let rows = b * t;
        data.next_train_batch(
            self.size * b,
            t,
            &mut self.global_inputs,
            &mut self.global_targets,
        );
        let mine = self.rank * rows..(self.rank + 1) * rows;
        inputs.copy_from_slice(&self.global_inputs[mine.clone()]);
        targets.copy_from_slice(&self.global_targets[mine]);
    }
}
