//! Data-parallel training and FP8 ZeRO (`precision = "fp8-o3"`), over any
//! [`Communicator`] (threads in one process, or MPI under `mpirun`).
//!
//! ## Data parallelism (every precision)
//! With N ranks and `batch = B`, the global batch is N*B rows: every rank draws the same
//! N*B-row batch from its (identical) data stream and keeps rows `r*B..(r+1)*B`. So the
//! token stream equals a single-rank run with `batch = N*B`, and so does the loss (the
//! mean of the ranks' means, which are over equal row counts). After the backward:
//! - f32 gradients (all of them in fp32/bf16; the non-linear ones in FP8 modes) are
//!   averaged with the communicator's f32 ring all-reduce: a fixed summation order
//!   (`fp8lm_collectives::comm`), so every rank gets bit-identical gradients;
//! - in FP8 modes the linear layers' weight gradients, already FP8 E5M2 with a per-tensor
//!   scale when they leave the backward, are averaged by the FP8-LM all-reduce
//!   (automatic factor mu, shared minimum scale, FP8 sum, scale `N * mu * s_g`).
//!
//! The global gradient norm, the skip decision and clipping then use the reduced
//! gradients, and every rank runs the same optimizer on the same inputs, so the
//! replicas stay bit-identical without broadcasting weights.
//!
//! ## FP8 ZeRO (fp8-o3)
//! Master weights and optimizer state (the FP8-LM optimizer's 6 bytes/param) are
//! partitioned: [`fp8lm_optim::zero`] cuts tensors larger than 1/(8N) of the model into
//! row blocks (each keeps one scale) and assigns whole units greedily, largest first, to
//! the least-loaded rank. Every rank computes the same partition without communication.
//! A step then does:
//! 1. scale agreement for the FP8 weight gradients (one vector all-reduce, Min), and
//!    re-quantisation to `mu * s_g` (FP8-LM);
//! 2. *reduce to the owner*: each rank packs the gradients of the units owned by rank q
//!    into segment q of one buffer (segments padded to the largest), and one ring
//!    reduce-scatter leaves each rank exactly its own segment, summed: FP8 bytes for the
//!    linear weights, f32 for the rest. This sends `(N-1)/N` of a buffer per rank, half
//!    of an all-reduce;
//! 3. saturation counts of the FP8 sums (one small all-reduce) so every rank updates the
//!    same mu; the global gradient norm (one scalar all-reduce);
//! 4. each owner runs `Fp8Adam` on its units only;
//! 5. each owner broadcasts its units' new weights as FP16 with a power-of-two
//!    per-unit scale, the optimizer's master format: the master is FP16 with the
//!    power-of-two scale of its amax, so the broadcast is exact, and every rank (the owner
//!    included) decodes the same bytes, so the replicas stay bit-identical.
//!
//! ## Not done
//! Gradient communication does not overlap the backward pass: the reductions start when
//! the whole backward is finished (the model's backward is one function; overlapping
//! needs a per-layer hook and a communication thread, which the single-threaded MPI
//! backend does not allow). ZeRO state is not re-partitioned on resume: checkpoints of an
//! fp8-o3 run hold each rank's own units.

use crate::config::Precision;
use crate::data::Dataset;
use crate::model::params::split_tensors_mut;
use crate::model::Model;
use crate::train::{clip_scale, global_grad_norm, lr_at, StepStats, Trainer};
use anyhow::{anyhow, bail, Result};
use fp8lm_collectives::{
    BufMut, Communicator, GradAllReduceConfig, GradAllReducer, GradMethod, ReduceOp,
};
use fp8lm_fp8::cast::{decode_table, f16_to_f32_amax, f32_to_f16_amax, f32_to_fp8_amax};
use fp8lm_fp8::scaling::{scale_for_amax, ScaleRounding};
use fp8lm_fp8::{Fp8Format, ScaledFp8};
use fp8lm_optim::fp8_adam::SCALAR_BYTES_PER_TENSOR;
use fp8lm_optim::zero::{split_units, Partition, Unit};
use fp8lm_optim::{AdamWHyper, Fp8Adam, Fp8AdamConfig, Grad};
use half::f16;
use std::ops::Range;
use std::time::{Duration, Instant};

