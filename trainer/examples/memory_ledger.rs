//! Print the memory ledger of the default run for each precision (what
//! `fp8lm bench memory` prints): `cargo run --release -p fp8lm-trainer --example memory_ledger`.

fn main() -> anyhow::Result<()> {
    let cfg = fp8lm_trainer::RunConfig::default();
    print!("{}", fp8lm_trainer::memory::bench_memory(&cfg, 256, true)?);
    Ok(())
}
