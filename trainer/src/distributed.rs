//! Data-parallel training and FP8 ZeRO (`precision = "fp8-o3"`), over any
//! [`Communicator`] (threads in one process, or MPI under `mpirun`).
//!
//! ## Data parallelism (every precision)
//! With N ranks and `batch = B`, the global batch is N*B rows: every rank draws the same
//! N*B-row batch from its (identical) data stream and keeps rows `r*B..(r+1)*B`. So the
//! token stream equals a single-rank run with `batch = N*B`, and so does the loss (the
//! mean of the ranks' means, which are over equal row counts). Gradients are reduced
//! group by group as the backward finishes them (see *Overlap* below):
//! - f32 gradients (all of them in fp32/bf16; the non-linear ones in FP8 modes) are
//!   averaged with the communicator's f32 ring all-reduce: a fixed summation order
//!   (`fp8lm_collectives::comm`), so every rank gets bit-identical gradients;
//! - in FP8 modes the linear layers' weight gradients, already FP8 E5M2 with a per-tensor
//!   scale when they leave the backward, are averaged by the FP8-LM all-reduce
//!   (automatic factor mu, shared minimum scale, FP8 sum, scale `N * mu * s_g`). mu is
//!   per tensor and lives in one list in tensor order (`fp8_reducer.mu`, what
//!   checkpoints store); each group's reduction borrows its tensors' entries.
//!
//! ## Overlap of the reduction with the backward
//! [`Model::backward_with`] hands out each group of gradients the moment it is final:
//! the final norm (with LLaMA's untied LM head), then block L-1 down to block 0, then
//! the embeddings (with GPT-2's tied LM head: the embedding lookup adds to its gradient
//! last, so it is final only at the very end). A group is a disjoint `&mut` borrow of
//! the flat gradient buffer (split up front with `split_at_mut`) plus the group's
//! linears, whose FP8 weight gradients are quantised before the hand-out; the backward
//! never touches it again. With overlap (`dist.overlap = "on"`, or `"auto"`, the default,
//! when it resolves to on) the backward runs
//! on a scoped thread and sends the groups over a channel to the step's own thread,
//! which owns the communicator and reduces each group (fp8-o3: agrees its scales and
//! packs it, see below) while the backward computes the earlier layers. All MPI calls stay on the thread that initialised MPI; the
//! in-process communicator (not `Sync`) never leaves its thread. The order of the
//! groups is fixed by the model, so it is the same on every rank. With
//! `dist.overlap = "off"` the same groups are reduced in the same order after the
//! backward: the same calls on the same bytes, so on and off are bit-identical (a test
//! checks it). Against the previous all-at-once reduction, only the bucketing changes:
//! each group is its own set of buckets; on 2 ranks the sums are bit-identical (two
//! addends commute), on more ranks the ring's per-element summation order may differ.
//!
//! Cost: the reducing thread competes with the backward for cores. The in-process
//! communicator sleeps while it waits; MPI busy-polls, so under `mpirun` on a host whose
//! cores the ranks' compute threads already fill, overlap can lengthen the step even
//! though it hides most of the communication (`fp8lm bench train --dist` reports both;
//! `--mca mpi_yield_when_idle 1` and fewer compute threads per rank help). Hence `auto`:
//! on for the in-process communicator, and under MPI only when the host has a core
//! beyond `local ranks x compute threads` ([`crate::config::Overlap::resolve`]; rank 0
//! logs the decision).
//!
//! What the step waits for (`StepStats::comm_exposed`) is the reduction still running
//! when the backward ends (at least the embedding group, final only then), the loss
//! all-reduce, and for fp8-o3 everything after the packing. A panic in the backward
//! thread closes the channel; the step returns an error naming the rank (under MPI the
//! panic hook aborts the job first); a failed reduction stops the reducing, lets the
//! backward finish and returns the error: no rank waits forever.
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
//! 1. scale agreement for the FP8 weight gradients (one vector all-reduce, Min, per
//!    group of final gradients, overlapped with the backward like the replicated
//!    reduction), and re-quantisation to `mu * s_g` (FP8-LM);
//! 2. *reduce to the owner*: each rank packs the gradients of the units owned by rank q
//!    into segment q of one buffer (segments padded to the largest; packing, too, is
//!    done group by group during the backward), and after the backward one ring
//!    reduce-scatter leaves each rank exactly its own segment, summed: FP8 bytes for the
//!    linear weights, f32 for the rest. This sends `(N-1)/N` of a buffer per rank, half
//!    of an all-reduce;
//! 3. saturation counts of the FP8 sums (one small all-reduce) so every rank updates the
//!    same mu; the global gradient norm (one scalar all-reduce);
//! 4. each owner runs `Fp8Adam` on its units only;
//! 5. the owners share their units' new weights in the optimizer's master format (FP16
//!    with a power-of-two per-unit scale for the FP8 linears' weights, f32 for the rest)
//!    through one all-gather of per-owner segments: the master is FP16 with the
//!    power-of-two scale of its amax, so this is exact, and every rank (the owner
//!    included) decodes the same bytes, so the replicas stay bit-identical.
//!
//! ## Not done
//! fp8-o3 overlaps only its steps 1 and 2 (scale agreement and packing, group by group as
//! the backward finishes them); the reduce-scatter to the owners still starts when the
//! whole backward is done. Per-group reduce-scatters would give the same bits (the ring
//! sums each owner's segment in the same order whatever the buffer length), but a
//! group's units are not balanced across owners, so padding each group's segments to
//! its most loaded owner would send up to N times the bytes; that needs a
//! reduce-to-owner primitive or a partition balanced within each group first.
//!
//! ## Checkpoints
//! Replicated precisions checkpoint rank 0's state (all ranks hold the same). fp8-o3
//! gathers every owner's units ([`Trainer::gather_optimizer_state`]) and re-partitions
//! them on resume, for the same or another number of ranks ([`crate::repartition`]).

