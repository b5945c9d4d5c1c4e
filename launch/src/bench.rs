//! `fp8lm bench ...`: benchmarks that print figures. Each wraps the bench function the
//! owning crate exposes (kernels, fp8, trainer, optim, collectives). Figures from a
//! shared machine are noisy: each bench compares implementations measured in the same
//! run, best-of several.

use anyhow::Result;
use clap::Subcommand;
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
    /// Step time and tokens/s for fp32, bf16 and fp8-o1 (forward / backward / optimizer,
    /// GEMM share), on the small default model and at GPT-2 124M dimensions. With
    /// `--dist`: data-parallel step time, communication time and the part of it the step
    /// waited for (exposed), for fp32, fp8-o1 and fp8-o3 with the gradient reduction
    /// overlapped with the backward and not (over MPI under `mpirun`, else on `--ranks`
    /// in-process ranks), for the model of `--config`/`--set`.
    Train {
        /// Only the small model (the 124M case builds ~7 GB of trainers).
        #[arg(long)]
        small_only: bool,
        /// Timed steps per case (best-of and median paired ratio; with --dist: averaged
        /// after 2 warm-up steps).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        #[arg(long)]
        dist: bool,
        /// In-process ranks for --dist without mpirun.
        #[arg(long, default_value_t = 2)]
        ranks: usize,
        /// With --dist: tensor-parallel sizes T to measure (comma-separated, each
        /// dividing the rank count; D = ranks / T), SP off and on for T > 1, in
        /// fp32, fp8-o1 and fp8-o3: step time, TP / DP communication time, exposed
        /// time, bytes per collective kind. Without it: the data-parallel table.
        #[arg(long, value_delimiter = ',')]
        tp: Vec<usize>,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Memory by category (weights, gradients, moments, activations) for the config's
    /// model in each precision the trainer supports.
    Memory {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Also measure fp8-o3 on this many data-parallel ranks (each an `mpirun` child
        /// process, so each peak is its own; needs the `mpi` feature): every rank's
        /// optimizer + master state against state / N, and its peak resident set while
        /// training and after a sharded checkpoint save. 0 or 1: not measured.
        #[arg(long, default_value_t = 0)]
        ranks: usize,
        /// Precisions measured one process each (comma-separated).
        #[arg(long, default_value = "fp32,bf16,fp8-o1,fp8-o2")]
        precisions: String,
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

const NOISE: &str = "figures on a shared machine are noisy; compare rows of this run";

pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Gemm { budget_ms } => {
            use fp8lm_kernels::bench::{gemm_bench, gemm_bench_backward, GEMM_BENCH_SHAPES};
            println!(
                "GEMM benchmark ({budget_ms} ms per case, {} threads; {NOISE})",
                rayon::current_num_threads()
            );
            let report = gemm_bench(&GEMM_BENCH_SHAPES, Duration::from_millis(budget_ms));
            print!("{}", report.table());
            // The backward GEMMs' layouts (dinp plain, dW trans_a) of the same layers.
            let back =
                gemm_bench_backward(&GEMM_BENCH_SHAPES[1..], Duration::from_millis(budget_ms));
            print!("{}", back.table());
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
            tp,
            ..
        } => crate::dist::bench(&cfg, steps, ranks, &tp),
        BenchCmd::Train {
            small_only, steps, ..
        } => {
            use fp8lm_trainer::bench::{bench_train, default_cases};
            println!("training step benchmark, best of {steps} steps ({NOISE})");
            let report = bench_train(&default_cases(!small_only), steps.max(1))?;
            print!("{}", report.table());
            for c in report.checks() {
                println!("{c}");
            }
            Ok(())
        }
        BenchCmd::Memory {
            cfg,
            ranks,
            precisions,
        } => memory(&cfg, ranks, &precisions),
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

/// Set in the child processes of `fp8lm bench memory` (one per precision, so each
/// peak resident set is its own): the precision to measure.
const MEMORY_CHILD_ENV: &str = "FP8LM_BENCH_MEMORY_CHILD";

/// The value of [`MEMORY_CHILD_ENV`] in the `mpirun` children measuring fp8-o3 ranks.
const ZERO_CHILD: &str = "fp8-o3-ranks";

fn memory(args: &ConfigArgs, ranks: usize, precisions: &str) -> Result<()> {
    let cfg = crate::run::load(args)?;
    if std::env::var(MEMORY_CHILD_ENV).as_deref() == Ok(ZERO_CHILD) {
        return memory_zero_child(&cfg);
    }
    if let Ok(p) = std::env::var(MEMORY_CHILD_ENV) {
        let mut c = cfg.clone();
        c.precision = serde_json::from_value(serde_json::json!(p))
            .map_err(|e| anyhow::anyhow!("{MEMORY_CHILD_ENV}={p}: {e}"))?;
        let r = fp8lm_trainer::memory::measure_peak(&c, c.vocab(), 2)?;
        println!("PEAK {}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!(
        "memory ledger: model {}L {}H {}C T={} B={} V={} (from the config; change it with --config/--set)",
        cfg.model.layers,
        cfg.model.heads,
        cfg.model.channels,
        cfg.model.context,
        cfg.batch,
        cfg.vocab()
    );
    print!(
        "{}",
        fp8lm_trainer::memory::bench_memory(&cfg, cfg.vocab(), true)?
    );
    print!(
        "{}",
        fp8lm_trainer::distributed::zero_imbalance_table(&cfg, cfg.vocab(), &[2, 4, 8])?
    );
    // Measured: each precision in a child process (2 training steps, an evaluation and
    // a checkpoint save, as `fp8lm train` does), peak resident set start-up included.
    let exe = std::env::current_exe()?;
    let mut rows = Vec::new();
    for p in precisions
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let out = std::process::Command::new(&exe)
            .args(std::env::args_os().skip(1))
            .env(MEMORY_CHILD_ENV, p)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix("PEAK "))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "bench memory: the {p} child process reported no peak (exit {}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                )
            })?;
        rows.push(serde_json::from_str(line)?);
    }
    println!("ledger vs measured peak resident set (one process per precision; MB = 1e6 bytes):");
    print!("{}", fp8lm_trainer::memory::peak_table(&rows));
    if ranks > 1 {
        memory_zero(ranks)?;
    }
    Ok(())
}

