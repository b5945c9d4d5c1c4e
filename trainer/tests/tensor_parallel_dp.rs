//! Data parallelism over tensor-parallel replicas (D x T grid, in-process thread ranks):
//! D = 2 x T = 2 on 4 ranks trains like D = 1 x T = 2 with twice the batch, and the grid
//! stays consistent (every rank of a tensor-parallel group holds the same replicated
//! tensors, every replica the same shards, bit for bit).
//!
//! Why the runs can match: both replicas draw the same 2B-row batch the D = 1 run draws
//! and keep their B rows; each replica's loss and gradients are means over its B rows,
//! and their mean over the data-parallel group (f32 ring, fixed order, so bit-identical
//! on both replicas) is the mean over 2B rows with the sum grouped as two partial sums
//! of B rows each. So D = 2 differs from D = 1 only in the f32 summation order of the
//! batch mean (the loss's mean, the weight-gradient GEMMs' K-sum over the rows, the bias
//! and norm gradients' row sums): the regrouping of tensor_parallel_model.rs again
//! (~sqrt(K) * 2^-24 ~ 1e-6 relative typically for K = 2 * 4 * 32 = 256 rows, AdamW's
//! g / sqrt(v) insensitive to the last bits), hence fp32 within 1e-5 relative over 10
//! steps.
//!
//! Low precision: bf16 amplifies such f32 differences by flipping roundings (2^-8
//! relative) of a few GEMM inputs. In FP8 modes the weight gradients leave each replica
//! as E5M2 with their own per-tensor scale and are summed by the FP8-LM all-reduce
//! (shared minimum scale, FP8 sum, mu): two E5M2 roundings (2^-3 relative) of a half
//! batch's gradient instead of one of the whole batch's, FP8 noise between equally valid
//! quantisations. Bounds: measured below, asserted with head-room.
//!
//! Measured (max relative loss difference over 10 steps, GPT-2 / LLaMA; 2 layers,
//! C = 64, 4 heads, context 32, batch 4 per replica vs 8): fp32 1.1e-7 / 8.7e-8 (the
//! same with sequence parallelism); bf16 8.0e-6 / 3.7e-6; fp8-o1 4.3e-4 / 2.1e-4;
//! fp8-o2 2.6e-4 / 5.0e-4 (with SP 2.6e-4 / 5.0e-4). Asserted: fp32 1e-5 (90x the
//! measurement), bf16 2e-4 (25x; the T-vs-1 bound of tensor_parallel_model.rs), FP8 2e-3
//! (4x). Control: the grid against D = 1 with only B rows (what it would compute if both
//! replicas kept the same rows, or their gradients were not averaged) differs by
//! 9.5e-3 / 1.2e-2 in fp32, ~1000x the fp32 bound.

use fp8lm_collectives::grid::Grid;
use fp8lm_collectives::{run_ranks, Communicator};
use fp8lm_trainer::data::synthetic::MarkovCorpus;
use fp8lm_trainer::data::Dataset;
use fp8lm_trainer::{Arch, Precision, RunConfig, Trainer};

mod rows;
use rows::Rows;

const STEPS: usize = 10;
const B: usize = 4;

fn cfg(arch: Arch, precision: Precision, batch: usize) -> RunConfig {
    cfg_sp(arch, precision, batch, false)
}

fn cfg_sp(arch: Arch, precision: Precision, batch: usize, sp: bool) -> RunConfig {
    let mut c = RunConfig {
        batch,
        max_steps: STEPS,
        precision,
        ..RunConfig::default()
    };
    c.model.arch = arch;
    c.model.context = 32;
    c.dist.tensor_parallel = 2;
    c.dist.sequence_parallel = sp;
    c
}

/// D = 1 x T = 2, `batch` rows: rank 0's losses.
fn losses_d1(c: &RunConfig) -> Vec<f32> {
    run_ranks(2, |comm| {
        let mut data = MarkovCorpus::new(3);
        let mut tr = Trainer::new_tp(c, data.vocab_size(), comm.rank())?;
        (0..STEPS)
            .map(|_| tr.train_step_tp(&mut data, comm).map(|s| s.loss))
            .collect::<anyhow::Result<Vec<f32>>>()
    })
    .unwrap()
    .swap_remove(0)
}

/// One rank's outcome on the 2 x 2 grid (`params`: every weight as f32, the FP16
/// masters' values for fp8-o2's linears).
struct RankEnd {
    dp: usize,
    tp: usize,
    losses: Vec<f32>,
    params: Vec<f32>,
    sharded: Vec<bool>,
    ranges: Vec<std::ops::Range<usize>>,
    /// The optimizer state this rank holds (fp8-o3: its ZeRO share of its shard's).
    state: fp8lm_optim::StateBytes,
}

