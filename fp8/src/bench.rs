//! Bulk-cast throughput, for `fp8lm bench` and `examples/bench_cast.rs`.
//!
//! Each row times one cast over a slice of `elements` values, best of `reps` passes
//! after one warm-up pass, and reports GB/s of *input* read (1 GB = 1e9 bytes). The
//! scalar row (`E4M3::from_f32` in a loop) is the baseline the others are a ratio to.
//! Figures on a shared machine are noisy: compare rows of one run, not across runs.

use crate::cast::{self, Backend};
use crate::format::{CastMode, Fp8Format, E4M3};
use half::{bf16, f16};
use std::hint::black_box;
use std::time::Instant;

/// One measured cast.
#[derive(Clone, Debug, PartialEq)]
pub struct CastBenchRow {
    /// e.g. `"f32->e4m3+amax"`.
    pub op: String,
    /// `"scalar"` (the reference API in a loop), `"portable"` or `"avx2"`.
    pub backend: &'static str,
    pub threads: usize,
    pub elements: usize,
    pub input_bytes: usize,
    /// Best time of one pass.
    pub seconds: f64,
    /// Input bytes / `seconds` / 1e9.
    pub gb_per_s: f64,
}

/// What to measure.
#[derive(Clone, Copy, Debug)]
pub struct CastBenchConfig {
    /// Elements per slice (4M f32 = 16 MiB, past the caches: a streaming figure).
    pub elements: usize,
    /// Timed passes per row (the best is kept).
    pub reps: usize,
}

impl Default for CastBenchConfig {
    fn default() -> Self {
        CastBenchConfig {
            elements: 1 << 22,
            reps: 10,
        }
    }
}

fn time_best(reps: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up: page faults, caches, rayon pool start-up
    (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Runs every cast row; a few seconds in total at the default size.
pub fn bench_casts(cfg: CastBenchConfig) -> Vec<CastBenchRow> {
    let n = cfg.elements;
    // Activations-like data: normal-ish values over several binades, fixed pattern.
    let src: Vec<f32> = (0..n)
        .map(|i| {
            let u = (i as u32).wrapping_mul(2654435761) as f32 / u32::MAX as f32;
            (u - 0.5) * 2f32.powi((i % 13) as i32 - 6)
        })
        .collect();
    let src_bf16: Vec<bf16> = src.iter().map(|&x| bf16::from_f32(x)).collect();
    let src_f16: Vec<f16> = src.iter().map(|&x| f16::from_f32(x)).collect();
    let mut fp8 = vec![0u8; n];
    let mut out_f32 = vec![0f32; n];
    let mut out_f16 = vec![f16::ZERO; n];
    let threads = rayon::current_num_threads();
    let simd = Backend::detect();
    let scale = 64.0f32;
    let sat = CastMode::SatFinite;
    let mut rows = Vec::new();
    let mut row =
        |op: &str, backend: &'static str, threads: usize, elem_bytes: usize, secs: f64| {
            let bytes = n * elem_bytes;
            rows.push(CastBenchRow {
                op: op.to_string(),
                backend,
                threads,
                elements: n,
                input_bytes: bytes,
                seconds: secs,
                gb_per_s: bytes as f64 / secs / 1e9,
            });
        };
    let r = cfg.reps;

    let t = time_best(r, || {
        let mut amax = 0f32;
        for (d, &x) in fp8.iter_mut().zip(&src) {
            amax = amax.max(x.abs());
            *d = E4M3::from_f32(x * scale).to_bits();
        }
        black_box(amax);
    });
    row("f32->e4m3+amax", "scalar", 1, 4, t);
    for backend in [Backend::Portable, Backend::Avx2, Backend::Avx512] {
        if !backend.is_available() {
            continue;
        }
        let t = time_best(r, || {
            black_box(cast::f32_to_fp8_amax_with(
                Fp8Format::E4M3,
                sat,
                backend,
                &src,
                scale,
                &mut fp8,
            ));
        });
        row("f32->e4m3+amax", backend.name(), 1, 4, t);
    }
    let t = time_best(r, || {
        black_box(cast::par_f32_to_fp8_amax(
            Fp8Format::E4M3,
            &src,
            scale,
            &mut fp8,
        ));
    });
    row("f32->e4m3+amax", simd.name(), threads, 4, t);
    let t = time_best(r, || {
        black_box(cast::f32_to_fp8_amax(
            Fp8Format::E5M2,
            &src,
            scale,
            &mut fp8,
        ));
    });
    row("f32->e5m2+amax", simd.name(), 1, 4, t);
    let t = time_best(r, || {
        black_box(cast::bf16_to_fp8_amax(
            Fp8Format::E4M3,
            &src_bf16,
            scale,
            &mut fp8,
        ));
    });
    row("bf16->e4m3+amax", simd.name(), 1, 2, t);
    let t = time_best(r, || {
        black_box(cast::f16_to_fp8_amax(
            Fp8Format::E5M2,
            &src_f16,
            scale,
            &mut fp8,
        ));
    });
    row("f16->e5m2+amax", simd.name(), 1, 2, t);
    let t = time_best(r, || {
        black_box(cast::fp8_to_f32_amax(
            Fp8Format::E4M3,
            &fp8,
            1.0 / scale,
            &mut out_f32,
        ));
    });
    row("e4m3->f32+amax", simd.name(), 1, 1, t);
    let t = time_best(r, || {
        black_box(cast::par_fp8_to_f32_amax(
            Fp8Format::E4M3,
            &fp8,
            1.0 / scale,
            &mut out_f32,
        ));
    });
    row("e4m3->f32+amax", simd.name(), threads, 1, t);
    let t = time_best(r, || {
        black_box(cast::f32_to_f16_amax(&src, scale, &mut out_f16));
    });
    row("f32->f16+amax", simd.name(), 1, 4, t);
    let t = time_best(r, || {
        black_box(cast::amax_f32(&src));
    });
    row("amax f32", simd.name(), 1, 4, t);
    rows
}

/// The rows as an aligned text table, with each row's ratio to the first (scalar) row
/// of the same op where there is one.
pub fn format_rows(rows: &[CastBenchRow]) -> String {
    let mut s = format!(
        "{:<18} {:<9} {:>7} {:>10} {:>10} {:>9}\n",
        "cast", "backend", "threads", "ms/pass", "GB/s in", "x scalar"
    );
    for r in rows {
        let base = rows
            .iter()
            .find(|b| b.op == r.op && b.backend == "scalar")
            .map(|b| format!("{:.1}", r.gb_per_s / b.gb_per_s))
            .unwrap_or_else(|| "-".into());
        s += &format!(
            "{:<18} {:<9} {:>7} {:>10.3} {:>10.2} {:>9}\n",
            r.op,
            r.backend,
            r.threads,
            r.seconds * 1e3,
            r.gb_per_s,
            base
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_produces_consistent_rows() {
        let rows = bench_casts(CastBenchConfig {
            elements: 4096,
            reps: 1,
        });
        assert!(rows.len() >= 9);
        for r in &rows {
            assert!(
                r.seconds > 0.0 && r.gb_per_s.is_finite() && r.gb_per_s > 0.0,
                "{r:?}"
            );
            assert_eq!(r.elements, 4096);
        }
        let table = format_rows(&rows);
        assert!(table.contains("f32->e4m3+amax") && table.contains("x scalar"));
    }
}
