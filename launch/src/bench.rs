//! `fp8lm bench ...`: benchmarks that print figures. Each wraps the bench function the
//! owning crate exposes; one whose crate has not provided it yet says so and fails,
//! rather than printing made-up numbers. Figures from a shared machine are noisy: each
//! bench compares implementations measured in the same run.

use anyhow::{bail, Result};
use clap::Subcommand;
use std::time::Duration;

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// GEMM throughput: our FP8 / bf16 / f32 GEMMs vs the `gemm` and `matrixmultiply`
    /// crates on GPT-2-like shapes (best of several runs).
    Gemm {
        /// Time budget per (implementation, shape) in milliseconds.
        #[arg(long, default_value_t = 400)]
        budget_ms: u64,
    },
    /// Bulk FP8 cast throughput (f32 -> E4M3/E5M2 with amax, and back).
    Cast,
    /// One training step per precision (fp32, bf16, fp8-o1, ...): time and tokens/s.
    Train,
    /// Memory by category (weights, gradients, optimizer state, activations) per precision.
    Memory,
    /// Gradient all-reduce in f32, bf16 and FP8 (FP8-LM): bytes sent per rank and time.
    /// Runs on MPI's ranks under `mpirun` (build with `--features mpi`), else on
    /// in-process ranks.
    Allreduce {
        /// Gradient elements per rank.
        #[arg(long, default_value_t = 64 << 20)]
        elements: usize,
        /// Repetitions (the best is reported).
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

pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Gemm { budget_ms } => {
            use fp8lm_kernels::bench::{gemm_bench, GEMM_BENCH_SHAPES};
            println!(
                "GEMM benchmark ({} ms per case, {} threads; figures on a shared machine are noisy, compare rows of this run)",
                budget_ms,
                rayon::current_num_threads()
            );
            let report = gemm_bench(&GEMM_BENCH_SHAPES, Duration::from_millis(budget_ms));
            print!("{}", report.table());
            Ok(())
        }
        BenchCmd::Cast => not_built(
            "cast",
            "fp8lm_fp8::bench (the FP8 engineer's cast benchmark)",
        ),
        BenchCmd::Train => not_built(
            "train",
            "fp8lm_trainer::bench (the model engineer's step benchmark)",
        ),
        BenchCmd::Memory => not_built("memory", "the memory ledger (the optimizer engineer's)"),
        BenchCmd::Allreduce {
            elements,
            reps,
            ranks,
        } => {
            // Only rank 0 gets the table; the other MPI ranks print nothing.
            if let Some(table) = fp8lm_collectives::bench::run(elements, reps, ranks)? {
                println!("(shared machine: figures are noisy, compare rows of this run)");
                print!("{table}");
            }
            Ok(())
        }
    }
}
