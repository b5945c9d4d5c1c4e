//! `fp8lm plan`: each rank's memory and each collective's bytes per step, for any model
//! and process grid, computed from the config alone: nothing of the model is allocated,
//! so a GPT-3 175B on 1024 ranks plans in milliseconds on a laptop.
//!
//! Memory is the memory ledger's ([`crate::memory`]): the same [`LedgerSizes`] a real run
//! fills from its buffers ([`LedgerSizes::of_trainer`]) are filled here from the shapes,
//! and [`LedgerSizes::ledger`] files both under the same categories. Tests build small
//! trainers (every precision, both architectures, fp8-o3 on several ranks) and check the
//! two agree entry by entry, so the plan cannot drift from what the runs allocate.
//!
//! Bytes per collective are what this rank sends per optimizer step (the ring algorithms
//! of `fp8lm_collectives`: an all-reduce of n bytes sends `2 (N-1)/N n`, a reduce-scatter
//! or all-gather `(N-1)/N n`), checked against the communicator's byte counter of real
//! data-parallel steps.

use anyhow::{bail, Result};
use std::fmt::Write as _;

use crate::config::{Precision, RunConfig};
use crate::memory::{LedgerSizes, MemoryLedger};
use crate::model::{Dims, Layout};
use crate::tensor_parallel::TpShard;
use fp8lm_optim::fp8_adam::SCALAR_BYTES_PER_TENSOR;
use fp8lm_optim::StateBytes;

/// The process grid a plan is for: `dp` data-parallel replicas (fp8-o3 partitions the
/// optimizer state over them) of a model split over `tp` tensor-parallel ranks (`sp`:
/// with sequence parallelism).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanGrid {
    pub dp: usize,
    pub tp: usize,
    pub sp: bool,
}

impl PlanGrid {
    /// Data parallelism only.
    pub fn data_parallel(dp: usize) -> PlanGrid {
        PlanGrid {
            dp,
            tp: 1,
            sp: false,
        }
    }

    /// The grid `cfg.dist` asks for (`dist.data_parallel = 0` plans one replica).
    pub fn of_config(cfg: &RunConfig) -> PlanGrid {
        PlanGrid {
            dp: cfg.dist.data_parallel.max(1),
            tp: cfg.dist.tensor_parallel.max(1),
            sp: cfg.dist.sequence_parallel,
        }
    }
}

/// One linear layer's shape: `rows x c -> rows x oc`, its weight tensor `w`.
#[derive(Clone, Copy, Debug)]
struct LinearShape {
    c: usize,
    oc: usize,
}

