//! `grad_accum = k` over micro-batches of B sequences against one batch of k*B of the
//! same sequences: the accumulated gradient / k is the big batch's mean gradient.
//!
//! Tolerances: fp32 sums the same per-token terms in another order; the bound is the
//! f32 summation error `n * 2^-24` relative (n = k*B*T terms per weight), times 4 for
//! cancellation in the sums. fp8-o2: both sides round independently: each E5M2 cast
//! has a relative RMS error <= 2^-3 / sqrt(3) (half an ulp of a 2-bit mantissa, uniform);
//! the accumulated side casts once per micro-batch (k), the big batch once, and the
//! micro-batches' dy / x are cast with their own scales (2 more roundings of the inputs):
//! relative L2 error <= sqrt(k + 1 + 2) * 2^-3 / sqrt(3). Dropping or doubling one
//! micro-batch moves the gradient by ~1/sqrt(k) = 0.5, far outside it.

use fp8lm_optim::Grad;
use fp8lm_trainer::{Precision, RunConfig, Trainer};

mod rows;
use rows::Rows;

fn grads_f64(tr: &Trainer) -> Vec<f64> {
    let m = tr.model();
    let mut out = Vec::new();
    for g in m.grad_views() {
        match g {
            Grad::F32(s) => out.extend(s.iter().map(|&x| x as f64)),
            Grad::Fp8(q) => out.extend(q.dequantize().iter().map(|&x| x as f64)),
        }
    }
    out
}

/// One optimizer step of `accum` micro-batches of `batch` rows, context 16.
fn one_step_cfg(precision: Precision, batch: usize, accum: usize) -> RunConfig {
    let mut cfg = RunConfig {
        precision,
        batch,
        grad_accum: accum,
        max_steps: 1,
        ..RunConfig::default()
    };
    cfg.model.context = 16;
    cfg
}

fn one_step(precision: Precision, batch: usize, accum: usize) -> (f32, Vec<f64>) {
    let cfg = one_step_cfg(precision, batch, accum);
    let mut data = Rows { next: 0, vocab: 64 };
    let mut tr = Trainer::new(&cfg, 64).unwrap();
    let st = tr.train_step(&mut data).unwrap();
    assert_eq!(st.tokens, batch * accum * 16);
    assert_eq!(data.next, (batch * accum) as u64);
    (st.loss, grads_f64(&tr))
}

fn rel_l2(a: &[f64], b: &[f64], scale_a: f64) -> f64 {
    let (mut d, mut n) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        d += (x * scale_a - y).powi(2);
        n += y * y;
    }
    (d / n).sqrt()
}

#[test]
fn accumulated_micro_batches_match_one_big_batch() {
    let (k, b, t) = (4usize, 2usize, 16usize);
    // fp32
    let (l_acc, g_acc) = one_step(Precision::Fp32, b, k);
    let (l_big, g_big) = one_step(Precision::Fp32, k * b, 1);
    let tol32 = 4.0 * (k * b * t) as f64 * 2f64.powi(-24);
    assert!(
        ((l_acc - l_big) / l_big).abs() as f64 <= tol32,
        "{l_acc} vs {l_big}"
    );
    let e = rel_l2(&g_acc, &g_big, 1.0 / k as f64);
    assert!(
        e <= tol32,
        "fp32 gradient: relative error {e:e} > {tol32:e}"
    );
    // fp8-o2: E5M2 accumulation
    let (l_acc, g_acc) = one_step(Precision::Fp8O2, b, k);
    let (l_big, g_big) = one_step(Precision::Fp8O2, k * b, 1);
    let tol8 = ((k + 3) as f64).sqrt() * 2f64.powi(-3) / 3f64.sqrt();
    assert!(((l_acc - l_big) / l_big).abs() < 0.01, "{l_acc} vs {l_big}");
    let e = rel_l2(&g_acc, &g_big, 1.0 / k as f64);
    assert!(e <= tol8, "fp8-o2 gradient: relative error {e} > {tol8}");
    // The test can fail: one micro-batch fewer is far off.
    let (_, g_short) = one_step(Precision::Fp8O2, b, k - 1);
    let e_short = rel_l2(&g_short, &g_big, 1.0 / (k - 1) as f64);
    assert!(
        e_short > tol8,
        "dropping a micro-batch went unnoticed ({e_short})"
    );
}

