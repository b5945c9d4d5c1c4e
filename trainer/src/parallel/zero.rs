//! FP8 ZeRO (fp8-o3): the partition of the optimizer state into units and owners, the
//! packing of each owner's gradient segment, the reduce-scatter to the owners, the
//! owners' update and the all-gather of their new masters (see the module docs of
//! [`crate::parallel`]).

use super::{comm_err, fp8_wgrad, slices_mut, DistState, F16_MAX, WGRAD};
use crate::config::{Precision, ZeroPartition};
use crate::model::{FinalGrads, GradGroup, Model};
use crate::repartition::{decode_states, encode_states, NamedState, UnitSpan};
use crate::train::{clip_scale, global_grad_norm_on, grad_sum_squares_on, lr_at, Trainer};
use anyhow::{anyhow, bail, Context, Result};
use fp8lm_collectives::{next_mu, BufMut, Communicator, GradMethod, GradTally, ReduceOp};
use fp8lm_fp8::cast::{decode_table, f16_to_f32_amax, f32_to_f16_amax, f32_to_fp8_counted};
use fp8lm_fp8::merge_amax;
use fp8lm_fp8::scaling::{scale_for_amax, ScaleRounding};
use fp8lm_fp8::ScaledFp8;
use fp8lm_optim::fp8_adam::SCALAR_BYTES_PER_TENSOR;
use fp8lm_optim::zero::{split_units, Partition, Unit};
use fp8lm_optim::ParamOut;
use fp8lm_optim::{Fp8AdamConfig, Grad, StateTensor};
use half::f16;
use std::ops::Range;
use std::time::{Duration, Instant};

/// FP8 ZeRO bookkeeping (identical on every rank).
pub(super) struct Zero {
    pub(super) units: Vec<Unit>,
    pub(super) part: Partition,
    /// Flat-buffer range of each unit.
    pub(super) ranges: Vec<Range<usize>>,
    /// Per unit: index into `fp8_tensors` when its gradient is FP8 (a linear weight).
    pub(super) fp8_of_unit: Vec<Option<usize>>,
    /// Tensor indices of the FP8 weight gradients, and FP8-LM's mu for each.
    pub(super) fp8_tensors: Vec<usize>,
    pub(super) mu: Vec<f32>,
    /// Per-rank segment lengths of the FP8 and f32 reduce buffers, and each unit's offset
    /// inside its owner's segment (of its kind).
    pub(super) seg8: usize,
    pub(super) seg32: usize,
    pub(super) seg_off: Vec<usize>,
    /// The units of each group of final gradients, in the backward's order.
    pub(super) groups: Vec<ZeroGroup>,
}

/// fp8-o3: what to pack when the backward finishes a group of gradients.
pub(super) struct ZeroGroup {
    pub(super) group: GradGroup,
    /// Flat offset of the group's first gradient.
    pub(super) start: usize,
    /// FP8 weight gradients in the group: (index into `Zero::fp8_tensors`, position of
    /// its linear among the group's linears).
    pub(super) fp8: Vec<(usize, usize)>,
    /// Units whose tensor lies in the group.
    pub(super) units: Vec<usize>,
}

/// fp8-o3 gradients packed for the reduce-scatter to the owners: each owner's segment of
/// FP8 bytes (re-quantised to `mu * s_g`) and of f32, and the agreed scales `s_g`.
pub(crate) struct ZeroPacked {
    pub(super) buf8: Vec<u8>,
    pub(super) buf32: Vec<f32>,
    pub(super) s_g: Vec<f32>,
    /// This rank's non-zero FP8 codes that re-quantisation flushed (all tensors).
    pub(super) flushed: u64,
}

/// FP8 ZeRO's partition of `metas` over `ranks`: tensors larger than 1/(8 ranks) of the
/// model are cut into row blocks (one scale each; blocks of at most 1/(8N) of the model
/// give the greedy split enough units to balance), then whole units go greedily, largest
/// first, to the least-loaded rank, weighed by their optimizer-state bytes: `cfg`'s
/// formats for tensors with `low_precision[t]` (the FP8 linears' weights), f32 master and
/// moments (12 B/param) for the rest, as `Fp8Adam::with_low_precision` keeps them, plus
/// the per-unit scalars. Deterministic: every rank computes the same.
pub fn zero_partition(
    metas: &[fp8lm_optim::ParamMeta],
    ranks: usize,
    low_precision: &[bool],
    cfg: &Fp8AdamConfig,
) -> Result<(Vec<Unit>, Partition)> {
    zero_partition_with(metas, ranks, low_precision, cfg, ZeroPartition::RowBlocks)
}

/// [`zero_partition`] with the choice of `dist.zero_partition`: `WholeTensor` skips the
/// row-block cut (the recipe's greedy over whole tensors).
pub fn zero_partition_with(
    metas: &[fp8lm_optim::ParamMeta],
    ranks: usize,
    low_precision: &[bool],
    cfg: &Fp8AdamConfig,
    mode: ZeroPartition,
) -> Result<(Vec<Unit>, Partition)> {
    if ranks == 0 {
        bail!("ZeRO partition: the number of ranks must be at least 1");
    }
    if low_precision.len() != metas.len() {
        bail!(
            "ZeRO partition: {} precision flags for {} tensors",
            low_precision.len(),
            metas.len()
        );
    }
    let total: usize = metas.iter().map(|m| m.numel()).sum();
    let max_elems = match mode {
        ZeroPartition::RowBlocks => (total / (8 * ranks)).max(1),
        ZeroPartition::WholeTensor => usize::MAX,
    };
    let units = split_units(metas, max_elems);
    let items: Vec<(&str, usize)> = units
        .iter()
        .map(|u| {
            let per = if low_precision[u.tensor] {
                cfg.state_bytes_per_param()
            } else {
                F32_STATE_BYTES_PER_PARAM
            };
            (u.name.as_str(), u.numel() * per + SCALAR_BYTES_PER_TENSOR)
        })
        .collect();
    let part = Partition::greedy(&items, ranks).map_err(|e| anyhow!(e))?;
    Ok((units, part))
}

