//! Every op of the fast `Cpu` backend against the scalar `Reference` oracle, on the
//! shapes the model uses (the tiny test model: rows B*T = 64, C = 64, 3C, 4C, V = 64;
//! and one GPT-2-124M-wide layer, C = 768 -> 4C, where the GEMM blocking and the matrix
//! units take their multi-block paths).
//!
//! Tolerances (u = 2^-24, f32's unit roundoff):
//! - GEMM: both backends accumulate the same products in f32 (FP8 and bf16 products are
//!   exact in f32, and with power-of-two scales so is the descale), in different orders;
//!   each is within gamma_k * sum_p |a_ip b_pj| of the exact value (gamma_k = k u /
//!   (1 - k u)), so they differ by at most 2 gamma_k sum |a||b| per element, computed
//!   per element here in f64.
//! - Casts, amax, FP8 / FP16 decodes: bit-identical (both are the fp8 crate's bit-exact
//!   casts, the bulk SIMD ones exhaustively tested against the scalar one).
//! - Sums of squares (f64): n * 2^-53 relative.
//! - Layer ops: Cpu evaluates in f32, Reference in f64 then rounds once. An op whose
//!   longest reduction has k terms is within (k + c0) u of the exact value relative to
//!   the magnitude of its terms (c0 = 16 covers the fixed number of roundings of the
//!   per-element arithmetic: norm, exp / tanh, products); the test bounds the largest
//!   difference by (k + 16) u times the largest term magnitude it checks against.

use fp8lm_fp8::{cast, Fp8Format};
use fp8lm_kernels::layers::attention::rope_table;
use fp8lm_kernels::{Backend, Cpu, GemmOps, GemmShape, MatRef, Reference};
use half::{bf16, f16};

const U: f64 = 1.0 / (1u64 << 24) as f64;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
    fn tokens(&mut self, n: usize, v: usize) -> Vec<u32> {
        (0..n)
            .map(|_| ((self.next() + 1.0) * 0.5 * v as f32) as u32 % v as u32)
            .collect()
    }
}

// ---------------------------------------------------------------- GEMM

/// An operand in `fmt` ("f32", "bf16", "e4m3", "e5m2") with a power-of-two scale.
enum Op {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    Fp8(Vec<u8>, Fp8Format, f32),
}

impl Op {
    fn new(fmt: &str, x: &[f32]) -> Op {
        match fmt {
            "f32" => Op::F32(x.to_vec()),
            "bf16" => Op::Bf16(x.iter().map(|&v| bf16::from_f32(v)).collect()),
            _ => {
                let f = if fmt == "e4m3" {
                    Fp8Format::E4M3
                } else {
                    Fp8Format::E5M2
                };
                let scale = 64.0; // power of two: descale exact
                let mut d = vec![0u8; x.len()];
                cast::par_f32_to_fp8_counted(f, x, scale, &mut d);
                Op::Fp8(d, f, scale)
            }
        }
    }
    fn mat(&self) -> MatRef<'_> {
        match self {
            Op::F32(v) => MatRef::F32(v),
            Op::Bf16(v) => MatRef::Bf16(v),
            Op::Fp8(d, f, s) => MatRef::Fp8 {
                data: d,
                format: *f,
                scale: *s,
            },
        }
    }
}

/// `sum_p |a_ip b_pj|` per output, in f64.
fn abs_products(s: GemmShape, a: &MatRef<'_>, b: &MatRef<'_>) -> Vec<f64> {
    let mut out = vec![0f64; s.m * s.n];
    for i in 0..s.m {
        for p in 0..s.k {
            let av = a
                .get(if s.trans_a { p * s.m + i } else { i * s.k + p })
                .abs() as f64;
            for j in 0..s.n {
                let bv = b
                    .get(if s.trans_b { j * s.k + p } else { p * s.n + j })
                    .abs() as f64;
                out[i * s.n + j] += av * bv;
            }
        }
    }
    out
}