/// What a planned rank holds and sends.
#[derive(Clone, Debug)]
pub struct Plan {
    pub grid: PlanGrid,
    pub precision: Precision,
    /// One rank's ledger (every rank of a data-parallel grid holds the same sizes, up to
    /// fp8-o3's partition: this is its most loaded rank).
    pub ledger: MemoryLedger,
    /// (collective, group, what, bytes this rank sends per step).
    pub collectives: Vec<Collective>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Collective {
    pub kind: &'static str,
    pub group: &'static str,
    pub what: String,
    pub bytes: u64,
}

/// One rank's tensors, without their values.
struct Shape {
    /// The rank's dims (heads, MLP width and vocabulary divided by T), its attention
    /// width (C / T) and the share of the residual stream's rows it holds (T with SP).
    d: Dims,
    attn_width: usize,
    sp_rows: usize,
    lay: Layout,
    lin: Vec<(usize, LinearShape)>,
    /// Per tensor: whether it is a linear layer's weight.
    is_linear: Vec<bool>,
}

fn shape(cfg: &RunConfig, vocab: usize, grid: PlanGrid) -> Result<Shape> {
    if grid.dp == 0 || grid.tp == 0 {
        bail!("plan: the data-parallel and tensor-parallel sizes must be at least 1");
    }
    let whole = Dims::from_config(cfg, vocab)?;
    // Rank 0's shard: every tensor-parallel rank holds the same sizes.
    let shard = if grid.tp > 1 {
        let mut s = TpShard::new(&whole, 0, grid.tp).map_err(anyhow::Error::msg)?;
        s.sp = grid.sp;
        Some(s)
    } else {
        None
    };
    let lay = crate::model::Model::layout_of(&whole, shard);
    let d = shard.map_or(whole, |s| s.local_dims(&whole));
    let attn_width = shard.map_or(whole.c, |s| s.attn_width(&whole));
    let sp_rows = if grid.sp { grid.tp } else { 1 };
    let lin = linears(&d, attn_width, &lay);
    let mut is_linear = vec![false; lay.metas.len()];
    for (w, _) in &lin {
        is_linear[*w] = true;
    }
    Ok(Shape {
        d,
        attn_width,
        sp_rows,
        lay,
        lin,
        is_linear,
    })
}

/// The model's linear layers in the model's order (block by block: qkv, proj, fc, proj;
/// then the LM head), with the tensor index of each weight.
fn linears(d: &Dims, ca: usize, lay: &Layout) -> Vec<(usize, LinearShape)> {
    let mut out = Vec::new();
    for bp in &lay.blocks {
        for (w, c, oc) in [
            (bp.qkvw, d.c, 3 * ca),
            (bp.projw, ca, d.c),
            (bp.fcw, d.c, d.fc_out()),
            (bp.fprojw, d.f, d.c),
        ] {
            out.push((w, LinearShape { c, oc }));
        }
    }
    out.push((lay.head, LinearShape { c: d.c, oc: d.v }));
    out
}

/// f32 elements of the activation arena (`Acts` in `model/gpt/acts.rs`): what the forward
/// keeps for the backward, and the backward's one-layer scratch, for a rank with dims
/// `d`, attention width `ca` and `1 / spt` of the residual stream's rows.
/// `keep_linear_inputs`: fp32 keeps every layer's linear inputs (its dW GEMMs read them
/// in f32).
fn activation_elems(d: &Dims, ca: usize, spt: usize, keep_linear_inputs: bool) -> (usize, usize) {
    let (bt, c, l) = (d.b * d.t, d.c, d.l);
    let bts = bt / spt;
    let sp_len = if spt > 1 { bts * c } else { 0 };
    let li = if keep_linear_inputs { l } else { 1 };
    // With SP the column-parallel linears keep their own shard of the norm outputs: ln1
    // is one shared slot (none in fp32), ln2 and lnf none.
    let (ln1, ln2, lnf) = match (spt > 1, keep_linear_inputs) {
        (false, _) => (li * bt * c, li * bt * c, bt * c),
        (true, false) => (bt * c, 0, 0),
        (true, true) => (0, 0, 0),
    };
    let kept = bts * c // encoded
        + ln1 + 2 * l * bts // ln1, mean, rstd
        + l * bt * 3 * ca // qkv
        + li * bt * ca // atty
        + l * d.b * d.h * d.t * d.t // att
        + l * bts * c // residual2
        + ln2 + 2 * l * bts // ln2, mean, rstd
        + l * bt * d.fc_out() // fch
        + li * bt * d.f // fch_act
        + l * bts * c // residual3
        + 2 * sp_len // sequence-parallel shard buffers
        + lnf + 2 * bts // lnf, mean, rstd
        + bt * d.v // logits
        + bt; // losses
              // attproj and fcproj (one slot each, read by no backward), then the gradients.
    let scratch =
        2 * bt * c + bts * c + bt * c + bt * ca + bt * 3 * ca + bt * d.fc_out() + bt * d.f;
    (kept, scratch)
}

/// The share of its E4M3 input's rows linear `i` of `count` (the model's order) keeps:
/// `spt` for a column-parallel layer (qkv, fc, the head) under SP, 1 otherwise.
fn column_shards(i: usize, count: usize, spt: usize) -> usize {
    if is_column(i, count) {
        spt
    } else {
        1
    }
}

/// Whether linear `i` of `count` (the model's order) is column-parallel (qkv, fc, head).
fn is_column(i: usize, count: usize) -> bool {
    matches!(i % 4, 0 | 2) || i + 1 == count
}

/// Per-element optimizer-state bytes (master, first moment, second moment) of the
/// FP8-LM optimizer: FP16 / E4M3 / FP16 for the FP8 linears' weights, f32 for the rest
/// (`Fp8Adam::with_low_precision`).
fn fp8_adam_bytes(low_precision: bool) -> [usize; 3] {
    if low_precision {
        [2, 1, 2]
    } else {
        [4, 4, 4]
    }
}

/// The ledger sizes of the most loaded rank of `grid` for `cfg`'s model, without
/// building it.
pub fn ledger_sizes(cfg: &RunConfig, vocab: usize, grid: PlanGrid) -> Result<LedgerSizes> {
    ledger_sizes_of_rank(cfg, vocab, grid, None)
}

/// [`ledger_sizes`] of data-parallel rank `rank` (`None`: the most loaded).
pub fn ledger_sizes_of_rank(
    cfg: &RunConfig,
    vocab: usize,
    grid: PlanGrid,
    rank: Option<usize>,
) -> Result<LedgerSizes> {
    let Shape {
        d,
        attn_width,
        sp_rows,
        lay,
        lin,
        is_linear,
    } = shape(cfg, vocab, grid)?;
    let p = cfg.precision;
    let fp8 = matches!(p, Precision::Fp8O1 | Precision::Fp8O2 | Precision::Fp8O3);
    let block = cfg.fp8.recipe == "block";
    // fp8-o2 (not block-scaled) keeps no f32 copy of the linears' weights; nor does
    // fp8-o3 over several data-parallel ranks without tensor parallelism, whose ranks
    // hold the owners' E4M3 bytes and the tied embedding's FP16 masters.
    let zero_e4m3 = p == Precision::Fp8O3 && grid.dp > 1 && grid.tp == 1 && !block;
    let weights_from_optimizer = (p == Precision::Fp8O2 && !block) || zero_e4m3;
    let numel = |i: usize| lay.metas[i].numel();
    let rows = d.b * d.t;
    let f32_params = (0..lay.metas.len())
        .filter(|&i| !(weights_from_optimizer && is_linear[i]))
        .map(|i| 4 * numel(i))
        .sum();
    let (mut fp8_grads, mut f32_grads) = (0, 0);
    for (i, &l) in is_linear.iter().enumerate() {
        if fp8 && l {
            fp8_grads += numel(i);
        } else {
            f32_grads += 4 * numel(i);
        }
    }
    let block_max = lin[..4 * d.l]
        .iter()
        .map(|(_, s)| s.c * s.oc)
        .max()
        .unwrap_or(0);
    let when = |on: bool, b: usize| if on { b } else { 0 };
    let (kept_elems, scratch) = activation_elems(&d, attn_width, sp_rows, p == Precision::Fp32);
    let bf16 = p == Precision::Bf16;
    let fp32 = p == Precision::Fp32;
    let sp = sp_rows > 1;
    // The elements of its `[rows, c]` input linear `i` keeps (1 / T of them for a
    // column-parallel layer under SP, block-scaled FP8 excepted).
    let kept = |i: usize, c: usize| {
        let spt = if fp8 && block { 1 } else { sp_rows };
        rows * c / column_shards(i, lin.len(), spt)
    };
    let optimizer = match p {
        Precision::Fp8O3 if grid.dp > 1 => {
            let shares = zero_shares(&lay, &is_linear, cfg, grid.dp)?;
            fp8_adam_state(shares[rank.unwrap_or_else(|| heaviest(&shares))])
        }
        Precision::Fp8O2 | Precision::Fp8O3 => fp8_adam_state(whole_share(&lay, &is_linear)),
        _ => StateBytes {
            master: 0,
            exp_avg: 4 * lay.total,
            exp_avg_sq: 4 * lay.total,
            scalars: 0,
        },
    };
    Ok(LedgerSizes {
        precision: p,
        params: lay.total,
        f32_params,
        wte_f16: when(zero_e4m3 && is_linear[lay.wte], 2 * numel(lay.wte)),
        fp8_grads,
        f32_grads,
        wgrad_scratch: when(fp8, 4 * (d.v * d.c + block_max)),
        e4m3_weights: when(fp8, lin.iter().map(|(_, s)| s.c * s.oc).sum()),
        activations: 4 * kept_elems,
        backward_scratch: 4 * scratch,
        // With SP the column-parallel layers (qkv, fc, head) keep 1 / T of their rows.
        e4m3_inputs: when(
            fp8,
            lin.iter().enumerate().map(|(i, (_, s))| kept(i, s.c)).sum(),
        ),
        e4m3_gathered: when(fp8 && sp && !block, rows * d.c),
        // fp32 keeps the other linears' inputs in the arena (`activation_elems`).
        f32_input_shards: when(
            fp32 && sp,
            lin.iter()
                .enumerate()
                .filter(|&(i, _)| is_column(i, lin.len()))
                .map(|(i, (_, s))| 4 * kept(i, s.c))
                .sum(),
        ),
        f32_gathered: when(fp32 && sp, 4 * rows * d.c),
        bf16_gathered: when(bf16 && sp, 2 * rows * d.c),
        e5m2_dy: when(fp8, lin.iter().map(|(_, s)| rows * s.oc).max().unwrap_or(0)),
        bf16_inputs: when(
            bf16,
            lin.iter()
                .enumerate()
                .map(|(i, (_, s))| 2 * kept(i, s.c))
                .sum(),
        ),
        bf16_tiles: when(
            bf16,
            lin.iter()
                .map(|(_, s)| crate::model::linear::bf16_tile_bytes(rows, s.c, s.oc))
                .max()
                .unwrap_or(0),
        ),
        optimizer,
    })
}

/// One data-parallel rank's share of fp8-o3's ZeRO partition: elements and units of
/// the FP8 linears' weights (FP16 masters, E5M2 gradients) and of the rest (f32).
#[derive(Clone, Copy, Debug, Default)]
struct ZeroShare {
    low_elems: usize,
    low_units: usize,
    full_elems: usize,
    full_units: usize,
    /// Of the FP8 units, those of a tied token embedding (GPT-2's wte / LM head).
    wte_elems: usize,
    wte_units: usize,
}

/// Every rank's share (one rank: everything), from the partition the runs compute.
fn zero_shares(
    lay: &Layout,
    is_linear: &[bool],
    cfg: &RunConfig,
    ranks: usize,
) -> Result<Vec<ZeroShare>> {
    let ocfg = fp8lm_optim::Fp8AdamConfig::fp8_lm(cfg.optim.hyper());
    let mode = cfg.dist.zero_partition;
    let (units, part) =
        crate::distributed::zero_partition_with(&lay.metas, ranks, is_linear, &ocfg, mode)?;
    let mut shares = vec![ZeroShare::default(); ranks];
    for (u, unit) in units.iter().enumerate() {
        let s = &mut shares[part.owner[u]];
        if is_linear[unit.tensor] {
            (s.low_elems, s.low_units) = (s.low_elems + unit.numel(), s.low_units + 1);
            if unit.tensor == lay.wte {
                (s.wte_elems, s.wte_units) = (s.wte_elems + unit.numel(), s.wte_units + 1);
            }
        } else {
            (s.full_elems, s.full_units) = (s.full_elems + unit.numel(), s.full_units + 1);
        }
    }
    Ok(shares)
}

/// The FP8-LM optimizer's state of `share` (each unit is a tensor to the optimizer).
fn fp8_adam_state(share: ZeroShare) -> StateBytes {
    let [lm, la, lv] = fp8_adam_bytes(true);
    let [fm, fa, fv] = fp8_adam_bytes(false);
    let (lo, fu) = (share.low_elems, share.full_elems);
    StateBytes {
        master: lm * lo + fm * fu,
        exp_avg: la * lo + fa * fu,
        exp_avg_sq: lv * lo + fv * fu,
        scalars: 8 + SCALAR_BYTES_PER_TENSOR * (share.low_units + share.full_units),
    }
}

/// The whole model as one rank's share (one unit per tensor).
fn whole_share(lay: &Layout, is_linear: &[bool]) -> ZeroShare {
    let mut s = ZeroShare::default();
    for (i, m) in lay.metas.iter().enumerate() {
        if is_linear[i] {
            (s.low_elems, s.low_units) = (s.low_elems + m.numel(), s.low_units + 1);
        } else {
            (s.full_elems, s.full_units) = (s.full_elems + m.numel(), s.full_units + 1);
        }
    }
    s
}

/// Index of the most loaded share (by optimizer-state bytes; ties to the lowest rank).
fn heaviest(shares: &[ZeroShare]) -> usize {
    (0..shares.len())
        .max_by_key(|&r| (fp8_adam_state(shares[r]).total(), std::cmp::Reverse(r)))
        .unwrap_or(0)
}

/// The plan of `cfg` on `grid`: one rank's ledger and its bytes per collective.
pub fn plan(cfg: &RunConfig, vocab: usize, grid: PlanGrid) -> Result<Plan> {
    let sizes = ledger_sizes(cfg, vocab, grid)?;
    let zero = if cfg.precision == Precision::Fp8O3 && grid.dp > 1 {
        let sh = shape(cfg, vocab, grid)?;
        zero_shares(&sh.lay, &sh.is_linear, cfg, grid.dp)?
    } else {
        vec![]
    };
    let mut collectives = collective_bytes(&sizes, &zero, grid);
    if grid.tp > 1 {
        collectives.extend(tp_collective_bytes(cfg, &shape(cfg, vocab, grid)?, grid));
    }
    Ok(Plan {
        grid,
        precision: cfg.precision,
        ledger: sizes.ledger(),
        collectives,
    })
}

/// Bytes one rank sends per step inside its tensor-parallel group (rings over T ranks;
/// n = batch x context tokens, C channels, L blocks), as `model/gpt/` and
/// `tensor_parallel/` move them:
/// - without SP, all-reduces of `[n, C]` f32: f̄ after the embedding and both row-parallel
///   layers, f's backward before both column-parallel layers of a block and the head
///   (4L + 2), and the vocabulary-parallel cross-entropy's `[n]` row max and `[2n]` sums;
/// - with SP, g all-gathers the 2L + 1 norm outputs (E4M3 in the FP8 precisions, bf16
///   in bf16, f32 in fp32) and gathers them again in the backward, the column-parallel
///   layers keeping only their shard (in that format), ḡ's backward all-gathers the 2L row-parallel output gradients (E5M2 /
///   f32), the embedding's backward one f32 `[n, C]`; reduce-scatters: ḡ after the 2L
///   row-parallel layers and the embedding, g's backward for the 2L + 1 norm outputs;
///   all-reduces: the cross-entropy's and the replicated tensors' gradients (norms,
///   row-parallel biases; the position embedding sees every token already).
///
/// Left out, as for data parallelism: one-element agreements (amaxes, norm).
fn tp_collective_bytes(cfg: &RunConfig, sh: &Shape, grid: PlanGrid) -> Vec<Collective> {
    let t = grid.tp as u64;
    let frac = |b: u64| b * (t - 1) / t;
    let (n, c, l) = ((sh.d.b * sh.d.t) as u64, sh.d.c as u64, sh.d.l as u64);
    let fp8 = cfg.precision.is_fp8();
    let mut out = Vec::new();
    let mut push = |kind, what: &str, bytes| {
        out.push(Collective {
            kind,
            group: "tensor-parallel",
            what: what.to_string(),
            bytes,
        })
    };
    let xent = 2 * frac(3 * n * 4);
    if !grid.sp {
        push(
            "all-reduce",
            "f32 activations [n, C] (f̄ forward, f backward) and the cross-entropy",
            2 * frac((4 * l + 2) * n * c * 4) + xent,
        );
        return out;
    }
    if fp8 {
        push(
            "all-gather",
            "E4M3 norm outputs (g, and again in the backward) and E5M2 output gradients",
            frac((6 * l + 2) * n * c),
        );
        push(
            "all-gather",
            "f32 embedding output gradient",
            frac(n * c * 4),
        );
    } else {
        // The norm outputs move in the format the column-parallel GEMMs read: f32, or
        // bf16 (rounded before g: `Linear::forward_sp`); the column-parallel layers keep
        // their input shard and gather it again for dW in that format.
        let (elem, what) = if cfg.precision == Precision::Bf16 {
            (
                2,
                "bf16 norm outputs (g, and again for dW of the column-parallel layers)",
            )
        } else {
            (
                4,
                "f32 norm outputs (g, and again for dW of the column-parallel layers)",
            )
        };
        push("all-gather", what, frac(2 * (2 * l + 1) * n * c * elem));
        push(
            "all-gather",
            "f32 output gradients and the embedding's gradient",
            frac((2 * l + 1) * n * c * 4),
        );
    }
    push(
        "reduce-scatter",
        "f32 row-parallel outputs (ḡ), the embedding and g's backward",
        frac((4 * l + 2) * n * c * 4),
    );
    let replicated: usize = (0..sh.lay.metas.len())
        .filter(|&i| Some(i) != sh.lay.wpe)
        .filter(|&i| !sh.is_linear[i] && i != sh.lay.wte)
        .filter(|&i| {
            !sh.lay
                .blocks
                .iter()
                .any(|b| [b.qkvb, b.fcb].contains(&Some(i)))
        })
        .map(|i| sh.lay.metas[i].numel())
        .sum();
    push(
        "all-reduce",
        "replicated tensors' f32 gradients and the cross-entropy",
        2 * frac(replicated as u64 * 4) + xent,
    );
    out
}

/// Bytes one rank sends per step, by collective (the ring algorithms: module docs).
/// Left out: the per-step scalar agreements (loss, gradient norm, skip and stop flags,
/// FP8 scales and saturation counts: a few bytes per tensor).
fn collective_bytes(s: &LedgerSizes, zero: &[ZeroShare], grid: PlanGrid) -> Vec<Collective> {
    let n = grid.dp as u64;
    let mut out = Vec::new();
    if n < 2 {
        return out;
    }
    let allreduce = |bytes: usize| 2 * (n - 1) * bytes as u64 / n;
    let mut push = |kind, what: &str, bytes| {
        out.push(Collective {
            kind,
            group: "data-parallel",
            what: what.to_string(),
            bytes,
        })
    };
    if s.precision == Precision::Fp8O3 {
        // Each owner's segment padded to the largest, (N-1) segments sent per rank.
        let max = |f: &dyn Fn(&ZeroShare) -> usize| zero.iter().map(f).max().unwrap_or(0) as u64;
        push(
            "reduce-scatter",
            "E5M2 weight gradients to their ZeRO owners",
            (n - 1) * max(&|z| z.low_elems),
        );
        push(
            "reduce-scatter",
            "f32 gradients to their ZeRO owners",
            (n - 1) * max(&|z| 4 * z.full_elems),
        );
        if s.f32_params < 4 * s.params {
            // E4M3 weight storage (`Zero::update_and_share_e4m3`): per FP8 unit its E4M3
            // bytes and 24 B (scale, amax, two counts); the tied embedding's units also
            // their FP16 master and scale; f32 for the rest.
            let tied = s.wte_f16 > 0;
            push(
                "all-gather",
                "E4M3 weights from their owners (+ tied embedding f16, f32 rest)",
                (n - 1)
                    * max(&|z| {
                        let (we, wu) = if tied {
                            (z.wte_elems, z.wte_units)
                        } else {
                            (0, 0)
                        };
                        z.low_elems + 24 * z.low_units + 2 * we + 4 * wu + 4 * z.full_elems
                    }),
            );
        } else {
            push(
                "all-gather",
                "new masters from their owners (f16 + scale linears, f32 rest)",
                (n - 1) * max(&|z| 2 * z.low_elems + 4 * z.low_units + 4 * z.full_elems),
            );
        }
    } else {
        push("all-reduce", "f32 gradients", allreduce(s.f32_grads));
        if s.fp8_grads > 0 {
            push(
                "all-reduce",
                "E5M2 weight gradients (FP8-LM all-reduce)",
                allreduce(s.fp8_grads),
            );
        }
    }
    out
}

impl Plan {
    /// The table `fp8lm plan` prints: the ledger, then bytes per collective.
    pub fn report(&self, title: &str) -> String {
        let g = self.grid;
        let mut s = self.ledger.report(&format!(
            "{title} [{} on D = {} x T = {}{} ranks, per rank]",
            self.precision.name(),
            g.dp,
            g.tp,
            if g.sp { " (sequence parallel)" } else { "" }
        ));
        if self.collectives.is_empty() {
            s += "  collectives: none (one rank)\n";
        } else {
            let _ = writeln!(s, "  bytes sent per step by this rank:");
            for c in &self.collectives {
                let _ = writeln!(
                    s,
                    "    {:<15} {:<14} {:<52} {:>12.1} MiB",
                    c.kind,
                    c.group,
                    c.what,
                    c.bytes as f64 / (1 << 20) as f64
                );
            }
        }
        s
    }
}

#[cfg(test)]
mod tests;
