//! `fp8lm bench train`: ms per step and tokens/s for fp32, bf16, FP8-O1 and FP8-O2, split
//! into forward / backward / optimizer, with the share of the step spent inside GEMMs.
//! Where the low-precision GEMMs run on a matrix unit (AMX, AVX512-BF16), the FP8-O2
//! model is also stepped with them forced onto the f32 FMA kernel, in the same rounds
//! (row `gemm path fma`): the speed before the matrix units, paired.
//!
//! Two models: the default small one and GPT-2 124M dimensions (L=12, H=12, C=768,
//! V=50257, T=64, B=4). The three precisions of a model are built side by side (about
//! 7 GB at 124M dims), run one warm-up step each, then `steps` timed steps round-robin;
//! each row reports its fastest step (best-of, since the machine may be shared: the
//! minimum is the least disturbed run), and the median of its per-round ratios to fp32
//! (paired: the steps of one round run back to back). Data: the built-in synthetic
//! corpus (token ids < 256, valid for any vocabulary).
//!
//! The targets, stated by [`TrainBenchReport::checks`]: at 124M dims at least 70%
//! of an fp32 step inside GEMMs, and those GEMMs at the throughput the GEMM benchmark
//! shows (the step's own GEMM shapes, timed standalone in the same rounds, best-of like
//! the steps: the in-step rate at least 90% of it); with the matrix-unit GEMMs (issue 12)
//! FP8-O2 step time at most 0.45x fp32, FP8-O1 and bf16 at most 0.5x (judged on the
//! paired ratio, the steadier of the two on a shared machine; both are printed).

use crate::config::{Precision, RunConfig};
use crate::data::synthetic::MarkovCorpus;
use crate::data::Dataset;
use crate::model::Model;
use crate::train::Trainer;
use anyhow::Result;
use fp8lm_kernels::{Cpu, GemmOps, GemmShape, MatRef};
use std::fmt::Write;
use std::time::Duration;

/// One measured (model, precision).
#[derive(Clone, Debug)]
pub struct TrainBenchRow {
    pub model: String,
    pub precision: Precision,
    pub params: usize,
    pub tokens: usize,
    /// The fastest timed step and its phases.
    pub step: Duration,
    pub forward: Duration,
    pub backward: Duration,
    pub optimizer: Duration,
    pub gemm: Duration,
    /// The least GEMM time of any timed step (best-of, like the standalone reference).
    pub gemm_best: Duration,
    /// Floating-point operations of the step's GEMMs (2mnk each).
    pub gemm_flops: f64,
    /// Median over the rounds of (this step / the fp32 step of the same round): the
    /// precisions of a model step back to back, so load that comes and goes hits both
    /// sides of each ratio alike, where best-of compares the best moments of each.
    pub paired_vs_fp32: f64,
    /// The path its low-precision GEMMs ran on (`amx`, `avx512bf16`, `fma`; fp32: `fma`).
    pub gemm_path: &'static str,
}

impl TrainBenchRow {
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.step.as_secs_f64()
    }
    pub fn gemm_share(&self) -> f64 {
        self.gemm.as_secs_f64() / self.step.as_secs_f64()
    }
    /// GFLOP/s inside the step's GEMMs (their fastest step).
    pub fn gemm_gflops(&self) -> f64 {
        self.gemm_flops / self.gemm_best.as_secs_f64() / 1e9
    }
}

/// Every GEMM one training step runs (the linears' forward, dinp and dW), in order.
pub fn step_gemm_shapes(model: &Model) -> Vec<GemmShape> {
    let n = model.dims.b * model.dims.t;
    model
        .linears
        .iter()
        .flat_map(|l| {
            [
                GemmShape::new(n, l.oc, l.c).trans_b(),
                GemmShape::new(n, l.c, l.oc),
                GemmShape::new(l.oc, l.c, n).trans_a(),
            ]
        })
        .collect()
}

fn flops(shapes: &[GemmShape]) -> f64 {
    shapes.iter().map(|s| 2.0 * (s.m * s.n * s.k) as f64).sum()
}

