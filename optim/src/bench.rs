//! Optimizer step time: fp32 AdamW against the FP8-LM optimizer, per parameter.
//!
//! Both run on the same parameter shapes (GPT-2 124M by default), the fp32 AdamW with
//! f32 gradients (its 16 bytes/parameter), the FP8 optimizer with E5M2 gradients (its 6).
//! Steps alternate between the two so machine contention hits both alike; the figure
//! reported is the median of each. Timing is a benchmark's job, never a unit test's.

use crate::api::{AdamWHyper, Grad, Optimizer, ParamMeta};
use crate::{AdamW, Fp8Adam, Fp8AdamConfig};
use fp8lm_fp8::{Fp8Format, ScaledFp8};
use rayon::prelude::*;
use std::time::Instant;

/// Result of [`optimizer_step`]: median step times.
#[derive(Clone, Debug)]
pub struct OptimBench {
    pub params: usize,
    pub steps: usize,
    pub fp32_step_s: f64,
    pub fp8_step_s: f64,
    pub fp32_state_bytes: usize,
    pub fp8_state_bytes: usize,
    /// Fix-ups of the FP8 optimizer's one-pass scaling during the run.
    pub fp8_rescales: u64,
    pub fp8_deferred_chunks: u64,
    pub fp8_tensor_steps: u64,
}

impl OptimBench {
    pub fn fp32_ns_per_param(&self) -> f64 {
        self.fp32_step_s * 1e9 / self.params as f64
    }
    pub fn fp8_ns_per_param(&self) -> f64 {
        self.fp8_step_s * 1e9 / self.params as f64
    }
    /// FP8 step time over fp32 step time (target: at most 1.2).
    pub fn ratio(&self) -> f64 {
        self.fp8_step_s / self.fp32_step_s
    }
    pub fn report(&self) -> String {
        format!(
            "optimizer step, {} parameters, median of {} steps each (interleaved; {} threads):\n\
             \x20 fp32 AdamW (f32 grads, 16 B/param): {:8.2} ms  {:6.3} ns/param  state {} MB\n\
             \x20 FP8-LM     (E5M2 grads, 6 B/param): {:8.2} ms  {:6.3} ns/param  state {} MB\n\
             \x20 FP8 / fp32 = {:.3}  (target <= 1.2)\n\
             \x20 one-pass scaling fix-ups: {} state re-scales, {} deferred chunks over {} tensor steps",
            self.params,
            self.steps,
            rayon::current_num_threads(),
            self.fp32_step_s * 1e3,
            self.fp32_ns_per_param(),
            self.fp32_state_bytes / 1_000_000,
            self.fp8_step_s * 1e3,
            self.fp8_ns_per_param(),
            self.fp8_state_bytes / 1_000_000,
            self.ratio(),
            self.fp8_rescales,
            self.fp8_deferred_chunks,
            self.fp8_tensor_steps,
        )
    }
}

fn fill(seed: u64, scale: f32, v: &mut [f32]) {
    v.par_chunks_mut(1 << 16).enumerate().for_each(|(c, ch)| {
        let mut s = seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for x in ch {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            *x = ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale;
        }
    });
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Time `steps` optimizer steps of each optimizer on tensors shaped as `metas` (after
/// one warm-up step each). Gradients change every step (a fresh seed per step would
/// cost more than the step, so two gradient sets alternate).
pub fn optimizer_step(metas: &[ParamMeta], steps: usize) -> OptimBench {
    let h = AdamWHyper::default();
    let numel: Vec<usize> = metas.iter().map(ParamMeta::numel).collect();
    let params: usize = numel.iter().sum();
    let mk = |seed: u64, scale: f32| -> Vec<Vec<f32>> {
        numel
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let mut v = vec![0f32; n];
                fill(seed + i as u64, scale, &mut v);
                v
            })
            .collect()
    };
    let mut w32 = mk(1, 0.04);
    let mut w8 = w32.clone();
    let g32: Vec<Vec<Vec<f32>>> = vec![mk(100, 1e-3), mk(200, 1e-3)];
    let g8: Vec<Vec<ScaledFp8>> = g32
        .iter()
        .map(|gs| {
            gs.iter()
                .zip(metas)
                .map(|(g, m)| ScaledFp8::quantize_current(g, &m.shape, Fp8Format::E5M2, 0).0)
                .collect()
        })
        .collect();
    let mut fp32 = AdamW::new(metas, h);
    let mut p8: Vec<&mut [f32]> = w8.iter_mut().map(|p| p.as_mut_slice()).collect();
    let mut fp8 = Fp8Adam::new(metas, &mut p8, Fp8AdamConfig::fp8_lm(h)).expect("shapes match");
    let mut p32: Vec<&mut [f32]> = w32.iter_mut().map(|p| p.as_mut_slice()).collect();
    let (mut t32, mut t8) = (Vec::new(), Vec::new());
    for s in 0..=steps {
        let gr32: Vec<Grad> = g32[s % 2].iter().map(|g| Grad::F32(g)).collect();
        let gr8: Vec<Grad> = g8[s % 2].iter().map(Grad::Fp8).collect();
        let t = Instant::now();
        fp32.step(&mut p32, &gr32, 1e-4, 1.0);
        let a = t.elapsed().as_secs_f64();
        let t = Instant::now();
        fp8.step(&mut p8, &gr8, 1e-4, 1.0);
        let b = t.elapsed().as_secs_f64();
        if s > 0 {
            t32.push(a);
            t8.push(b);
        }
    }
    let st = fp8.stats();
    OptimBench {
        params,
        steps,
        fp32_step_s: median(&mut t32),
        fp8_step_s: median(&mut t8),
        fp32_state_bytes: fp32.state_bytes(),
        fp8_state_bytes: fp8.state_bytes(),
        fp8_rescales: st.rescales,
        fp8_deferred_chunks: st.deferred_chunks,
        fp8_tensor_steps: st.tensor_steps,
    }
}
