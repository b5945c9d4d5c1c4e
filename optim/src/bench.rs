//! Optimizer step time: fp32 AdamW against the FP8-LM optimizer, per parameter.
//!
//! Both run on the same parameter shapes (GPT-2 124M by default), the fp32 AdamW with
//! f32 gradients (its 16 bytes/parameter), the FP8 optimizer with E5M2 gradients (its 6).
//! Steps alternate between the two so machine contention hits both alike; the figure
//! reported is the median of each. Timing is a benchmark's job, never a unit test's.
//!
//! Two rows: the headline one (median of `steps` after one warm-up step, which the
//! target is judged on) includes the first steps, where the FP8 optimizer's moments grow
//! from zero by binades and its one-pass scaling needs re-scale passes; the steady-state
//! row times `steps` more after [`STEADY_AFTER`] steps in all, where re-scales are rare.
//! Each row reports the fix-ups that happened in its own steps, and (on Linux) the median
//! CPU time of all threads per step besides the wall time: on a shared machine other
//! processes' time slices inflate wall times, not CPU times (memory stalls count in both).

use crate::api::{AdamWHyper, Grad, Optimizer, ParamMeta};
use crate::{AdamW, Fp8Adam, Fp8AdamConfig};
use fp8lm_fp8::{Fp8Format, ScaledFp8};
use rayon::prelude::*;
use std::time::Instant;

/// Steps taken in all (warm-up included) before the steady-state row is timed.
pub const STEADY_AFTER: usize = 30;

/// Median step times of one row and the FP8 optimizer's fix-ups during its steps.
#[derive(Clone, Debug)]
pub struct OptimRow {
    /// Optimizer steps taken before the first timed one.
    pub after_steps: usize,
    pub fp32_step_s: f64,
    pub fp8_step_s: f64,
    pub fp8_rescales: u64,
    pub fp8_deferred_chunks: u64,
    pub fp8_tensor_steps: u64,
    /// Median CPU time of all threads per step, fp32 and FP8 (Linux only).
    pub cpu_s: Option<(f64, f64)>,
}

