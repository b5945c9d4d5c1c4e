//! `fp8lm`: train, evaluate, sample, inspect checkpoints, tokenize text, benchmark.
//!
//! Every subcommand validates its inputs before doing any work and reports problems as
//! one readable line naming the file, key or value at fault.
//!
//! Exit codes: 0 done; 1 a failure while running; 2 a usage or configuration error;
//! 3 a diverged training run (`max_skipped_fraction`); 4 the collectives watchdog ended
//! the job (`dist.timeout_s`); 128 + signal (129 SIGHUP, 130 SIGINT, 143 SIGTERM) a
//! training run stopped by a signal after saving its checkpoint.

mod bench;
mod compare;
mod devices;
mod dist;
mod inspect;
mod plan;

mod progress;
mod report;
mod run;
mod signals;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

const AFTER_HELP: &str = "\
Examples:
  fp8lm train                                   # configs/tiny.toml: tiny GPT-2, embedded corpus (~1 min)
  fp8lm train --config configs/gpt2-124m.toml --set data.path=shards/ --set max_steps=100
  fp8lm train --set precision=fp8-o1 --set run_dir=runs/fp8
  fp8lm train --resume runs/default             # continue from the newest checkpoint
  fp8lm sample --checkpoint runs/default --prompt 'the '
  fp8lm inspect runs/default/checkpoints/step_00000300
  fp8lm tokenize --input book.txt --output shards/ --tokenizer gpt2
  fp8lm report runs/fp32 runs/fp8             # final losses, FP8 health, overlaid curves
  fp8lm compare --seeds 4 --set max_steps=300   # fp32 vs FP8 recipes, mean +- sd, 95% CI
  fp8lm bench gemm

Every config key is documented in configs/example.toml.";

