//! Refuse a run that cannot fit in memory before allocating it, naming both figures,
//! instead of dying on a raw allocation failure (abort, exit code 134) minutes later.
//!
//! The figure compared is the memory ledger's total ([`MemoryLedger::for_trainer`]) of
//! the model the config describes, computed without building that model:
//! 1. a first bound from the exact parameter count ([`Layout`], no allocation): the f32
//!    weights and their gradients alone, `8 bytes x params`; more than what is available
//!    is refused at once (a `model.layers = 100000` or a huge vocabulary);
//! 2. a rough estimate (24 bytes per parameter plus the activation arena's f32 count);
//!    when it is below half of what is available the run goes on without more work;
//! 3. otherwise the ledger itself, interpolated from tiny trainers: the ledger is a
//!    polynomial of degree (1, 1, 2, 1, 2) in (layers, batch, context, vocabulary, width)
//!    (per-layer state is linear in the layers, activations linear in the batch, attention
//!    scores quadratic in the context, weights quadratic in the width), so its values at
//!    a few small sizes give it exactly at any size (tensor-product Lagrange
//!    interpolation; [`ledger_total_estimate`]).
//!
//! Available memory: `MemAvailable` of `/proc/meminfo`, or the cgroup's limit minus its
//! use when that is smaller (containers).

use anyhow::{bail, Result};

use crate::config::RunConfig;
use crate::memory::MemoryLedger;
use crate::model::{Dims, Layout};
use crate::Trainer;