impl OptimRow {
    /// FP8 step time over fp32 step time.
    pub fn ratio(&self) -> f64 {
        self.fp8_step_s / self.fp32_step_s
    }
}

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
    /// Median CPU time of all threads per step, fp32 and FP8 (Linux only): on a shared
    /// machine, time-slicing inflates wall times but not these.
    pub cpu_s: Option<(f64, f64)>,
    /// The same measurement after [`STEADY_AFTER`] steps (None if not requested).
    pub steady: Option<OptimRow>,
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
        let cpu = |c: Option<(f64, f64)>| {
            match c {
            Some((a, b)) => format!(
                "\n  CPU time of all threads (median; time-slicing on a shared machine does not inflate it): fp32 {:.2} ms, FP8 {:.2} ms, FP8 / fp32 = {:.3}",
                a * 1e3,
                b * 1e3,
                b / a
            ),
            None => String::new(),
        }
        };
        let mut r = self.headline() + &cpu(self.cpu_s);
        if let Some(st) = &self.steady {
            let ns = |s: f64| s * 1e9 / self.params as f64;
            r += &format!(
                "\nsteady state: median of {} steps each after {} steps (not the target's row):\n\
                 \x20 fp32 AdamW: {:8.2} ms  {:6.3} ns/param\n\
                 \x20 FP8-LM    : {:8.2} ms  {:6.3} ns/param\n\
                 \x20 FP8 / fp32 = {:.3}\n\
                 \x20 one-pass scaling fix-ups in these steps: {} state re-scales, {} deferred chunks over {} tensor steps",
                self.steps,
                st.after_steps,
                st.fp32_step_s * 1e3,
                ns(st.fp32_step_s),
                st.fp8_step_s * 1e3,
                ns(st.fp8_step_s),
                st.ratio(),
                st.fp8_rescales,
                st.fp8_deferred_chunks,
                st.fp8_tensor_steps,
            );
            r += &cpu(st.cpu_s);
        }
        r
    }

    fn headline(&self) -> String {
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
/// one warm-up step each), then `steps` more after [`STEADY_AFTER`] steps in all.
pub fn optimizer_step(metas: &[ParamMeta], steps: usize) -> OptimBench {
    optimizer_step_with(metas, steps, Some(STEADY_AFTER))
}

/// [`optimizer_step`] with the steady-state row timed after `steady_after` steps in all
/// (at least 1 + `steps`), or not at all. Gradients change every step (a fresh seed per
/// step would cost more than the step, so two gradient sets alternate).
pub fn optimizer_step_with(
    metas: &[ParamMeta],
    steps: usize,
    steady_after: Option<usize>,
) -> OptimBench {
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
    let mut taken = 0usize;
    // Steps both optimizers `n` times; returns the timed row if `timed`.
    let mut run = |n: usize, timed: bool| -> OptimRow {
        let before = fp8.stats();
        let after_steps = taken;
        let (mut t32, mut t8) = (Vec::new(), Vec::new());
        let (mut c32, mut c8) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let s = taken;
            taken += 1;
            let gr32: Vec<Grad> = g32[s % 2].iter().map(|g| Grad::F32(g)).collect();
            let gr8: Vec<Grad> = g8[s % 2].iter().map(Grad::Fp8).collect();
            let (t, c) = (Instant::now(), cpu_time_s());
            fp32.step(&mut p32, &gr32, 1e-4, 1.0);
            t32.push(t.elapsed().as_secs_f64());
            c32.extend(cpu_time_s().zip(c).map(|(b, a)| b - a));
            let (t, c) = (Instant::now(), cpu_time_s());
            fp8.step(&mut p8, &gr8, 1e-4, 1.0);
            t8.push(t.elapsed().as_secs_f64());
            c8.extend(cpu_time_s().zip(c).map(|(b, a)| b - a));
        }
        let st = fp8.stats();
        OptimRow {
            after_steps,
            fp32_step_s: if timed { median(&mut t32) } else { 0.0 },
            fp8_step_s: if timed { median(&mut t8) } else { 0.0 },
            fp8_rescales: st.rescales - before.rescales,
            fp8_deferred_chunks: st.deferred_chunks - before.deferred_chunks,
            fp8_tensor_steps: st.tensor_steps - before.tensor_steps,
            cpu_s: (timed && c32.len() == n && c8.len() == n)
                .then(|| (median(&mut c32), median(&mut c8))),
        }
    };
    // The headline row: one warm-up step (its fix-ups counted, as always), then `steps`.
    let warm = run(1, false);
    let head = run(steps, true);
    let steady = steady_after.map(|after| {
        let done = 1 + steps;
        if after > done {
            run(after - done, false);
        }
        run(steps, true)
    });
    OptimBench {
        params,
        steps,
        fp32_step_s: head.fp32_step_s,
        fp8_step_s: head.fp8_step_s,
        fp32_state_bytes: fp32.state_bytes(),
        fp8_state_bytes: fp8.state_bytes(),
        fp8_rescales: warm.fp8_rescales + head.fp8_rescales,
        fp8_deferred_chunks: warm.fp8_deferred_chunks + head.fp8_deferred_chunks,
        fp8_tensor_steps: warm.fp8_tensor_steps + head.fp8_tensor_steps,
        cpu_s: head.cpu_s,
        steady,
    }
}

/// CPU time consumed so far by all threads of this process (Linux: the sum of each
/// thread's run time from /proc/self/task/*/schedstat, in ns), or None.
fn cpu_time_s() -> Option<f64> {
    let mut ns = 0u64;
    for t in std::fs::read_dir("/proc/self/task").ok()? {
        let st = std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok()?;
        ns += st.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 * 1e-9)
}