#[derive(Parser)]
#[command(name = "fp8lm", version, about = "Train language models in FP8 mixed precision (the FP8-LM recipe).", after_help = AFTER_HELP)]
struct Cli {
    /// Log level filter (also RUST_LOG), e.g. `debug` or `fp8lm_trainer=debug`.
    #[arg(long, global = true, default_value = "info")]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Config sources shared by the commands that build a model.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ConfigArgs {
    /// TOML run config (default: configs/tiny.toml, built in). Keys: configs/example.toml.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override one key, e.g. `--set model.layers=4 --set precision=fp8-o1`. Applied after
    /// --config, in order; the value is parsed as the key's type.
    #[arg(long = "set", short = 's', value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a model. With no arguments: the tiny default on the embedded synthetic corpus.
    Train {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Continue a run: a run directory (newest checkpoint) or a checkpoint directory.
        /// The checkpoint's config is used unless --config is given; --set still applies.
        #[arg(long, value_name = "DIR")]
        resume: Option<PathBuf>,
        /// With --resume: allow a checkpoint in another precision and convert it
        /// (fp32 <-> bf16, fp8-o2 <-> fp8-o3); without it a precision change is refused.
        #[arg(long)]
        convert_precision: bool,
    },
    /// Validation loss of a checkpoint (on its own data, or on --set data.path=...).
    Eval {
        /// Checkpoint directory or run directory.
        #[arg(long, value_name = "DIR")]
        checkpoint: PathBuf,
        /// Overrides on the checkpoint's config (data.path, eval_batches, batch).
        #[arg(long = "set", short = 's', value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Generate text from a checkpoint.
    Sample {
        /// Checkpoint directory or run directory.
        #[arg(long, value_name = "DIR")]
        checkpoint: PathBuf,
        /// Text to continue.
        #[arg(long)]
        prompt: String,
        /// Tokens to generate.
        #[arg(long, default_value_t = 200)]
        tokens: usize,
        /// Softmax temperature; 0 = greedy.
        #[arg(long, default_value_t = 0.8)]
        temperature: f32,
        /// Sampling seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// List a checkpoint's tensors: name, dtype, shape, scale, bytes; and its metadata.
    Inspect {
        /// Checkpoint directory, run directory, or a single .safetensors file.
        checkpoint: PathBuf,
    },
    /// Tokenize text into llm.c `.bin` shards (readable by llm.c and by `data.path`).
    Tokenize {
        /// A UTF-8 text file or a folder of them (joined with the document separator).
        #[arg(long, short = 'i')]
        input: PathBuf,
        /// Output folder for `<prefix>_000000.bin`, ...
        #[arg(long, short = 'o')]
        output: PathBuf,
        /// `byte` (vocab 256) or `gpt2` (GPT-2 BPE, vocab 50257).
        #[arg(long, default_value = "gpt2")]
        tokenizer: String,
        /// Maximum tokens per shard.
        #[arg(long, default_value_t = 100_000_000)]
        shard_tokens: usize,
        /// File name prefix.
        #[arg(long, default_value = "shard")]
        prefix: String,
        /// Remove the `.bin` shards already in --output first (without it, a folder that
        /// holds shards is refused: a run would read old and new shards together).
        #[arg(long)]
        force: bool,
    },
    /// Compare finished (or running) runs: a table of final losses and FP8 health, and
    /// their loss curves overlaid in one SVG.
    Report {
        /// Run directories (each with metrics.jsonl).
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// Where to write the overlaid loss curves.
        #[arg(long, default_value = "report.svg")]
        out: PathBuf,
    },
    /// Parity harness: train K seeds of each precision/recipe on the config's data and
    /// print the validation losses (mean +- sd) and each variant's difference to the
    /// first with a 95% interval (paired by seed).
    Compare {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Comma-separated `precision[:recipe]` list; the first is the reference.
        /// Precisions: fp32, bf16, fp8-o1, fp8-o2; recipes: delayed, current.
        #[arg(long, default_value = "fp32,fp8-o1:delayed,fp8-o1:current")]
        variants: String,
        /// Seeds per variant (K >= 2 for an interval).
        #[arg(long, default_value_t = 4)]
        seeds: usize,
        /// The seeds are first_seed, first_seed + 1, ...
        #[arg(long, default_value_t = 1)]
        first_seed: u64,
    },
    /// Print the resolved config (file + overrides, validated) as TOML.
    Config {
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// CUDA support of this binary: GPUs, compute capability, driver, NVRTC, cuBLASLt and
    /// NCCL versions, or exactly which library is missing.
    Devices,
    /// Each rank's memory by category and the bytes each collective sends per step, for
    /// the config's model on `dist.data_parallel` ranks, without allocating the model.
    Plan {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Plan every precision (fp32, bf16, fp8-o1, fp8-o2, fp8-o3) and compare them.
        #[arg(long)]
        all: bool,
    },
    /// Benchmarks that print figures (GEMM, casts, a training step, memory, all-reduce).
    Bench {
        #[command(subcommand)]
        which: bench::BenchCmd,
    },
}

fn init_tracing(filter: &str) {
    use tracing_subscriber::EnvFilter;
    let f = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(f)
        .with_writer(progress::LogWriter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

/// Under an MPI launcher, each rank's compute threads default to its share of the host's
/// cores (`cores / local ranks`): rayon would otherwise start one thread per core in
/// every rank, and N ranks on one host would run N x cores threads on the cores.
/// `RAYON_NUM_THREADS` still wins.
fn size_thread_pool_for_mpi() {
    if !fp8lm_collectives::launched_by_mpi() || std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let local = fp8lm_trainer::distributed::mpi_local_ranks(1);
    let threads = fp8lm_trainer::distributed::rank_cores(local);
    match rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
    {
        Ok(()) => tracing::debug!(threads, local_ranks = local, "compute threads per rank"),
        Err(e) => tracing::warn!("could not size the compute thread pool: {e}"),
    }
}

/// Errors that are the user's input (exit 2) rather than a failure while running (exit 1).
#[derive(Debug)]
pub struct UsageError(pub String);
impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for UsageError {}

fn main() {
    // Rust ignores SIGPIPE, turning a closed pipe (`| head`) into a panic on the next
    // print; the default action ends the process quietly, as CLI tools do.
    #[cfg(unix)]
    // SAFETY: setting a signal disposition to SIG_DFL at start-up, before any threads.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    init_tracing(&cli.log);
    size_thread_pool_for_mpi();
    // Decide (and log) the GEMM path now: a forced FP8LM_GEMM this machine lacks is a
    // usage error at start-up, not a panic in the first GEMM.
    if let Err(e) = fp8lm_kernels::gemm::GemmPath::init() {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    let result = match cli.cmd {
        Cmd::Train {
            cfg,
            resume,
            convert_precision,
        } => run::train(
            &cfg,
            run::TrainOpts {
                resume: resume.as_deref(),
                convert_precision,
            },
        ),
        Cmd::Eval { checkpoint, set } => run::eval(&checkpoint, &set),
        Cmd::Sample {
            checkpoint,
            prompt,
            tokens,
            temperature,
            seed,
        } => run::sample(&checkpoint, &prompt, tokens, temperature, seed),
        Cmd::Inspect { checkpoint } => inspect::inspect(&checkpoint),
        Cmd::Tokenize {
            input,
            output,
            tokenizer,
            shard_tokens,
            prefix,
            force,
        } => run::tokenize(&input, &output, &tokenizer, shard_tokens, &prefix, force),
        Cmd::Config { cfg } => {
            run::load(&cfg).map(|c| print!("{}", fp8lm_trainer::config_file::to_toml(&c)))
        }
        Cmd::Devices => devices::devices(),
        Cmd::Bench { which } => bench::run(which),
        Cmd::Plan { cfg, all } => plan::run(&cfg, all),
        Cmd::Report { runs, out } => report::report(&runs, &out),
        Cmd::Compare {
            cfg,
            variants,
            seeds,
            first_seed,
        } => compare::run(&cfg, &variants, seeds, first_seed),
    };
    if let Err(e) = result {
        progress::finish_all();
        if e.is::<signals::Stopped>() {
            eprintln!("fp8lm: {e:#}");
        } else {
            eprintln!("error: {e:#}");
        }
        std::process::exit(exit_code_of(&e));
    }
}

/// The exit code for an error (see the crate docs).
pub fn exit_code_of(e: &anyhow::Error) -> i32 {
    if let Some(s) = e.downcast_ref::<signals::Stopped>() {
        return signals::exit_code(s.signal);
    }
    if e.is::<run::Diverged>() {
        return run::EXIT_DIVERGED;
    }
    let usage = e.downcast_ref::<fp8lm_trainer::ConfigError>().is_some()
        || e.downcast_ref::<UsageError>().is_some();
    if usage {
        2
    } else {
        1
    }
}