/// D = 2 x T = 2, batch B per replica: every rank's losses and final weights.
fn grid_run(c: &RunConfig) -> Vec<RankEnd> {
    let grid = Grid::new(4, 2).unwrap();
    run_ranks(4, |world| {
        let (tp, dp) = grid.groups(world)?;
        let (dpr, tpr) = grid.coords(world.rank());
        assert_eq!((dp.rank(), tp.rank()), (dpr, tpr), "grid coordinates");
        let mut data = MarkovCorpus::new(3);
        let mut tr = Trainer::new_tp(c, data.vocab_size(), tp.rank())?;
        tr.enable_data_parallel(&dp)?;
        let losses = (0..STEPS)
            .map(|_| tr.train_step_dxt(&mut data, &tp, &dp).map(|s| s.loss))
            .collect::<anyhow::Result<Vec<f32>>>()?;
        let m = tr.model();
        let ranges = (0..m.layout.metas.len())
            .map(|i| m.layout.range(i))
            .collect();
        anyhow::Ok(RankEnd {
            dp: dpr,
            tp: tpr,
            losses,
            params: tr.weights_f32_all(),
            sharded: tr.tp_sharded(),
            ranges,
            state: tr.optimizer().state_breakdown(),
        })
    })
    .unwrap()
}

fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| ((x as f64 - y as f64) / y as f64).abs())
        .fold(0.0, f64::max)
}

/// Checks D = 2 x T = 2 against D = 1 x T = 2 with 2B rows (`sp`: both with sequence
/// parallelism); returns the grid's losses.
fn check_sp(arch: Arch, p: Precision, bound: f64, sp: bool) -> Vec<f32> {
    check_ends(arch, p, bound, sp).0
}

/// [`check_sp`], returning the grid's losses and every rank's outcome.
fn check_ends(arch: Arch, p: Precision, bound: f64, sp: bool) -> (Vec<f32>, Vec<RankEnd>) {
    let base = losses_d1(&cfg_sp(arch, p, 2 * B, sp));
    assert!(
        base[STEPS - 1] < base[0] - 0.1,
        "{arch:?} {p:?}: D = 1 does not train: {base:?}"
    );
    let ends = grid_run(&cfg_sp(arch, p, B, sp));
    for e in &ends {
        assert_eq!(
            e.losses, ends[0].losses,
            "{arch:?} {p:?}: rank (dp {}, tp {}) reports other losses",
            e.dp, e.tp
        );
        // The replicas hold the same shard, bit for bit.
        let twin = ends
            .iter()
            .find(|o| o.tp == e.tp && o.dp != e.dp)
            .expect("two replicas");
        let diff = e
            .params
            .iter()
            .zip(&twin.params)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(
            diff, 0,
            "{arch:?} {p:?}: tp rank {} differs between replicas {} and {} in {diff} weights",
            e.tp, e.dp, twin.dp
        );
        // The ranks of a group hold the same replicated tensors.
        let peer = ends
            .iter()
            .find(|o| o.dp == e.dp && o.tp != e.tp)
            .expect("two tp ranks");
        for (i, r) in e.ranges.iter().enumerate() {
            if !e.sharded[i] {
                assert_eq!(
                    &e.params[r.clone()],
                    &peer.params[r.clone()],
                    "{arch:?} {p:?}: replicated tensor {i} differs between tp ranks {} and {} of replica {}",
                    e.tp,
                    peer.tp,
                    e.dp
                );
            }
        }
    }
    // Not a vacuous comparison: the weights moved during training.
    let start = Trainer::new_tp(&cfg(arch, p, B), 256, 0).unwrap();
    let w0 = start.weights_f32_all();
    let moved = w0
        .iter()
        .zip(&ends.iter().find(|e| e.tp == 0).unwrap().params)
        .filter(|(a, b)| a != b)
        .count();
    assert!(
        moved * 2 > w0.len(),
        "{arch:?} {p:?}: only {moved} weights moved"
    );
    let rel = max_rel(&ends[0].losses, &base);
    println!("{arch:?} {p:?} SP {sp}: D = 2 x T = 2 vs D = 1 x T = 2 (2B rows): max relative loss difference {rel:.2e}");
    assert!(
        rel <= bound,
        "{arch:?} {p:?} SP {sp}: losses differ by {rel:.2e} > {bound:.0e}\nD = 1: {base:?}\nD = 2: {:?}",
        ends[0].losses
    );
    (ends[0].losses.clone(), ends)
}

