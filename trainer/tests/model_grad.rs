//! Whole-model gradient against central finite differences.
//!
//! The model runs in f32 (its GEMMs are f32-only), so element-wise differences would
//! drown in rounding. Instead, for each parameter tensor we take the direction
//! `u = g / |g|` of its analytic gradient `g` and compare the directional derivative
//! `|g| = g . u` with the central difference `(L(w + eps u) - L(w - eps u)) / 2 eps`.
//! With eps = 1e-2 and the loss (~3.5) averaged in f64, rounding noise is ~1e-4 and the
//! curvature term ~eps^2; a wrong gradient (a missing term, wrong scale or wrong
//! direction) moves the ratio by far more than the 2% tolerance. The per-layer backward
//! passes are checked element-wise in f64 in `fp8lm_kernels::layers`.

#![allow(clippy::field_reassign_with_default)] // configs read best as default + overrides

use fp8lm_trainer::model::{Dims, LinearPrecision, Model};
use fp8lm_trainer::rng::Rng;
use fp8lm_trainer::{Arch, RunConfig};

fn tiny(arch: Arch) -> (Model, Vec<u32>, Vec<u32>) {
    let mut cfg = RunConfig::default();
    cfg.model.arch = arch;
    cfg.model.layers = 2;
    cfg.model.heads = 2;
    cfg.model.channels = 16;
    cfg.model.context = 8;
    cfg.batch = 2;
    let d = Dims::from_config(&cfg, 23).unwrap();
    let mut m = Model::new(d, LinearPrecision::Fp32, 5);
    // Larger-than-init weights so every path carries signal.
    let mut rng = Rng::new(9);
    for x in m.params.iter_mut() {
        *x += 0.1 * rng.normal();
    }
    let n = d.b * d.t;
    let inp: Vec<u32> = (0..n).map(|_| rng.below(d.v) as u32).collect();
    let tgt: Vec<u32> = (0..n).map(|_| rng.below(d.v) as u32).collect();
    (m, inp, tgt)
}

fn check(arch: Arch) {
    let (mut m, inp, tgt) = tiny(arch);
    let (b, t) = (m.dims.b, m.dims.t);
    m.forward(&inp, Some(&tgt), b, t, true).unwrap();
    m.backward();
    let grads = m.grads.clone();
    let w0 = m.params.clone();
    let eps = 1e-2f64;
    for i in 0..m.layout.metas.len() {
        let r = m.layout.range(i);
        let g = &grads[r.clone()];
        let gn = g.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let name = m.layout.metas[i].name.clone();
        assert!(gn > 1e-6, "{name}: gradient is zero");
        let mut at = |s: f64| {
            m.params.copy_from_slice(&w0);
            for (p, &gi) in m.params[r.clone()].iter_mut().zip(g) {
                *p += (s * gi as f64 / gn) as f32;
            }
            m.forward(&inp, Some(&tgt), b, t, false).unwrap() as f64
        };
        let num = (at(eps) - at(-eps)) / (2.0 * eps);
        let rel = (num - gn).abs() / gn;
        assert!(
            rel < 0.02,
            "{arch:?} {name}: |g| = {gn:.6e}, finite difference {num:.6e} (rel err {rel:.3e})"
        );
    }
}

#[test]
fn gpt2_gradient_matches_finite_differences() {
    check(Arch::Gpt2);
}

#[test]
fn llama_gradient_matches_finite_differences() {
    check(Arch::Llama);
}
