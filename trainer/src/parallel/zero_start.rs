//! fp8-o3 start-up and resume with nothing full-precision of the whole model: a rank
//! draws (fresh) or reads (resumed) only what it keeps.
//!
//! A data-parallel fp8-o3 rank with E4M3 weight storage keeps the linears' weights only
//! as E4M3 bytes (the owners cast and all-gather them) and the masters of its own units.
//! So [`Trainer::new_for_ranks`] draws nothing ([`ZeroWeights::Undrawn`]: `params` stays
//! a fresh zero mapping, never touched), and once `enable_data_parallel` knows the
//! rank's units:
//! - fresh start ([`draw_share`]): every tensor is drawn in turn from the seed's one RNG
//!   stream (the values of `Model::new`), the linears' weights one at a time into the
//!   weight-gradient scratch; each FP8 linear weight is rounded to its master's view with
//!   its whole tensor's amax (what `round_to_master_view` did on the whole model), and
//!   the rank's units are pushed into its optimizer as they pass, so each master is cast
//!   as it is drawn. The other tensors (norms, biases, positions) are drawn into
//!   `params`, which every rank keeps in f32 anyway. The same bits as the old path,
//!   which drew the whole f32 model first (`trainer/tests/zero_start.rs`; the memory, `zero_start_memory.rs`).
//! - resume ([`restore_f32_tensors`], then [`template_share`]): only the tensors kept in
//!   f32 are read from the model group, by range
//!   ([`Checkpoint::model_tensor`](crate::checkpoint::Checkpoint::model_tensor), which
//!   reads from disk when the group was left there,
//!   [`Checkpoint::load_leaving`](crate::checkpoint::Checkpoint::load_leaving)); the
//!   linears' weights are the owners' masters, which the rank's optimizer shard holds,
//!   so their f32 copies in the model group are never read
//!   ([`ZeroWeights::Restored`]). The optimizer is built over zeros in the scratch and
//!   its state imported.
//!
//! Before `enable_data_parallel` the linears' ranges of `params` are zeros, so the ranks'
//! start-up agreement (`agreement::weights_hash`) compares the f32 tensors only (step
//! and data position as ever); the masters come from the owners' shards.
//!
//! With the f32 view of the masters (the block recipe, `Trainer::keep_zero_f32_view`,
//! tensor parallelism) every rank holds the whole model in f32 by design; those paths
//! draw the whole model as before ([`materialize`]).

use super::zero::Zero;
use crate::checkpoint::Checkpoint;
use crate::train::{round_tensor_to_master_view, round_to_master_view, Trainer};
use anyhow::{anyhow, bail, Result};
use fp8lm_optim::{Fp8Adam, Fp8AdamConfig};

/// Where an fp8-o3 rank's initial weights stand before `enable_data_parallel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ZeroWeights {
    /// `params` holds every tensor's values (every other trainer).
    Held,
    /// fp8-o3 on several ranks, nothing drawn yet ([`draw_share`] will).
    Undrawn,
    /// fp8-o3 on several ranks, resumed: the f32 tensors read from the checkpoint; the
    /// linears' weights are left to the owners' masters in the optimizer shards.
    Restored,
}

/// Draw the whole model into `params` as the old start-up did (`Model::new`'s values,
/// linear weights rounded to their masters' view), for the paths that keep the f32
/// view. A no-op unless [`ZeroWeights::Undrawn`].
pub(crate) fn materialize(tr: &mut Trainer) -> Result<()> {
    match tr.zero_weights {
        ZeroWeights::Held => return Ok(()),
        ZeroWeights::Restored => bail!(
            "fp8-o3: this rank read only the f32 tensors of its checkpoint (the linears' \
             weights are in the optimizer shards), so it cannot keep the f32 view of the \
             masters; enable data parallelism on the rank count it was built for"
        ),
        ZeroWeights::Undrawn => {}
    }
    let ocfg = Fp8AdamConfig::fp8_lm(tr.cfg.optim.hyper());
    let d = tr.model.dims;
    tr.model.params = tr.model.layout.init(&d, tr.cfg.seed);
    round_to_master_view(&mut tr.model, &ocfg)?;
    tr.zero_weights = ZeroWeights::Held;
    Ok(())
}