fn check(arch: Arch, p: Precision, bound: f64) {
    check_sp(arch, p, bound, false);
}

#[test]
fn fp32_dp_over_tp_trains_like_twice_the_batch() {
    for arch in [Arch::Gpt2, Arch::Llama] {
        let grid = check_sp(arch, Precision::Fp32, 1e-5, false);
        // The comparison sees the batch: D = 1 with B rows (what the grid would train on
        // if both replicas kept the same rows, or reduced nothing) is far outside it.
        let half = losses_d1(&cfg(arch, Precision::Fp32, B));
        let rel = max_rel(&grid, &half);
        println!("{arch:?} Fp32: D = 2 x T = 2 vs D = 1 x T = 2 with B rows: {rel:.2e}");
        assert!(
            rel > 100.0 * 1e-5,
            "{arch:?}: the grid trains like B rows ({rel:.2e})"
        );
    }
}

/// With sequence parallelism the norms' partial gradients are all-reduced over the
/// tensor-parallel group before the backward hands their group out, so the
/// data-parallel mean sees whole gradients: the same bound as without.
#[test]
fn sequence_parallel_dp_over_tp_trains_like_twice_the_batch() {
    for arch in [Arch::Gpt2, Arch::Llama] {
        check_sp(arch, Precision::Fp32, 1e-5, true);
        check_sp(arch, Precision::Fp8O2, 2e-3, true);
    }
}

#[test]
fn low_precision_dp_over_tp_trains_like_twice_the_batch() {
    for arch in [Arch::Gpt2, Arch::Llama] {
        for p in [Precision::Bf16, Precision::Fp8O1, Precision::Fp8O2] {
            check(arch, p, if p == Precision::Bf16 { 2e-4 } else { 2e-3 });
        }
    }
}

/// The optimizer state one D = 1 x T = 2 rank holds (its whole shard's, no ZeRO).
fn state_d1(c: &RunConfig) -> Vec<fp8lm_optim::StateBytes> {
    run_ranks(2, |comm| {
        let tr = Trainer::new_tp(c, 256, comm.rank())?;
        anyhow::Ok(tr.optimizer().state_breakdown())
    })
    .unwrap()
}

/// Issue #13: "D = 2 x T = 2 on 4 ranks, fp8-o3, matches D = 1 x T = 2 with twice the
/// batch." The grid runs FP8 ZeRO over each data-parallel pair (the replicas of one
/// shard); D = 1 runs the shard's whole FP8 optimizer on each TP rank.
///
/// Tolerance. Against D = 1 the grid changes only the FP8 rounding of the weight
/// gradients: each replica casts its half batch's gradient to E5M2 with its own scale,
/// the pair agrees the smaller scale (re-quantising one side, 2^-3 relative per element
/// at E5M2's 2 mantissa bits) and the reduce-scatter's FP8 sum rounds again (one more
/// 2^-3), where D = 1 rounds the whole batch's gradient once. The updates are AdamW's
/// g / sqrt(v), so per-element gradient noise of ~2^-3 moves each weight by a fraction
/// of lr in direction noise only; the loss sees its mean, ~2^-3 / sqrt(elements) per
/// step. The master all-gather is exact (FP16 with its power-of-two scale, decoded the
/// same on every rank), so nothing else differs. This is the same noise as fp8-o2 under
/// the FP8-LM all-reduce, measured above at 2.6e-4 / 5.0e-4; fp8-o3 measured
/// 2.7e-4 (GPT-2) / 4.6e-4 (LLaMA) max relative loss difference over 10 steps; asserted
/// 2e-3 (the FP8 bound of the other precisions, 4x the measurement), still 5x below the
/// 9.5e-3 / 1.2e-2 a run that dropped half the batch shows in fp32.
///
/// Memory (the ledger's optimizer figures, `StateBytes`): each replica owns a disjoint
/// set of its shard's units, so per TP coordinate the two shares' master and moment
/// bytes add up exactly to the D = 1 rank's; and no rank holds more than 1.25x its
/// 1/(D*T) of the whole model's fp8-o2 state: the greedy partition's max is at most the
/// mean plus the largest unit (units are cut at 1/(8D) of the shard, +12.5%), plus the
/// norms, biases and positions every TP rank keeps whole (12 B/param in f32). Measured:
/// 1.060 / 1.059 (GPT-2), 1.008 / 1.004 (LLaMA) x whole/(D*T).
#[test]
fn fp8_o3_dp_over_tp_trains_like_twice_the_batch() {
    for arch in [Arch::Gpt2, Arch::Llama] {
        let (_, ends) = check_ends(arch, Precision::Fp8O3, 2e-3, false);
        let d1 = state_d1(&cfg(arch, Precision::Fp8O3, B));
        let mut whole_cfg = cfg(arch, Precision::Fp8O2, B);
        whole_cfg.dist.tensor_parallel = 1;
        let whole = Trainer::new(&whole_cfg, 256)
            .unwrap()
            .optimizer()
            .state_breakdown();
        let big = |s: &fp8lm_optim::StateBytes| s.master + s.exp_avg + s.exp_avg_sq;
        for (tp, d1_tp) in d1.iter().enumerate() {
            let shares: Vec<usize> = ends
                .iter()
                .filter(|e| e.tp == tp)
                .map(|e| big(&e.state))
                .collect();
            assert_eq!(shares.len(), 2);
            assert_eq!(
                shares.iter().sum::<usize>(),
                big(d1_tp),
                "{arch:?}: tp rank {tp}'s replicas hold {shares:?} bytes of master + moments, \
                 the D = 1 rank {}",
                big(d1_tp)
            );
        }
        let ideal = whole.total() as f64 / 4.0;
        for e in &ends {
            let ratio = e.state.total() as f64 / ideal;
            println!(
                "{arch:?} fp8-o3 rank (dp {}, tp {}): optimizer state {} B = {ratio:.3} x whole/(D*T) ({} B / 4)",
                e.dp,
                e.tp,
                e.state.total(),
                whole.total()
            );
            assert!(
                (0.5..=1.25).contains(&ratio),
                "{arch:?}: rank (dp {}, tp {}) holds {} B of optimizer state, {ratio:.3} x \
                 the whole model's {} B / (D*T)",
                e.dp,
                e.tp,
                e.state.total(),
                whole.total()
            );
        }
    }
}

