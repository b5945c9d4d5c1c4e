//! GEMM throughput: our FP8, bf16 and f32 GEMMs against the f32 GEMMs of the `gemm` and
//! `matrixmultiply` crates, measured in the same run on the same data.
//!
//! The two crates are baselines only, so they are optional dependencies behind the cargo
//! feature `baselines` (which the `fp8lm` binary turns on for `fp8lm bench gemm`): a
//! library user of `fp8lm-kernels` does not build them. Without the feature the report
//! has our rows only and [`GemmBenchReport::checks`] leaves out the comparison with the
//! crates.
//!
//! [`gemm_bench`]: the forward GEMM of a linear layer, `out[M,N] = inp[M,K] @ W[N,K]^T`
//! (`trans_b`), for every implementation (the crates get the same strides). FP8 is
//! E4M3 x E4M3 as in the forward pass. [`gemm_bench_backward`]: the two backward GEMMs
//! (E5M2 x E4M3), ours only, FP8 against f32. Each figure is the best of several timed runs
//! after one warm-up (best-of, since the machine may be shared: the minimum is the least
//! disturbed run). GFLOP/s counts `2 M N K` flops.
//!
//! Both crates pick their kernel at run time (AVX-512 where present; the `gemm` crate is
//! built with its `x86-v4` feature for that). Our low-precision GEMMs run on the path
//! [`GemmPath::detect`] picks (AMX, AVX512-BF16 or FMA); the row `fp8lm-fma` is the same
//! FP8 GEMM forced onto the f32 FMA kernel (what FP8 ran on before the matrix-unit paths),
//! measured in the same run. The targets: FP8 >= 4x our f32 on every shape (issue 12,
//! matrix units); our f32 within 15% of the best crate. [`GemmBenchReport::checks`]
//! states both from the rows, and the FP8 speed-up over `fp8lm-fma`.

use crate::gemm::{GemmPath, Isa};
use crate::{Cpu, GemmOps, GemmShape, MatRef};
use fp8lm_fp8::{Fp8Format, E4M3};
use half::bf16;
use std::time::{Duration, Instant};

/// The shapes of the issue: a square one and the GPT-2-small-like linear layers at 256
/// tokens (QKV, MLP down-projection, MLP up-projection).
pub const GEMM_BENCH_SHAPES: [(usize, usize, usize); 4] = [
    (1024, 1024, 1024),
    (256, 2304, 768),
    (256, 768, 3072),
    (256, 3072, 768),
];

/// (M, N, K, layout) of a measured GEMM.
pub type GemmKey = (usize, usize, usize, &'static str);

/// One measured (implementation, dtype, shape).
#[derive(Clone, Debug)]
pub struct GemmBenchRow {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// `fp8lm` (ours), `gemm-crate`, `matrixmultiply`.
    pub implementation: &'static str,
    /// Operand types: `e4m3xe4m3`, `e5m2xe4m3`, `bf16`, `f32`.
    pub dtype: &'static str,
    /// Which GEMM of a linear layer: `fwd` (`inp @ W^T`), `dinp` (`dout @ W`), `dW`
    /// (`dout^T @ inp`).
    pub layout: &'static str,
    pub gflops: f64,
    /// GFLOP per second of process CPU time (best run): with one thread this is the
    /// speed the core delivers while it runs us, much less sensitive to other processes
    /// on a shared machine than wall time. With several threads it also counts time
    /// threads spend spinning at joins.
    pub cpu_gflops: Option<f64>,
    /// Threads the implementation used.
    pub threads: usize,
    /// Best wall time of one GEMM.
    pub best: Duration,
}

/// All rows plus what they say about the targets.
#[derive(Clone, Debug)]
pub struct GemmBenchReport {
    pub rows: Vec<GemmBenchRow>,
    /// Our f32 kernel ISA (`avx512`, `avx2`, `scalar`).
    pub isa: &'static str,
    /// Our low-precision GEMM path (`amx`, `avx512bf16`, `fma`).
    pub path: &'static str,
    /// The 1-minute load average when the run ended (Linux), to judge how contended the
    /// machine was: above the core count, wall-time figures are unreliable.
    pub load_average: Option<f64>,
}

fn load_average() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// Minimal deterministic data (the figures do not depend on the values).
fn data(len: usize, seed: u32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2654435761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect()
}

/// CPU time consumed by this process so far (all threads), if the OS reports it.
fn process_cpu_time() -> Option<Duration> {
    #[cfg(unix)]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec through a valid pointer.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
        if rc == 0 {
            return Some(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32));
        }
    }
    None
}