/// One step of a T-way tensor-parallel group (`Trainer::train_step_tp`, the same step
/// path as `train_step`): every rank's loss and its shard's gradients.
fn one_step_tp(
    precision: Precision,
    batch: usize,
    accum: usize,
    tp: usize,
    sp: bool,
) -> Vec<(f32, Vec<f64>)> {
    let mut cfg = one_step_cfg(precision, batch, accum);
    cfg.dist.tensor_parallel = tp;
    cfg.dist.sequence_parallel = sp;
    fp8lm_collectives::run_ranks(tp, |comm| {
        use fp8lm_collectives::Communicator;
        let mut data = Rows { next: 0, vocab: 64 };
        let mut tr = Trainer::new_tp(&cfg, 64, comm.rank())?;
        let st = tr.train_step_tp(&mut data, comm)?;
        assert_eq!(st.tokens, batch * accum * 16);
        assert_eq!(data.next, (batch * accum) as u64);
        anyhow::Ok((st.loss, grads_f64(&tr)))
    })
    .unwrap()
}

/// The same under tensor parallelism (T = 2), with and without sequence parallelism:
/// each rank's shard of the accumulated gradient / k against its shard of the big
/// batch's. Both sides shard alike (the same regrouped sums over the group), so what
/// differs is what differs on one rank, and the bounds are the single-rank test's. With
/// SP the norms' and row-parallel biases' gradients are partial sums over each rank's
/// token rows, all-reduced over the group after every micro-batch's backward: what the
/// earlier micro-batches left (already reduced) must be counted once, not T times.
/// Measured (k = 2, B = 2, context 16): fp32 gradient 9.6e-8 (1.3e-7 with SP) against
/// the bound 1.5e-5; fp8-o2 5.3e-2 against 0.16. Control: counting the earlier sum T
/// times (SP) is off by 0.44 in fp32.
#[test]
fn accumulated_micro_batches_match_one_big_batch_under_tensor_parallelism() {
    let (k, b, t, tp) = (2usize, 2usize, 16usize, 2usize);
    let tol32 = 4.0 * (k * b * t) as f64 * 2f64.powi(-24);
    let tol8 = ((k + 3) as f64).sqrt() * 2f64.powi(-3) / 3f64.sqrt();
    for sp in [false, true] {
        for (p, tol) in [(Precision::Fp32, tol32), (Precision::Fp8O2, tol8)] {
            let acc = one_step_tp(p, b, k, tp, sp);
            let big = one_step_tp(p, k * b, 1, tp, sp);
            for (r, ((l_acc, g_acc), (l_big, g_big))) in acc.iter().zip(&big).enumerate() {
                let what = format!("{p:?}, sp = {sp}, rank {r} of {tp}");
                let lt = if p == Precision::Fp32 { tol32 } else { 0.01 };
                assert!(
                    ((l_acc - l_big) / l_big).abs() as f64 <= lt,
                    "{what}: loss {l_acc} vs {l_big}"
                );
                let e = rel_l2(g_acc, g_big, 1.0 / k as f64);
                assert!(e <= tol, "{what}: gradient relative error {e:e} > {tol:e}");
            }
        }
    }
}

#[test]
fn grad_accum_zero_is_refused() {
    let e =
        fp8lm_trainer::config_file::load_config_str("grad_accum = 0\n", "test", &[]).unwrap_err();
    assert_eq!(e.key, "grad_accum");
}
