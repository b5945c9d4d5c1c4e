//! `fp8lm plan`: print each rank's memory (the ledger's categories) and the bytes each
//! collective sends per step, for the config's model on the `dist.data_parallel` x
//! `dist.tensor_parallel` grid (`dist.sequence_parallel` too),
//! without allocating the model (`fp8lm_trainer::plan`).

use anyhow::Result;
use fp8lm_trainer::plan::{plan, Plan, PlanGrid};
use fp8lm_trainer::Precision;

use crate::ConfigArgs;

/// Print the plan of the config (`all`: of every precision, then a summary table).
pub fn run(args: &ConfigArgs, all: bool) -> Result<()> {
    let cfg = crate::run::load(args)?;
    let grid = PlanGrid::of_config(&cfg);
    let m = &cfg.model;
    let title = format!(
        "{:?} L={} H={} C={} T={} B={} V={}",
        m.arch,
        m.layers,
        m.heads,
        m.channels,
        m.context,
        cfg.batch,
        cfg.vocab()
    );
    let precisions = if all {
        Precision::ALL.to_vec()
    } else {
        vec![cfg.precision]
    };
    let mut plans = Vec::new();
    for p in precisions {
        let mut c = cfg.clone();
        c.precision = p;
        let pl = plan(&c, c.vocab(), grid)?;
        print!("{}", pl.report(&title));
        println!();
        plans.push(pl);
    }
    if all {
        print!("{}", summary(&plans));
    }
    Ok(())
}

/// One line per precision: optimizer+gradient+master state per parameter and per rank,
/// the rank's whole ledger, and the bytes it sends per step (GB = 1e9 bytes).
fn summary(plans: &[Plan]) -> String {
    let gb = |b: f64| b / 1e9;
    let mut s = format!(
        "per rank, D = {} data-parallel x T = {} tensor-parallel:\n  {:<8} {:>13} {:>16} {:>15} {:>16}\n",
        plans.first().map_or(1, |p| p.grid.dp),
        plans.first().map_or(1, |p| p.grid.tp),
        "precision",
        "state B/param",
        "state GB/rank",
        "total GB/rank",
        "sent GB/step"
    );
    for p in plans {
        let sent: u64 = p.collectives.iter().map(|c| c.bytes).sum();
        s += &format!(
            "  {:<8} {:>13.2} {:>16.2} {:>15.2} {:>16.2}\n",
            p.precision.name(),
            p.ledger.state_bytes_per_param(),
            gb(p.ledger.state_bytes() as f64),
            gb(p.ledger.total() as f64),
            gb(sent as f64)
        );
    }
    s
}
