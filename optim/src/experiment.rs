//! Small convex problems for optimizer numerics: tests and ablation examples share them.
//!
//! Least squares `L(x) = 0.5/n ||A x - b||^2` with `b = A x* + noise`: convex, with a
//! known noise floor, so "reaches the same loss" is a meaningful comparison between
//! optimizers. Column scales can span several decades, which gives the gradients (and
//! the second moment, their square) a wide dynamic range: the regime where a
//! low-precision second moment underflows.

use crate::api::{Grad, Optimizer, ParamMeta};
use fp8lm_fp8::{Fp8Format, ScaledFp8};

/// `A` (n x d, row-major), `b` (n).
pub struct LeastSquares {
    pub n: usize,
    pub d: usize,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

/// xorshift64* uniform in [0, 1) and a Box-Muller normal; deterministic per seed.
struct Rng(u64);
impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
}

impl LeastSquares {
    /// Column j of A is scaled by `10^(-decades * j / d)`, so the gradient's entries
    /// span about `decades` decades and the second moment's twice that; the solution's
    /// entries are O(1).
    pub fn new(n: usize, d: usize, decades: f32, noise: f32, seed: u64) -> Self {
        let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let col: Vec<f32> = (0..d)
            .map(|j| 10f32.powf(-decades * j as f32 / d as f32))
            .collect();
        let a: Vec<f32> = (0..n * d).map(|i| r.normal() * col[i % d]).collect();
        let x_star: Vec<f32> = (0..d).map(|_| r.normal()).collect();
        let b = (0..n)
            .map(|i| dot(&a[i * d..(i + 1) * d], &x_star) + noise * r.normal())
            .collect();
        LeastSquares { n, d, a, b }
    }

    /// Loss and gradient at `x` (gradient written to `g`).
    pub fn loss_grad(&self, x: &[f32], g: &mut [f32]) -> f32 {
        g.fill(0.0);
        let mut loss = 0f64;
        for i in 0..self.n {
            let row = &self.a[i * self.d..(i + 1) * self.d];
            let r = dot(row, x) - self.b[i];
            loss += 0.5 * (r as f64) * (r as f64);
            for (gj, &aj) in g.iter_mut().zip(row) {
                *gj += r * aj;
            }
        }
        let inv_n = 1.0 / self.n as f32;
        g.iter_mut().for_each(|v| *v *= inv_n);
        (loss / self.n as f64) as f32
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// How the gradient reaches the optimizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradPath {
    F32,
    /// Quantised with current scaling to this format (as the FP8 backward leaves it).
    Fp8(Fp8Format),
}

/// Builds an optimizer for the given parameter descriptions; may rewrite the initial
/// parameters (the FP8 optimizer sets them to its master's f32 view).
pub type MakeOptimizer<'a> = dyn Fn(&[ParamMeta], &mut [&mut [f32]]) -> Box<dyn Optimizer> + 'a;

/// Train `x` (one tensor, no weight decay) from zero for `steps` steps with a cosine
/// schedule from `lr` to `lr / 100`; returns the loss at the final point.
pub fn run_least_squares(
    prob: &LeastSquares,
    make: &MakeOptimizer,
    steps: usize,
    lr: f32,
    grad_path: GradPath,
) -> f32 {
    let meta = ParamMeta {
        name: "x".into(),
        shape: vec![prob.d],
        weight_decay: false,
    };
    let mut x = vec![0f32; prob.d];
    let mut opt = make(std::slice::from_ref(&meta), &mut [x.as_mut_slice()]);
    let mut g = vec![0f32; prob.d];
    for t in 0..steps {
        prob.loss_grad(&x, &mut g);
        let cos = 0.5 * (1.0 + (std::f32::consts::PI * t as f32 / steps as f32).cos());
        let lr_t = lr * (0.01 + 0.99 * cos);
        match grad_path {
            GradPath::F32 => opt.step(&mut [x.as_mut_slice()], &[Grad::F32(&g)], lr_t, 1.0),
            GradPath::Fp8(f) => {
                let (q, _) = ScaledFp8::quantize_current(&g, &[prob.d], f, 0);
                opt.step(&mut [x.as_mut_slice()], &[Grad::Fp8(&q)], lr_t, 1.0)
            }
        }
    }
    prob.loss_grad(&x, &mut g)
}