/// `fp8lm bench memory`: fp8-o3's partition of `cfg`'s model over each of `ranks`, both
/// ways (`dist.zero_partition`), as a table of units and max/mean optimizer-state bytes.
pub fn zero_imbalance_table(
    cfg: &crate::RunConfig,
    vocab: usize,
    ranks: &[usize],
) -> Result<String> {
    let mut c = cfg.clone();
    c.precision = Precision::Fp8O2;
    let tr = Trainer::new(&c, vocab)?;
    let model = tr.model();
    let lay = &model.layout;
    let low: Vec<bool> = (0..lay.metas.len())
        .map(|t| fp8_wgrad(model, t).is_some())
        .collect();
    let ocfg = Fp8AdamConfig::fp8_lm(cfg.optim.hyper());
    let mut out = String::from(
        "fp8-o3 ZeRO partition of the optimizer state (dist.zero_partition), max/mean bytes per rank:\n\
         ranks | whole-tensor (units, max/mean) | row-blocks (units, max/mean)\n",
    );
    for &n in ranks {
        let mut cells = Vec::new();
        for mode in [ZeroPartition::WholeTensor, ZeroPartition::RowBlocks] {
            let (units, part) = zero_partition_with(&lay.metas, n, &low, &ocfg, mode)?;
            cells.push(format!("{:>5} {:>6.3}", units.len(), part.max_over_mean()));
        }
        out += &format!("{n:>5} | {:>30} | {:>28}\n", cells[0], cells[1]);
    }
    Ok(out)
}

/// f32 master weight and two f32 moments.
const F32_STATE_BYTES_PER_PARAM: usize = 12;

impl Zero {
    pub(super) fn new(
        model: &Model,
        size: usize,
        cfg: &Fp8AdamConfig,
        mode: ZeroPartition,
    ) -> Result<Zero> {
        let lay = &model.layout;
        let low: Vec<bool> = (0..lay.metas.len())
            .map(|t| fp8_wgrad(model, t).is_some())
            .collect();
        let (units, part) = zero_partition_with(&lay.metas, size, &low, cfg, mode)?;
        let ranges: Vec<_> = units
            .iter()
            .map(|u| {
                let r = u.range();
                lay.offsets[u.tensor] + r.start..lay.offsets[u.tensor] + r.end
            })
            .collect();
        let fp8_tensors: Vec<usize> = (0..lay.metas.len())
            .filter(|&t| fp8_wgrad(model, t).is_some())
            .collect();
        let fp8_of_unit: Vec<Option<usize>> = units
            .iter()
            .map(|u| fp8_tensors.iter().position(|&t| t == u.tensor))
            .collect();
        let (mut fill8, mut fill32) = (vec![0usize; size], vec![0usize; size]);
        let mut seg_off = vec![0; units.len()];
        for (u, unit) in units.iter().enumerate() {
            let q = part.owner[u];
            let fill = if fp8_of_unit[u].is_some() {
                &mut fill8[q]
            } else {
                &mut fill32[q]
            };
            seg_off[u] = *fill;
            *fill += unit.numel();
        }
        let mut groups = Vec::new();
        for spec in model.grad_groups() {
            let inside = |r: &Range<usize>| r.start >= spec.range.start && r.end <= spec.range.end;
            let mut fp8 = Vec::new();
            for (j, &t) in fp8_tensors.iter().enumerate() {
                if inside(&lay.range(t)) {
                    let li = model.linear_of_tensor[t].expect("an FP8 gradient has a linear");
                    if !spec.linears.contains(&li) {
                        bail!(
                            "gradient group {:?}: tensor {} belongs to linear {li}, outside the group's linears",
                            spec.group,
                            lay.metas[t].name
                        );
                    }
                    fp8.push((j, li - spec.linears.start));
                }
            }
            groups.push(ZeroGroup {
                group: spec.group,
                start: spec.range.start,
                fp8,
                units: (0..units.len()).filter(|&u| inside(&ranges[u])).collect(),
            });
        }
        let grouped: usize = groups.iter().map(|g| g.units.len()).sum();
        if grouped != units.len() {
            bail!(
                "fp8-o3: the gradient groups hold {grouped} of the {} units",
                units.len()
            );
        }
        Ok(Zero {
            groups,
            mu: vec![1.0; fp8_tensors.len()],
            seg8: fill8.into_iter().max().unwrap_or(0),
            seg32: fill32.into_iter().max().unwrap_or(0),
            units,
            part,
            ranges,
            fp8_of_unit,
            fp8_tensors,
            seg_off,
        })
    }

    pub(super) fn pack_buffers(&self, n: usize) -> ZeroPacked {
        ZeroPacked {
            buf8: vec![0u8; n * self.seg8],
            buf32: vec![0f32; n * self.seg32],
            s_g: vec![0.0; self.fp8_tensors.len()],
            flushed: 0,
        }
    }

