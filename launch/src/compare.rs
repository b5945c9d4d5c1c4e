//! `fp8lm compare`: K seeds of each precision/recipe on the config's data, the
//! validation loss of each (mean +- sd) and each variant's paired difference to the first
//! variant with a 95% interval (`fp8lm_trainer::compare`).

use crate::ConfigArgs;
use anyhow::Result;
use fp8lm_trainer::compare::{compare, Variant};

pub fn run(args: &ConfigArgs, variants: &str, seeds: usize, first_seed: u64) -> Result<()> {
    let base = crate::run::load(args)?;
    if seeds == 0 {
        return Err(crate::UsageError(
            "--seeds 0: allowed: an integer >= 1 (2 or more for an interval)".into(),
        )
        .into());
    }
    let vs = variants
        .split(',')
        .map(|s| Variant::parse(s.trim(), &base))
        .collect::<Result<Vec<_>>>()
        .map_err(|e| crate::UsageError(format!("--variants: {e:#}")))?;
    let seeds: Vec<u64> = (0..seeds as u64).map(|i| first_seed + i).collect();
    println!(
        "compare: {} variants x {} seeds, {} steps each, model {}L {}C T={} B={}, data {}",
        vs.len(),
        seeds.len(),
        base.max_steps,
        base.model.layers,
        base.model.channels,
        base.model.context,
        base.batch,
        if base.data.path.is_empty() {
            "embedded corpus"
        } else {
            &base.data.path
        }
    );
    let cmp = compare(&base, &vs, &seeds, |v, s, l| {
        tracing::info!("{v} seed {s}: val loss {l:.4}")
    })?;
    print!("{}", cmp.table());
    Ok(())
}
