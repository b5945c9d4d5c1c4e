//! Training-step benchmark (the same as `fp8lm bench train`).
//!
//! `cargo run --release -p fp8lm-trainer --example bench_train [-- --small-only] [--steps N]`

use fp8lm_trainer::bench::{bench_train, default_cases};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let small_only = args.iter().any(|a| a == "--small-only");
    let steps = args
        .iter()
        .position(|a| a == "--steps")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(3);
    let report = bench_train(&default_cases(!small_only), steps)?;
    print!("{}", report.table());
    for c in report.checks() {
        println!("{c}");
    }
    Ok(())
}