/// The reference the in-step rate is held to: the same f32 GEMMs run back to back
/// outside the model, on operands allocated once.
struct StandaloneGemms {
    shapes: Vec<GemmShape>,
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
    best: Duration,
}

impl StandaloneGemms {
    fn new(shapes: Vec<GemmShape>) -> Self {
        let max = |f: fn(&GemmShape) -> usize| shapes.iter().map(f).max().unwrap_or(0);
        StandaloneGemms {
            a: vec![0.01; max(|s| s.m * s.k)],
            b: vec![0.02; max(|s| s.k * s.n)],
            c: vec![0.0; max(|s| s.m * s.n)],
            shapes,
            best: Duration::MAX,
        }
    }
    /// One timed pass over every shape; keeps the fastest.
    fn run(&mut self) {
        let t = std::time::Instant::now();
        for s in &self.shapes {
            let (la, lb, lc) = (s.m * s.k, s.k * s.n, s.m * s.n);
            let (a, b) = (MatRef::F32(&self.a[..la]), MatRef::F32(&self.b[..lb]));
            Cpu.gemm(*s, a, b, &mut self.c[..lc], false);
        }
        self.best = self.best.min(t.elapsed());
    }
    fn gflops(&self) -> f64 {
        flops(&self.shapes) / self.best.as_secs_f64() / 1e9
    }
}

#[derive(Clone, Debug, Default)]
pub struct TrainBenchReport {
    pub rows: Vec<TrainBenchRow>,
    /// Per model: the standalone f32 GFLOP/s of its step's GEMM shapes.
    pub standalone_gflops: Vec<(String, f64)>,
}

/// The two models of the issue, named.
pub fn default_cases(include_124m: bool) -> Vec<(String, RunConfig)> {
    let mut out = vec![("small (default)".to_string(), RunConfig::default())];
    if include_124m {
        let mut c = RunConfig::default();
        c.model.layers = 12;
        c.model.heads = 12;
        c.model.channels = 768;
        c.model.context = 64;
        c.model.vocab = 50257;
        c.batch = 4;
        out.push(("gpt2-124M dims".to_string(), c));
    }
    out
}

