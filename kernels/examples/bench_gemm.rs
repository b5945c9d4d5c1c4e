//! Prints GEMM throughput of ours (FP8, bf16, f32) and of the f32 GEMM crates on the
//! issue's shapes: `cargo run --release -p fp8lm-kernels --example bench_gemm [ms-per-case]`.
//! With `BENCH_BACKWARD=1`, also the two backward GEMMs (FP8 E5M2 x E4M3 vs our f32).
//! Environment: `RAYON_NUM_THREADS` / `MATMUL_NUM_THREADS` set the thread counts,
//! `FP8LM_GEMM_ISA=avx2|scalar` forces a slower kernel of ours.

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
    let report = gemm_bench(&GEMM_BENCH_SHAPES, Duration::from_millis(ms));
    print!("{}", report.table());
    if std::env::var_os("BENCH_BACKWARD").is_some() {
        let back = gemm_bench_backward(&GEMM_BENCH_SHAPES, Duration::from_millis(ms));
        print!("{}", back.table());
    }
}