/// Pause before each timed run.
const SETTLE: Duration = Duration::from_millis(3);

/// One case to time: (implementation, dtype, threads, the GEMM call).
type Case<'a> = (&'static str, &'static str, usize, Box<dyn FnMut() + 'a>);

/// Best-of timing, interleaved: one warm-up each, then round-robin over the cases until
/// `budget` per case is spent (at least 3 runs each), so that a burst of load from other
/// processes hits all cases alike. Returns the best wall time and the best process CPU
/// time per case.
fn time_interleaved(budget: Duration, cases: &mut [Case<'_>]) -> Vec<(Duration, Option<Duration>)> {
    for c in cases.iter_mut() {
        (c.3)();
    }
    let mut best = vec![(Duration::MAX, None::<Duration>); cases.len()];
    let start = Instant::now();
    let total = budget * cases.len() as u32;
    let mut rounds = 0;
    while rounds < 3 || start.elapsed() < total {
        // Rotate the starting case each round so no case always follows the same one.
        let nc = cases.len();
        for i in (0..nc).map(|i| (i + rounds) % nc) {
            let (c, b) = (&mut cases[i], &mut best[i]);
            // Let the previous case's pool threads (rayon's, matrixmultiply's) finish
            // spinning and sleep, so their CPU time is not charged to this case.
            std::thread::sleep(SETTLE);
            let (t, cpu0) = (Instant::now(), process_cpu_time());
            (c.3)();
            b.0 = b.0.min(t.elapsed());
            if let (Some(c0), Some(c1)) = (cpu0, process_cpu_time()) {
                let cpu = c1.saturating_sub(c0);
                b.1 = Some(b.1.map_or(cpu, |x| x.min(cpu)));
            }
        }
        rounds += 1;
    }
    best
}

/// Measure every implementation on every shape, spending about `budget` per
/// (implementation, shape). The shapes are `(M, N, K)`.
pub fn gemm_bench(shapes: &[(usize, usize, usize)], budget: Duration) -> GemmBenchReport {
    let threads = rayon::current_num_threads();
    let mut rows = Vec::new();
    for &(m, n, k) in shapes {
        let a32 = data(m * k, 1);
        let b32 = data(n * k, 2); // W[N,K]
        let a16: Vec<bf16> = a32.iter().map(|&x| bf16::from_f32(x)).collect();
        let b16: Vec<bf16> = b32.iter().map(|&x| bf16::from_f32(x)).collect();
        let scale = 256.0; // |x| < 0.5 -> < 128, in E4M3 range
        let a8: Vec<u8> = a32
            .iter()
            .map(|&x| E4M3::from_f32(x * scale).to_bits())
            .collect();
        let b8: Vec<u8> = b32
            .iter()
            .map(|&x| E4M3::from_f32(x * scale).to_bits())
            .collect();
        let s = GemmShape::new(m, n, k).trans_b();
        let fp8 = |d| MatRef::Fp8 {
            data: d,
            format: Fp8Format::E4M3,
            scale,
        };
        // Each case owns its output so the closures can coexist.
        let mut cs: Vec<Vec<f32>> = (0..4).map(|_| vec![0f32; m * n]).collect();
        let mut cs = cs.iter_mut();
        let (c0, c1, c2, c5) = (
            cs.next().unwrap(),
            cs.next().unwrap(),
            cs.next().unwrap(),
            cs.next().unwrap(),
        );
        let (a8, b8, a16, b16, a32, b32) = (&a8, &b8, &a16, &b16, &a32, &b32);
        let mut cases: Vec<Case<'_>> = vec![
            (
                "fp8lm",
                "e4m3xe4m3",
                threads,
                Box::new(move || Cpu.gemm(s, fp8(a8), fp8(b8), c0, false)),
            ),
            (
                "fp8lm-fma",
                "e4m3xe4m3",
                threads,
                Box::new(move || Cpu.gemm_with_path(GemmPath::Fma, s, fp8(a8), fp8(b8), c5, false)),
            ),
            (
                "fp8lm",
                "bf16",
                threads,
                Box::new(move || Cpu.gemm(s, MatRef::Bf16(a16), MatRef::Bf16(b16), c1, false)),
            ),
            (
                "fp8lm",
                "f32",
                threads,
                Box::new(move || Cpu.gemm(s, MatRef::F32(a32), MatRef::F32(b32), c2, false)),
            ),
        ];
        #[cfg(feature = "baselines")]
        cases.extend(baseline_cases((m, n, k), threads, a32, b32));
        push_rows(&mut rows, (m, n, k), "fwd", budget, &mut cases);
    }
    GemmBenchReport {
        rows,
        isa: Isa::detect().name(),
        path: GemmPath::detect().name(),
        load_average: load_average(),
    }
}