/// Time fp32, bf16 and fp8-o1 on each case.
pub fn bench_train(cases: &[(String, RunConfig)], steps: usize) -> Result<TrainBenchReport> {
    let mut rows = Vec::new();
    let mut standalone_gflops = Vec::new();
    let precisions = [
        Precision::Fp32,
        Precision::Bf16,
        Precision::Fp8O1,
        Precision::Fp8O2,
    ];
    let path = fp8lm_kernels::GemmPath::detect();
    // The fp8-o2 model is also stepped with its GEMMs forced onto the FMA kernel (the
    // path before the matrix units), in the same rounds: the baseline, paired.
    let baseline = path != fp8lm_kernels::GemmPath::Fma;
    for (name, base) in cases {
        let mut runs = Vec::new();
        for p in precisions {
            let mut cfg = base.clone();
            cfg.precision = p;
            cfg.max_steps = steps + 1;
            let mut data = MarkovCorpus::new(cfg.seed);
            let mut tr = Trainer::new(&cfg, data.vocab_size())?;
            tr.train_step(&mut data)?; // warm-up: page in buffers, first scales
            runs.push((tr, data, None::<crate::train::StepStats>, Duration::MAX));
        }
        let mut standalone = StandaloneGemms::new(step_gemm_shapes(runs[0].0.model()));
        standalone.run(); // warm-up

        // Round-robin over the precisions, so load from other processes hits all alike.
        let mut rounds: Vec<Vec<f64>> = Vec::new();
        let mut base_best: (Option<crate::train::StepStats>, Duration) = (None, Duration::MAX);
        for _ in 0..steps.max(1) {
            let mut round = Vec::new();
            let n_runs = runs.len();
            for (i, (tr, data, best, gemm_best)) in runs.iter_mut().enumerate() {
                let st = tr.train_step(data)?;
                *gemm_best = (*gemm_best).min(st.gemm);
                let total = st.forward + st.backward + st.optimizer;
                round.push(total.as_secs_f64());
                if best
                    .as_ref()
                    .is_none_or(|b| total < b.forward + b.backward + b.optimizer)
                {
                    *best = Some(st);
                }
                if baseline && i + 1 == n_runs {
                    fp8lm_kernels::set_path_override(Some(fp8lm_kernels::GemmPath::Fma));
                    let sb = tr.train_step(data);
                    fp8lm_kernels::set_path_override(None);
                    let sb = sb?;
                    base_best.1 = base_best.1.min(sb.gemm);
                    let total = sb.forward + sb.backward + sb.optimizer;
                    round.push(total.as_secs_f64());
                    if base_best
                        .0
                        .as_ref()
                        .is_none_or(|b| total < b.forward + b.backward + b.optimizer)
                    {
                        base_best.0 = Some(sb);
                    }
                }
            }
            rounds.push(round);
            standalone.run();
        }
        // Round entries: one per precision in order, then the baseline (if any):
        // [fp32, bf16, fp8-o1, fp8-o2, fp8-o2 on fma].
        let n_prec = precisions.len();
        let mut entries: Vec<_> = runs
            .iter()
            .zip(precisions)
            .enumerate()
            .map(|(i, ((tr, _, best, gemm_best), p))| {
                let gp = if p == Precision::Fp32 {
                    "fma"
                } else {
                    path.name()
                };
                (i, tr, best.clone(), *gemm_best, p, gp)
            })
            .collect();
        if baseline {
            let tr = &runs[n_prec - 1].0;
            entries.push((
                n_prec,
                tr,
                base_best.0.clone(),
                base_best.1,
                Precision::Fp8O2,
                "fma",
            ));
        }
        for (i, tr, best, gemm_best, p, gemm_path) in entries {
            let b = best.expect("at least one step");
            let mut ratios: Vec<f64> = rounds.iter().map(|r| r[i] / r[0]).collect();
            ratios.sort_by(f64::total_cmp);
            let gemm_flops = flops(&step_gemm_shapes(tr.model()));
            rows.push(TrainBenchRow {
                gemm_path,
                model: name.clone(),
                precision: p,
                params: tr.model().num_params(),
                tokens: b.tokens,
                step: b.forward + b.backward + b.optimizer,
                forward: b.forward,
                backward: b.backward,
                optimizer: b.optimizer,
                gemm: b.gemm,
                gemm_best,
                gemm_flops,
                paired_vs_fp32: ratios[ratios.len() / 2],
            });
        }
        standalone_gflops.push((name.clone(), standalone.gflops()));
    }
    Ok(TrainBenchReport {
        rows,
        standalone_gflops,
    })
}

impl TrainBenchReport {
    fn fp32_of(&self, model: &str) -> Option<&TrainBenchRow> {
        self.rows
            .iter()
            .find(|r| r.model == model && r.precision == Precision::Fp32)
    }