    /// Steps 1 and 2 of the fp8-o3 step for one group of final gradients: the FP8-LM
    /// scale agreement for its FP8 weight gradients (one vector all-reduce, Min), then
    /// each of its units packed into its owner's segment, FP8 re-quantised to `mu * s_g`.
    /// Per tensor the same values as when done for all groups at once.
    pub(super) fn pack_group(
        &self,
        zg: &ZeroGroup,
        g: &FinalGrads<'_>,
        comm: &dyn Communicator,
        packed: &mut ZeroPacked,
    ) -> Result<()> {
        let wgrad = |k: usize| -> Result<&ScaledFp8> {
            match g.linears[k].fp8.as_ref() {
                Some(f) => Ok(&f.wgrad),
                None => bail!(
                    "linear {} has no FP8 state in an FP8 run",
                    g.linears[k].name
                ),
            }
        };
        let mut s_g = zg
            .fp8
            .iter()
            .map(|&(_, k)| wgrad(k).map(|w| w.scale))
            .collect::<Result<Vec<f32>>>()?;
        if !s_g.is_empty() {
            comm.all_reduce(BufMut::F32(&mut s_g), ReduceOp::Min)
                .map_err(comm_err)?;
        }
        for (&(j, _), &v) in zg.fp8.iter().zip(&s_g) {
            packed.s_g[j] = v;
        }
        for &u in &zg.units {
            let unit = &self.units[u];
            let q = self.part.owner[u];
            let range = unit.range();
            match self.fp8_of_unit[u] {
                Some(j) => {
                    let k = zg
                        .fp8
                        .iter()
                        .find(|&&(jj, _)| jj == j)
                        .map(|&(_, k)| k)
                        .expect("the group holds its units' FP8 tensors");
                    let w = wgrad(k)?;
                    let dst = &mut packed.buf8[q * self.seg8 + self.seg_off[u]..][..range.len()];
                    let ratio = self.mu[j] * packed.s_g[j] / w.scale;
                    let src = &w.data[range];
                    if ratio == 1.0 {
                        dst.copy_from_slice(src);
                    } else {
                        let table = decode_table(w.format);
                        let tmp: Vec<f32> =
                            src.iter().map(|&b| table[b as usize] * ratio).collect();
                        let (_, counts) = f32_to_fp8_counted(WGRAD, &tmp, 1.0, dst);
                        packed.flushed += counts.flushed;
                    }
                }
                None => {
                    let dst = &mut packed.buf32[q * self.seg32 + self.seg_off[u]..][..range.len()];
                    let r = &self.ranges[u];
                    dst.copy_from_slice(&g.grads[r.start - zg.start..r.end - zg.start]);
                }
            }
        }
        Ok(())
    }

    pub(super) fn owned(&self, rank: usize) -> Vec<usize> {
        self.part.owned_by(rank)
    }

    pub(super) fn spans(&self, units: &[usize]) -> Vec<UnitSpan> {
        units
            .iter()
            .map(|&u| UnitSpan {
                name: self.units[u].name.clone(),
                tensor: self.units[u].tensor,
                offset: self.units[u].offset,
                numel: self.units[u].numel(),
            })
            .collect()
    }

    /// Owners share their units' new weights in the optimizer's master format: FP16
    /// with a power-of-two scale per unit for the FP8 linears' weights (exact: the master
    /// is FP16 with the scale of its amax), f32 for the rest. One ring all-gather of
    /// per-owner segments (padded to the largest) rather than N broadcasts: one
    /// synchronisation point per step instead of N. Every rank, the owner included,
    /// decodes the same bytes into `params`, so the replicas stay identical.
    pub(super) fn share_weights(&self, comm: &dyn Communicator, params: &mut [f32]) -> Result<()> {
        let (me, n) = (comm.rank(), comm.size());
        // Per owner: (FP16 units, f32 units, payload bytes).
        let layout: Vec<(Vec<usize>, Vec<usize>, usize)> = (0..n)
            .map(|q| {
                let (low, full): (Vec<usize>, Vec<usize>) = self
                    .owned(q)
                    .into_iter()
                    .partition(|&u| self.fp8_of_unit[u].is_some());
                let numel = |us: &[usize]| us.iter().map(|&u| self.units[u].numel()).sum::<usize>();
                let bytes = 2 * numel(&low) + 4 * low.len() + 4 * numel(&full);
                (low, full, bytes)
            })
            .collect();
        let seg = layout.iter().map(|l| l.2).max().unwrap_or(0);
        if seg == 0 {
            return Ok(());
        }
        // Segment layout: [f16 bits of every FP16 unit][f32 scale per FP16 unit][f32 units].
        let mut mine = vec![0u8; seg];
        {
            let (low, full, _) = &layout[me];
            let mut off = 0;
            let mut h = Vec::new();
            let mut scales = Vec::with_capacity(low.len());
            for &u in low {
                let src = &params[self.ranges[u].clone()];
                let amax = fp8lm_fp8::cast::amax_f32(src);
                let sc = scale_for_amax(F16_MAX, amax, 0, ScaleRounding::PowerOfTwo).unwrap_or(1.0);
                h.resize(src.len(), f16::ZERO);
                f32_to_f16_amax(src, sc, &mut h);
                for x in &h {
                    mine[off..off + 2].copy_from_slice(&x.to_bits().to_le_bytes());
                    off += 2;
                }
                scales.push(sc);
            }
            for sc in scales {
                mine[off..off + 4].copy_from_slice(&sc.to_le_bytes());
                off += 4;
            }
            for &u in full {
                for x in &params[self.ranges[u].clone()] {
                    mine[off..off + 4].copy_from_slice(&x.to_le_bytes());
                    off += 4;
                }
            }
        }
        let all = comm.all_gather_bytes(&mine).map_err(comm_err)?;
        for (q, (low, full, _)) in layout.iter().enumerate() {
            let b = &all[q * seg..(q + 1) * seg];
            let n16: usize = low.iter().map(|&u| self.units[u].numel()).sum();
            let sc_at = 2 * n16;
            let mut off = 0;
            let mut h = Vec::new();
            for (k, &u) in low.iter().enumerate() {
                let dst = &mut params[self.ranges[u].clone()];
                h.clear();
                h.extend(
                    b[off..off + 2 * dst.len()]
                        .chunks_exact(2)
                        .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]]))),
                );
                off += 2 * dst.len();
                let sc =
                    f32::from_le_bytes(b[sc_at + 4 * k..sc_at + 4 * k + 4].try_into().unwrap());
                f16_to_f32_amax(&h, 1.0 / sc, dst);
            }
            let mut off = sc_at + 4 * low.len();
            for &u in full {
                let dst = &mut params[self.ranges[u].clone()];
                let l = dst.len();
                for (d, c) in dst.iter_mut().zip(b[off..off + 4 * l].chunks_exact(4)) {
                    *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
                off += 4 * l;
            }
        }
        Ok(())
    }
}