/// The f32 GEMMs of the `gemm` and `matrixmultiply` crates on `a32 [m,k] @ b32 [n,k]^T`
/// (cargo feature `baselines`; each case owns its output). `matrixmultiply` sizes its
/// own thread pool: `MATMUL_NUM_THREADS`, else every core.
#[cfg(feature = "baselines")]
fn baseline_cases<'a>(
    (m, n, k): (usize, usize, usize),
    threads: usize,
    a32: &'a [f32],
    b32: &'a [f32],
) -> Vec<Case<'a>> {
    let mm_threads = std::env::var("MATMUL_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let (mut c3, mut c4) = (vec![0f32; m * n], vec![0f32; m * n]);
    vec![
        (
            "gemm-crate",
            "f32",
            threads,
            Box::new(move || {
                // SAFETY: the pointers and strides describe a32 [m,k], b32 [n,k] read
                // as its transpose [k,n] (row stride 1, column stride k), and c [m,n].
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        k,
                        c3.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        a32.as_ptr(),
                        1,
                        k as isize,
                        b32.as_ptr(),
                        k as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::Rayon(threads),
                    )
                }
            }),
        ),
        (
            "matrixmultiply",
            "f32",
            mm_threads,
            Box::new(move || {
                // SAFETY: as above (matrixmultiply takes row and column strides).
                unsafe {
                    matrixmultiply::sgemm(
                        m,
                        k,
                        n,
                        1.0,
                        a32.as_ptr(),
                        k as isize,
                        1,
                        b32.as_ptr(),
                        1,
                        k as isize,
                        0.0,
                        c4.as_mut_ptr(),
                        n as isize,
                        1,
                    )
                }
            }),
        ),
    ]
}