/// Largest `|cpu - ref| / (2 gamma_k sum|a||b|)` (<= 1 passes).
fn gemm_excess(s: GemmShape, a: &MatRef<'_>, b: &MatRef<'_>, cpu: &[f32], rf: &[f32]) -> f64 {
    let k = s.k as f64;
    let gamma = k * U / (1.0 - k * U);
    let ab = abs_products(s, a, b);
    cpu.iter()
        .zip(rf)
        .zip(&ab)
        .map(|((&x, &y), &t)| {
            (x as f64 - y as f64).abs() / (2.0 * gamma * t).max(f64::MIN_POSITIVE)
        })
        .fold(0f64, f64::max)
}

/// The three GEMMs of a linear `rows x c -> oc` (forward, dinp, dW).
fn linear_shapes(rows: usize, c: usize, oc: usize) -> [GemmShape; 3] {
    [
        GemmShape::new(rows, oc, c).trans_b(),
        GemmShape::new(rows, c, oc),
        GemmShape::new(oc, c, rows).trans_a(),
    ]
}

#[test]
fn gemm_matches_reference_on_model_shapes() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let layers = [
        (64, 64, 192),
        (64, 64, 256),
        (64, 256, 64),
        (64, 64, 64),
        (128, 768, 3072),
    ];
    for (rows, c, oc) in layers {
        for s in linear_shapes(rows, c, oc) {
            for (fa, fb) in [
                ("f32", "f32"),
                ("bf16", "bf16"),
                ("e4m3", "e4m3"),
                ("e5m2", "e4m3"),
            ] {
                if rows == 128 && fa == "f32" {
                    continue; // the wide layer only for the matrix-unit paths
                }
                let a = Op::new(fa, &rng.vec(s.m * s.k, 1.0));
                let b = Op::new(fb, &rng.vec(s.k * s.n, 1.0));
                let (am, bm) = (a.mat(), b.mat());
                for acc in [false, true] {
                    let init = rng.vec(s.m * s.n, 1.0);
                    let (mut cpu, mut rf) = (init.clone(), init);
                    Cpu.gemm(s, am, bm, &mut cpu, acc);
                    Reference.gemm(s, am, bm, &mut rf, acc);
                    // (with `acc`, one more f32 add on each side: inside the bound, whose
                    // terms are >= the old value's share here)
                    let e = gemm_excess(s, &am, &bm, &cpu, &rf);
                    assert!(e <= 1.0, "{s:?} {fa}x{fb} acc={acc}: {e:.2} x the bound");
                }
            }
        }
    }
}

/// The GEMM bound is tight enough to see a transposed operand and a wrong scale.
#[test]
fn gemm_bound_sees_a_transposed_operand_and_a_wrong_scale() {
    let mut rng = Rng(7);
    let (m, n, k) = (64, 64, 64);
    let a = Op::new("e4m3", &rng.vec(m * k, 1.0));
    let b = Op::new("e4m3", &rng.vec(k * n, 1.0));
    let s = GemmShape::new(m, n, k);
    let mut cpu = vec![0f32; m * n];
    Cpu.gemm(s, a.mat(), b.mat(), &mut cpu, false);
    // B read as if stored transposed (square, so the lengths still match)
    let mut rf = vec![0f32; m * n];
    Reference.gemm(s.trans_b(), a.mat(), b.mat(), &mut rf, false);
    assert!(gemm_excess(s, &a.mat(), &b.mat(), &cpu, &rf) > 100.0);
    // B's scale off by one binade
    let Op::Fp8(d, f, sc) = &b else {
        unreachable!()
    };
    let wrong = MatRef::Fp8 {
        data: d,
        format: *f,
        scale: sc * 2.0,
    };
    Reference.gemm(s, a.mat(), wrong, &mut rf, false);
    assert!(gemm_excess(s, &a.mat(), &b.mat(), &cpu, &rf) > 100.0);
}

