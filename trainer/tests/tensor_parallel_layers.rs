//! Tensor-parallel layers against the unsharded computation, on in-process ranks:
//! an MLP (column-parallel fc, GELU, row-parallel proj: the model's
//! `ColumnParallelLinear` / `RowParallelLinear` over its `Linear`) with and without
//! sequence parallelism, in f32 and FP8, for T = 2 and 4; and the vocabulary-parallel
//! embedding and cross-entropy against the full softmax.
//!
//! The reference is the same code on a group of one rank (every shard = the whole
//! tensor), so a difference can only come from the sharding and the collectives.

use fp8lm_collectives::{run_ranks, BufMut, CommError, Communicator, ReduceOp};
use fp8lm_fp8::ScalingRecipe;
use fp8lm_kernels::{Cpu, GemmOps, LayerOps, MatRef};
use fp8lm_trainer::model::{Linear, LinearPrecision};
use fp8lm_trainer::tensor_parallel::shard::embed_forward;
use fp8lm_trainer::tensor_parallel::{
    even_part, qkv_rows, vocab_parallel_cross_entropy, ColumnParallelLinear, RowParallelLinear,
};

fn values(seed: u64, n: usize, amp: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * amp
        })
        .collect()
}

struct Mlp {
    n: usize,
    c: usize,
    x: Vec<f32>,
    w_fc: Vec<f32>,
    b_fc: Vec<f32>,
    w_proj: Vec<f32>,
    b_proj: Vec<f32>,
    dy: Vec<f32>,
}

fn mlp() -> Mlp {
    let (n, c) = (16, 64);
    Mlp {
        n,
        c,
        x: values(1, n * c, 1.0),
        w_fc: values(2, 4 * c * c, 0.125),
        b_fc: values(3, 4 * c, 0.1),
        w_proj: values(4, c * 4 * c, 0.06),
        b_proj: values(5, c, 0.1),
        dy: values(6, n * c, 0.01),
    }
}

/// What one rank computed: output rows, input-gradient rows (its shard with SP, all rows
/// without), weight-gradient shards, bias gradients.
#[derive(Debug, Clone)]
struct Out {
    y: Vec<f32>,
    dx: Vec<f32>,
    dw_fc: Vec<f32>,
    db_fc: Vec<f32>,
    dw_proj: Vec<f32>,
    db_proj: Vec<f32>,
}

/// FP8 as the layer tests run it: current (just-in-time) power-of-two scaling of every
/// operand, no margin.
const FP8: LinearPrecision = LinearPrecision::Fp8 {
    recipe: ScalingRecipe::Current,
    margin: 0,
};

fn run_mlp(m: &Mlp, t: usize, sp: bool, p: LinearPrecision) -> Vec<Out> {
    let (n, c) = (m.n, m.c);
    run_ranks(t, |comm| -> Result<Out, CommError> {
        let r = comm.rank();
        // This rank's shards: fc's rows (output features), proj's columns (input features).
        let part = even_part("fc width", 4 * c, t, r).unwrap();
        let f = part.len();
        let w_fc = m.w_fc[part.start * c..part.end * c].to_vec();
        let b_fc = m.b_fc[part.clone()].to_vec();
        let w_proj: Vec<f32> = (0..c)
            .flat_map(|o| m.w_proj[o * 4 * c + part.start..o * 4 * c + part.end].to_vec())
            .collect();
        let mut fc = Linear::new("fc".into(), c, f, n, p);
        let mut proj = Linear::new("proj".into(), f, c, n, p);
        if sp {
            // As the model runs a column-parallel layer under SP: only its input's shard
            // is kept, re-gathered for the backward.
            fc.keep_input_shard(t, n);
        }
        let rows = even_part("tokens", n, t, r).unwrap();
        let shard = |v: &[f32]| v[rows.start * c..rows.end * c].to_vec();
        let tp: Option<&dyn Communicator> = Some(comm);

        // ---- forward: x -> (f | g) -> fc -> GELU -> proj -> (f̄ | ḡ) -> + b
        let x_shard = shard(&m.x);
        let mut x_full = if sp { vec![0f32; n * c] } else { m.x.clone() };
        let mut h = vec![0f32; n * f];
        ColumnParallelLinear::new(&mut fc, tp, sp).forward(
            &mut h,
            &mut x_full,
            &x_shard,
            &w_fc,
            Some(&b_fc),
            n,
            true,
        )?;
        let mut a = vec![0f32; n * f];
        Cpu.gelu_forward(&mut a, &h);
        let (mut partial, mut y_shard) = (vec![0f32; n * c], vec![0f32; n * c]);
        let y = RowParallelLinear::new(&mut proj, tp, sp)
            .forward(
                &mut partial,
                &mut y_shard,
                &a,
                &w_proj,
                Some(&m.b_proj),
                n,
                true,
            )?
            .to_vec();

        // ---- backward
        let dy_rows = if sp { shard(&m.dy) } else { m.dy.clone() };
        let (mut da, mut dw_proj) = (vec![0f32; n * f], vec![0f32; c * f]);
        let (mut db_proj, mut scratch) = (vec![0f32; c], vec![0f32; n * c]);
        RowParallelLinear::new(&mut proj, tp, sp).backward(
            &mut da,
            &mut dw_proj,
            Some(&mut db_proj),
            &dy_rows,
            &mut scratch,
            &a,
            &w_proj,
            n,
        )?;
        let mut dh = vec![0f32; n * f];
        Cpu.gelu_backward(&mut dh, &h, &da);
        let (mut dx_partial, mut dx_shard) = (vec![0f32; n * c], vec![0f32; n * c]);
        let (mut dw_fc, mut db_fc) = (vec![0f32; f * c], vec![0f32; f]);
        let mut col = ColumnParallelLinear::new(&mut fc, tp, sp);
        col.backward(
            &mut dx_partial,
            &mut dw_fc,
            Some(&mut db_fc),
            &dh,
            &x_full,
            &w_fc,
            n,
        )?;
        let dx = col.input_grad(&mut dx_partial, &mut dx_shard)?.to_vec();
        if sp {
            // Each rank summed its own rows: the bias gradient is reduced like a norm's.
            comm.all_reduce(BufMut::F32(&mut db_proj), ReduceOp::Sum)?;
        }
        Ok(Out {
            y,
            dx,
            dw_fc,
            db_fc,
            dw_proj,
            db_proj,
        })
    })
    .unwrap()
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

/// max |a - b| / max |b|.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let d = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    d / max_abs(b).max(f32::MIN_POSITIVE)
}

