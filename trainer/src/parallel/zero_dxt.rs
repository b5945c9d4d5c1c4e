//! fp8-o3 on a D x T grid: FP8 ZeRO over each data-parallel subgroup (the D ranks with
//! the same tensor-parallel coordinate). Each tensor-parallel rank's `Model` holds only
//! its shard in its flat layout, so [`super::zero::Zero`] partitions that shard's
//! tensors over its D replicas exactly as it partitions a whole model over D ranks;
//! nothing in the partition, the packing, the reduce-scatter or the master all-gather
//! knows about T. What the grid adds: the backward calls the TP collectives, so the
//! packing runs on the step's thread as `backward_tp` hands out each group (the one step
//! path, `parallel::step`, through `overlap::run_backward` with the TP group: no overlap
//! thread), and the gradient norm adds the sharded tensors' squares over the TP group
//! ([`Trainer::zero_update`]'s `tp` argument). Per-rank optimizer state: the shard's
//! state / D, i.e. about the whole model's / (D * T) (plus the replicated norms and
//! biases, held by every TP rank's owner).
//!
//! Checkpoints (`crate::checkpoint::tp`): every (dp, tp) rank streams its own share into
//! its own file (units in its shard's local element coordinates, listed in
//! `optimizer_shards`); nobody gathers the state. A resume on the same T reads, per
//! rank, only the stored pieces that overlap its units under the new partition
//! ([`Trainer::enable_data_parallel_from_tp_checkpoint`]): the same D copies every unit
//! verbatim (bit for bit), another D re-partitions by [`crate::repartition`]'s rule;
//! another T (or a whole-model checkpoint) re-cuts the units across tensor slices
//! (`crate::checkpoint::tp_reshard`).

use super::zero::Zero;
use crate::checkpoint::shard::agree_outcome;
use crate::checkpoint::Checkpoint;
use crate::config::Precision;
use crate::train::Trainer;
use anyhow::{anyhow, bail, Result};
use fp8lm_collectives::Communicator;
use fp8lm_optim::{Fp8Adam, Fp8AdamConfig};

impl Trainer {
    /// [`Trainer::enable_data_parallel`] on a D x T grid for a run resumed from `ck`
    /// (everything but the optimizer state restored beforehand: for fp8-o3
    /// `tensor_parallel::ckpt::restore_tp_except_optimizer`, else `snapshot::restore`).
    /// fp8-o3: this rank's units under the ZeRO partition of its shard over `dp` are read
    /// from the checkpoint by range (its tensor-parallel rank's stored pieces that overlap
    /// them: `checkpoint::tp::read_tp_units`), re-partitioned when the checkpoint's D
    /// differs, re-cut across tensor slices when its T does (or it was written without
    /// tensor parallelism: `checkpoint::tp_reshard`), and become its optimizer; the shard's whole state that
    /// `Trainer::new_tp` built is dropped first, so no rank holds more than its share
    /// besides what it reads. Every rank of `world` (the whole grid) learns whether every
    /// rank read its share (an error names the ranks that did not). Other precisions, or
    /// without `ck`, as [`Trainer::enable_data_parallel`]. Every rank calls it.
    pub fn enable_data_parallel_from_tp_checkpoint(
        &mut self,
        dp: &dyn Communicator,
        world: &dyn Communicator,
        ck: Option<&Checkpoint>,
    ) -> Result<()> {
        let Some(ck) = ck.filter(|_| self.cfg.precision == Precision::Fp8O3) else {
            return self.enable_data_parallel(dp);
        };
        if self.tp_shard().is_none() {
            bail!(
                "rank {} of {}: enable_data_parallel_from_tp_checkpoint needs a \
                 tensor-parallel trainer (Trainer::new_tp)",
                world.rank(),
                world.size()
            );
        }
        let ocfg = Fp8AdamConfig::fp8_lm(self.cfg.optim.hyper());
        let (rank, size) = (dp.rank(), dp.size());
        // The partition `enable_data_parallel` builds (deterministic: the same there).
        let z = Zero::new(&self.model, size, &ocfg, self.cfg.dist.zero_partition)?;
        let want = z.spans(&z.owned(rank));
        drop(z);
        self.optimizer = Box::new(Fp8Adam::empty(ocfg));
        let read = crate::tensor_parallel::ckpt::read_own_units(self, ck, size, &want);
        let outcome = match &read {
            Ok(_) => Ok(String::new()),
            Err(e) => Err(anyhow!("{e:#}")),
        };
        agree_outcome(world, "reading the fp8-o3 optimizer shards", outcome)?;
        let (stored, old) = read?;
        self.enable_data_parallel_resume(dp, Some((&stored, &old)))
    }
}
