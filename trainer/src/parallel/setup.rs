//! Turning a trainer into one rank of a data-parallel group: config agreement, the
//! reduction plans, fp8-o3's partition and this rank's optimizer share; accessors; the
//! data-parallel state checkpoints carry besides the optimizer's.

use super::grad_sync::group_plans;
use super::overlap::resolve_overlap;
use super::zero::Zero;
use super::zero_start::{self, ZeroWeights};
use super::{comm_err, slices_mut, DistState, WGRAD};
use crate::checkpoint::shard::read_units;
use crate::checkpoint::Checkpoint;
use crate::config::Precision;
use crate::repartition::{repartition_state, repartition_state_owned, NamedState, UnitSpan};
use crate::train::Trainer;
use anyhow::{anyhow, bail, Context, Result};
use fp8lm_collectives::{
    fixed_mu, Communicator, GradAllReduceConfig, GradAllReducer, GradMethod, GradTally,
};
use fp8lm_optim::{Fp8Adam, Fp8AdamConfig, Optimizer};

/// Where a resuming fp8-o3 rank takes its optimizer state from.
pub enum ZeroState<'a> {
    /// A whole optimizer state and the units it is cut into (checkpoints written before
    /// sharding; tests).
    Whole(&'a [NamedState], &'a [UnitSpan]),
    /// A sharded checkpoint: the rank reads only its own units' ranges.
    Sharded(&'a Checkpoint),
}

/// `opt`'s state entries as a template for [`repartition_state`]: names, kinds, formats,
/// scales and shapes, without the data (which `repartition_state` never reads from the
/// template).
fn state_template(opt: &dyn Optimizer) -> Vec<NamedState> {
    use fp8lm_optim::{StateRef, StateTensor};
    let mut out = Vec::new();
    opt.visit_state(&mut |name, st| {
        let t = match st {
            StateRef::F32(_) => StateTensor::F32(Vec::new()),
            StateRef::F16 { scale, .. } => StateTensor::F16 {
                data: Vec::new(),
                scale,
            },
            StateRef::Fp8(t) => StateTensor::Fp8(fp8lm_fp8::ScaledFp8 {
                data: Vec::new(),
                shape: t.shape.clone(),
                format: t.format,
                scale: t.scale,
            }),
            StateRef::Scalar(x) => StateTensor::Scalar(x),
        };
        out.push((name.to_string(), t));
    });
    out
}

impl Trainer {
    /// Make this trainer rank `comm.rank()` of `comm.size()` data-parallel ranks (any
    /// size, 1 included). Refuses a config that differs between ranks (hash agreement,
    /// the error names the ranks). For fp8-o3, builds this rank's share of the FP8
    /// optimizer and makes every rank's weights equal to the owners' FP16 masters.
    /// Must be called by every rank, before the first step.
    pub fn enable_data_parallel(&mut self, comm: &dyn Communicator) -> Result<()> {
        self.enable_data_parallel_resume(comm, None)
    }

    /// [`Trainer::enable_data_parallel`] for a resumed run. Everything but the optimizer
    /// state is restored beforehand (`snapshot::restore`, or for fp8-o3
    /// `snapshot::restore_except_optimizer`). For fp8-o3, `zero_state` is the
    /// checkpoint's optimizer state and its unit list ([`crate::snapshot::stored_optimizer_state`]):
    /// this rank takes its own units' state from it, re-partitioned if the checkpoint was
    /// written with another number of ranks (see [`crate::repartition`]). Ignored
    /// otherwise (replicated optimizers are restored whole by `snapshot::restore`).
    pub fn enable_data_parallel_resume(
        &mut self,
        comm: &dyn Communicator,
        zero_state: Option<(&[NamedState], &[UnitSpan])>,
    ) -> Result<()> {
        self.enable_data_parallel_from(comm, zero_state.map(|(s, u)| ZeroState::Whole(s, u)))
    }

    /// [`Trainer::enable_data_parallel`] for a run resumed from `ck` (everything but the
    /// optimizer state restored beforehand, as for
    /// [`Trainer::enable_data_parallel_resume`]). For fp8-o3 the rank's optimizer state
    /// comes from the checkpoint: from a sharded one, this rank reads only the ranges of
    /// its own units ([`crate::checkpoint::shard::read_units`]); from one written before
    /// sharding (the whole state in `optimizer.safetensors`), the whole state is loaded
    /// and this rank keeps its units. Other precisions ignore `ck` here.
    pub fn enable_data_parallel_from_checkpoint(
        &mut self,
        comm: &dyn Communicator,
        ck: Option<&Checkpoint>,
    ) -> Result<()> {
        match ck {
            Some(ck) if self.cfg.precision == Precision::Fp8O3 => {
                // (a tensor-parallel checkpoint is read by range too, re-cut across slices)
                if ck.meta.optimizer_shards.is_some() || ck.meta.tp_shards.is_some() {
                    self.enable_data_parallel_from(comm, Some(ZeroState::Sharded(ck)))
                } else {
                    let (st, units) = crate::snapshot::stored_optimizer_state(self, ck)?;
                    self.enable_data_parallel_from(comm, Some(ZeroState::Whole(&st, &units)))
                }
            }
            _ => self.enable_data_parallel_from(comm, None),
        }
    }