/// Compare rank outputs with the one-rank reference: y/dx rows (sharded with SP), weight
/// gradient shards (fc: its rows; proj: its columns), bias gradients.
fn check(m: &Mlp, got: &[Out], want: &Out, sp: bool, tol: f32, what: &str) -> f32 {
    let (n, c, t) = (m.n, m.c, got.len());
    let mut worst = 0f32;
    for (r, o) in got.iter().enumerate() {
        let rows = even_part("tokens", n, t, r).unwrap();
        let part = even_part("fc", 4 * c, t, r).unwrap();
        let sel = |v: &[f32]| {
            if sp {
                v[rows.start * c..rows.end * c].to_vec()
            } else {
                v.to_vec()
            }
        };
        let fc_rows = want.dw_fc[part.start * c..part.end * c].to_vec();
        let proj_cols: Vec<f32> = (0..c)
            .flat_map(|o| want.dw_proj[o * 4 * c + part.start..o * 4 * c + part.end].to_vec())
            .collect();
        for (name, a, b) in [
            ("y", o.y.clone(), sel(&want.y)),
            ("dx", o.dx.clone(), sel(&want.dx)),
            ("dW fc", o.dw_fc.clone(), fc_rows),
            ("db fc", o.db_fc.clone(), want.db_fc[part.clone()].to_vec()),
            ("dW proj", o.dw_proj.clone(), proj_cols),
            ("db proj", o.db_proj.clone(), want.db_proj.clone()),
        ] {
            let e = rel_err(&a, &b);
            worst = worst.max(e);
            assert!(
                e <= tol,
                "{what}: rank {r} {name}: relative error {e:.3e} > {tol:.1e}"
            );
        }
    }
    worst
}

/// f32: sharding only changes the order of f32 sums (the row-parallel output is a sum of
/// T partial dot products; SP's reduce-scatter sums in ring order). Each side is within
/// k * 2^-24 * sum|a||b| of the exact value, k <= 4C = 256 the longest inner dimension;
/// with these magnitudes sum|a||b| stays within a few times max|result|, so 2 * 256 *
/// 2^-24 * 4 = 1.2e-4 bounds the relative difference; a wrong shard, a missing bias or
/// reduction gives O(1).
#[test]
fn tp_mlp_f32_matches_unsharded_with_and_without_sp() {
    let m = mlp();
    let want = run_mlp(&m, 1, false, LinearPrecision::Fp32).remove(0);
    let tol = 2.0 * 256.0 * 2f32.powi(-24) * 4.0;
    for t in [2, 4] {
        for sp in [false, true] {
            let got = run_mlp(&m, t, sp, LinearPrecision::Fp32);
            let e = check(&m, &got, &want, sp, tol, &format!("f32 T={t} sp={sp}"));
            eprintln!("f32 T={t} sp={sp}: worst relative difference {e:.2e}");
        }
    }
}