    pub fn table(&self) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<16} {:>10} {:>7} {:>10} {:>10} {:>9} {:>9} {:>9} {:>10} {:>6} {:>8} {:>7} {:>10}",
            "model",
            "params",
            "prec",
            "gemm path",
            "ms/step",
            "fwd ms",
            "bwd ms",
            "opt ms",
            "tok/s",
            "gemm%",
            "vs fp32",
            "paired",
            "GEMM GF/s"
        );
        for r in &self.rows {
            let ratio = self
                .fp32_of(&r.model)
                .map(|f| r.step.as_secs_f64() / f.step.as_secs_f64())
                .unwrap_or(f64::NAN);
            let _ = writeln!(
                s,
                "{:<16} {:>10} {:>7} {:>10} {:>10.1} {:>9.1} {:>9.1} {:>9.1} {:>10.0} {:>5.1}% {:>7.2}x {:>6.2}x {:>10.1}",
                r.model,
                r.params,
                r.precision.name(),
                r.gemm_path,
                ms(r.step),
                ms(r.forward),
                ms(r.backward),
                ms(r.optimizer),
                r.tokens_per_s(),
                100.0 * r.gemm_share(),
                ratio,
                r.paired_vs_fp32,
                r.gemm_gflops()
            );
        }
        for (model, gf) in &self.standalone_gflops {
            let _ = writeln!(
                s,
                "{model}: the step's f32 GEMM shapes run standalone at {gf:.1} GFLOP/s"
            );
        }
        s
    }

    /// The targets, one line each, with PASS/MISS.
    pub fn checks(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mark = |ok: bool| if ok { "PASS" } else { "MISS" };
        for r in &self.rows {
            let Some(f) = self.fp32_of(&r.model) else {
                continue;
            };
            if r.precision == Precision::Fp32 && r.model.contains("124M") {
                let sh = r.gemm_share();
                out.push(format!(
                    "[{}] {}: fp32 GEMM share {:.1}% (target >= 70%)",
                    mark(sh >= 0.70),
                    r.model,
                    100.0 * sh
                ));
                if let Some((_, gf)) = self.standalone_gflops.iter().find(|(m, _)| *m == r.model) {
                    let rel = r.gemm_gflops() / gf;
                    out.push(format!(
                        "[{}] {}: fp32 in-step GEMMs at {:.0}% of the same GEMMs standalone \
                         ({:.1} vs {:.1} GFLOP/s; target >= 90%)",
                        mark(rel >= 0.9),
                        r.model,
                        100.0 * rel,
                        r.gemm_gflops(),
                        gf
                    ));
                }
            }
            // Issue 12 (matrix units): fp8-o2 <= 0.45x fp32, fp8-o1 and bf16 <= 0.5x.
            let target = match r.precision {
                Precision::Fp8O2 => Some(0.45),
                Precision::Fp8O1 | Precision::Bf16 => Some(0.5),
                _ => None,
            };
            if let Some(target) = target {
                let best_of = r.step.as_secs_f64() / f.step.as_secs_f64();
                let ratio = r.paired_vs_fp32;
                // The targets are at 124M dims; the small model's ~10 ms steps are
                // dominated by thread wake-ups, so its ratio is reported, not judged; so
                // is the FMA baseline row (the path before the matrix units).
                let on_path =
                    r.gemm_path != "fma" || self.rows.iter().all(|q| q.gemm_path == "fma");
                let verdict = if r.model.contains("124M") && on_path {
                    mark(ratio <= target)
                } else {
                    "info"
                };
                out.push(format!(
                    "[{verdict}] {}: {} step (gemm path {}) {ratio:.2}x fp32, median of paired \
                     rounds (best-of: {best_of:.2}x; target at 124M dims: <= {target:.2}x)",
                    r.model,
                    r.precision.name(),
                    r.gemm_path,
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_bench_reports_gemm_work_and_throughput() {
        let cases = default_cases(false);
        let report = bench_train(&cases, 1).unwrap();
        let lowp_path = fp8lm_kernels::GemmPath::detect();
        let extra = usize::from(lowp_path != fp8lm_kernels::GemmPath::Fma);
        assert_eq!(
            report.rows.len(),
            4 + extra,
            "4 precisions + the FMA baseline"
        );
        // GPT-2 linears per layer: qkv c->3c, proj c->c, fc c->4c, fc-proj 4c->c (12 c^2),
        // plus the tied head c->V; three GEMMs of 2*rows*c*oc flops each.
        let cfg = &cases[0].1;
        let tr = Trainer::new(cfg, MarkovCorpus::new(cfg.seed).vocab_size()).unwrap();
        let d = tr.model().dims;
        let (c, rows) = (d.c as f64, (d.b * d.t) as f64);
        let want = 6.0 * rows * (d.l as f64 * 12.0 * c * c + c * d.v as f64);
        assert_eq!(report.rows[0].paired_vs_fp32, 1.0);
        for r in &report.rows {
            assert!(r.paired_vs_fp32 > 0.0 && r.paired_vs_fp32.is_finite());
            assert_eq!(r.gemm_flops, want, "{:?}", r.precision);
            assert!(r.gemm_gflops() > 0.0 && r.gemm_gflops().is_finite());
        }
        assert_eq!(report.standalone_gflops.len(), 1);
        assert!(report.standalone_gflops[0].1 > 0.0);
        assert!(report.table().contains("standalone"));
    }
}
