//! `fp8lm bench ...`: benchmarks that print figures. Each wraps the bench function the
//! owning crate exposes; one whose crate has not provided it yet says so and fails,
//! rather than printing made-up numbers. Figures from a shared machine are noisy: each
//! bench compares implementations measured in the same run.

use anyhow::{bail, Result};
use clap::Subcommand;
use fp8lm_trainer::{Precision, Trainer};
use std::time::Duration;

use crate::ConfigArgs;

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// GEMM throughput: our FP8 / bf16 / f32 GEMMs vs the `gemm` and `matrixmultiply`
    /// crates on GPT-2-like shapes (best of several runs).
    Gemm {
        /// Time budget per (implementation, shape) in milliseconds.
        #[arg(long, default_value_t = 400)]
        budget_ms: u64,
    },
    /// Bulk FP8 cast throughput (f32 -> E4M3/E5M2 with amax, and back), best of N passes.
    Cast {
        /// Elements per slice (the default, 4M, streams past the caches).
        #[arg(long, default_value_t = 1 << 22)]
        elements: usize,
        #[arg(long, default_value_t = 10)]
        reps: usize,
    },
    /// One training step per precision (fp32, bf16, fp8-o1, ...): time and tokens/s.
    Train {
        /// Data-parallel: fp32 vs fp8-o3 step time and its share spent in communication
        /// (over MPI under `mpirun`, else on `--ranks` in-process ranks).
        #[arg(long)]
        dist: bool,
        #[arg(long, default_value_t = 2)]
        ranks: usize,
        #[arg(long, default_value_t = 5)]
        steps: usize,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Memory by category (weights, gradients, moments, activations) for the config's
    /// model in each precision the trainer supports.
    Memory {
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Optimizer step time per parameter: fp32 AdamW vs the FP8-LM optimizer (GPT-2 shapes).
    Optim {
        #[arg(long, default_value_t = 10)]
        steps: usize,
        #[arg(long, default_value_t = 12)]
        layers: usize,
        #[arg(long, default_value_t = 768)]
        channels: usize,
    },
    /// FP8 gradient all-reduce vs f32 all-reduce: in-process ranks, or MPI under mpirun.
    Allreduce {
        /// Gradient elements per rank.
        #[arg(long, default_value_t = 64 << 20)]
        elements: usize,
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// In-process ranks when not started by mpirun.
        #[arg(long, default_value_t = 2)]
        ranks: usize,
    },
}

fn not_built(what: &str, provider: &str) -> Result<()> {
    bail!(
        "`fp8lm bench {what}` is not built yet: it needs {provider}, which has not landed on main"
    )
}

const NOISE: &str = "figures on a shared machine are noisy; compare rows of this run";

pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Gemm { budget_ms } => {
            use fp8lm_kernels::bench::{gemm_bench, GEMM_BENCH_SHAPES};
            println!(
                "GEMM benchmark ({budget_ms} ms per case, {} threads; {NOISE})",
                rayon::current_num_threads()
            );
            let report = gemm_bench(&GEMM_BENCH_SHAPES, Duration::from_millis(budget_ms));
            print!("{}", report.table());
            Ok(())
        }
        BenchCmd::Cast { elements, reps } => {
            use fp8lm_fp8::bench::{bench_casts, format_rows, CastBenchConfig};
            if elements == 0 || reps == 0 {
                return Err(crate::UsageError("--elements and --reps must be >= 1".into()).into());
            }
            println!(
                "bulk casts: {elements} elements, best of {reps} passes, SIMD backend {}, {} threads ({NOISE})",
                fp8lm_fp8::cast::Backend::detect().name(),
                rayon::current_num_threads()
            );
            print!(
                "{}",
                format_rows(&bench_casts(CastBenchConfig { elements, reps }))
            );
            Ok(())
        }
        BenchCmd::Train {
            dist: true,
            ranks,
            steps,
            cfg,
        } => crate::dist::bench(&cfg, steps, ranks),
        BenchCmd::Train { .. } => not_built(
            "train",
            "fp8lm_trainer::bench (the model engineer's step benchmark)",
        ),
        BenchCmd::Memory { cfg } => memory(&cfg),
        BenchCmd::Optim {
            steps,
            layers,
            channels,
        } => {
            let metas = fp8lm_optim::zero::gpt2_metas(layers, channels, 1024, 50257);
            println!(
                "optimizer step, {layers} layers x {channels} channels, {steps} steps ({NOISE})"
            );
            println!(
                "{}",
                fp8lm_optim::bench::optimizer_step(&metas, steps.max(1)).report()
            );
            Ok(())
        }
        BenchCmd::Allreduce {
            elements,
            reps,
            ranks,
        } => {
            if let Some(table) = fp8lm_collectives::bench::run(elements, reps, ranks)? {
                println!("({NOISE})");
                print!("{table}");
            }
            Ok(())
        }
    }
}

/// The memory ledger of a constructed trainer (buffers as allocated, before any step).
pub fn ledger(tr: &Trainer) -> fp8lm_trainer::memory::MemoryLedger {
    use fp8lm_trainer::memory::{Category, MemoryLedger};
    let m = tr.model();
    let n = m.num_params();
    let mut l = MemoryLedger::new(n);
    // fp32 / bf16 / fp8-o1 keep f32 weights the optimizer updates in place: the master.
    l.add(
        Category::MasterWeights,
        "f32 weights (updated in place)",
        4 * m.params.len(),
    );
    l.add(Category::Gradients, "f32 gradients", 4 * m.grads.len());
    l.add_optimizer(tr.optimizer(), ["f32", "f32", "f32"]);
    l.add(
        Category::Activations,
        "activations (forward cache)",
        m.activation_bytes(),
    );
    l
}

fn memory(args: &ConfigArgs) -> Result<()> {
    let base = crate::run::load(args)?;
    println!(
        "memory ledger: model {}L {}H {}C T={} B={} V={} (from the config; change it with --config/--set)",
        base.model.layers,
        base.model.heads,
        base.model.channels,
        base.model.context,
        base.batch,
        base.vocab()
    );
    for p in [
        Precision::Fp32,
        Precision::Bf16,
        Precision::Fp8O1,
        Precision::Fp8O2,
        Precision::Fp8O3,
    ] {
        let mut cfg = base.clone();
        cfg.precision = p;
        match Trainer::new(&cfg, cfg.vocab()) {
            Ok(tr) => print!("{}", ledger(&tr).report(p.name())),
            Err(e) => println!("{}: not available: {e:#}", p.name()),
        }
    }
    if let Some(rss) = fp8lm_trainer::memory::resident_bytes() {
        println!(
            "process resident memory now: {:.1} MiB",
            rss as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}
