//! Prints bulk-cast throughput: `cargo run --release -p fp8lm-fp8 --example bench_cast
//! [elements] [reps]`. Figures on a shared machine are noisy; compare rows of one run.

use fp8lm_fp8::bench::{bench_casts, format_rows, CastBenchConfig};
use fp8lm_fp8::cast::Backend;

fn main() {
    let mut cfg = CastBenchConfig::default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parse = |i: usize, name: &str| -> Option<usize> {
        args.get(i).map(|a| {
            a.parse().unwrap_or_else(|_| {
                eprintln!("bench_cast: {name} must be a positive integer, got {a:?}");
                std::process::exit(2)
            })
        })
    };
    if let Some(n) = parse(0, "elements") {
        cfg.elements = n;
    }
    if let Some(r) = parse(1, "reps") {
        cfg.reps = r;
    }
    println!(
        "bulk casts: {} elements, best of {} passes, SIMD backend {}, {} rayon threads",
        cfg.elements,
        cfg.reps,
        Backend::detect().name(),
        rayon::current_num_threads()
    );
    print!("{}", format_rows(&bench_casts(cfg)));
}