/// Bytes this process may still allocate: min(MemAvailable, cgroup limit - usage).
/// `None` where neither is known.
pub fn available_bytes() -> Option<u64> {
    let mem = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    let cg = match (
        read("/sys/fs/cgroup/memory.max"),
        read("/sys/fs/cgroup/memory.current"),
    ) {
        (Some(max), Some(cur)) => Some(max.saturating_sub(cur)),
        _ => None,
    };
    match (mem, cg) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn gib(b: f64) -> String {
    format!("{:.2} GiB", b / (1u64 << 30) as f64)
}

/// Lagrange weights of `nodes` at `x`.
fn lagrange(nodes: &[f64], x: f64) -> Vec<f64> {
    (0..nodes.len())
        .map(|i| {
            (0..nodes.len())
                .filter(|&j| j != i)
                .map(|j| (x - nodes[j]) / (nodes[i] - nodes[j]))
                .product()
        })
        .collect()
}

/// The memory ledger's total for `cfg` (bytes), interpolated from small trainers (module
/// docs, step 3): layers {1, 2}, batch {1, 2}, context {2, 3, 4}, vocabulary {16, 32} and,
/// for GPT-2 (whose MLP width 4C is polynomial in C; LLaMA rounds its SwiGLU width),
/// width {2H, 4H, 6H}. So the small trainers are tiny whatever the config (72 of them
/// for GPT-2, in well under a second; 24 at the config's width for LLaMA).
pub fn ledger_total_estimate(cfg: &RunConfig, vocab: usize) -> Result<f64> {
    let d = Dims::from_config(cfg, vocab)?;
    let h = cfg.model.heads as f64;
    let mut axes: Vec<(Vec<f64>, f64)> = vec![
        (vec![1.0, 2.0], d.l as f64),
        (vec![1.0, 2.0], d.b as f64),
        (vec![2.0, 3.0, 4.0], d.t as f64),
        (vec![16.0, 32.0], d.v as f64),
    ];
    let gpt2 = cfg.model.arch == crate::config::Arch::Gpt2;
    if gpt2 {
        axes.push((vec![2.0 * h, 4.0 * h, 6.0 * h], d.c as f64));
    }
    let weights: Vec<Vec<f64>> = axes.iter().map(|(n, x)| lagrange(n, *x)).collect();
    let mut idx = vec![0usize; axes.len()];
    let mut total = 0.0;
    loop {
        let node = |a: usize| axes[a].0[idx[a]] as usize;
        let mut c = cfg.clone();
        (c.model.layers, c.batch, c.model.context) = (node(0), node(1), node(2));
        c.model.vocab = 0;
        if gpt2 {
            c.model.channels = node(4);
        }
        let tr = Trainer::new(&c, node(3))?;
        let w: f64 = (0..axes.len()).map(|a| weights[a][idx[a]]).product();
        total += w * MemoryLedger::for_trainer(&tr).total() as f64;
        // Next node combination (odometer).
        let mut a = 0;
        loop {
            if a == axes.len() {
                return Ok(total);
            }
            idx[a] += 1;
            if idx[a] < axes[a].0.len() {
                break;
            }
            idx[a] = 0;
            a += 1;
        }
    }
}

/// Refuse `cfg` when its memory ledger exceeds `available` bytes (module docs).
pub fn check_fits(cfg: &RunConfig, vocab: usize, available: u64) -> Result<()> {
    let d = Dims::from_config(cfg, vocab)?;
    let params = Layout::new(&d).total as f64;
    let avail = available as f64;
    let shape = format!(
        "model.layers = {}, model.channels = {}, model.context = {}, batch = {}, vocab {}",
        d.l, d.c, d.t, d.b, d.v
    );
    let floor = 8.0 * params;
    if floor > avail {
        bail!(
            "this model needs at least {} ({} parameters: f32 weights and gradients alone) \
             but only {} of memory is available ({shape}); make the model smaller",
            gib(floor),
            params as u64,
            gib(avail)
        );
    }
    let (b, t, c, l) = (d.b as f64, d.t as f64, d.c as f64, d.l as f64);
    let acts =
        4.0 * (l * b * t * (16.0 * c + d.h as f64 * t) + b * t * (2.0 * d.v as f64 + 8.0 * c));
    if 24.0 * params + acts < avail / 2.0 {
        return Ok(());
    }
    let need = ledger_total_estimate(cfg, vocab)?;
    if need > avail {
        bail!(
            "this run needs {} of memory (the memory ledger's total: weights, gradients, \
             optimizer state, activations) but only {} is available ({shape}); make the \
             model, batch or context smaller",
            gib(need),
            gib(avail)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The interpolated ledger equals the ledger of the trainer itself (sizes where both
    /// can be built); the ledger is a polynomial, so the only error is f64 rounding
    /// (bound: 1e-6 relative, far above f64 rounding times the Lagrange weights' size).
    #[test]
    fn interpolated_ledger_matches_the_built_trainer() {
        use crate::{Arch, Precision};
        for (arch, precision) in [
            (Arch::Gpt2, Precision::Fp32),
            (Arch::Gpt2, Precision::Bf16),
            (Arch::Gpt2, Precision::Fp8O2),
            (Arch::Llama, Precision::Fp8O1),
        ] {
            let mut cfg = RunConfig {
                precision,
                ..Default::default()
            };
            cfg.model.arch = arch;
            (cfg.model.layers, cfg.batch, cfg.model.context) = (5, 7, 24);
            cfg.model.channels = 96;
            let est = ledger_total_estimate(&cfg, 300).unwrap();
            let real = MemoryLedger::for_trainer(&Trainer::new(&cfg, 300).unwrap()).total() as f64;
            assert!(
                (est - real).abs() < 1e-6 * real,
                "{arch:?} {precision:?}: {est} vs {real}"
            );
        }
    }

    #[test]
    fn too_large_is_refused_naming_both_figures() {
        let mut cfg = RunConfig::default();
        cfg.model.layers = 100_000;
        let e = check_fits(&cfg, 256, 8 << 30).unwrap_err().to_string();
        assert!(
            e.contains("needs at least") && e.contains("only 8.00 GiB"),
            "{e}"
        );
        assert!(e.contains("model.layers = 100000"), "{e}");
        // Fits in params, not in activations: a huge context (attention is T^2).
        let mut cfg = RunConfig::default();
        cfg.model.context = 200_000;
        let e = check_fits(&cfg, 256, 8 << 30).unwrap_err().to_string();
        assert!(
            e.contains("memory ledger") && e.contains("only 8.00 GiB"),
            "{e}"
        );
        assert!(check_fits(&RunConfig::default(), 256, 8 << 30).is_ok());
    }
}