#[test]
fn gemm_low_precision_outputs_match_reference() {
    let mut rng = Rng(99);
    let s = GemmShape::new(64, 192, 64).trans_b();
    let a = Op::new("e4m3", &rng.vec(s.m * s.k, 1.0));
    let b = Op::new("e4m3", &rng.vec(s.k * s.n, 1.0));
    // FP8 out: the amax of the f32 result within the GEMM bound; codes within one FP8
    // ulp (a rounding boundary may fall between the two f32 results).
    let (mut oc, mut or) = (vec![0u8; s.m * s.n], vec![0u8; s.m * s.n]);
    let ac = Cpu.gemm_fp8_out(s, a.mat(), b.mat(), &mut oc, Fp8Format::E4M3, 8.0);
    let ar = Reference.gemm_fp8_out(s, a.mat(), b.mat(), &mut or, Fp8Format::E4M3, 8.0);
    // inputs at most ~1 times 8: nothing saturates; the counts agree exactly
    assert_eq!(ac.counts.saturated, 0);
    assert_eq!(ac.counts.saturated, ar.counts.saturated);
    let (ac, ar) = (ac.amax, ar.amax);
    assert!(((ac - ar) / ar).abs() < 1e-4, "amax {ac} vs {ar}");
    for (&x, &y) in oc.iter().zip(&or) {
        assert!(
            (x as i32 - y as i32).abs() <= 1 && (x ^ y) & 0x80 == 0,
            "{x:#x} vs {y:#x}"
        );
    }
    let (mut bc, mut br) = (vec![bf16::ZERO; s.m * s.n], vec![bf16::ZERO; s.m * s.n]);
    Cpu.gemm_bf16_out(s, a.mat(), b.mat(), &mut bc, false);
    Reference.gemm_bf16_out(s, a.mat(), b.mat(), &mut br, false);
    for (&x, &y) in bc.iter().zip(&br) {
        assert!(
            (x.to_bits() as i32 - y.to_bits() as i32).abs() <= 1,
            "{x} vs {y}"
        );
    }
}

// ---------------------------------------------------------------- casts and reductions

/// Values that exercise every branch of a cast: normal, tiny (flush), huge
/// (saturate), zeros of both signs, inf, NaN.
fn cast_inputs(rng: &mut Rng, n: usize) -> Vec<f32> {
    let mut v = rng.vec(n, 4.0);
    for (i, x) in v.iter_mut().enumerate() {
        match i % 97 {
            0 => *x = 0.0,
            1 => *x = -0.0,
            2 => *x *= 1e-9,
            3 => *x *= 1e6,
            4 => *x = f32::INFINITY,
            _ => {}
        }
    }
    v
}