/// Time `cases` (interleaved) and append their rows.
fn push_rows(
    rows: &mut Vec<GemmBenchRow>,
    (m, n, k): (usize, usize, usize),
    layout: &'static str,
    budget: Duration,
    cases: &mut [Case<'_>],
) {
    let best = time_interleaved(budget, cases);
    for (case, (best, cpu)) in cases.iter().zip(best) {
        let flops = 2.0 * (m * n * k) as f64;
        rows.push(GemmBenchRow {
            m,
            n,
            k,
            implementation: case.0,
            dtype: case.1,
            layout,
            gflops: flops / best.as_secs_f64() / 1e9,
            cpu_gflops: cpu.map(|c| flops / c.as_secs_f64().max(1e-9) / 1e9),
            threads: case.2,
            best,
        });
    }
}

/// The two backward GEMMs of a linear layer whose forward GEMM has shape `(M, N, K)`
/// (`out[M,N] = inp[M,K] @ W[N,K]^T`), ours only, FP8 as the recipe has them (E5M2
/// output gradient x E4M3 weight / activation) against our f32 in the same layout:
/// `dinp[M,K] = dout[M,N] @ W[N,K]` (GEMM shape `(M, K, N)`, plain) and
/// `dW[N,K] = dout^T @ inp` (GEMM shape `(N, K, M)`, `trans_a`).
pub fn gemm_bench_backward(shapes: &[(usize, usize, usize)], budget: Duration) -> GemmBenchReport {
    let threads = rayon::current_num_threads();
    let mut rows = Vec::new();
    for &(m, n, k) in shapes {
        let inp = data(m * k, 3);
        let w = data(n * k, 4);
        let dout = data(m * n, 5);
        let q = |x: &[f32], fmt: Fp8Format, scale: f32| -> Vec<u8> {
            x.iter().map(|&v| fmt.encode(v * scale, true)).collect()
        };
        let (inp8, w8, dout8) = (
            q(&inp, Fp8Format::E4M3, 256.0),
            q(&w, Fp8Format::E4M3, 256.0),
            q(&dout, Fp8Format::E5M2, 4096.0),
        );
        let e4 = |d| MatRef::Fp8 {
            data: d,
            format: Fp8Format::E4M3,
            scale: 256.0,
        };
        let e5 = |d| MatRef::Fp8 {
            data: d,
            format: Fp8Format::E5M2,
            scale: 4096.0,
        };
        let (inp, w, dout, inp8, w8, dout8) = (&inp, &w, &dout, &inp8, &w8, &dout8);
        let mut c: Vec<Vec<f32>> = (0..3).map(|_| vec![0f32; m.max(n) * k]).collect();
        let (c0, c1) = c.split_at_mut(1);
        let (c1, c2) = c1.split_at_mut(1);
        let (c0, c1, c2) = (&mut c0[0], &mut c1[0], &mut c2[0]);
        let fma = GemmPath::Fma;
        let s = GemmShape::new(m, k, n);
        let mut cases: Vec<Case<'_>> = vec![
            (
                "fp8lm",
                "e5m2xe4m3",
                threads,
                Box::new(|| Cpu.gemm(s, e5(dout8), e4(w8), &mut c0[..m * k], false)),
            ),
            (
                "fp8lm-fma",
                "e5m2xe4m3",
                threads,
                Box::new(|| Cpu.gemm_with_path(fma, s, e5(dout8), e4(w8), &mut c2[..m * k], false)),
            ),
            (
                "fp8lm",
                "f32",
                threads,
                Box::new(|| {
                    Cpu.gemm(
                        s,
                        MatRef::F32(dout),
                        MatRef::F32(w),
                        &mut c1[..m * k],
                        false,
                    )
                }),
            ),
        ];
        push_rows(&mut rows, (m, k, n), "dinp", budget, &mut cases);
        drop(cases);
        let s = GemmShape::new(n, k, m).trans_a();
        let mut cases: Vec<Case<'_>> = vec![
            (
                "fp8lm",
                "e5m2xe4m3",
                threads,
                Box::new(|| Cpu.gemm(s, e5(dout8), e4(inp8), &mut c0[..n * k], false)),
            ),
            (
                "fp8lm-fma",
                "e5m2xe4m3",
                threads,
                Box::new(|| {
                    Cpu.gemm_with_path(fma, s, e5(dout8), e4(inp8), &mut c2[..n * k], false)
                }),
            ),
            (
                "fp8lm",
                "f32",
                threads,
                Box::new(|| {
                    Cpu.gemm(
                        s,
                        MatRef::F32(dout),
                        MatRef::F32(inp),
                        &mut c1[..n * k],
                        false,
                    )
                }),
            ),
        ];
        push_rows(&mut rows, (n, k, m), "dW", budget, &mut cases);
    }
    GemmBenchReport {
        rows,
        isa: Isa::detect().name(),
        path: GemmPath::detect().name(),
        load_average: load_average(),
    }
}

/// FP8 GEMM over our f32 GEMM, the target for the matrix-unit paths.
pub const FP8_TARGET: f64 = 4.0;

impl GemmBenchReport {
    fn find(
        &self,
        key: (usize, usize, usize, &str),
        imp: &str,
        fp8: bool,
        cpu: bool,
    ) -> Option<f64> {
        self.rows
            .iter()
            .find(|r| {
                (r.m, r.n, r.k, r.layout) == key
                    && r.implementation == imp
                    && (if fp8 {
                        r.dtype.starts_with('e')
                    } else {
                        r.dtype == "f32"
                    })
            })
            .and_then(|r| if cpu { r.cpu_gflops } else { Some(r.gflops) })
    }

    /// Per (shape, layout): fp8 / our f32, and our f32 / best crate f32 where crates were
    /// measured; from wall-time GFLOP/s, or from GFLOP per CPU-second when `cpu`.
    pub fn ratios(&self, cpu: bool) -> Vec<(GemmKey, f64, Option<f64>)> {
        let mut keys: Vec<GemmKey> = self
            .rows
            .iter()
            .map(|r| (r.m, r.n, r.k, r.layout))
            .collect();
        keys.dedup();
        keys.into_iter()
            .filter_map(|key| {
                let f32_ours = self.find(key, "fp8lm", false, cpu)?;
                let fp8 = self.find(key, "fp8lm", true, cpu)?;
                let best_crate = ["gemm-crate", "matrixmultiply"]
                    .iter()
                    .filter_map(|i| self.find(key, i, false, cpu))
                    .reduce(f64::max);
                Some((key, fp8 / f32_ours, best_crate.map(|b| f32_ours / b)))
            })
            .collect()
    }