/// Per-rank data-parallel state held by the [`Trainer`] (the communicator itself is
/// passed to each call: it is not `Send`, and tests borrow it from `run_ranks`).
pub struct DistState {
    pub rank: usize,
    pub size: usize,
    /// The global batch `[N*B, T]`, of which this rank keeps its rows.
    global_inputs: Vec<u32>,
    global_targets: Vec<u32>,
    /// FP8-LM all-reduce of the FP8 weight gradients (holds mu per tensor).
    fp8_reducer: GradAllReducer,
    /// f32 all-reduce of the other gradients.
    f32_reducer: GradAllReducer,
    zero: Option<Zero>,
}

/// FP8 ZeRO bookkeeping (identical on every rank).
struct Zero {
    units: Vec<Unit>,
    part: Partition,
    /// Flat-buffer range of each unit.
    ranges: Vec<Range<usize>>,
    /// Per unit: index into `fp8_tensors` when its gradient is FP8 (a linear weight).
    fp8_of_unit: Vec<Option<usize>>,
    /// Tensor indices of the FP8 weight gradients, and FP8-LM's mu for each.
    fp8_tensors: Vec<usize>,
    mu: Vec<f32>,
    /// Per-rank segment lengths of the FP8 and f32 reduce buffers, and each unit's offset
    /// inside its owner's segment (of its kind).
    seg8: usize,
    seg32: usize,
    seg_off: Vec<usize>,
}

const WGRAD: Fp8Format = crate::model::WGRAD_FORMAT;
const F16_MAX: f32 = 65504.0;

fn comm_err(e: fp8lm_collectives::CommError) -> anyhow::Error {
    anyhow!("{e}")
}

/// The FP8 weight gradient of tensor `t`, if it has one.
fn fp8_wgrad(model: &Model, t: usize) -> Option<&ScaledFp8> {
    model.linear_of_tensor[t]
        .and_then(|li| model.linears[li].fp8.as_ref())
        .map(|f| &f.wgrad)
}

/// Disjoint mutable views `buf[r]` for ascending, non-overlapping `ranges`.
fn slices_mut<'a>(buf: &'a mut [f32], ranges: &[Range<usize>]) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(ranges.len());
    let (mut rest, mut base) = (buf, 0);
    for r in ranges {
        let (_, tail) = rest.split_at_mut(r.start - base);
        let (mid, tail) = tail.split_at_mut(r.len());
        out.push(mid);
        rest = tail;
        base = r.end;
    }
    out
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
    let max_elems = (total / (8 * ranks)).max(1);
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

/// f32 master weight and two f32 moments.
const F32_STATE_BYTES_PER_PARAM: usize = 12;