#[test]
fn casts_and_amax_are_bit_identical() {
    let mut rng = Rng(3);
    for n in [64 * 64, 64 * 192, 100_003] {
        let v = cast_inputs(&mut rng, n);
        assert_eq!(Cpu.amax_f32(&v).to_bits(), Reference.amax_f32(&v).to_bits());
        let finite: Vec<f32> = v
            .iter()
            .map(|x| if x.is_finite() { *x } else { 1.0 })
            .collect();
        assert_eq!(Cpu.amax_f32(&finite), Reference.amax_f32(&finite));
        for fmt in [Fp8Format::E4M3, Fp8Format::E5M2] {
            for scale in [1.0f32, 32.0, 0.25] {
                let (mut dc, mut dr) = (vec![0u8; n], vec![0u8; n]);
                let rc = Cpu.cast_fp8(fmt, &v, scale, &mut dc);
                let rr = Reference.cast_fp8(fmt, &v, scale, &mut dr);
                assert_eq!(dc, dr, "{fmt:?} scale {scale}: codes");
                assert_eq!(rc.amax.to_bits(), rr.amax.to_bits());
                assert_eq!(rc.counts, rr.counts, "{fmt:?} scale {scale}: counts");
                assert!(rr.counts.saturated > 0 && rr.counts.flushed > 0);
                // decode + add
                let base = rng.vec(n, 1.0);
                let (mut ac, mut ar) = (base.clone(), base);
                Cpu.add_decoded_fp8(&mut ac, &dc, fmt, scale);
                Reference.add_decoded_fp8(&mut ar, &dc, fmt, scale);
                let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&ac), bits(&ar), "{fmt:?}: add_decoded_fp8");
                // sums of squares over finite codes
                let fin: Vec<u8> = dc
                    .iter()
                    .map(|&b| if fmt.decode(b).is_finite() { b } else { 0 })
                    .collect();
                let (sc, sr) = (
                    Cpu.sum_squares_fp8(&fin, fmt),
                    Reference.sum_squares_fp8(&fin, fmt),
                );
                assert!(
                    ((sc - sr) / sr).abs() <= n as f64 * 2f64.powi(-53),
                    "{sc} vs {sr}"
                );
            }
        }
        let (mut bc, mut br) = (vec![bf16::ZERO; n], vec![bf16::ZERO; n]);
        Cpu.cast_bf16(&v, &mut bc);
        Reference.cast_bf16(&v, &mut br);
        assert!(bc.iter().zip(&br).all(|(x, y)| x.to_bits() == y.to_bits()));
        let (sc, sr) = (
            Cpu.sum_squares_f32(&finite),
            Reference.sum_squares_f32(&finite),
        );
        assert!(
            ((sc - sr) / sr).abs() <= n as f64 * 2f64.powi(-53),
            "{sc} vs {sr}"
        );
    }
}

#[test]
fn fp16_embedding_lookup_is_bit_identical() {
    let mut rng = Rng(5);
    let (v, c, b, t) = (64, 64, 4, 16);
    let wte: Vec<f16> = rng
        .vec(v * c, 1.0)
        .iter()
        .map(|&x| f16::from_f32(x))
        .collect();
    let wpe = rng.vec(t * c, 1.0);
    let tokens = rng.tokens(b * t, v);
    let (mut oc, mut or) = (vec![0f32; b * t * c], vec![0f32; b * t * c]);
    Cpu.encoder_forward_f16(&mut oc, &tokens, &wte, 4.0, Some(&wpe), t, c);
    Reference.encoder_forward_f16(&mut or, &tokens, &wte, 4.0, Some(&wpe), t, c);
    assert_eq!(oc, or);
}

// ---------------------------------------------------------------- layer ops

/// `max |cpu - ref| <= (k + 16) u * mag` (see the module docs).
fn close(what: &str, cpu: &[f32], rf: &[f32], k: usize, mag: f64) {
    assert_eq!(cpu.len(), rf.len());
    let d = cpu
        .iter()
        .zip(rf)
        .map(|(&x, &y)| (x as f64 - y as f64).abs())
        .fold(0f64, f64::max);
    let tol = (k + 16) as f64 * U * mag;
    eprintln!("{what}: {:.3} of the bound", d / tol);
    assert!(
        d <= tol,
        "{what}: max difference {d:e} > {tol:e} (k = {k}, magnitude {mag:e})"
    );
}

fn max_abs(x: &[f32]) -> f64 {
    x.iter().fold(0f64, |m, &v| m.max(v.abs() as f64))
}

/// Run `op` on both backends from the same starting buffers and compare every output.
macro_rules! both {
    ($outs:expr, |$be:ident, $o:ident| $body:expr) => {{
        let init = $outs;
        let mut c = init.clone();
        let mut r = init;
        {
            let $be: &dyn Backend = &Cpu;
            let $o = &mut c;
            $body;
        }
        {
            let $be: &dyn Backend = &Reference;
            let $o = &mut r;
            $body;
        }
        (c, r)
    }};
}