    /// One line per target per (shape, layout) with the wall-time ratio and, where
    /// measured, the CPU-time ratio; `ok` / `MISS` judged on the wall-time ratio.
    pub fn checks(&self) -> Vec<String> {
        let cpu = self.ratios(true);
        let mut out = Vec::new();
        for (key, fp8_ratio, f32_ratio) in self.ratios(false) {
            let (m, n, k, layout) = key;
            let c = cpu.iter().find(|c| c.0 == key);
            let cpu_fp8 = c.map_or(String::new(), |c| format!(", per cpu-s {:.2}", c.1));
            let fp8_ours = self.find(key, "fp8lm", true, false);
            let speedup = fp8_ours
                .zip(self.find(key, "fp8lm-fma", true, false))
                .map_or(String::new(), |(a, b)| {
                    format!("; fp8 {} / fp8 on fma = {:.2}", self.path, a / b)
                });
            out.push(format!(
                "{m}x{n}x{k} {layout}: fp8/f32 = {fp8_ratio:.2}{cpu_fp8} (target >= {FP8_TARGET:.1}) {}{speedup}",
                if fp8_ratio >= FP8_TARGET { "ok" } else { "MISS" }
            ));
            if let Some(f32_ratio) = f32_ratio {
                let cpu_f32 = c
                    .and_then(|c| c.2)
                    .map_or(String::new(), |r| format!(", per cpu-s {r:.2}"));
                out.push(format!(
                    "{m}x{n}x{k} {layout}: f32/best-crate = {f32_ratio:.2}{cpu_f32} (target >= 0.85) {}",
                    if f32_ratio >= 0.85 { "ok" } else { "MISS" }
                ));
            }
        }
        out
    }

    /// A plain-text table of the rows followed by the target checks.
    pub fn table(&self) -> String {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let load = self.load_average.map_or(String::new(), |l| {
            format!(", load average {l:.1} on {cores} cores")
        });
        let mut s = format!(
            "GEMM, best of runs, f32 kernel isa {}, low-precision path {}{load}\n{:>16} {:>6} {:>15} {:>10} {:>9} {:>11} {:>7} {:>10}\n",
            self.isa, self.path, "M x N x K", "layout", "impl", "dtype", "GFLOP/s", "GFLOP/cpu-s", "threads", "ms"
        );
        for r in &self.rows {
            let cpu = r.cpu_gflops.map_or("-".to_string(), |g| format!("{g:.1}"));
            s += &format!(
                "{:>16} {:>6} {:>15} {:>10} {:>9.1} {:>11} {:>7} {:>10.3}\n",
                format!("{}x{}x{}", r.m, r.n, r.k),
                r.layout,
                r.implementation,
                r.dtype,
                r.gflops,
                cpu,
                r.threads,
                r.best.as_secs_f64() * 1e3
            );
        }
        for c in self.checks() {
            s += &c;
            s.push('\n');
        }
        if self.load_average.is_some_and(|l| l > cores as f64) {
            s += "note: load average above the core count: other processes shared the cores, so \
                  wall-time ratios are unreliable; the per cpu-s ratios (single-threaded runs \
                  especially) compare the implementations' own speed\n";
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bench runs end to end on a small shape and reports consistent rows.
    #[test]
    fn bench_smoke() {
        let rep = gemm_bench(&[(33, 40, 17)], Duration::from_millis(1));
        // ours (fp8, fp8 on fma, bf16, f32), plus the two crates with `baselines`
        let (rows, checks) = if cfg!(feature = "baselines") {
            (6, 2)
        } else {
            (4, 1)
        };
        assert_eq!(rep.rows.len(), rows);
        assert!(rep.rows.iter().all(|r| r.gflops > 0.0 && r.threads >= 1));
        assert_eq!(rep.ratios(false).len(), 1);
        assert_eq!(rep.checks().len(), checks);
        assert!(rep.table().contains("33x40x17"));
        let back = gemm_bench_backward(&[(33, 40, 17)], Duration::from_millis(1));
        assert_eq!(back.rows.len(), 6);
        assert_eq!(back.ratios(false).len(), 2);
        assert_eq!(back.checks().len(), 2, "no crate rows: fp8/f32 checks only");
    }
}
