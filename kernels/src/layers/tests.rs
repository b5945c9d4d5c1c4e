//! Every backward checked against central finite differences, in f64 (the layer functions
//! are generic over [`Real`]). Objective: `L = sum(out * r)` for a fixed random `r`, so
//! `dout = r`. With eps = 1e-5 in f64 the difference quotient is accurate to ~1e-9, so
//! the tolerance (1e-7 absolute + 1e-6 relative) fails on any wrong term.

use super::*;

struct Lcg(u64);
impl Lcg {
    fn vec(&mut self, n: usize, scale: f64) -> Vec<f64> {
        (0..n)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (((self.0 >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0) * scale
            })
            .collect()
    }
}

fn dotf(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Compare `analytic` with the central difference of `f` at `x`.
fn fd_check(what: &str, x: &[f64], analytic: &[f64], f: impl Fn(&[f64]) -> f64) {
    assert_eq!(x.len(), analytic.len());
    let eps = 1e-5;
    let mut xp = x.to_vec();
    for i in 0..x.len() {
        xp[i] = x[i] + eps;
        let fp = f(&xp);
        xp[i] = x[i] - eps;
        let fm = f(&xp);
        xp[i] = x[i];
        let num = (fp - fm) / (2.0 * eps);
        let err = (num - analytic[i]).abs();
        assert!(
            err <= 1e-7 + 1e-6 * num.abs(),
            "{what}[{i}]: analytic {} vs numeric {num}",
            analytic[i]
        );
    }
}

#[test]
fn layernorm_backward_matches_fd() {
    let (n, c) = (5, 7);
    let mut g = Lcg(1);
    let (inp, w, b, r) = (
        g.vec(n * c, 2.0),
        g.vec(c, 1.5),
        g.vec(c, 0.5),
        g.vec(n * c, 1.0),
    );
    let fwd = |inp: &[f64], w: &[f64], b: &[f64]| {
        let (mut out, mut m, mut s) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        norm::layernorm_forward(&mut out, &mut m, &mut s, inp, w, b);
        (out, m, s)
    };
    let (_, m, s) = fwd(&inp, &w, &b);
    let (mut dinp, mut dw, mut db) = (vec![0.0; n * c], vec![0.0; c], vec![0.0; c]);
    norm::layernorm_backward(&mut dinp, &mut dw, &mut db, &r, &inp, &w, &m, &s);
    fd_check("dinp", &inp, &dinp, |x| dotf(&fwd(x, &w, &b).0, &r));
    fd_check("dw", &w, &dw, |x| dotf(&fwd(&inp, x, &b).0, &r));
    fd_check("db", &b, &db, |x| dotf(&fwd(&inp, &w, x).0, &r));
}

#[test]
fn rmsnorm_backward_matches_fd() {
    let (n, c) = (4, 6);
    let mut g = Lcg(2);
    let (inp, w, r) = (g.vec(n * c, 2.0), g.vec(c, 1.5), g.vec(n * c, 1.0));
    let fwd = |inp: &[f64], w: &[f64]| {
        let (mut out, mut s) = (vec![0.0; n * c], vec![0.0; n]);
        norm::rmsnorm_forward(&mut out, &mut s, inp, w);
        (out, s)
    };
    let (_, s) = fwd(&inp, &w);
    let (mut dinp, mut dw) = (vec![0.0; n * c], vec![0.0; c]);
    norm::rmsnorm_backward(&mut dinp, &mut dw, &r, &inp, &w, &s);
    fd_check("dinp", &inp, &dinp, |x| dotf(&fwd(x, &w).0, &r));
    fd_check("dw", &w, &dw, |x| dotf(&fwd(&inp, x).0, &r));
}

#[test]
fn gelu_and_swiglu_backward_match_fd() {
    let mut g = Lcg(3);
    let (inp, r) = (g.vec(40, 3.0), g.vec(40, 1.0));
    let gelu = |x: &[f64]| {
        let mut o = vec![0.0; x.len()];
        act::gelu_forward(&mut o, x);
        dotf(&o, &r)
    };
    let mut d = vec![0.0; 40];
    act::gelu_backward(&mut d, &inp, &r);
    fd_check("gelu", &inp, &d, gelu);

    let (n, f) = (3, 5);
    let (inp, r) = (g.vec(n * 2 * f, 3.0), g.vec(n * f, 1.0));
    let sw = |x: &[f64]| {
        let mut o = vec![0.0; n * f];
        act::swiglu_forward(&mut o, x, f);
        dotf(&o, &r)
    };
    let mut d = vec![0.0; n * 2 * f];
    act::swiglu_backward(&mut d, &inp, &r, f);
    fd_check("swiglu", &inp, &d, sw);
}

#[test]
fn bias_and_residual_match_fd() {
    let (n, oc) = (37, 70); // crosses a COL_BLOCK boundary
    let mut g = Lcg(4);
    let (x, bias, r) = (g.vec(n * oc, 1.0), g.vec(oc, 1.0), g.vec(n * oc, 1.0));
    let f = |b: &[f64]| {
        let mut o = x.clone();
        act::bias_forward(&mut o, b);
        dotf(&o, &r)
    };
    let mut db = vec![0.0; oc];
    act::bias_backward(&mut db, &r);
    fd_check("dbias", &bias, &db, f);
    let mut o = vec![0.0; n * oc];
    act::residual_forward(&mut o, &x, &r);
    act::add_inplace(&mut o, &x);
    for i in 0..o.len() {
        assert_eq!(o[i], (x[i] + r[i]) + x[i]);
    }
}

#[test]
fn attention_backward_matches_fd() {
    let (b, t, c, nh) = (2, 5, 8, 2);
    let mut g = Lcg(5);
    let (qkv, r) = (g.vec(b * t * 3 * c, 1.5), g.vec(b * t * c, 1.0));
    let fwd = |qkv: &[f64]| {
        let (mut out, mut att) = (vec![0.0; b * t * c], vec![0.0; b * nh * t * t]);
        attention::attention_forward(&mut out, &mut att, qkv, t, c, nh);
        (out, att)
    };
    let (_, att) = fwd(&qkv);
    // causal: probabilities above the diagonal are exactly zero, rows sum to one
    for row in 0..b * nh * t {
        let ti = row % t;
        let p = &att[row * t..(row + 1) * t];
        assert!(p[ti + 1..].iter().all(|&x| x == 0.0));
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }
    let mut dqkv = vec![7.0; qkv.len()]; // overwritten, not accumulated
    attention::attention_backward(&mut dqkv, &r, &qkv, &att, t, c, nh);
    fd_check("dqkv", &qkv, &dqkv, |x| dotf(&fwd(x).0, &r));
}

#[test]
fn rope_backward_matches_fd_and_preserves_norm() {
    let (b, t, c, nh) = (2, 4, 8, 2);
    let mut g = Lcg(6);
    let (qkv, r) = (g.vec(b * t * 3 * c, 1.0), g.vec(b * t * 3 * c, 1.0));
    let tab = attention::rope_table::<f64>(t, c / nh, 10000.0);
    let fwd = |x: &[f64]| {
        let mut y = x.to_vec();
        attention::rope_forward(&mut y, &tab, t, c, nh);
        y
    };
    let y = fwd(&qkv);
    assert!(
        (dotf(&y, &y) - dotf(&qkv, &qkv)).abs() < 1e-10,
        "rotation changed the norm"
    );
    assert_eq!(&y[..c / nh], &qkv[..c / nh], "position 0 must be unrotated");
    let mut d = r.clone();
    attention::rope_backward(&mut d, &tab, t, c, nh);
    fd_check("rope", &qkv, &d, |x| dotf(&fwd(x), &r));
}

#[test]
fn softmax_xent_backward_matches_fd() {
    let (n, v) = (4, 9);
    let mut g = Lcg(7);
    let logits = g.vec(n * v, 4.0);
    let targets: Vec<u32> = vec![0, 8, 3, 3];
    let mean_loss = |x: &[f64]| {
        let (mut p, mut l) = (x.to_vec(), vec![0.0; n]);
        loss::softmax_xent_forward(&mut p, &mut l, &targets);
        l.iter().sum::<f64>() / n as f64
    };
    let (mut p, mut l) = (logits.clone(), vec![0.0; n]);
    loss::softmax_xent_forward(&mut p, &mut l, &targets);
    for row in p.chunks(v) {
        assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }
    loss::softmax_xent_backward(&mut p, &targets, 1.0 / n as f64);
    fd_check("dlogits", &logits, &p, mean_loss);
}

#[test]
fn encoder_backward_matches_fd() {
    let (b, t, c, v) = (2, 3, 4, 5);
    let mut g = Lcg(8);
    let (wte, wpe, r) = (g.vec(v * c, 1.0), g.vec(t * c, 1.0), g.vec(b * t * c, 1.0));
    let tokens = [1u32, 4, 1, 0, 2, 4];
    let f = |wte: &[f64], wpe: &[f64]| {
        let mut o = vec![0.0; b * t * c];
        embed::encoder_forward(&mut o, &tokens, wte, Some(wpe), t, c);
        dotf(&o, &r)
    };
    let (mut dwte, mut dwpe) = (vec![0.0; v * c], vec![0.0; t * c]);
    embed::encoder_backward(&mut dwte, Some(&mut dwpe), &r, &tokens, t, c);
    fd_check("dwte", &wte, &dwte, |x| f(x, &wpe));
    fd_check("dwpe", &wpe, &dwpe, |x| f(&wte, x));
}

#[test]
fn f32_ops_through_the_trait_match_f64() {
    // The trait's f32 instantiation against the f64 one: tolerance 1e-5 relative, a few
    // f32 ulps accumulated over rows of 64.
    let (b, t, c, nh) = (2, 16, 64, 4);
    let mut g = Lcg(9);
    let qkv64 = g.vec(b * t * 3 * c, 1.0);
    let qkv32: Vec<f32> = qkv64.iter().map(|&x| x as f32).collect();
    let (mut o64, mut a64) = (vec![0.0; b * t * c], vec![0.0; b * nh * t * t]);
    attention::attention_forward(&mut o64, &mut a64, &qkv64, t, c, nh);
    let (mut o32, mut a32) = (vec![0f32; b * t * c], vec![0f32; b * nh * t * t]);
    Cpu.attention_forward(&mut o32, &mut a32, &qkv32, t, c, nh);
    for (x, y) in o32.iter().zip(&o64) {
        assert!(
            (*x as f64 - y).abs() <= 1e-5 * (1.0 + y.abs()),
            "{x} vs {y}"
        );
    }
}