use crate::config::{Overlap, Precision, ZeroPartition};
use crate::data::Dataset;
use crate::model::{FinalGrads, GradGroup, Model};
use crate::repartition::{decode_states, encode_states, repartition_state, NamedState, UnitSpan};
use crate::train::{clip_scale, global_grad_norm, lr_at, StepStats, Trainer};
use anyhow::{anyhow, bail, Context, Result};
use fp8lm_collectives::{
    fixed_mu, next_mu, panic_message, BufMut, Communicator, GradAllReduceConfig, GradAllReducer,
    GradMethod, GradTally, ReduceOp,
};
use fp8lm_fp8::cast::{decode_table, f16_to_f32_amax, f32_to_f16_amax, f32_to_fp8_counted};
use fp8lm_fp8::scaling::{scale_for_amax, ScaleRounding};
use fp8lm_fp8::{Fp8Format, ScaledFp8};
use fp8lm_optim::fp8_adam::SCALAR_BYTES_PER_TENSOR;
use fp8lm_optim::zero::{split_units, Partition, Unit};
use fp8lm_optim::{AdamWHyper, Fp8Adam, Fp8AdamConfig, Grad, Optimizer, StateTensor};
use half::f16;
use std::ops::Range;
use std::sync::mpsc;
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
    /// What to reduce for each group of gradients, in the order the backward finishes
    /// them (`Model::grad_groups`).
    groups: Vec<GroupPlan>,
    /// `dist.overlap`: reduce groups while the backward runs.
    overlap: bool,
    /// Test hook: the backward panics when it finishes this many groups
    /// ([`Trainer::inject_backward_panic`]).
    panic_after_groups: Option<usize>,
    zero: Option<Zero>,
    /// The last step's FP8 gradient reductions: mu, overflow, underflow (metrics).
    tally: GradTally,
}

/// The reductions of one group of finished gradients (replicated precisions).
struct GroupPlan {
    group: GradGroup,
    /// Tensors reduced in f32, as ranges inside the group (ascending).
    f32: Vec<Range<usize>>,
    /// FP8 weight gradients: (index into the group's linears, index into the model's
    /// FP8 tensor list, where `fp8_reducer.mu` keeps its mu).
    fp8: Vec<(usize, usize)>,
}