    fn enable_data_parallel_from(
        &mut self,
        comm: &dyn Communicator,
        zero_state: Option<ZeroState<'_>>,
    ) -> Result<()> {
        // Under tensor parallelism `comm` is the data-parallel group of this rank's shard:
        // fp8-o3 partitions the shard's tensors over it (`super::zero_dxt`).
        let toml = crate::config_file::to_toml(&self.cfg);
        fp8lm_collectives::agree_config(comm, "training config", toml.as_bytes())
            .map_err(comm_err)?;
        let (rank, size) = (comm.rank(), comm.size());
        let d = self.model.dims;
        let zero = if self.cfg.precision == Precision::Fp8O3 {
            let ocfg = Fp8AdamConfig::fp8_lm(self.cfg.optim.hyper());
            let mode = self.cfg.dist.zero_partition;
            let mut z = Zero::new(&self.model, size, &ocfg, mode)?;
            if rank == 0 {
                tracing::info!(
                    "fp8-o3 ZeRO partition {} over {size} ranks: {} units, optimizer state max/mean {:.3}",
                    mode.name(),
                    z.units.len(),
                    z.part.max_over_mean()
                );
            }
            if let Some(mu) = fixed_mu(self.cfg.dist.fp8_allreduce.reducer_config().method, size) {
                z.mu.iter_mut().for_each(|m| *m = mu);
            }
            let owned = z.owned(rank);
            let metas: Vec<_> = owned.iter().map(|&u| z.units[u].meta()).collect();
            // As fp8-o2: low-precision state for the FP8 linears' weights, f32 for the rest.
            let low: Vec<bool> = owned.iter().map(|&u| z.fp8_of_unit[u].is_some()).collect();
            // The single-rank optimizer `Trainer::new` built (if any) goes first, so the
            // whole state and this rank's share never coexist.
            self.optimizer = Box::new(Fp8Adam::empty(ocfg));
            self.zero_deferred = false;
            if !self.zero_e4m3_eligible(size) {
                // The f32 view of the masters: the whole model in `params`, as before.
                zero_start::materialize(self)
                    .map_err(|e| anyhow!("fp8-o3 on rank {rank} of {size}: {e:#}"))?;
            }
            zero_start::need_state(self, zero_state.is_some(), rank, size)?;
            // A rank built for several ranks draws (fresh) or has read (resumed) only
            // what it keeps (`zero_start`); one built whole takes its units from `params`.
            let mut opt = match self.zero_weights {
                ZeroWeights::Undrawn => zero_start::draw_share(self, &z, &owned, &low, ocfg)?,
                ZeroWeights::Restored => zero_start::template_share(self, &z, &owned, &low, ocfg)?,
                ZeroWeights::Held => {
                    let rs: Vec<_> = owned.iter().map(|&u| z.ranges[u].clone()).collect();
                    let mut ps = slices_mut(&mut self.model.params, &rs);
                    Fp8Adam::with_low_precision(&metas, &mut ps, ocfg, &low)
                        .map_err(|e| anyhow!(e))?
                }
            };
            self.zero_weights = ZeroWeights::Held;
            let new_units = z.spans(&owned);
            // Names and formats only: no copy of the state.
            let template = state_template(&opt);
            let ctx = || format!("fp8-o3 resume on rank {rank} of {size}");
            let state = match zero_state {
                Some(ZeroState::Whole(stored, old_units)) => Some(
                    repartition_state(stored, old_units, &template, &new_units)
                        .with_context(ctx)?,
                ),
                Some(ZeroState::Sharded(ck)) => {
                    // What this rank read is moved into its optimizer, not copied.
                    let (stored, old_units) = read_units(ck, &new_units)
                        .with_context(|| format!("{} from {}", ctx(), ck.dir.display()))?;
                    Some(
                        repartition_state_owned(stored, &old_units, &template, &new_units)
                            .with_context(ctx)?,
                    )
                }
                None => None,
            };
            match state {
                Some(state) => {
                    opt.import_state(state)
                        .map_err(|e| anyhow!("{}: {e}", ctx()))?;
                }
                None if self.step != 0 => bail!(
                    "fp8-o3: the trainer is at step {} but no optimizer state was given to \
                     re-partition (use enable_data_parallel_resume)",
                    self.step
                ),
                None => {}
            }
            self.optimizer = Box::new(opt);
            if self.zero_e4m3_eligible(size) {
                // What the compute reads, in its formats: the linears' E4M3 weights and
                // the tied embedding's FP16 masters; the f32 view of the masters goes.
                let wte = self.model.layout.wte;
                let wte_units: Vec<_> = z
                    .units
                    .iter()
                    .filter(|u| u.tensor == wte)
                    .map(|u| (u.range(), 1.0f32))
                    .collect();
                self.model
                    .hold_linear_weights_as_e4m3(Some(wte_units))
                    .map_err(|e| anyhow!("fp8-o3 on rank {rank} of {size}: {e}"))?;
                let opt = self.optimizer.as_mut();
                z.update_and_share_e4m3(comm, &mut self.model, opt, None)?;
            } else {
                z.share_weights(comm, &mut self.model.params)?;
            }
            Some(z)
        } else {
            None
        };
        let reducer = |method| {
            GradAllReducer::new(GradAllReduceConfig {
                method,
                format: WGRAD,
                ..GradAllReduceConfig::default()
            })
        };
        let fp8_cfg = self.cfg.dist.fp8_allreduce.reducer_config();
        self.dist = Some(Box::new(DistState {
            rank,
            size,
            global_inputs: vec![0; size * d.b * d.t],
            global_targets: vec![0; size * d.b * d.t],
            fp8_reducer: GradAllReducer::new(GradAllReduceConfig {
                format: WGRAD,
                ..fp8_cfg
            }),
            f32_reducer: reducer(GradMethod::F32),
            groups: group_plans(&self.model)?,
            overlap: resolve_overlap(self.cfg.dist.overlap, comm),
            panic_after_groups: None,
            zero,
            tally: GradTally::default(),
        }));
        Ok(())
    }

