//! fp8-o3 on a D x T grid: FP8 ZeRO over each data-parallel subgroup (the D ranks with
//! the same tensor-parallel coordinate). Each tensor-parallel rank's `Model` holds only
//! its shard in its flat layout, so [`super::zero::Zero`] partitions that shard's
//! tensors over its D replicas exactly as it partitions a whole model over D ranks;
//! nothing in the partition, the packing, the reduce-scatter or the master all-gather
//! knows about T. What the grid adds: the backward calls the TP collectives, so the
//! packing runs on the step's thread as `backward_tp` hands out each group (no overlap
//! thread), and the gradient norm adds the sharded tensors' squares over the TP group
//! ([`Trainer::zero_update`]'s `tp` argument). Per-rank optimizer state: the shard's
//! state / D, i.e. about the whole model's / (D * T) (plus the replicated norms and
//! biases, held by every TP rank's owner).

use super::zero::ZeroPacked;
use super::DistState;
use crate::model::{FinalGrads, Model};
use anyhow::{bail, Result};
use fp8lm_collectives::Communicator;

impl DistState {
    /// Whether this rank runs fp8-o3's ZeRO (its optimizer holds only its units).
    pub(crate) fn zero_on(&self) -> bool {
        self.zero.is_some()
    }

    /// The backward of a tensor-parallel rank under fp8-o3: as each group of final
    /// gradients is handed out, its FP8 scales are agreed over `dp` and its units packed
    /// into their owners' segments ([`super::zero::Zero::pack_group`]). The reduce-scatter
    /// to the owners follows in [`crate::Trainer::zero_update`]. After a failed agreement
    /// the backward runs to its end without packing and the error is returned.
    pub(crate) fn tp_backward_and_pack(
        &mut self,
        model: &mut Model,
        tp: &dyn Communicator,
        dp: &dyn Communicator,
    ) -> Result<ZeroPacked> {
        let rank = self.rank;
        let Some(z) = self.zero.as_ref() else {
            bail!("data-parallel rank {rank}: fp8-o3 packing without a ZeRO partition");
        };
        let mut p = z.pack_buffers(self.size);
        let mut next = 0usize;
        let mut failed: Option<anyhow::Error> = None;
        let r = model.backward_tp(Some(tp), &mut |g: FinalGrads<'_>| {
            if failed.is_some() {
                return;
            }
            let zg = match z.groups.get(next) {
                Some(zg) if zg.group == g.group => zg,
                zg => {
                    failed = Some(anyhow::anyhow!(
                        "data-parallel rank {rank}: the backward finished gradient group {:?} where group {:?} was due",
                        g.group,
                        zg.map(|x| x.group)
                    ));
                    return;
                }
            };
            next += 1;
            if let Err(e) = z.pack_group(zg, &g, dp, &mut p) {
                failed = Some(e);
            }
        });
        r.map_err(super::comm_err)?;
        if let Some(e) = failed {
            return Err(e);
        }
        if next != z.groups.len() {
            bail!(
                "data-parallel rank {rank}: the backward finished {next} gradient groups, {} expected",
                z.groups.len()
            );
        }
        Ok(p)
    }
}