/// FP8: power-of-two scales make a shard's quantisation the same as the whole tensor's
/// for every value in the format's normal range (multiplying by 2^s commutes with
/// rounding); only values in the subnormal range, below 2^-6 (E4M3) or 2^-14 (E5M2) of
/// the scaled max, may round differently when a shard's amax sits in a lower binade than
/// the whole tensor's. Such a value has at most half a subnormal step of error,
/// 2^-10 / 448 of the amax for E4M3, 2^-17 / 57344 for E5M2, against E4M3's 2^-4 relative
/// step for normal values; over k = 256 terms this is below 256 * 2^-10 / 448 = 5.6e-4 of
/// max|a| max|b| k. Add the f32 bound above: 2e-3 of max|result| (products of the test's
/// magnitudes included). A recipe bug (wrong scale, unshared scale under SP, E5M2 where
/// E4M3 belongs) moves results by E4M3/E5M2 steps, 6% or more.
#[test]
fn tp_mlp_fp8_matches_unsharded_fp8_and_sp_gathers_fp8() {
    let m = mlp();
    let want = run_mlp(&m, 1, false, FP8).remove(0);
    let want_f32 = run_mlp(&m, 1, false, LinearPrecision::Fp32).remove(0);
    // The FP8 path really is FP8: it differs from f32 by far more than the tolerance.
    assert!(
        rel_err(&want.y, &want_f32.y) > 5e-3,
        "FP8 output equals f32: FP8 path not used?"
    );
    for t in [2, 4] {
        for sp in [false, true] {
            let got = run_mlp(&m, t, sp, FP8);
            let e = check(&m, &got, &want, sp, 2e-3, &format!("fp8 T={t} sp={sp}"));
            eprintln!("fp8 T={t} sp={sp}: worst relative difference {e:.2e}");
        }
    }
}

#[test]
fn qkv_rows_take_each_ranks_heads_from_q_k_and_v() {
    // C = 8, 4 heads of 2, T = 2: rank 1 holds heads 2, 3 = columns 4..8 of q, k and v.
    assert_eq!(qkv_rows(8, 4, 2, 1).unwrap(), vec![4..8, 12..16, 20..24]);
    let e = qkv_rows(8, 3, 2, 0).unwrap_err();
    assert!(
        e.contains("model.heads = 3") && e.contains("dist.tensor_parallel = 2"),
        "{e}"
    );
}

/// Vocabulary-parallel embedding + LM head + cross-entropy equal the unsharded ones:
/// embeddings exactly (one rank contributes each row, the others add zeros), losses and
/// gradients within f32 rounding of the sum of exponentials (V = 96 terms: 96 * 2^-24
/// relative, doubled; the sharded sum is accumulated in f64 per shard).
#[test]
fn vocab_parallel_embedding_and_cross_entropy_match_full_softmax() {
    let (v, c, n) = (96, 16, 12);
    let wte = values(11, v * c, 0.5);
    let tokens: Vec<u32> = (0..n as u32).map(|i| (i * 37 + 5) % v as u32).collect();
    let targets: Vec<u32> = (0..n as u32).map(|i| (i * 53 + 1) % v as u32).collect();
    let x = values(12, n * c, 1.0);
    // Reference: full embedding lookup, logits = x @ wte^T, softmax cross-entropy.
    let mut emb_ref = vec![0f32; n * c];
    Cpu.encoder_forward(&mut emb_ref, &tokens, &wte, None, n, c);
    let mut logits = vec![0f32; n * v];
    Cpu.gemm(
        fp8lm_kernels::GemmShape::new(n, v, c).trans_b(),
        MatRef::F32(&x),
        MatRef::F32(&wte),
        &mut logits,
        false,
    );
    let mut loss_ref = vec![0f32; n];
    Cpu.softmax_xent_forward(&mut logits, &mut loss_ref, &targets);
    Cpu.softmax_xent_backward(&mut logits, &targets, 1.0 / n as f32);
    let dlogits_ref = logits;
    let tol = 2.0 * v as f32 * 2f32.powi(-24) * 4.0;
    for t in [2, 4] {
        let out = run_ranks(t, |comm| -> Result<_, CommError> {
            let vr = even_part("vocabulary", v, t, comm.rank()).unwrap();
            // the model's vocabulary-parallel lookup (f̄ included), on this rank's rows
            let wte_t = &wte[vr.start * c..vr.end * c];
            let row = |i: usize, o: &mut [f32]| o.copy_from_slice(&wte_t[i * c..(i + 1) * c]);
            let mut e = vec![0f32; n * c];
            embed_forward(comm, &mut e, &tokens, vr.clone(), &row, None, 1, c, None)?;
            let mut lg = vec![0f32; n * vr.len()];
            Cpu.gemm(
                fp8lm_kernels::GemmShape::new(n, vr.len(), c).trans_b(),
                MatRef::F32(&x),
                MatRef::F32(wte_t),
                &mut lg,
                false,
            );
            let mut losses = vec![0f32; n];
            vocab_parallel_cross_entropy(
                comm,
                &mut lg,
                vr.clone(),
                &targets,
                &mut losses,
                1.0 / n as f32,
            )?;
            Ok((e, losses, lg, vr))
        })
        .unwrap();
        for (r, (e, losses, dlg, vr)) in out.iter().enumerate() {
            assert_eq!(e, &emb_ref, "T={t} rank {r}: embeddings");
            let el = rel_err(losses, &loss_ref);
            assert!(el <= tol, "T={t} rank {r}: loss relative error {el:.2e}");
            let want: Vec<f32> = (0..n)
                .flat_map(|i| dlogits_ref[i * v + vr.start..i * v + vr.end].to_vec())
                .collect();
            let eg = rel_err(dlg, &want);
            assert!(eg <= tol, "T={t} rank {r}: dlogits relative error {eg:.2e}");
        }
    }
}