    /// Whether gradient reductions overlap the backward (`dist.overlap` resolved at
    /// [`Trainer::enable_data_parallel`]; false without data parallelism).
    pub fn overlaps(&self) -> bool {
        self.dist.as_ref().is_some_and(|d| d.overlap)
    }

    /// This process's rank (0 without data parallelism).
    pub fn rank(&self) -> usize {
        self.dist.as_ref().map_or(0, |d| d.rank)
    }
    /// Number of data-parallel ranks (1 without data parallelism).
    pub fn world_size(&self) -> usize {
        self.dist.as_ref().map_or(1, |d| d.size)
    }
    /// Rank 0: the one that prints progress and writes metrics.
    pub fn is_root(&self) -> bool {
        self.rank() == 0
    }

    /// Data-parallel state a resume needs besides the optimizer's: FP8-LM's per-tensor
    /// mu of the gradient all-reduce (replicated FP8 modes) and of ZeRO's reduce-scatter
    /// (fp8-o3), for `CheckpointMeta::extra`. Empty without data parallelism.
    pub fn dist_checkpoint_extra(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        if let Some(d) = self.dist.as_ref() {
            m.insert("allreduce_mu".into(), serde_json::json!(d.fp8_reducer.mu));
            if let Some(z) = d.zero.as_ref() {
                m.insert("zero_mu".into(), serde_json::json!(z.mu));
            }
        }
        m
    }

    /// Restore what [`Trainer::dist_checkpoint_extra`] saved (after enabling data
    /// parallelism). Missing keys keep the defaults (checkpoints of single-process runs);
    /// a length that does not match this model's FP8 tensors is an error.
    pub fn restore_dist_extra(&mut self, extra: &serde_json::Value) -> Result<()> {
        let Some(d) = self.dist.as_mut() else {
            return Ok(());
        };
        let get = |k: &str| -> Result<Option<Vec<f32>>> {
            match extra.get(k) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => serde_json::from_value(v.clone())
                    .map(Some)
                    .with_context(|| format!("checkpoint extra `{k}`: not a list of numbers")),
            }
        };
        if let Some(mu) = get("allreduce_mu")? {
            let nfp8: usize = d.groups.iter().map(|g| g.fp8.len()).sum();
            // Empty: saved before the first reduction (or by a run without FP8 gradients).
            if !mu.is_empty() && mu.len() != nfp8 {
                bail!(
                    "checkpoint extra `allreduce_mu`: {} values for {nfp8} FP8 weight gradients",
                    mu.len()
                );
            }
            d.fp8_reducer.mu = mu;
        }
        if let (Some(mu), Some(z)) = (get("zero_mu")?, d.zero.as_mut()) {
            if mu.len() != z.mu.len() {
                bail!(
                    "checkpoint extra `zero_mu`: {} values for {} FP8 weight gradients",
                    mu.len(),
                    z.mu.len()
                );
            }
            z.mu = mu;
        }
        Ok(())
    }

    /// The FP8 gradient reductions of the last data-parallel step (mu per FP8 weight
    /// gradient, overflow and underflow counts); `None` on a single rank or before the
    /// first step, and without FP8 weight gradients.
    pub fn allreduce_tally(&self) -> Option<&GradTally> {
        self.dist
            .as_ref()
            .map(|d| &d.tally)
            .filter(|t| t.elements > 0)
    }

    /// Failure injection for tests: in the next data-parallel steps, the backward pass
    /// panics after finishing `groups` gradient groups (mid-backward, while earlier
    /// groups may be in flight). `None` clears it. No effect without data parallelism.
    #[doc(hidden)]
    pub fn inject_backward_panic(&mut self, groups: Option<usize>) {
        if let Some(d) = self.dist.as_mut() {
            d.panic_after_groups = groups;
        }
    }
}