/// fp8-o3 on `ranks` data-parallel ranks, each an `mpirun` child running this command
/// again (with [`MEMORY_CHILD_ENV`] = [`ZERO_CHILD`]): one row per rank.
fn memory_zero(ranks: usize) -> Result<()> {
    let exe = std::env::current_exe()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // All ranks save into one folder (rank 0 removes it).
    let dir = std::env::temp_dir().join(format!("fp8lm-bench-memory-o3-{}", std::process::id()));
    let dir_s = dir.to_string_lossy().into_owned();
    let envs = [
        (MEMORY_CHILD_ENV, ZERO_CHILD),
        ("FP8LM_BENCH_MEMORY_DIR", dir_s.as_str()),
    ];
    let exe_s = exe.to_string_lossy().into_owned();
    let out = fp8lm_collectives::mpirun::run_mpirun(
        &exe_s,
        ranks,
        &args,
        &envs,
        std::time::Duration::from_secs(3600),
    )
    .map_err(|e| anyhow::anyhow!("bench memory --ranks {ranks}: {e}"));
    let _ = std::fs::remove_dir_all(&dir);
    let out = out?;
    let mut rows: Vec<fp8lm_trainer::memory::ZeroPeakReport> = Vec::new();
    for l in out.text.lines().filter_map(|l| l.strip_prefix("PEAKZERO ")) {
        rows.push(serde_json::from_str(l)?);
    }
    rows.sort_by_key(|r| r.rank);
    if !out.success || rows.len() != ranks {
        anyhow::bail!(
            "bench memory --ranks {ranks}: the mpirun job {} with {} of {ranks} rank reports:\n{}",
            if out.success { "succeeded" } else { "failed" },
            rows.len(),
            out.text
        );
    }
    println!(
        "fp8-o3 on {ranks} ranks (one mpirun process each; peak resident set after the \
         start-up (trainer built, data parallelism enabled), after 2 steps and an evaluation, after a sharded checkpoint save too, and of a resume from it on \
         a fresh trainer with one step; state: the rank's optimizer + master bytes; \
         MB = 1e6 bytes; FP8LM_ZERO_START=whole measures the start-up and resume that \
         drew the whole f32 model and loaded the whole model group):"
    );
    print!("{}", fp8lm_trainer::memory::zero_peak_table(&rows));
    Ok(())
}

/// One rank of [`memory_zero`]'s job.
fn memory_zero_child(cfg: &fp8lm_trainer::RunConfig) -> Result<()> {
    let comm = fp8lm_collectives::init()?;
    let dir = std::env::var_os("FP8LM_BENCH_MEMORY_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("fp8lm-bench-memory-o3"));
    let r = fp8lm_collectives::or_abort(
        comm.as_ref(),
        fp8lm_trainer::memory::measure_peak_zero(cfg, cfg.vocab(), 2, comm.as_ref(), &dir),
    );
    println!("PEAKZERO {}", serde_json::to_string(&r)?);
    Ok(())
}