impl Trainer {
    /// fp8-o3: bytes of optimizer state each rank holds by the partition (master, moments,
    /// per-unit scalars), in rank order. `None` unless ZeRO is on. This rank's actual
    /// holding is `optimizer().state_bytes()`.
    pub fn zero_rank_bytes(&self) -> Option<Vec<usize>> {
        let z = self.dist.as_ref()?.zero.as_ref()?;
        Some(z.part.rank_bytes.clone())
    }

    /// The whole optimizer state, and (fp8-o3) the units it is cut into: for tests and
    /// tools that compare whole states. Under fp8-o3 it holds every rank's share on every
    /// rank, so `fp8lm train` does not call it (its checkpoints are sharded, see
    /// [`crate::snapshot::save_trainer_sharded`]).
    /// Replicated precisions: this rank's own state (every rank holds the same); no
    /// communication. fp8-o3: every owner's units, gathered to every rank (one length
    /// all-gather and one all-gather of the padded encoded states), `step` first, then
    /// each unit's entries in unit order; every rank must call it.
    pub fn gather_optimizer_state(
        &self,
        comm: &dyn Communicator,
    ) -> Result<(Vec<NamedState>, Option<Vec<UnitSpan>>)> {
        let mine = self.optimizer.export_state();
        let Some(dist) = self.dist.as_ref() else {
            return Ok((mine, None));
        };
        let Some(z) = dist.zero.as_ref() else {
            return Ok((mine, None));
        };
        let bytes = encode_states(&mine);
        let lens = comm
            .all_gather_bytes(&(bytes.len() as u64).to_le_bytes())
            .map_err(comm_err)?;
        let seg = lens
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()) as usize)
            .max()
            .unwrap_or(0);
        let mut padded = bytes;
        padded.resize(seg, 0);
        let all = comm.all_gather_bytes(&padded).map_err(comm_err)?;
        let mut per_unit: Vec<Vec<(String, StateTensor)>> = vec![Vec::new(); z.units.len()];
        let mut step = None;
        for q in 0..dist.size {
            let states = decode_states(&all[q * seg..(q + 1) * seg])
                .with_context(|| format!("optimizer state gathered from rank {q}"))?;
            let owned = z.owned(q);
            if states.len() != 1 + 7 * owned.len() {
                bail!(
                    "rank {q} sent {} optimizer state entries for its {} units (expected step + 7 per unit)",
                    states.len(),
                    owned.len()
                );
            }
            let mut it = states.into_iter();
            let first = it.next().expect("checked length");
            step.get_or_insert(first);
            for (i, e) in it.enumerate() {
                per_unit[owned[i / 7]].push(e);
            }
        }
        let mut out = vec![step.expect("at least one rank")];
        out.extend(per_unit.into_iter().flatten());
        let all_units: Vec<usize> = (0..z.units.len()).collect();
        Ok((out, Some(z.spans(&all_units))))
    }

    /// Every tensor's exact f32 weights, flat in layout order, on every rank: under
    /// fp8-o3 with E4M3 weight storage ([`Trainer::zero_holds_e4m3`]) the owners' FP16
    /// masters of the linears (`f16 / scale`, exact) and the f32 tensors from `params`;
    /// otherwise [`Trainer::weights_f32_all`], without communication. Every rank must
    /// call it. A transient of the whole model (tests, tools).
    pub fn gather_weights_f32(&self, comm: &dyn Communicator) -> Result<Vec<f32>> {
        Ok(self
            .weights_f32_from_owners(comm, None)?
            .expect("every rank receives"))
    }

    /// [`Trainer::gather_weights_f32`] to rank `root` only (`Some` there, `None` on the
    /// others): one broadcast per FP8 unit from its owner, so a rank other than `root`
    /// holds one unit's FP16 at a time (the model group of a sharded checkpoint).
    pub fn gather_weights_f32_to(
        &self,
        comm: &dyn Communicator,
        root: usize,
    ) -> Result<Option<Vec<f32>>> {
        self.weights_f32_from_owners(comm, Some(root))
    }

    fn weights_f32_from_owners(
        &self,
        comm: &dyn Communicator,
        root: Option<usize>,
    ) -> Result<Option<Vec<f32>>> {
        let me = comm.rank();
        let zero = self.dist.as_ref().and_then(|d| d.zero.as_ref());
        let Some(z) = zero.filter(|_| self.zero_holds_e4m3()) else {
            return Ok((root.is_none() || root == Some(me)).then(|| self.weights_f32_all()));
        };
        let receive = root.is_none() || root == Some(me);
        let mut out = receive.then(|| self.model.params.clone());
        let owned = z.owned(me);
        let biggest = (0..z.units.len())
            .filter(|&u| z.fp8_of_unit[u].is_some())
            .map(|u| z.units[u].numel())
            .max()
            .unwrap_or(0);
        let mut buf = vec![0u8; 4 + 2 * biggest];
        let mut h = Vec::new();
        for u in (0..z.units.len()).filter(|&u| z.fp8_of_unit[u].is_some()) {
            let (q, numel) = (z.part.owner[u], z.units[u].numel());
            let b = &mut buf[..4 + 2 * numel];
            if q == me {
                let k = owned.iter().position(|&x| x == u).expect("an owned unit");
                let (m, s) = self.optimizer.master_f16(k).with_context(|| {
                    format!(
                        "fp8-o3 on rank {me}: unit {} has no FP16 master",
                        z.units[u].name
                    )
                })?;
                b[..4].copy_from_slice(&s.to_le_bytes());
                for (d, x) in b[4..].chunks_exact_mut(2).zip(m) {
                    d.copy_from_slice(&x.to_bits().to_le_bytes());
                }
            }
            comm.broadcast_bytes(b, q).map_err(comm_err)?;
            if let Some(out) = out.as_mut() {
                let s = f32::from_le_bytes(b[..4].try_into().expect("4 bytes"));
                h.clear();
                h.extend(
                    b[4..]
                        .chunks_exact(2)
                        .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]]))),
                );
                f16_to_f32_amax(&h, 1.0 / s, &mut out[z.ranges[u].clone()]);
            }
        }
        Ok(out)
    }

    /// fp8-o3: the units (tensors or row blocks) whose state this rank holds, as
    /// checkpoints record them. `None` unless ZeRO is on.
    pub fn zero_owned_spans(&self) -> Option<Vec<UnitSpan>> {
        let dist = self.dist.as_ref()?;
        let z = dist.zero.as_ref()?;
        Some(z.spans(&z.owned(dist.rank)))
    }

    /// fp8-o3: names of the units (tensors or row blocks) whose state this rank holds.
    pub fn zero_owned_units(&self) -> Option<Vec<String>> {
        let dist = self.dist.as_ref()?;
        let z = dist.zero.as_ref()?;
        Some(
            z.owned(dist.rank)
                .iter()
                .map(|&u| z.units[u].name.clone())
                .collect(),
        )
    }

    /// FP8 ZeRO, after the backward packed the gradients ([`Zero::pack_group`]): reduce
    /// each unit's gradient to its owner, owners update their units, owners share the
    /// new weights. Returns (global grad norm, skipped).
    ///
    /// `tp`: on a D x T grid (`comm` the data-parallel group of this tensor-parallel
    /// rank), the tensor-parallel group and which tensors are split over it, for the
    /// whole model's norm: the sharded tensors' squares are summed over `tp` too, the
    /// replicated ones (the same on every TP rank) counted once.
    pub(crate) fn zero_update(
        &mut self,
        dist: &mut DistState,
        comm: &dyn Communicator,
        loss: f32,
        comm_time: &mut Duration,
        packed: ZeroPacked,
        tp: Option<(&dyn Communicator, &[bool])>,
    ) -> Result<(f32, bool)> {
        // `grad_accum` micro-batches summed into the gradients (`run_step`): the mean is
        // the sum / k, folded into the norm and the update's gradient scale (x * 1.0 == x
        // for one).
        let inv = 1.0 / self.cfg.grad_accum.max(1) as f32;
        let lr = lr_at(&self.cfg.optim, self.step, self.cfg.max_steps);
        let clip = self.cfg.optim.grad_clip;
        let (n, me) = (dist.size, dist.rank);
        let z = dist.zero.as_mut().expect("zero state");
        let model = &mut self.model;
        let ZeroPacked {
            mut buf8,
            mut buf32,
            s_g,
            flushed,
        } = packed;
        // 3. Reduce to the owners: one reduce-scatter per kind.
        let tc = Instant::now();
        if z.seg8 > 0 {
            let got = comm
                .reduce_scatter(BufMut::Fp8(&mut buf8, WGRAD), ReduceOp::Sum)
                .map_err(comm_err)?;
            debug_assert_eq!(got, me * z.seg8..(me + 1) * z.seg8);
        }
        if z.seg32 > 0 {
            let got = comm
                .reduce_scatter(BufMut::F32(&mut buf32), ReduceOp::Sum)
                .map_err(comm_err)?;
            debug_assert_eq!(got, me * z.seg32..(me + 1) * z.seg32);
        }
        // Saturated FP8 sums per tensor (counted by the owners), so all ranks update mu alike.
        let owned = z.owned(me);
        let mut sat = vec![0f32; z.fp8_tensors.len()];
        for &u in &owned {
            if let Some(j) = z.fp8_of_unit[u] {
                let s = &buf8[me * z.seg8 + z.seg_off[u]..][..z.units[u].numel()];
                sat[j] += s.iter().filter(|&&b| b & 0x7F == WGRAD.max_bits()).count() as f32;
            }
        }
        if !sat.is_empty() {
            comm.all_reduce(BufMut::F32(&mut sat), ReduceOp::Sum)
                .map_err(comm_err)?;
        }
        *comm_time += tc.elapsed();
        // 4. This rank's reduced gradients (means), its share of the norm, the update.
        let result_scale: Vec<f32> = (0..z.fp8_tensors.len())
            .map(|j| n as f32 * z.mu[j] * s_g[j])
            .collect();
        let inv_n = 1.0 / n as f32;
        let mine32 = &mut buf32[me * z.seg32..(me + 1) * z.seg32];
        mine32.iter_mut().for_each(|x| *x *= inv_n);
        let fp8_grads: Vec<Option<ScaledFp8>> = owned
            .iter()
            .map(|&u| {
                z.fp8_of_unit[u].map(|j| ScaledFp8 {
                    data: buf8[me * z.seg8 + z.seg_off[u]..][..z.units[u].numel()].to_vec(),
                    shape: z.units[u].shape.clone(),
                    format: WGRAD,
                    scale: result_scale[j],
                })
            })
            .collect();
        let grads: Vec<Grad<'_>> = owned
            .iter()
            .zip(&fp8_grads)
            .map(|(&u, g8)| match g8 {
                Some(g) => Grad::Fp8(g),
                None => Grad::F32(&buf32[me * z.seg32 + z.seg_off[u]..][..z.units[u].numel()]),
            })
            .collect();
        let tc = Instant::now();
        let grad_norm = match tp {
            None => {
                let local = global_grad_norm_on(&**model.backend(), &grads) as f64;
                let sq = comm
                    .all_reduce_scalar((local * local) as f32, ReduceOp::Sum)
                    .map_err(comm_err)?;
                sq.sqrt()
            }
            Some((tpc, sharded)) => {
                let (mut sh, mut rep) = (Vec::new(), Vec::new());
                for (&u, &g) in owned.iter().zip(&grads) {
                    match sharded.get(z.units[u].tensor) {
                        Some(true) => sh.push(g),
                        Some(false) => rep.push(g),
                        None => bail!(
                            "fp8-o3 on rank {me}: unit {} names tensor {}, outside the {} \
                             tensors of the tensor-parallel layout",
                            z.units[u].name,
                            z.units[u].tensor,
                            sharded.len()
                        ),
                    }
                }
                let be = &**model.backend();
                let mut sq = [
                    grad_sum_squares_on(be, &sh) as f32,
                    grad_sum_squares_on(be, &rep) as f32,
                ];
                comm.all_reduce(BufMut::F32(&mut sq), ReduceOp::Sum)
                    .map_err(comm_err)?;
                let shards = tpc
                    .all_reduce_scalar(sq[0], ReduceOp::Sum)
                    .map_err(comm_err)?;
                (shards + sq[1]).sqrt()
            }
        };
        let grad_norm = grad_norm * inv;
        *comm_time += tc.elapsed();
        // FP8-LM's mu: halve on overflow, else grow to 2x over `growth_steps`, cap max_mu
        // (the configured rule, `dist.fp8_allreduce`); the fixed-mu methods keep theirs.
        let rc = &dist.fp8_reducer.cfg;
        let mut tally = GradTally {
            flushed,
            saturated: sat.iter().map(|&c| c as u64).sum(),
            ..Default::default()
        };
        for (j, &t) in z.fp8_tensors.iter().enumerate() {
            let numel = model.layout.metas[t].numel();
            tally.elements += numel as u64;
            if rc.method == GradMethod::Fp8Lm {
                z.mu[j] = next_mu(rc, z.mu[j], sat[j] as u64, numel);
            }
        }
        tally.mu = z.mu.clone();
        dist.tally = tally;
        let skipped = !loss.is_finite() || !grad_norm.is_finite();
        if model.weights_from_optimizer() {
            // E4M3 weight storage: the owners write the compute bytes from their masters
            // in the update's pass and all-gather them (after a skipped step, re-cast
            // with the scale the forward may have moved, as fp8-o2 does).
            let update = (!skipped).then_some((&grads[..], lr, clip_scale(grad_norm, clip) * inv));
            let opt = self.optimizer.as_mut();
            *comm_time += z.update_and_share_e4m3(comm, model, opt, update)?;
            return Ok((grad_norm, skipped));
        }
        if skipped {
            return Ok((grad_norm, true));
        }
        let rs: Vec<_> = owned.iter().map(|&u| z.ranges[u].clone()).collect();
        let be = model.backend().clone();
        let mut ps = slices_mut(&mut model.params, &rs);
        let mut outs: Vec<ParamOut<'_>> = ps.iter_mut().map(|p| ParamOut::F32(p)).collect();
        self.optimizer.step_on(
            &*be,
            &mut outs,
            &grads,
            lr,
            clip_scale(grad_norm, clip) * inv,
        );
        // 5. Owners share the new weights.
        let tc = Instant::now();
        z.share_weights(comm, &mut model.params)?;
        *comm_time += tc.elapsed();
        Ok((grad_norm, false))
    }
}