impl Zero {
    fn new(model: &Model, size: usize, cfg: &Fp8AdamConfig) -> Result<Zero> {
        let lay = &model.layout;
        let low: Vec<bool> = (0..lay.metas.len())
            .map(|t| fp8_wgrad(model, t).is_some())
            .collect();
        let (units, part) = zero_partition(&lay.metas, size, &low, cfg)?;
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
        Ok(Zero {
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

    fn owned(&self, rank: usize) -> Vec<usize> {
        self.part.owned_by(rank)
    }

    /// Owners broadcast their units' new weights in the optimizer's master format: FP16
    /// with a power-of-two scale per unit for the FP8 linears' weights (exact: the master
    /// is FP16 with the scale of its amax), f32 for the rest. Every rank, the owner
    /// included, decodes the same bytes into `params`, so the replicas stay identical.
    fn broadcast_weights(&self, comm: &dyn Communicator, params: &mut [f32]) -> Result<()> {
        let me = comm.rank();
        for q in 0..comm.size() {
            let owned = self.owned(q);
            let (low, full): (Vec<usize>, Vec<usize>) =
                owned.iter().partition(|&&u| self.fp8_of_unit[u].is_some());
            let numel = |us: &[usize]| us.iter().map(|&u| self.units[u].numel()).sum::<usize>();
            let mut master_f16 = vec![f16::ZERO; numel(&low)];
            let mut master_f32 = vec![0f32; numel(&full)];
            let mut scales = vec![1f32; low.len()];
            if q == me {
                let mut off = 0;
                for (k, &u) in low.iter().enumerate() {
                    let src = &params[self.ranges[u].clone()];
                    let amax = fp8lm_fp8::cast::amax_f32(src);
                    scales[k] =
                        scale_for_amax(F16_MAX, amax, 0, ScaleRounding::PowerOfTwo).unwrap_or(1.0);
                    f32_to_f16_amax(src, scales[k], &mut master_f16[off..off + src.len()]);
                    off += src.len();
                }
                let mut off = 0;
                for &u in &full {
                    let src = &params[self.ranges[u].clone()];
                    master_f32[off..off + src.len()].copy_from_slice(src);
                    off += src.len();
                }
            }
            let e = comm_err;
            if !master_f16.is_empty() {
                comm.broadcast(BufMut::F16(&mut master_f16), q).map_err(e)?;
                comm.broadcast(BufMut::F32(&mut scales), q).map_err(e)?;
            }
            if !master_f32.is_empty() {
                comm.broadcast(BufMut::F32(&mut master_f32), q).map_err(e)?;
            }
            let mut off = 0;
            for (k, &u) in low.iter().enumerate() {
                let dst = &mut params[self.ranges[u].clone()];
                let l = dst.len();
                f16_to_f32_amax(&master_f16[off..off + l], 1.0 / scales[k], dst);
                off += l;
            }
            if q != me {
                let mut off = 0;
                for &u in &full {
                    let dst = &mut params[self.ranges[u].clone()];
                    let l = dst.len();
                    dst.copy_from_slice(&master_f32[off..off + l]);
                    off += l;
                }
            }
        }
        Ok(())
    }
}

impl Trainer {
    /// Make this trainer rank `comm.rank()` of `comm.size()` data-parallel ranks (any
    /// size, 1 included). Refuses a config that differs between ranks (hash agreement,
    /// the error names the ranks). For fp8-o3, builds this rank's share of the FP8
    /// optimizer and makes every rank's weights equal to the owners' FP16 masters.
    /// Must be called by every rank, before the first step.
    pub fn enable_data_parallel(&mut self, comm: &dyn Communicator) -> Result<()> {
        let toml = crate::config_file::to_toml(&self.cfg);
        fp8lm_collectives::agree_config(comm, "training config", toml.as_bytes())
            .map_err(comm_err)?;
        let (rank, size) = (comm.rank(), comm.size());
        let d = self.model.dims;
        let zero = if self.cfg.precision == Precision::Fp8O3 {
            if self.step != 0 {
                bail!("fp8-o3: resuming a ZeRO run (step {}) is not supported yet; the optimizer state is partitioned per rank", self.step);
            }
            let o = &self.cfg.optim;
            let hyper = AdamWHyper {
                beta1: o.beta1,
                beta2: o.beta2,
                eps: o.eps,
                weight_decay: o.weight_decay,
            };
            let ocfg = Fp8AdamConfig::fp8_lm(hyper);
            let z = Zero::new(&self.model, size, &ocfg)?;
            let owned = z.owned(rank);
            let metas: Vec<_> = owned.iter().map(|&u| z.units[u].meta()).collect();
            // As fp8-o2: low-precision state for the FP8 linears' weights, f32 for the rest.
            let low: Vec<bool> = owned.iter().map(|&u| z.fp8_of_unit[u].is_some()).collect();
            let rs: Vec<_> = owned.iter().map(|&u| z.ranges[u].clone()).collect();
            let mut ps = slices_mut(&mut self.model.params, &rs);
            let opt =
                Fp8Adam::with_low_precision(&metas, &mut ps, ocfg, &low).map_err(|e| anyhow!(e))?;
            self.optimizer = Box::new(opt);
            z.broadcast_weights(comm, &mut self.model.params)?;
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
        self.dist = Some(Box::new(DistState {
            rank,
            size,
            global_inputs: vec![0; size * d.b * d.t],
            global_targets: vec![0; size * d.b * d.t],
            fp8_reducer: reducer(GradMethod::Fp8Lm),
            f32_reducer: reducer(GradMethod::F32),
            zero,
        }));
        Ok(())
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

    /// fp8-o3: bytes of optimizer state each rank holds by the partition (master, moments,
    /// per-unit scalars), in rank order. `None` unless ZeRO is on. This rank's actual
    /// holding is `optimizer().state_bytes()`.
    pub fn zero_rank_bytes(&self) -> Option<Vec<usize>> {
        let z = self.dist.as_ref()?.zero.as_ref()?;
        Some(z.part.rank_bytes.clone())
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

    /// One data-parallel optimizer step: this rank's shard of the next global batch,
    /// forward, backward, gradient reduction, then the update (replicated, or ZeRO's
    /// owner update + broadcast). Every rank must call it with its communicator. The
    /// loss and gradient norm in the result are global. Needs
    /// [`Trainer::enable_data_parallel`] first.
    pub fn train_step_dist(
        &mut self,
        data: &mut dyn Dataset,
        comm: &dyn Communicator,
    ) -> Result<StepStats> {
        let Some(mut dist) = self.dist.take() else {
            bail!("train_step_dist: call enable_data_parallel first");
        };
        let r = self.step_dist_inner(&mut dist, data, comm);
        self.dist = Some(dist);
        r
    }

    fn step_dist_inner(
        &mut self,
        dist: &mut DistState,
        data: &mut dyn Dataset,
        comm: &dyn Communicator,
    ) -> Result<StepStats> {
        if comm.size() != dist.size || comm.rank() != dist.rank {
            bail!(
                "train_step_dist: communicator is rank {} of {}, the trainer was set up as rank {} of {}",
                comm.rank(),
                comm.size(),
                dist.rank,
                dist.size
            );
        }
        let d = self.model.dims;
        let (n, rank) = (dist.size, dist.rank);
        let t0 = Instant::now();
        let rows = d.b * d.t;
        data.next_train_batch(
            n * d.b,
            d.t,
            &mut dist.global_inputs,
            &mut dist.global_targets,
        );
        let mine = rank * rows..(rank + 1) * rows;
        self.inputs
            .copy_from_slice(&dist.global_inputs[mine.clone()]);
        self.targets.copy_from_slice(&dist.global_targets[mine]);
        self.check_tokens(&format!("training batch (rank {rank})"))?;
        self.model.take_gemm_time();
        let local_loss = self
            .model
            .forward(&self.inputs, Some(&self.targets), d.b, d.t, true)
            .expect("targets given");
        let t1 = Instant::now();
        self.model.backward();
        let t2 = Instant::now();
        let gemm = self.model.take_gemm_time();

        let mut comm_time = Duration::ZERO;
        let tc = Instant::now();
        let loss = comm
            .all_reduce_scalar(local_loss, ReduceOp::Sum)
            .map_err(comm_err)?
            / n as f32;
        comm_time += tc.elapsed();

        let lr = lr_at(&self.cfg.optim, self.step, self.cfg.max_steps);
        let clip = self.cfg.optim.grad_clip;
        let (grad_norm, skipped) = if dist.zero.is_some() {
            self.zero_update(dist, comm, loss, lr, clip, &mut comm_time)?
        } else {
            self.replicated_update(dist, comm, loss, lr, clip, &mut comm_time)?
        };
        if skipped {
            self.skipped += 1;
            tracing::warn!(
                step = self.step,
                loss,
                grad_norm,
                "non-finite loss or gradients: step skipped on all ranks"
            );
        }
        let t3 = Instant::now();
        let stats = StepStats {
            step: self.step,
            loss,
            grad_norm,
            lr,
            skipped,
            tokens: n * rows,
            forward: t1 - t0,
            backward: t2 - t1,
            optimizer: t3 - t2,
            gemm,
            comm: comm_time,
        };
        self.step += 1;
        Ok(stats)
    }

    /// All-reduce every gradient (FP8-LM for FP8 weight gradients, f32 for the rest),
    /// then the same optimizer step on every rank. Returns (global grad norm, skipped).
    fn replicated_update(
        &mut self,
        dist: &mut DistState,
        comm: &dyn Communicator,
        loss: f32,
        lr: f32,
        clip: f32,
        comm_time: &mut Duration,
    ) -> Result<(f32, bool)> {
        let tc = Instant::now();
        let model = &mut self.model;
        let ntens = model.layout.metas.len();
        let fp8_t: Vec<usize> = (0..ntens)
            .filter(|&t| fp8_wgrad(model, t).is_some())
            .collect();
        let mut nonfinite = false;
        if !fp8_t.is_empty() {
            let placeholder = || ScaledFp8 {
                data: Vec::new(),
                shape: vec![0],
                format: WGRAD,
                scale: 1.0,
            };
            let mut taken: Vec<ScaledFp8> = fp8_t
                .iter()
                .map(|&t| {
                    let li = model.linear_of_tensor[t].expect("fp8 tensor has a linear");
                    let f = model.linears[li].fp8.as_mut().expect("fp8 linear");
                    std::mem::replace(&mut f.wgrad, placeholder())
                })
                .collect();
            let res = dist.fp8_reducer.all_reduce_scaled_fp8(comm, &mut taken);
            for (&t, g) in fp8_t.iter().zip(taken) {
                let li = model.linear_of_tensor[t].expect("fp8 tensor has a linear");
                model.linears[li].fp8.as_mut().expect("fp8 linear").wgrad = g;
            }
            nonfinite |= res.map_err(comm_err)?.nonfinite;
        }
        {
            let Model { grads, layout, .. } = &mut *model;
            let mut views: Vec<&mut [f32]> = split_tensors_mut(grads, layout)
                .into_iter()
                .enumerate()
                .filter(|(t, _)| !fp8_t.contains(t))
                .map(|(_, g)| g)
                .collect();
            dist.f32_reducer
                .all_reduce_mean(comm, &mut views)
                .map_err(comm_err)?;
        }
        *comm_time += tc.elapsed();
        let (mut params, grads) = model.params_and_grads();
        let grad_norm = global_grad_norm(&grads);
        let skipped = nonfinite || !loss.is_finite() || !grad_norm.is_finite();
        if !skipped {
            self.optimizer
                .step(&mut params, &grads, lr, clip_scale(grad_norm, clip));
        }
        Ok((grad_norm, skipped))
    }

    /// FP8 ZeRO: reduce each unit's gradient to its owner, owners update their units,
    /// owners broadcast the new weights. Returns (global grad norm, skipped).
    fn zero_update(
        &mut self,
        dist: &mut DistState,
        comm: &dyn Communicator,
        loss: f32,
        lr: f32,
        clip: f32,
        comm_time: &mut Duration,
    ) -> Result<(f32, bool)> {
        let (n, me) = (dist.size, dist.rank);
        let z = dist.zero.as_mut().expect("zero state");
        let model = &mut self.model;
        let tc = Instant::now();
        // 1. FP8-LM scale agreement: s_g = min over ranks of each tensor's local scale.
        let mut s_g: Vec<f32> = z
            .fp8_tensors
            .iter()
            .map(|&t| fp8_wgrad(model, t).expect("fp8").scale)
            .collect();
        if !s_g.is_empty() {
            comm.all_reduce(BufMut::F32(&mut s_g), ReduceOp::Min)
                .map_err(comm_err)?;
        }
        let mut compute = tc.elapsed();
        // 2. Pack each owner's segment: FP8 bytes re-quantised to mu * s_g, and f32.
        let tp = Instant::now();
        let mut buf8 = vec![0u8; n * z.seg8];
        let mut buf32 = vec![0f32; n * z.seg32];
        for (u, unit) in z.units.iter().enumerate() {
            let q = z.part.owner[u];
            let range = unit.range();
            match z.fp8_of_unit[u] {
                Some(j) => {
                    let g = fp8_wgrad(model, unit.tensor).expect("fp8");
                    let dst = &mut buf8[q * z.seg8 + z.seg_off[u]..][..range.len()];
                    let ratio = z.mu[j] * s_g[j] / g.scale;
                    let src = &g.data[range];
                    if ratio == 1.0 {
                        dst.copy_from_slice(src);
                    } else {
                        let table = decode_table(g.format);
                        let tmp: Vec<f32> =
                            src.iter().map(|&b| table[b as usize] * ratio).collect();
                        f32_to_fp8_amax(WGRAD, &tmp, 1.0, dst);
                    }
                }
                None => {
                    let dst = &mut buf32[q * z.seg32 + z.seg_off[u]..][..range.len()];
                    dst.copy_from_slice(&model.grads[z.ranges[u].clone()]);
                }
            }
        }
        compute += tp.elapsed();
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
        *comm_time += tc.elapsed() + compute;
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
        let local = global_grad_norm(&grads) as f64;
        let tc = Instant::now();
        let sq = comm
            .all_reduce_scalar((local * local) as f32, ReduceOp::Sum)
            .map_err(comm_err)?;
        *comm_time += tc.elapsed();
        let grad_norm = sq.sqrt();
        // FP8-LM's mu: halve on overflow, else grow to 2x over `growth_steps`, cap max_mu.
        let rc = &dist.fp8_reducer.cfg;
        for (j, &t) in z.fp8_tensors.iter().enumerate() {
            let frac = sat[j] as f64 / model.layout.metas[t].numel().max(1) as f64;
            z.mu[j] = if frac > rc.overflow_fraction {
                z.mu[j] * 0.5
            } else {
                let g = 2f64.powf(1.0 / rc.growth_steps.max(1) as f64) as f32;
                (z.mu[j] * g).min(rc.max_mu)
            };
        }
        let skipped = !loss.is_finite() || !grad_norm.is_finite();
        if skipped {
            return Ok((grad_norm, true));
        }
        let rs: Vec<_> = owned.iter().map(|&u| z.ranges[u].clone()).collect();
        let mut ps = slices_mut(&mut model.params, &rs);
        self.optimizer
            .step(&mut ps, &grads, lr, clip_scale(grad_norm, clip));
        // 5. Owners share the new weights.
        let tc = Instant::now();
        z.broadcast_weights(comm, &mut model.params)?;
        *comm_time += tc.elapsed();
        Ok((grad_norm, false))
    }
}

/// Open the data of `cfg`, build a trainer as rank `comm.rank()` and run `steps`
/// data-parallel steps, calling `on_step` after each. What `fp8lm train` does under
/// `mpirun` (minus checkpoints and metrics), and what the distributed bench measures.
pub fn train_data_parallel(
    cfg: &crate::RunConfig,
    comm: &dyn Communicator,
    steps: usize,
    mut on_step: impl FnMut(&Trainer, &StepStats),
) -> Result<Trainer> {
    let mut data = crate::data::open_dataset(cfg).map_err(|e| {
        anyhow!(
            "rank {}: data.path = {:?}: {e:#}",
            comm.rank(),
            cfg.data.path
        )
    })?;
    let mut tr = Trainer::new(cfg, data.vocab_size())?;
    tr.enable_data_parallel(comm)?;
    for _ in 0..steps {
        let st = tr.train_step_dist(data.as_mut(), comm)?;
        on_step(&tr, &st);
    }
    Ok(tr)
}

/// Step time and the share of it spent in communication, averaged over the measured
/// steps (after `warmup` unmeasured ones), as rank 0 sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct DistBench {
    pub precision: Precision,
    pub ranks: usize,
    pub steps: usize,
    pub step_s: f64,
    pub comm_s: f64,
    /// Bytes this rank sent per step.
    pub bytes_sent_per_step: f64,
    /// This rank's optimizer state bytes.
    pub state_bytes: usize,
}

impl DistBench {
    pub fn comm_share(&self) -> f64 {
        self.comm_s / self.step_s.max(1e-12)
    }
}

/// Measure `steps` data-parallel steps of `cfg` on `comm` (after `warmup` steps).
pub fn bench_train_dist(
    cfg: &crate::RunConfig,
    comm: &dyn Communicator,
    warmup: usize,
    steps: usize,
) -> Result<DistBench> {
    let (mut step_s, mut comm_s, mut k) = (0.0, 0.0, 0usize);
    let mut sent0 = comm.bytes_sent();
    let tr = train_data_parallel(cfg, comm, warmup + steps, |_, st| {
        if k >= warmup {
            step_s += (st.forward + st.backward + st.optimizer).as_secs_f64();
            comm_s += st.comm.as_secs_f64();
        }
        k += 1;
        if k == warmup {
            sent0 = comm.bytes_sent();
        }
    })?;
    let m = steps.max(1) as f64;
    Ok(DistBench {
        precision: cfg.precision,
        ranks: comm.size(),
        steps,
        step_s: step_s / m,
        comm_s: comm_s / m,
        bytes_sent_per_step: (comm.bytes_sent() - sent0) as f64 / m,
        state_bytes: tr.optimizer().state_bytes(),
    })
}
