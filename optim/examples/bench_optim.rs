//! Optimizer step time per parameter, fp32 AdamW vs the FP8-LM optimizer.
//!
//! `cargo run --release -p fp8lm-optim --example bench_optim [-- STEPS [LAYERS CHANNELS]]`
//! (default: 10 steps at GPT-2 124M: 12 layers, 768 channels, 1024 positions, 50257 tokens).

use fp8lm_optim::zero::gpt2_metas;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap_or_else(|_| panic!("not a number: {a}")))
        .collect();
    let steps = args.first().copied().unwrap_or(10);
    let (layers, channels) = match args.get(1..3) {
        Some([l, c]) => (*l, *c),
        _ => (12, 768),
    };
    let metas = gpt2_metas(layers, channels, 1024, 50257);
    let r = fp8lm_optim::bench::optimizer_step(&metas, steps);
    println!("{}", r.report());
}