/// How one FP8 linear weight is cast to its E4M3 compute copy (the linear's
/// `Fp8Operand::optimizer_target`, without its bytes): the same on every rank.
#[derive(Clone, Copy)]
struct CastPolicy {
    format: fp8lm_fp8::Fp8Format,
    scale: Option<f32>,
    margin: i32,
    rounding: ScaleRounding,
    fallback: f32,
}

impl CastPolicy {
    fn target<'a>(&self, data: &'a mut [u8], scale: Option<f32>) -> ParamOut<'a> {
        ParamOut::Fp8(fp8lm_optim::Fp8Out {
            data,
            format: self.format,
            scale,
            margin: self.margin,
            rounding: self.rounding,
            fallback: self.fallback,
            written: None,
        })
    }
}

/// Bytes per FP8 unit of an owner's E4M3 segment besides its E4M3 bytes: the cast's
/// scale and amax (f32) and its saturated and flushed counts (u64).
const E4M3_UNIT_META: usize = 24;

fn f32_at(b: &[u8], at: usize) -> f32 {
    f32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Zero {
    /// Per owner, in E4M3 storage ([`Zero::update_and_share_e4m3`]): its FP8 units,
    /// its f32 units, which of its FP8 units also carry their FP16 master (the tied
    /// embedding, `wte_f16`), and its segment's bytes.
    fn e4m3_layout(&self, q: usize, wte_f16: Option<usize>) -> E4m3Segment {
        let (low, full): (Vec<usize>, Vec<usize>) = self
            .owned(q)
            .into_iter()
            .partition(|&u| self.fp8_of_unit[u].is_some());
        let f16: Vec<usize> = low
            .iter()
            .copied()
            .filter(|&u| Some(self.units[u].tensor) == wte_f16)
            .collect();
        let numel = |us: &[usize]| us.iter().map(|&u| self.units[u].numel()).sum::<usize>();
        let n8 = numel(&low);
        let meta = n8;
        let f16_at = meta + E4M3_UNIT_META * low.len();
        let f32_at = f16_at + 2 * numel(&f16) + 4 * f16.len();
        let bytes = f32_at + 4 * numel(&full);
        E4m3Segment {
            low,
            full,
            f16,
            meta,
            f16_at,
            f32_at,
            bytes,
        }
    }

    /// fp8-o3 with E4M3 weight storage ([`Model::hold_linear_weights_as_e4m3`]): the
    /// owners' update (`update`: gradients in owned order, learning rate, gradient scale;
    /// `None` re-casts the unchanged masters, after a skipped step or a restore) writes
    /// each owned FP8 unit's E4M3 compute bytes straight from the new FP16 master in the
    /// same fused pass (`ParamOut::Fp8`, as fp8-o2's optimizer does), at the linear's
    /// cast scale: the delayed one every rank knows, or (current scaling, a first cast)
    /// one from the whole tensor's amax, agreed by one Max all-reduce over the owners'
    /// units and re-cast where a unit's own guess differs; the f32 units are updated in
    /// `params` as before. Then one all-gather of per-owner segments moves what the
    /// compute reads: E4M3 bytes + scale, amax and counts per FP8 unit, the tied
    /// embedding's FP16 master + scale per unit (for the lookup), f32 values of the rest.
    /// Every rank copies the same bytes in, so replicas stay bit-identical; the bytes are
    /// those a forward would cast from the f32 view of the masters (the fp8-o2 fused
    /// cast, `fp8_o2_storage.rs`; `zero_e4m3_weights.rs`). Returns the time spent in
    /// the collectives.
    pub(super) fn update_and_share_e4m3(
        &self,
        comm: &dyn Communicator,
        model: &mut Model,
        opt: &mut dyn fp8lm_optim::Optimizer,
        update: Option<(&[Grad<'_>], f32, f32)>,
    ) -> Result<Duration> {
        let (me, n) = (comm.rank(), comm.size());
        let mut in_comm = Duration::ZERO;
        let wte = model.layout.wte;
        let wte_f16 = model.wte_f16_bytes().gt(&0).then_some(wte);
        let layouts: Vec<E4m3Segment> = (0..n).map(|q| self.e4m3_layout(q, wte_f16)).collect();
        let seg = layouts.iter().map(|l| l.bytes).max().unwrap_or(0);
        // The cast policy of every FP8 weight tensor (the same on every rank).
        let mut policy = Vec::with_capacity(self.fp8_tensors.len());
        for &t in &self.fp8_tensors {
            let li = model.linear_of_tensor[t].expect("an FP8 gradient has a linear");
            let Some(f) = model.linears[li].fp8.as_mut() else {
                bail!("linear {} has no FP8 state", model.linears[li].name);
            };
            let o = f.w.optimizer_target();
            policy.push(CastPolicy {
                format: o.format,
                scale: o.scale,
                margin: o.margin,
                rounding: o.rounding,
                fallback: o.fallback,
            });
        }
        let owned = self.owned(me);
        let lay = &layouts[me];
        let be = model.backend().clone();
        let mut mine = vec![0u8; seg];
        let mut written: Vec<fp8lm_optim::Fp8Written> = Vec::with_capacity(lay.low.len());
        {
            let (e4m3, _) = mine.split_at_mut(lay.meta);
            let full_ranges: Vec<Range<usize>> =
                lay.full.iter().map(|&u| self.ranges[u].clone()).collect();
            let mut f32_outs = slices_mut(&mut model.params, &full_ranges).into_iter();
            let mut rest = e4m3;
            let mut outs: Vec<ParamOut<'_>> = Vec::with_capacity(owned.len());
            for &u in &owned {
                match self.fp8_of_unit[u] {
                    Some(j) => {
                        let (head, tail) =
                            std::mem::take(&mut rest).split_at_mut(self.units[u].numel());
                        rest = tail;
                        outs.push(policy[j].target(head, policy[j].scale));
                    }
                    None => outs.push(ParamOut::F32(f32_outs.next().expect("one per f32 unit"))),
                }
            }
            match update {
                Some((grads, lr, grad_scale)) => {
                    opt.step_on(&*be, &mut outs, grads, lr, grad_scale)
                }
                None => opt.write_compute_weights_on(&*be, &mut outs).map_err(|e| {
                    anyhow!("fp8-o3 on rank {me}: re-casting the E4M3 weights: {e}")
                })?,
            }
            for o in &outs {
                if let ParamOut::Fp8(o) = o {
                    written.push(o.written.with_context(|| {
                        format!("fp8-o3 on rank {me}: the optimizer wrote no E4M3 weights")
                    })?);
                }
            }
        }
        // A scale from the amax (current scaling, a first cast): the whole tensor's,
        // over its units' owners, as a forward casting the f32 view would take it.
        if policy.iter().any(|p| p.scale.is_none()) {
            let mut amax = vec![0f32; self.fp8_tensors.len()];
            for (k, &u) in lay.low.iter().enumerate() {
                let j = self.fp8_of_unit[u].expect("an FP8 unit");
                amax[j] = merge_amax(amax[j], written[k].amax);
            }
            let tc = Instant::now();
            comm.all_reduce(BufMut::F32(&mut amax), ReduceOp::Max)
                .map_err(comm_err)?;
            in_comm += tc.elapsed();
            let want: Vec<f32> = policy
                .iter()
                .zip(&amax)
                .map(|(p, &a)| {
                    p.scale.unwrap_or_else(|| {
                        scale_for_amax(p.format.max(), a, p.margin, p.rounding)
                            .unwrap_or(p.fallback)
                    })
                })
                .collect();
            let redo: Vec<bool> = lay
                .low
                .iter()
                .zip(&written)
                .map(|(&u, w)| {
                    let j = self.fp8_of_unit[u].expect("an FP8 unit");
                    w.scale.to_bits() != want[j].to_bits()
                })
                .collect();
            if redo.iter().any(|&r| r) {
                let (e4m3, _) = mine.split_at_mut(lay.meta);
                let mut rest = e4m3;
                let mut outs: Vec<ParamOut<'_>> = Vec::with_capacity(owned.len());
                let mut k = 0;
                for &u in &owned {
                    match self.fp8_of_unit[u] {
                        Some(j) => {
                            let (head, tail) =
                                std::mem::take(&mut rest).split_at_mut(self.units[u].numel());
                            rest = tail;
                            outs.push(if redo[k] {
                                policy[j].target(head, Some(want[j]))
                            } else {
                                ParamOut::F32(&mut [])
                            });
                            k += 1;
                        }
                        None => outs.push(ParamOut::F32(&mut [])),
                    }
                }
                opt.write_compute_weights_on(&*be, &mut outs).map_err(|e| {
                    anyhow!("fp8-o3 on rank {me}: re-casting the E4M3 weights: {e}")
                })?;
                let mut k = 0;
                for (o, &u) in outs.iter().zip(&owned) {
                    if self.fp8_of_unit[u].is_none() {
                        continue;
                    }
                    if let ParamOut::Fp8(o) = o {
                        written[k] = o.written.with_context(|| {
                            format!("fp8-o3 on rank {me}: the optimizer re-cast no E4M3 weights")
                        })?;
                    }
                    k += 1;
                }
            }
        }
        // The rest of this owner's segment: per FP8 unit its cast, the tied embedding's
        // FP16 masters, the f32 units.
        for (k, w) in written.iter().enumerate() {
            let at = lay.meta + E4M3_UNIT_META * k;
            mine[at..at + 4].copy_from_slice(&w.scale.to_le_bytes());
            mine[at + 4..at + 8].copy_from_slice(&w.amax.to_le_bytes());
            mine[at + 8..at + 16].copy_from_slice(&w.saturated.to_le_bytes());
            mine[at + 16..at + 24].copy_from_slice(&w.flushed.to_le_bytes());
        }
        let mut at = lay.f16_at;
        let mut scales = Vec::with_capacity(lay.f16.len());
        for &u in &lay.f16 {
            let k = owned.iter().position(|&x| x == u).expect("an owned unit");
            let (h, s) = opt.master_f16(k).with_context(|| {
                format!(
                    "fp8-o3 on rank {me}: unit {} has no FP16 master",
                    self.units[u].name
                )
            })?;
            for x in h {
                mine[at..at + 2].copy_from_slice(&x.to_bits().to_le_bytes());
                at += 2;
            }
            scales.push(s);
        }
        for s in scales {
            mine[at..at + 4].copy_from_slice(&s.to_le_bytes());
            at += 4;
        }
        for &u in &lay.full {
            for x in &model.params[self.ranges[u].clone()] {
                mine[at..at + 4].copy_from_slice(&x.to_le_bytes());
                at += 4;
            }
        }
        let tc = Instant::now();
        let all = if seg == 0 {
            Vec::new()
        } else {
            comm.all_gather_bytes(&mine).map_err(comm_err)?
        };
        in_comm += tc.elapsed();
        drop(mine);
        // Every rank (the owners included) copies the same bytes in.
        let mut agg: Vec<Option<fp8lm_optim::Fp8Written>> = vec![None; self.fp8_tensors.len()];
        for (q, l) in layouts.iter().enumerate() {
            let b = &all[q * seg..(q + 1) * seg];
            let mut off = 0;
            for (k, &u) in l.low.iter().enumerate() {
                let unit = &self.units[u];
                let j = self.fp8_of_unit[u].expect("an FP8 unit");
                let li = model.linear_of_tensor[unit.tensor].expect("an FP8 linear");
                let f = model.linears[li].fp8.as_mut().expect("FP8 state");
                let tgt = f.w.optimizer_target();
                let r = unit.range();
                tgt.data[r.clone()].copy_from_slice(&b[off..off + r.len()]);
                off += r.len();
                let at = l.meta + E4M3_UNIT_META * k;
                let w = fp8lm_optim::Fp8Written {
                    scale: f32_at(b, at),
                    amax: f32_at(b, at + 4),
                    saturated: u64_at(b, at + 8),
                    flushed: u64_at(b, at + 16),
                };
                agg[j] = Some(match agg[j] {
                    None => w,
                    Some(a) => {
                        if a.scale.to_bits() != w.scale.to_bits() {
                            bail!(
                                "fp8-o3: unit {} of {} was cast with scale {} by rank {q}, \
                                 another unit of it with {}",
                                unit.name,
                                model.layout.metas[unit.tensor].name,
                                w.scale,
                                a.scale
                            );
                        }
                        fp8lm_optim::Fp8Written {
                            scale: a.scale,
                            amax: merge_amax(a.amax, w.amax),
                            saturated: a.saturated + w.saturated,
                            flushed: a.flushed + w.flushed,
                        }
                    }
                });
            }
            if !l.f16.is_empty() {
                let (bits, units) = model
                    .wte_f16_units_mut()
                    .context("fp8-o3: the tied embedding's FP16 units are not held")?;
                let mut at = l.f16_at;
                let sc_at =
                    l.f16_at + 2 * l.f16.iter().map(|&u| self.units[u].numel()).sum::<usize>();
                for (k, &u) in l.f16.iter().enumerate() {
                    let r = self.units[u].range();
                    for (d, c) in bits[r.clone()]
                        .iter_mut()
                        .zip(b[at..at + 2 * r.len()].chunks_exact(2))
                    {
                        *d = f16::from_bits(u16::from_le_bytes([c[0], c[1]]));
                    }
                    at += 2 * r.len();
                    let s = f32_at(b, sc_at + 4 * k);
                    let slot = units.iter_mut().find(|(ur, _)| *ur == r).with_context(|| {
                        format!("fp8-o3: no FP16 slot for unit {}", self.units[u].name)
                    })?;
                    slot.1 = s;
                }
            }
            let mut at = l.f32_at;
            for &u in &l.full {
                let dst = &mut model.params[self.ranges[u].clone()];
                let len = dst.len();
                for (d, c) in dst.iter_mut().zip(b[at..at + 4 * len].chunks_exact(4)) {
                    *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
                at += 4 * len;
            }
        }
        for (j, &t) in self.fp8_tensors.iter().enumerate() {
            let w = agg[j]
                .with_context(|| format!("fp8-o3: no owner sent {}", model.layout.metas[t].name))?;
            let li = model.linear_of_tensor[t].expect("an FP8 linear");
            model.linears[li]
                .fp8
                .as_mut()
                .expect("FP8 state")
                .w
                .accept_written(w);
        }
        Ok(in_comm)
    }
}

/// One owner's segment of the E4M3 all-gather: `[E4M3 bytes of its FP8 units]` then at
/// `meta` 24 B per FP8 unit (scale, amax, saturated, flushed), at `f16_at` the tied
/// embedding's FP16 masters then one f32 scale per such unit, at `f32_at` its f32 units.
struct E4m3Segment {
    low: Vec<usize>,
    full: Vec<usize>,
    f16: Vec<usize>,
    meta: usize,
    f16_at: usize,
    f32_at: usize,
    bytes: usize,
}