/// Fresh start: this rank's optimizer over its `owned` units (`low[k]`: unit `k` in
/// the configured low-precision formats), built while the model is drawn (see the
/// module docs). The rank's f32 tensors end in `params`; nothing else of the model is
/// kept.
pub(super) fn draw_share(
    tr: &mut Trainer,
    z: &Zero,
    owned: &[usize],
    low: &[bool],
    ocfg: Fp8AdamConfig,
) -> Result<Fp8Adam> {
    let metas = tr.model.layout.metas.clone();
    let seed = tr.cfg.seed;
    let mut opt = Fp8Adam::empty(ocfg);
    let mut next = 0;
    let mut err = None;
    tr.model
        .init_tensors(seed, &mut |i, vals, linear| {
            let mut go = || -> Result<()> {
                if linear {
                    round_tensor_to_master_view(&metas[i], vals, &ocfg)?;
                }
                // Units are in tensor order and `owned` ascending, so this rank's units
                // of tensor `i` come next.
                while next < owned.len() && z.units[owned[next]].tensor == i {
                    let u = &z.units[owned[next]];
                    opt.push_tensor(&u.meta(), &mut vals[u.range()], low[next])
                        .map_err(|e| anyhow!(e))?;
                    next += 1;
                }
                Ok(())
            };
            go().map_err(|e| {
                err = Some(e);
                String::new()
            })
        })
        .map_err(|e| err.take().unwrap_or_else(|| anyhow!(e)))?;
    if next != owned.len() {
        bail!(
            "fp8-o3: {} of this rank's {} units were drawn (units out of tensor order)",
            next,
            owned.len()
        );
    }
    Ok(opt)
}

/// Resume: this rank's optimizer over its `owned` units built over zeros (in the
/// weight-gradient scratch, resident while training anyway), for the checkpoint's state
/// to be imported into: names, shapes and formats are all the import needs.
pub(super) fn template_share(
    tr: &mut Trainer,
    z: &Zero,
    owned: &[usize],
    low: &[bool],
    ocfg: Fp8AdamConfig,
) -> Result<Fp8Adam> {
    let mut opt = Fp8Adam::empty(ocfg);
    let scratch = tr.model.wgrad_scratch_mut();
    let mut own = Vec::new();
    for (k, &u) in owned.iter().enumerate() {
        let u = &z.units[u];
        let n = u.numel();
        let p = if n <= scratch.len() {
            &mut scratch[..n]
        } else {
            own.resize(n, 0f32);
            &mut own[..]
        };
        p.fill(0.0);
        opt.push_tensor(&u.meta(), p, low[k])
            .map_err(|e| anyhow!(e))?;
    }
    Ok(opt)
}

/// `snapshot::restore_weights` for a [`ZeroWeights::Undrawn`] rank: checks every model
/// tensor's name and shape, reads only those kept in f32 (by range when the model
/// group was left on disk), and leaves the linears' weights to the owners' masters.
pub(crate) fn restore_f32_tensors(tr: &mut Trainer, ck: &Checkpoint) -> Result<()> {
    let metas = tr.model.layout.metas.clone();
    for (i, m) in metas.iter().enumerate() {
        if tr.model.linear_of_tensor[i].is_some() {
            ck.check_model_tensor(&m.name, &m.shape)?;
            continue;
        }
        let v = ck.model_tensor(&m.name, &m.shape)?.to_f32()?;
        tr.model
            .set_param(&m.name, &v)
            .map_err(|e| anyhow!("{}: {e}", ck.dir.display()))?;
    }
    tr.zero_weights = ZeroWeights::Restored;
    Ok(())
}

/// Refuse to build a share from restored weights without the checkpoint's optimizer
/// state (the linears' values are in it only).
pub(super) fn need_state(tr: &Trainer, have_state: bool, rank: usize, size: usize) -> Result<()> {
    if tr.zero_weights == ZeroWeights::Restored && !have_state {
        bail!(
            "fp8-o3 on rank {rank} of {size}: the weights were restored from a checkpoint \
             whose linear weights live in its optimizer shards, but no optimizer state was \
             given; pass the checkpoint (enable_data_parallel_from_checkpoint)"
        );
    }
    Ok(())
}

impl Trainer {
    /// fp8-o3 built for several ranks ([`Trainer::new_for_ranks`]): whether a resume
    /// reads only the model's f32 tensors from the checkpoint (the linears' weights
    /// come from the owners' masters), so the model group can stay on disk
    /// ([`Checkpoint::load_leaving`]).
    pub fn zero_reads_f32_only(&self) -> bool {
        // (`keep_zero_f32_view` asks for the whole f32 view: read whole.)
        self.zero_weights == ZeroWeights::Undrawn && !self.zero_f32_view
    }

    /// fp8-o3 built for several ranks: draw the whole f32 model now, as start-up did
    /// before `zero_start` (for tests and `bench memory`'s before/after figures).
    #[doc(hidden)]
    pub fn zero_draw_whole_model(&mut self) -> Result<()> {
        materialize(self)
    }
}
