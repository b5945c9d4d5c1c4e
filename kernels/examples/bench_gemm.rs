//! Prints GEMM throughput of ours (FP8, bf16, f32) and of the f32 GEMM crates on the
//! issue's shapes: `cargo run --release -p fp8lm-kernels --features baselines --example bench_gemm
//! [ms-per-case]` (the crates are the `baselines` feature's optional dependencies).
//! With `BENCH_BACKWARD=1`, also the two backward GEMMs (FP8 E5M2 x E4M3 vs our f32).
//! Environment: `RAYON_NUM_THREADS` / `MATMUL_NUM_THREADS` set the thread counts,
//! `FP8LM_GEMM_ISA=avx2|scalar` forces a slower kernel of ours, `FP8LM_GEMM=fma` the FMA
//! path for FP8/bf16; `BENCH_HEAD=1` measures GPT-2's LM head (256 x 50257 x 768) only.

use fp8lm_kernels::bench::{gemm_bench, gemm_bench_backward, GEMM_BENCH_SHAPES};
use std::time::Duration;

fn main() {
    let ms = match std::env::args().nth(1) {
        None => 400,
        Some(a) => match a.parse::<u64>() {
            Ok(v) => v,
            Err(_) => {
                eprintln!("bench_gemm: expected a time budget in ms per case, got {a:?}");
                std::process::exit(2);
            }
        },
    };
    let head = [(256, 50257, 768)];
    let shapes: &[(usize, usize, usize)] = if std::env::var_os("BENCH_HEAD").is_some() {
        &head
    } else {
        &GEMM_BENCH_SHAPES
    };
    let report = gemm_bench(shapes, Duration::from_millis(ms));
    print!("{}", report.table());
    if std::env::var_os("BENCH_BACKWARD").is_some() {
        let back = gemm_bench_backward(shapes, Duration::from_millis(ms));
        print!("{}", back.table());
    }
}