#[test]
fn layer_ops_match_reference_on_model_shapes() {
    let mut rng = Rng(11);
    let (b, t, c, nh, v) = (4usize, 16usize, 64usize, 4usize, 64usize);
    let n = b * t;
    let x = rng.vec(n * c, 2.0);
    let dy = rng.vec(n * c, 1.0);
    let w = rng.vec(c, 1.0);
    let bias = rng.vec(c, 0.5);
    let mag = |v: &[f32]| max_abs(v).max(1.0);

    // encoder
    let wte = rng.vec(v * c, 1.0);
    let wpe = rng.vec(t * c, 1.0);
    let tokens = rng.tokens(n, v);
    let (oc, or) = both!(vec![0f32; n * c], |be, o| be.encoder_forward(
        o,
        &tokens,
        &wte,
        Some(&wpe),
        t,
        c
    ));
    close("encoder_forward", &oc, &or, 1, mag(&or));
    let init = (rng.vec(v * c, 0.1), rng.vec(t * c, 0.1));
    let (gc, gr) = both!(init, |be, o| be.encoder_backward(
        &mut o.0,
        Some(&mut o.1),
        &dy,
        &tokens,
        t,
        c
    ));
    close(
        "encoder_backward dwte",
        &gc.0,
        &gr.0,
        n,
        mag(&gr.0) + mag(&dy),
    );
    close(
        "encoder_backward dwpe",
        &gc.1,
        &gr.1,
        n,
        mag(&gr.1) + b as f64 * mag(&dy),
    );

    // layernorm / rmsnorm
    let bufs = (vec![0f32; n * c], vec![0f32; n], vec![0f32; n]);
    let (lc, lr) = both!(bufs, |be, o| be
        .layernorm_forward(&mut o.0, &mut o.1, &mut o.2, &x, &w, &bias));
    close("layernorm out", &lc.0, &lr.0, c, 8.0 * mag(&lr.0));
    close("layernorm mean", &lc.1, &lr.1, c, mag(&x));
    close("layernorm rstd", &lc.2, &lr.2, c, mag(&lr.2));
    let (mean, rstd) = (lr.1.clone(), lr.2.clone());
    let g = (rng.vec(n * c, 0.1), vec![0f32; c], vec![0f32; c]);
    let (gc, gr) = both!(g, |be, o| be
        .layernorm_backward(&mut o.0, &mut o.1, &mut o.2, &dy, &x, &w, &mean, &rstd));
    let dmag = mag(&dy) * mag(&w) * mag(&rstd);
    close("layernorm dinp", &gc.0, &gr.0, c, 8.0 * dmag);
    close("layernorm dw", &gc.1, &gr.1, n, n as f64 * mag(&dy) * 8.0);
    close("layernorm db", &gc.2, &gr.2, n, n as f64 * mag(&dy));
    let (rc, rr) = both!((vec![0f32; n * c], vec![0f32; n]), |be, o| be
        .rmsnorm_forward(&mut o.0, &mut o.1, &x, &w));
    close("rmsnorm out", &rc.0, &rr.0, c, 8.0 * mag(&rr.0));
    close("rmsnorm rstd", &rc.1, &rr.1, c, mag(&rr.1));
    let rstd = rr.1.clone();
    let g = (rng.vec(n * c, 0.1), vec![0f32; c]);
    let (gc, gr) = both!(g, |be, o| be
        .rmsnorm_backward(&mut o.0, &mut o.1, &dy, &x, &w, &rstd));
    close(
        "rmsnorm dinp",
        &gc.0,
        &gr.0,
        c,
        8.0 * mag(&dy) * mag(&w) * mag(&rstd),
    );
    close("rmsnorm dw", &gc.1, &gr.1, n, n as f64 * mag(&dy) * 8.0);

    // activations, bias, residual
    let h = rng.vec(n * 4 * c, 3.0);
    let dh = rng.vec(n * 4 * c, 1.0);
    let (ac, ar) = both!(vec![0f32; n * 4 * c], |be, o| be.gelu_forward(o, &h));
    close("gelu_forward", &ac, &ar, 1, mag(&h));
    let (ac, ar) = both!(vec![0f32; n * 4 * c], |be, o| be.gelu_backward(o, &h, &dh));
    close("gelu_backward", &ac, &ar, 1, 2.0 * mag(&dh));
    let f = 2 * c;
    let (sc, sr) = both!(vec![0f32; n * f], |be, o| be.swiglu_forward(
        o,
        &h[..n * 2 * f],
        f
    ));
    close("swiglu_forward", &sc, &sr, 1, mag(&h) * mag(&h));
    let (sc, sr) = both!(vec![0f32; n * 2 * f], |be, o| be.swiglu_backward(
        o,
        &h[..n * 2 * f],
        &dh[..n * f],
        f
    ));
    close("swiglu_backward", &sc, &sr, 1, 2.0 * mag(&h) * mag(&dh));
    let (bc, br) = both!(x.clone(), |be, o| be.bias_forward(o, &bias));
    close("bias_forward", &bc, &br, 1, mag(&br));
    let (bc, br) = both!(rng.vec(c, 1.0), |be, o| be.bias_backward(o, &dy));
    close("bias_backward", &bc, &br, n, n as f64 * mag(&dy));
    let (rc, rr) = both!(vec![0f32; n * c], |be, o| be.residual_forward(o, &x, &dy));
    close("residual_forward", &rc, &rr, 1, mag(&rr));
    let (rc, rr) = both!(x.clone(), |be, o| be.add_inplace(o, &dy));
    close("add_inplace", &rc, &rr, 1, mag(&rr));

    // rope, attention
    let hs = c / nh;
    let table = rope_table::<f32>(t, hs, 10000.0);
    let qkv = rng.vec(n * 3 * c, 1.0);
    let (qc, qr) = both!(qkv.clone(), |be, o| be.rope_forward(o, &table, t, c, nh));
    close("rope_forward", &qc, &qr, 2, mag(&qkv));
    let (qc, qr) = both!(qkv.clone(), |be, o| be.rope_backward(o, &table, t, c, nh));
    close("rope_backward", &qc, &qr, 2, mag(&qkv));
    let bufs = (vec![0f32; n * c], vec![0f32; b * nh * t * t]);
    let (oc, or) = both!(bufs, |be, o| be
        .attention_forward(&mut o.0, &mut o.1, &qkv, t, c, nh));
    // scores: hs-term dot products; out: t-term weighted sums of v
    close("attention out", &oc.0, &or.0, hs + t, 4.0 * mag(&qkv));
    close(
        "attention probs",
        &oc.1,
        &or.1,
        hs + t,
        4.0 * mag(&qkv) * mag(&qkv),
    );
    let att = or.1.clone();
    let (dc, dr) = both!(vec![0f32; n * 3 * c], |be, o| be
        .attention_backward(o, &dy, &qkv, &att, t, c, nh));
    close(
        "attention dqkv",
        &dc,
        &dr,
        hs + t,
        8.0 * t as f64 * mag(&dy) * mag(&qkv),
    );

    // loss
    let logits = rng.vec(n * v, 4.0);
    let targets = rng.tokens(n, v);
    let (pc, pr) = both!((logits.clone(), vec![0f32; n]), |be, o| be
        .softmax_xent_forward(&mut o.0, &mut o.1, &targets));
    close("softmax probs", &pc.0, &pr.0, v, 8.0);
    close("xent losses", &pc.1, &pr.1, v, 8.0 * mag(&pr.1));
    let probs = pr.0.clone();
    let (pc, pr) = both!(probs, |be, o| be.softmax_xent_backward(
        o,
        &targets,
        1.0 / n as f32
    ));
    close("softmax_xent_backward", &pc, &pr, 1, 1.0 / n as f64);
}
