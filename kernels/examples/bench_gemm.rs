//! Prints GEMM throughput of ours (FP8, bf16, f32) and of the f32 GEMM crates on the
//! issue's shapes: `cargo run --release -p fp8lm-kernels --example bench_gemm [ms-per-case]`.

use fp8lm_kernels::bench::{gemm_bench, GEMM_BENCH_SHAPES};
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
}