/// The group plans of `model`; FP8 tensors are numbered in tensor order (the order of
/// `fp8_reducer.mu`, which checkpoints store).
fn group_plans(model: &Model) -> Result<Vec<GroupPlan>> {
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
struct Reduced {
    /// When the backward's compute ended.
    backward_end: Instant,
    /// Time inside the group reductions.
    comm: Duration,
    /// The part of it after the backward ended (what the step waited for).
    exposed: Duration,
    nonfinite: bool,
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
    /// The units of each group of final gradients, in the backward's order.
    groups: Vec<ZeroGroup>,
}

/// fp8-o3: what to pack when the backward finishes a group of gradients.
struct ZeroGroup {
    group: GradGroup,
    /// Flat offset of the group's first gradient.
    start: usize,
    /// FP8 weight gradients in the group: (index into `Zero::fp8_tensors`, position of
    /// its linear among the group's linears).
    fp8: Vec<(usize, usize)>,
    /// Units whose tensor lies in the group.
    units: Vec<usize>,
}

/// fp8-o3 gradients packed for the reduce-scatter to the owners: each owner's segment of
/// FP8 bytes (re-quantised to `mu * s_g`) and of f32, and the agreed scales `s_g`.
struct ZeroPacked {
    buf8: Vec<u8>,
    buf32: Vec<f32>,
    s_g: Vec<f32>,
    /// This rank's non-zero FP8 codes that re-quantisation flushed (all tensors).
    flushed: u64,
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

/// MPI processes on this host: the launcher's local size (OpenMPI, MPICH), else
/// `default`.
pub fn mpi_local_ranks(default: usize) -> usize {
    ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(default)
}

/// The cores one of `local_ranks` processes on this host may use: its CPU affinity
/// (launchers often bind each rank to its cores) capped at its share of the host.
pub fn rank_cores(local_ranks: usize) -> usize {
    let affinity = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: sysconf has no preconditions.
    let host = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let host = if host > 0 { host as usize } else { affinity };
    affinity.min(host / local_ranks.max(1)).max(1)
}

/// `dist.overlap` for this communicator and host, logged by rank 0 when `auto` decides.
/// Each rank decides for itself (hosts may differ); that is safe because on and off make
/// the same communication calls in the same order on the same bytes.
fn resolve_overlap(o: Overlap, comm: &dyn Communicator) -> bool {
    // In-process ranks share one process (and its thread pool): count it once.
    let local = if comm.backend() == "mpi" {
        mpi_local_ranks(comm.size())
    } else {
        1
    };
    let cores = rank_cores(local);
    let threads = rayon::current_num_threads();
    let on = o.resolve(comm.backend(), cores, threads);
    if o == Overlap::Auto && comm.rank() == 0 {
        tracing::info!(
            overlap = on,
            backend = comm.backend(),
            local_ranks = local,
            compute_threads = threads,
            rank_cores = cores,
            "dist.overlap = auto: {}",
            if on {
                "reductions overlap the backward"
            } else {
                "no core to spare for MPI's busy-waiting reductions: they run after the backward (set dist.overlap = \"on\" to force)"
            }
        );
    }
    on
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
    let o = &cfg.optim;
    let ocfg = Fp8AdamConfig::fp8_lm(AdamWHyper {
        beta1: o.beta1,
        beta2: o.beta2,
        eps: o.eps,
        weight_decay: o.weight_decay,
    });
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
    fn new(model: &Model, size: usize, cfg: &Fp8AdamConfig, mode: ZeroPartition) -> Result<Zero> {
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

    fn pack_buffers(&self, n: usize) -> ZeroPacked {
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
    fn pack_group(
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

    fn owned(&self, rank: usize) -> Vec<usize> {
        self.part.owned_by(rank)
    }

    fn spans(&self, units: &[usize]) -> Vec<UnitSpan> {
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
    fn share_weights(&self, comm: &dyn Communicator, params: &mut [f32]) -> Result<()> {
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

/// Run the backward of `model` and call `handle` on each group of final gradients, in
/// the order the backward finishes them ([`Model::grad_groups`]). Returns when the
/// backward's compute ended, the time spent in `handle`, and the part of it after the
/// backward ended (what the step waited for).
///
/// With `overlap`, the backward runs on a scoped thread and hands each finished group
/// (disjoint `&mut` borrows of the gradient buffer and of the group's linears) over a
/// channel to this thread, which owns the communicator and runs `handle` while the
/// backward goes on. MPI calls stay on the thread that initialised MPI
/// (`MPI_THREAD_FUNNELED`), and the in-process communicator (not `Sync`) never leaves
/// its thread. Without overlap the same groups are handled in the same order after the
/// backward: the same calls on the same data, so the same bits.
///
/// A panic in the backward closes the channel (its sender is dropped while unwinding);
/// the loop ends, the join reports the panic, and this returns an error naming the
/// rank, so the job aborts as for any rank error. After `handle` fails, the remaining
/// groups are drained unhandled (the backward finishes on its own) and its error is
/// returned. `panic_after` is the test hook of [`Trainer::inject_backward_panic`].
fn run_backward(
    model: &mut Model,
    rank: usize,
    overlap: bool,
    panic_after: Option<usize>,
    handle: &mut dyn FnMut(FinalGrads<'_>) -> Result<()>,
) -> Result<(Instant, Duration, Duration)> {
    let mut spent = Duration::ZERO;
    let mut failed: Option<anyhow::Error> = None;
    let mut step = |g: FinalGrads<'_>| {
        if failed.is_none() {
            let tc = Instant::now();
            if let Err(e) = handle(g) {
                failed = Some(e);
            }
            spent += tc.elapsed();
        }
    };
    let mut done = 0usize;
    let mut fault = move |g: &FinalGrads<'_>| {
        if panic_after == Some(done) {
            panic!(
                "injected failure in the backward before group {:?}",
                g.group
            );
        }
        done += 1;
    };
    let backward_end = if overlap {
        let joined = std::thread::scope(|s| {
            let (tx, rx) = mpsc::channel();
            let h = s.spawn(move || {
                model.backward_with(&mut |g| {
                    fault(&g);
                    // The receiver drains the channel to the end, so a send cannot fail;
                    // if it did, the backward would still run to its end.
                    let _ = tx.send(g);
                });
                Instant::now()
            });
            for g in rx {
                step(g);
            }
            h.join()
        });
        joined.map_err(|p| {
            anyhow!(
                "rank {rank}: the backward pass panicked: {}",
                panic_message(&*p)
            )
        })?
    } else {
        let mut finished = Vec::new();
        model.backward_with(&mut |g| {
            fault(&g);
            finished.push(g);
        });
        let end = Instant::now();
        for g in finished {
            step(g);
        }
        end
    };
    if let Some(e) = failed {
        return Err(e);
    }
    // Overlapped: what remained to handle when the backward ended (bounded by the
    // handling's own time: the rest is channel and loop bookkeeping).
    let exposed = if overlap {
        backward_end.elapsed().min(spent)
    } else {
        spent
    };
    Ok((backward_end, spent, exposed))
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
        if self.cfg.grad_accum > 1 {
            bail!(
                "grad_accum = {}: gradient accumulation is not supported with data \
                 parallelism yet (rank {} of {}); use grad_accum = 1 or one process",
                self.cfg.grad_accum,
                comm.rank(),
                comm.size()
            );
        }
        let toml = crate::config_file::to_toml(&self.cfg);
        fp8lm_collectives::agree_config(comm, "training config", toml.as_bytes())
            .map_err(comm_err)?;
        let (rank, size) = (comm.rank(), comm.size());
        let d = self.model.dims;
        let zero = if self.cfg.precision == Precision::Fp8O3 {
            let o = &self.cfg.optim;
            let hyper = AdamWHyper {
                beta1: o.beta1,
                beta2: o.beta2,
                eps: o.eps,
                weight_decay: o.weight_decay,
            };
            let ocfg = Fp8AdamConfig::fp8_lm(hyper);
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
            let rs: Vec<_> = owned.iter().map(|&u| z.ranges[u].clone()).collect();
            let mut ps = slices_mut(&mut self.model.params, &rs);
            let mut opt =
                Fp8Adam::with_low_precision(&metas, &mut ps, ocfg, &low).map_err(|e| anyhow!(e))?;
            match zero_state {
                Some((stored, old_units)) => {
                    let template = opt.export_state();
                    let new_units = z.spans(&owned);
                    let state = repartition_state(stored, old_units, &template, &new_units)
                        .with_context(|| format!("fp8-o3 resume on rank {rank} of {size}"))?;
                    opt.import_state(state)
                        .map_err(|e| anyhow!("fp8-o3 resume on rank {rank} of {size}: {e}"))?;
                }
                None if self.step != 0 => bail!(
                    "fp8-o3: the trainer is at step {} but no optimizer state was given to \
                     re-partition (use enable_data_parallel_resume)",
                    self.step
                ),
                None => {}
            }
            self.optimizer = Box::new(opt);
            z.share_weights(comm, &mut self.model.params)?;
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

    /// fp8-o3: bytes of optimizer state each rank holds by the partition (master, moments,
    /// per-unit scalars), in rank order. `None` unless ZeRO is on. This rank's actual
    /// holding is `optimizer().state_bytes()`.
    pub fn zero_rank_bytes(&self) -> Option<Vec<usize>> {
        let z = self.dist.as_ref()?.zero.as_ref()?;
        Some(z.part.rank_bytes.clone())
    }

    /// The optimizer state a checkpoint stores, and (fp8-o3) the units it is cut into.
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
    /// owner update + all-gather of the new weights). Every rank must call it with its communicator. The
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
        let (local_loss, t1) = self.forward_train(&format!("training batch (rank {rank})"))?;
        let mut packed = None;
        let (t2, mut comm_time, mut exposed, nonfinite) = if let Some(z) = dist.zero.as_ref() {
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
                &mut pack,
            )?;
            if next != z.groups.len() {
                bail!(
                    "rank {rank}: the backward finished {next} gradient groups, {} expected",
                    z.groups.len()
                );
            }
            packed = Some(p);
            (end, spent, exposed, false)
        } else {
            let r = self.backward_and_reduce(dist, comm)?;
            (r.backward_end, r.comm, r.exposed, r.nonfinite)
        };
        let gemm = self.model.take_gemm_time();

        let tc = Instant::now();
        let loss = comm
            .all_reduce_scalar(local_loss, ReduceOp::Sum)
            .map_err(comm_err)?
            / n as f32;
        let dt = tc.elapsed();
        comm_time += dt;
        exposed += dt;

        let lr = lr_at(&self.cfg.optim, self.step, self.cfg.max_steps);
        let clip = self.cfg.optim.grad_clip;
        let (grad_norm, skipped) = if dist.zero.is_some() {
            let before = comm_time;
            let packed = packed.expect("packed by the fp8-o3 backward");
            let r = self.zero_update(dist, comm, loss, &mut comm_time, packed)?;
            exposed += comm_time - before;
            r
        } else {
            self.replicated_update(loss, nonfinite, lr, clip)
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
            comm_exposed: exposed,
        };
        self.step += 1;
        Ok(stats)
    }

    /// The backward, with every group of gradients reduced as the backward finishes it
    /// (FP8-LM all-reduce for FP8 weight gradients, f32 mean for the rest), in the fixed
    /// order of [`Model::grad_groups`] on every rank (see [`run_backward`]).
    fn backward_and_reduce(
        &mut self,
        dist: &mut DistState,
        comm: &dyn Communicator,
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

    /// The same optimizer step on every rank, on the reduced gradients. Returns (global
    /// grad norm, skipped).
    fn replicated_update(&mut self, loss: f32, nonfinite: bool, lr: f32, clip: f32) -> (f32, bool) {
        let grad_norm = self.norm_and_update(lr, clip, 1, |g| {
            nonfinite || !loss.is_finite() || !g.is_finite()
        });
        (grad_norm.0, grad_norm.1)
    }

    /// FP8 ZeRO, after the backward packed the gradients ([`Zero::pack_group`]): reduce
    /// each unit's gradient to its owner, owners update their units, owners share the
    /// new weights. Returns (global grad norm, skipped).
    fn zero_update(
        &mut self,
        dist: &mut DistState,
        comm: &dyn Communicator,
        loss: f32,
        comm_time: &mut Duration,
        packed: ZeroPacked,
    ) -> Result<(f32, bool)> {
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
        let local = global_grad_norm(&grads) as f64;
        let tc = Instant::now();
        let sq = comm
            .all_reduce_scalar((local * local) as f32, ReduceOp::Sum)
            .map_err(comm_err)?;
        *comm_time += tc.elapsed();
        let grad_norm = sq.sqrt();
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
        if skipped {
            return Ok((grad_norm, true));
        }
        let rs: Vec<_> = owned.iter().map(|&u| z.ranges[u].clone()).collect();
        let mut ps = slices_mut(&mut model.params, &rs);
        self.optimizer
            .step(&mut ps, &grads, lr, clip_scale(grad_norm, clip));
        // 5. Owners share the new weights.
        let tc = Instant::now();
        z.share_weights(comm, &mut model.params)?;
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
    /// `dist.overlap` of the run (fp8-o3 overlaps only its scale agreement and packing).
    pub overlap: bool,
    pub step_s: f64,
    /// Time in communication, hidden behind the backward or not.
    pub comm_s: f64,
    /// The part of `comm_s` the step waited for.
    pub exposed_s: f64,
    /// Bytes this rank sent per step.
    pub bytes_sent_per_step: f64,
    /// This rank's optimizer state bytes.
    pub state_bytes: usize,
}

impl DistBench {
    pub fn comm_share(&self) -> f64 {
        self.comm_s / self.step_s.max(1e-12)
    }
    /// Share of the step spent waiting on communication.
    pub fn exposed_share(&self) -> f64 {
        self.exposed_s / self.step_s.max(1e-12)
    }
}

/// Measure `steps` data-parallel steps of `cfg` on `comm` (after `warmup` steps).
pub fn bench_train_dist(
    cfg: &crate::RunConfig,
    comm: &dyn Communicator,
    warmup: usize,
    steps: usize,
) -> Result<DistBench> {
    let (mut step_s, mut comm_s, mut exposed_s, mut k) = (0.0, 0.0, 0.0, 0usize);
    let mut sent0 = comm.bytes_sent();
    let tr = train_data_parallel(cfg, comm, warmup + steps, |_, st| {
        if k >= warmup {
            step_s += (st.forward + st.backward + st.optimizer).as_secs_f64();
            comm_s += st.comm.as_secs_f64();
            exposed_s += st.comm_exposed.as_secs_f64();
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
        overlap: tr.overlaps(),
        step_s: step_s / m,
        comm_s: comm_s / m,
        exposed_s: exposed_s / m,
        bytes_sent_per_step: (comm.bytes_sent() - sent0) as f64 / m,
        state_bytes: tr.optimizer().state_bytes(),
    })
}

/// `fp8lm bench train --dist`: fp32, fp8-o1 and fp8-o3, each with gradient communication
/// overlapped with the backward and not (fp8-o3: only its agreement and packing), on `comm`, `steps` measured
/// steps each (after 2 warm-up steps). Every rank must call it; the returned table (rank
/// 0's view) is for rank 0 to print.
pub fn bench_train_dist_table(
    cfg: &crate::RunConfig,
    comm: &dyn Communicator,
    steps: usize,
) -> Result<String> {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "bench train --dist: {} ranks ({} backend), {} layers x {} channels, B={} T={} per rank, \
         {steps} steps after 2 warm-up; figures on a shared machine are noisy, compare rows",
        comm.size(),
        comm.backend(),
        cfg.model.layers,
        cfg.model.channels,
        cfg.batch,
        cfg.model.context
    );
    let _ = writeln!(
        s,
        "comm: all communication time (hidden behind the backward or not); exposed: the part \
         the step waited for"
    );
    let _ = writeln!(
        s,
        "{:<8} {:>7} {:>10} {:>10} {:>11} {:>9} {:>14} {:>12}",
        "mode", "overlap", "step ms", "comm ms", "exposed ms", "exposed%", "sent B/step", "state B"
    );
    let mut base = None;
    let mut off_step = 0.0;
    for (p, overlap) in [
        (Precision::Fp32, false),
        (Precision::Fp32, true),
        (Precision::Fp8O1, false),
        (Precision::Fp8O1, true),
        (Precision::Fp8O3, false),
        (Precision::Fp8O3, true),
    ] {
        let mut c = cfg.clone();
        c.precision = p;
        c.dist.overlap = if overlap { Overlap::On } else { Overlap::Off };
        let b = bench_train_dist(&c, comm, 2, steps)?;
        let rel = base.map_or(1.0, |s: f64| b.step_s / s);
        base.get_or_insert(b.step_s);
        let vs_off = if overlap {
            format!(", {:.2}x overlap off", b.step_s / off_step)
        } else {
            off_step = b.step_s;
            String::new()
        };
        let _ = writeln!(
            s,
            "{:<8} {:>7} {:>10.2} {:>10.2} {:>11.2} {:>8.1}% {:>14.0} {:>12}  ({rel:.2}x fp32 off{vs_off})",
            p.name(),
            if overlap { "on" } else { "off" },
            b.step_s * 1e3,
            b.comm_s * 1e3,
            b.exposed_s * 1e3,
            100.0 * b.exposed_share(),
            b.bytes_sent_per_step,
            b.state_bytes
        );
    }
    Ok(s)
}
