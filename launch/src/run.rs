//! `train`, `eval`, `sample`, `tokenize`. (The trainer-backed commands are wired once the
//! `Trainer` lands on main.)

use anyhow::{bail, Result};
use fp8lm_trainer::config_file::load_config;
use fp8lm_trainer::tokenizer::Tokenizer;
use fp8lm_trainer::RunConfig;
use std::path::Path;
use std::time::Instant;

use crate::{ConfigArgs, UsageError};

pub fn load(args: &ConfigArgs) -> Result<RunConfig> {
    Ok(load_config(args.config.as_deref(), &args.set)?)
}

pub fn tokenize(
    input: &Path,
    output: &Path,
    tokenizer: &str,
    shard_tokens: usize,
    prefix: &str,
) -> Result<()> {
    let tok =
        Tokenizer::from_name(tokenizer).map_err(|e| UsageError(format!("--tokenizer: {e}")))?;
    if !input.exists() {
        return Err(UsageError(format!(
            "--input {}: no such file or directory",
            input.display()
        ))
        .into());
    }
    let t0 = Instant::now();
    let shards =
        fp8lm_trainer::data::shards::tokenize_to_shards(input, output, prefix, tok, shard_tokens)?;
    let mut total = 0;
    for s in &shards {
        let n = fp8lm_trainer::data::shards::Shard::open(s)?.len();
        total += n;
        println!("{}  {n} tokens", s.display());
    }
    println!(
        "{total} tokens ({} tokenizer) in {} shard(s), {:.1}s",
        tok.name(),
        shards.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn train(args: &ConfigArgs, _resume: Option<&Path>) -> Result<()> {
    let _cfg = load(args)?;
    bail!("`fp8lm train` is not built yet: the Trainer (branch model) has not landed on main")
}
pub fn eval(_p: &Path, _s: &[String]) -> Result<()> {
    bail!("`fp8lm eval` is not built yet: the Trainer (branch model) has not landed on main")
}
pub fn sample(_p: &Path, _pr: &str, _n: usize, _t: f32, _s: u64) -> Result<()> {
    bail!("`fp8lm sample` is not built yet: the Trainer (branch model) has not landed on main")
}