/// D = 2 x T = 2, `batch` rows per replica from [`Rows`] (row r a fixed function of r,
/// so k micro-batches draw exactly the rows one batch of k * B draws): rank 0's
/// (loss, gradient norm) per step.
fn grid_rows(c: &RunConfig, steps: usize) -> Vec<(f32, f32)> {
    let grid = Grid::new(4, 2).unwrap();
    run_ranks(4, |world| {
        let (tp, dp) = grid.groups(world)?;
        let mut data = Rows { next: 0, vocab: 64 };
        let mut tr = Trainer::new_tp(c, 64, tp.rank())?;
        tr.enable_data_parallel(&dp)?;
        (0..steps)
            .map(|_| {
                let s = tr.train_step_dxt(&mut data, &tp, &dp)?;
                Ok((s.loss, s.grad_norm))
            })
            .collect::<anyhow::Result<Vec<(f32, f32)>>>()
    })
    .unwrap()
    .swap_remove(0)
}

/// `grad_accum = 2` on the 2 x 2 grid (micro-batches add, the last one's backward
/// reduces over the replicas) equals one batch of twice the rows: the bounds of
/// `tests/tests/dp_grad_accum.rs` (fp32: f32 summation order, 1e-5; FP8: the E5M2
/// accumulation bound 0.16 on the norm, the FP8 D-vs-1 bound 2e-3 on the losses; a
/// missing 1/k doubles the norm).
#[test]
fn grad_accum_on_the_grid_equals_one_big_batch() {
    for (p, loss_tol, norm_tol) in [
        (Precision::Fp32, 1e-5, 1e-5),
        (Precision::Fp8O1, 2e-3, 0.16),
        (Precision::Fp8O3, 2e-3, 0.16),
    ] {
        let mut accum = cfg(Arch::Gpt2, p, B / 2);
        accum.grad_accum = 2;
        let (a, b) = (grid_rows(&accum, 3), grid_rows(&cfg(Arch::Gpt2, p, B), 3));
        for (step, ((la, na), (lb, nb))) in a.iter().zip(&b).enumerate() {
            let rel = |x: f32, y: f32| ((x - y) / y).abs() as f64;
            println!("{p:?} step {step}: loss {la} vs {lb}, norm {na} vs {nb}");
            assert!(
                rel(*la, *lb) <= loss_tol,
                "{p:?} step {step}: loss {la} vs {lb}"
            );
            assert!(
                rel(*na, *nb) <= norm_tol,
                "{p:?} step {step}: norm {na} vs {nb}"
            );
        }
    }
}
