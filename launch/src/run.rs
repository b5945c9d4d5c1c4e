//! `train`, `eval`, `sample`, `tokenize`: the run loop and its run directory.
//!
//! Run directory (`run_dir`):
//! - `config.toml`: the resolved config (file + `--set`), as used;
//! - `metrics.jsonl`: one line per step (see `fp8lm_trainer::metrics`);
//! - `loss.svg`: loss curves, redrawn at each evaluation;
//! - `fp8.svg` (FP8 runs) and `allreduce.svg` (data-parallel FP8 runs): FP8 health, redrawn
//!   with it (`crate::report::plot_health`);
//! - `checkpoints/step_N/`: the newest `checkpoint_keep` checkpoints;
//! - `summary.json`: final losses, throughput, memory by category (also printed).

use anyhow::{bail, Context, Result};
use fp8lm_collectives::{or_abort, Communicator, ReduceOp, Watchdog};
use fp8lm_trainer::checkpoint::{self, Checkpoint};
use fp8lm_trainer::config_file::{load_config, load_config_str, to_toml};
use fp8lm_trainer::data::{open_dataset, Dataset};
use fp8lm_trainer::metrics::{for_each_metric, Fp8TensorStats, MetricsRecord, MetricsWriter};
use fp8lm_trainer::plot::LossHistory;
use fp8lm_trainer::tokenizer::Tokenizer;
use fp8lm_trainer::{agreement, preflight, resume as resume_check};
use fp8lm_trainer::{snapshot, Precision, RunConfig, Trainer};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::progress::Progress;
use crate::signals::{self, Stopped};
use crate::{ConfigArgs, UsageError};

/// Exit code of a run stopped because too many steps were skipped (diverged).
pub const EXIT_DIVERGED: i32 = 3;
/// Exit code when the collectives watchdog ends a job (a rank stopped answering).
pub const EXIT_WATCHDOG: i32 = 4;

/// A run stopped because more than `max_skipped_fraction` of its recent steps were
/// skipped for non-finite gradients; `main` exits with [`EXIT_DIVERGED`].
#[derive(Debug)]
pub struct Diverged(pub String);
impl std::fmt::Display for Diverged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Diverged {}

/// Steps over which `max_skipped_fraction` is judged.
const SKIP_WINDOW: usize = 100;

/// The default run's config (`fp8lm train` without --config), compiled in.
pub const TINY_TOML: &str = include_str!("../../configs/tiny.toml");

/// Resolve `--config` (default: the built-in configs/tiny.toml) + `--set` into a
/// validated config.
pub fn load(args: &ConfigArgs) -> Result<RunConfig> {
    match &args.config {
        Some(p) => Ok(load_config(Some(p), &args.set)?),
        None => Ok(load_config_str(
            TINY_TOML,
            "configs/tiny.toml (built in)",
            &args.set,
        )?),
    }
}

/// A checkpoint's config with `--set` overrides applied (validated again).
fn config_from_checkpoint(ck: &Checkpoint, sets: &[String]) -> Result<RunConfig> {
    let origin = format!("{}/{}", ck.dir.display(), checkpoint::META_FILE);
    Ok(load_config_str(&to_toml(&ck.meta.config), &origin, sets)?)
}

pub fn tokenize(
    input: &Path,
    output: &Path,
    tokenizer: &str,
    shard_tokens: usize,
    prefix: &str,
    force: bool,
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
    clear_old_shards(output, force)?;
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

/// `.bin` shards already in `output`: refused (a later run reading the folder would mix
/// old and new shards), or with `--force` removed first (each one logged).
fn clear_old_shards(output: &Path, force: bool) -> Result<()> {
    let mut old: Vec<PathBuf> = std::fs::read_dir(output)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "bin"))
                .collect()
        })
        .unwrap_or_default();
    old.sort();
    if old.is_empty() {
        return Ok(());
    }
    if !force {
        let names: Vec<String> = old
            .iter()
            .take(5)
            .map(|p| p.file_name().unwrap_or_default().to_string_lossy().into())
            .collect();
        return Err(UsageError(format!(
            "--output {}: already holds {} .bin shard(s) ({}{}); a run reading this folder would mix them with the new ones. Pass --force to remove them first, or choose another folder",
            output.display(),
            old.len(),
            names.join(", "),
            if old.len() > 5 { ", ..." } else { "" }
        ))
        .into());
    }
    for p in &old {
        std::fs::remove_file(p).with_context(|| format!("{}: cannot remove", p.display()))?;
        tracing::warn!("--force: removed old shard {}", p.display());
    }
    Ok(())
}

/// The run directory a `--resume` path belongs to.
fn run_dir_of(resume: &Path, ck: &Checkpoint) -> PathBuf {
    if resume.join("checkpoints").is_dir() {
        return resume.to_path_buf();
    }
    // <run_dir>/checkpoints/step_N
    match ck.dir.parent() {
        Some(p) if p.file_name().is_some_and(|n| n == "checkpoints") => {
            p.parent().unwrap_or(Path::new(".")).to_path_buf()
        }
        _ => PathBuf::from(&ck.meta.config.run_dir),
    }
}

/// A fresh run never overwrites an old one: `runs/x` taken -> `runs/x-2`, `runs/x-3`, ...
fn fresh_run_dir(want: &str) -> PathBuf {
    let holds_run = |p: &Path| p.join("metrics.jsonl").exists() || p.join("checkpoints").exists();
    let base = PathBuf::from(want);
    if !holds_run(&base) {
        return base;
    }
    let mut k = 2;
    loop {
        let p = PathBuf::from(format!("{want}-{k}"));
        if !holds_run(&p) {
            let resumable = checkpoint::list_checkpoints(&base.join("checkpoints"))
                .is_ok_and(|c| !c.is_empty());
            if resumable {
                tracing::warn!(
                    "{} already holds a run; writing this one to {} (use --resume {} to continue the old one)",
                    base.display(),
                    p.display(),
                    base.display()
                );
            } else {
                tracing::warn!(
                    "{} already holds a run without a complete checkpoint (it holds {}; it cannot be resumed); writing this one to {}",
                    base.display(),
                    resume_check::describe_dir(&base),
                    p.display()
                );
            }
            return p;
        }
        k += 1;
    }
}

fn fp8_stats(tr: &Trainer) -> Vec<Fp8TensorStats> {
    tr.fp8_tensors()
        .iter()
        .map(|v| Fp8TensorStats {
            name: v.name.clone(),
            amax: v.stats.amax,
            scale: v.stats.scale,
            overflow: v.stats.overflow,
            underflow: v.stats.underflow,
            numel: v.stats.numel,
            scale_min: v.stats.block_scales.map(|b| b.0),
            scale_max: v.stats.block_scales.map(|b| b.1),
        })
        .collect()
}

/// Write a checkpoint of `tr`, streamed from the trainer's own buffers (no copy of the
/// state). Replicated precisions: rank 0 writes it alone (`zero` is `None`; every rank
/// holds the same state). fp8-o3 under data parallelism: every rank calls it with its
/// communicator and writes its own optimizer shard, rank 0 the model and the index
/// (`snapshot::save_trainer_sharded`): no rank gathers the optimizer state.
fn save_checkpoint(
    tr: &Trainer,
    data: &dyn Dataset,
    run_dir: &Path,
    skipped: u64,
    zero: Option<&dyn Communicator>,
) -> Result<PathBuf> {
    let mut extra = tr.dist_checkpoint_extra();
    extra.insert("skipped_steps".into(), json!(skipped));
    let (extra, root) = (
        serde_json::Value::Object(extra),
        run_dir.join("checkpoints"),
    );
    let keep = tr.cfg.checkpoint_keep;
    let dir = match zero {
        Some(c) => {
            snapshot::save_trainer_sharded(tr, data, extra, c, &root, keep, &mut |_| Ok(()))?
        }
        None => snapshot::save_trainer(tr, data, extra, None, &root, keep)?,
    };
    if zero.is_none_or(|c| c.rank() == 0) {
        tracing::info!("checkpoint saved: {}", dir.display());
    }
    Ok(dir)
}

/// Write a checkpoint of a tensor-parallel run: every rank of the D x T grid calls it;
/// the T ranks of replica 0 stream their shards into their own files (fp8-o3 over D > 1
/// replicas: every rank its own ZeRO share too), rank 0 writes the index
/// (`fp8lm_trainer::tensor_parallel::ckpt::save_trainer_tp`; atomic as a whole).
fn save_checkpoint_tp(
    tr: &Trainer,
    data: &dyn Dataset,
    run_dir: &Path,
    skipped: u64,
    world: &dyn Communicator,
    dp_rank: usize,
) -> Result<PathBuf> {
    let mut extra = tr.dist_checkpoint_extra();
    extra.insert("skipped_steps".into(), json!(skipped));
    let dir = fp8lm_trainer::tensor_parallel::ckpt::save_trainer_tp(
        tr,
        data,
        serde_json::Value::Object(extra),
        world,
        dp_rank,
        &run_dir.join("checkpoints"),
        tr.cfg.checkpoint_keep,
        &mut |_| Ok(()),
    )?;
    if world.rank() == 0 {
        tracing::info!("checkpoint saved: {}", dir.display());
    }
    Ok(dir)
}

/// Resuming from an earlier checkpoint starts a new timeline: later checkpoints of the old
/// one would otherwise be picked as "newest" by the next `--resume`. They are moved to
/// `checkpoints/superseded-<unix time>/`, not deleted.
fn supersede_later_checkpoints(root: &Path, step: u64) -> Result<()> {
    let later: Vec<_> = checkpoint::list_checkpoints(root)?
        .into_iter()
        .filter(|(s, _)| *s > step)
        .collect();
    if later.is_empty() {
        return Ok(());
    }
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // A fresh directory even when two resumes supersede within the same second.
    let mut aside = root.join(format!("superseded-{secs}"));
    let mut k = 2;
    while aside.exists() {
        aside = root.join(format!("superseded-{secs}-{k}"));
        k += 1;
    }
    std::fs::create_dir_all(&aside)?;
    for (_, dir) in later {
        let to = aside.join(dir.file_name().unwrap_or_default());
        std::fs::rename(&dir, &to)
            .with_context(|| format!("{}: cannot move aside", dir.display()))?;
        tracing::warn!(
            "resuming at step {step}: later checkpoint {} moved to {}",
            dir.display(),
            to.display()
        );
    }
    Ok(())
}

fn mb(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// What `train` is asked to do besides the config.
#[derive(Clone, Copy, Debug, Default)]
pub struct TrainOpts<'a> {
    /// `--resume DIR`.
    pub resume: Option<&'a Path>,
    /// `--convert-precision`: allow resuming a checkpoint in another precision (see
    /// `fp8lm_trainer::resume::conversion_supported`).
    pub convert_precision: bool,
}

/// `fp8lm train`: one process, or under `mpirun` one data-parallel rank of the job (every
/// rank runs the same loop; see [`train_ranked`]).
pub fn train(args: &ConfigArgs, opts: TrainOpts<'_>) -> Result<()> {
    signals::install();
    if !fp8lm_collectives::launched_by_mpi() {
        return train_ranked(args, opts, None);
    }
    let comm = fp8lm_collectives::init().map_err(|e| anyhow::anyhow!("{e}"))?;
    let c: &dyn Communicator = comm.as_ref();
    // An error on one rank must not leave the others waiting in a collective: it tears
    // the whole job down (MPI_Abort), naming the rank and the cause. A stop after a
    // signal or a divergence is not such an error: every rank decides it at the same
    // step, and they leave together (see train_ranked).
    match train_ranked(args, opts, Some(c)) {
        Ok(()) => Ok(()),
        Err(e) if e.is::<Stopped>() || e.is::<Diverged>() => {
            if c.rank() == 0 {
                Err(e)
            } else {
                // Rank 0 reports; the others leave with the same exit code, quietly.
                drop(comm);
                std::process::exit(crate::exit_code_of(&e));
            }
        }
        Err(e) => {
            let r: std::result::Result<(), String> =
                Err(format!("rank {} of {}: {e:#}", c.rank(), c.size()));
            or_abort(c, r);
            Ok(())
        }
    }
}

/// What the watchdog does on a timeout in `fp8lm train`: print why and end the process at
/// once (a rank blocked in MPI cannot be woken; under mpirun the launcher then ends the
/// job), exit code [`EXIT_WATCHDOG`].
fn watchdog_exit() -> fp8lm_collectives::watchdog::OnTimeout {
    Box::new(|msg: &str| {
        crate::progress::finish_all();
        eprintln!("error: {msg} (exit code {EXIT_WATCHDOG})");
        // SAFETY: _exit ends the process without running atexit handlers, which could
        // block on the MPI state the stuck main thread holds.
        #[cfg(unix)]
        unsafe {
            libc::_exit(EXIT_WATCHDOG)
        }
        #[cfg(not(unix))]
        std::process::exit(EXIT_WATCHDOG)
    })
}

/// Whether this step's per-tensor FP8 statistics go to `metrics.jsonl`: every
/// `fp8_stats_every` steps, and at any step with an overflow or a skipped update.
fn log_fp8_now(cfg: &RunConfig, done: u64, skipped: bool, stats: &[Fp8TensorStats]) -> bool {
    let every = cfg.fp8_stats_every as u64;
    skipped
        || (every > 0 && done.is_multiple_of(every))
        || stats.iter().any(|s| s.overflow > 0 || !s.amax.is_finite())
}

/// Bytes a tensor-parallel rank sent per step, by collective kind (JSON).
fn tp_bytes_per_step(tc: &fp8lm_collectives::CountingComm<'_>, steps: u64) -> serde_json::Value {
    let b = tc.bytes();
    let per = |x: u64| x / steps.max(1);
    json!({
        "all_reduce": per(b.all_reduce),
        "reduce_scatter": per(b.reduce_scatter),
        "all_gather_f32": per(b.all_gather),
        "all_gather_fp8": per(b.all_gather_fp8),
        "other": per(b.other),
    })
}

/// A tensor-parallel run (`dist.tensor_parallel = T > 1`) as far as it is wired in: under
/// mpirun with world = D x T ranks (D model replicas of T ranks each; fp8-o3 runs FP8
/// ZeRO over each shard's D replicas), from scratch or resumed from any checkpoint
/// written with tensor parallelism (re-sharded when its D x T differs,
/// `fp8lm_trainer::checkpoint::tp`; fp8-o3's ZeRO state over D > 1 replicas resumes on
/// the same T only, with any D: the library refuses another T, naming both grids).
fn check_tensor_parallel_run(cfg: &RunConfig, comm: Option<&dyn Communicator>) -> Result<()> {
    let t = cfg.dist.tensor_parallel;
    let world = comm.map_or(1, |c| c.size());
    if world < t || !world.is_multiple_of(t) {
        return Err(UsageError(format!(
            "dist.tensor_parallel = {t} needs a multiple of {t} ranks (D x T), this job \
             has {world}: launch it with `mpirun -n {t} fp8lm train ...` (or 2 x {t}, ...; \
             a tensor-parallel checkpoint resumes on one process with --set \
             dist.tensor_parallel=1)"
        ))
        .into());
    }
    Ok(())
}

/// The run loop, rank-aware. With a communicator (mpirun), every rank trains its shard
/// of each global batch and holds the same weights; rank 0 alone prints progress and
/// writes the run directory (config, metrics, plot, summary, checkpoints). Each rank
/// evaluates its share of one fixed set of validation sequences and the loss sums are
/// reduced (`fp8lm_trainer::eval`: the same figure for any batch or rank count;
/// evaluation casts leave the FP8 scaling state untouched, so replicas stay identical).
/// Checkpoints: rank 0 writes them; fp8-o3 on several ranks writes them together (each
/// rank streams its own optimizer shard, rank 0 the model and the shard index; no rank
/// gathers the whole state). `--resume` loads the same checkpoint on every rank; fp8-o3
/// ranks read only the byte ranges of their units under the current partition, for any
/// number of ranks. Tensor-parallel runs: every shard of replica 0 writes its own file
/// (model and optimizer slices, FP8 scaling), rank 0 the index; `--resume` re-shards
/// them for any D x T, one process included (`fp8lm_trainer::checkpoint::tp`). fp8-o3
/// over D > 1 tensor-parallel replicas: every rank also writes its own ZeRO share, and
/// `--resume` (same T, any D) reads per rank only its units.
///
/// Nothing in the run directory is written, moved or deleted before every input has been
/// validated (checkpoint, config, metrics.jsonl, rank agreement: step, data position and
/// weights must agree).
fn train_ranked(
    args: &ConfigArgs,
    opts: TrainOpts<'_>,
    comm: Option<&dyn Communicator>,
) -> Result<()> {
    // 1. Everything that can be wrong with the inputs is checked before any work.
    let (cfg, ck, run_dir) = match opts.resume {
        Some(r) => {
            // The model group stays on disk until the run knows whether it reads it
            // whole (fp8-o3 ranks read only their f32 tensors, by range).
            let ck = resume_check::find_checkpoint_leaving(r, &["model"])?;
            let cfg = match &args.config {
                Some(_) => load(args)?,
                None => config_from_checkpoint(&ck, &args.set)?,
            };
            ck.check_model_shape(&cfg)?;
            resume_check::check_config_change(&ck, &cfg, opts.convert_precision)?;
            let run_dir = run_dir_of(r, &ck);
            (cfg, Some(ck), run_dir)
        }
        None => {
            if opts.convert_precision {
                return Err(UsageError("--convert-precision needs --resume DIR".into()).into());
            }
            let cfg = load(args)?;
            let dir = fresh_run_dir(&cfg.run_dir);
            (cfg, None, dir)
        }
    };
    crate::devices::check_run_device(&cfg.device)?;
    // Every collective from here on is watched: a rank that stops answering ends the job.
    let watchdog = comm.map(|c| {
        Watchdog::new(
            c,
            std::time::Duration::from_secs(cfg.dist.timeout_s),
            watchdog_exit(),
        )
    });
    let comm: Option<&dyn Communicator> = watchdog.as_ref().map(|w| w as &dyn Communicator);
    let root = comm.is_none_or(|c| c.rank() == 0);
    let ranks = comm.map_or(1, |c| c.size());
    let dp = cfg.dist.data_parallel;
    let tpn = cfg.dist.tensor_parallel;
    if dp != 0 && dp * tpn != ranks {
        return Err(UsageError(format!(
            "dist.data_parallel = {dp} x dist.tensor_parallel = {tpn} but this job has {ranks} \
             rank(s): launch it with `mpirun -n {} fp8lm train ...`, or leave \
             dist.data_parallel at 0 (= the ranks / dist.tensor_parallel)",
            dp * tpn
        ))
        .into());
    }
    if let Some(c) = comm {
        // Name the differing keys and each rank's value (the trainer's own check only
        // compares hashes).
        agreement::agree_config_keys(c, &cfg)?;
        // Every rank has picked the run directory before rank 0 creates it (else a slow
        // rank would see rank 0's fresh run and pick `<run_dir>-2`).
        c.barrier().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let mut data = open_dataset(&cfg)?;
    if let Some(avail) = preflight::available_bytes() {
        // Ranks on one host share its memory.
        let local = if comm.is_some() {
            fp8lm_trainer::distributed::mpi_local_ranks(1).max(1)
        } else {
            1
        };
        preflight::check_fits(&cfg, data.vocab_size(), avail / local as u64)?;
    }
    // Tensor parallelism: every rank of the world is one rank of one T-way group, of one
    // of D = world / T replicas (tensor-parallel ranks innermost: `collectives::grid`).
    let tp = cfg.dist.tensor_parallel;
    if tp > 1 {
        check_tensor_parallel_run(&cfg, comm)?;
    }
    // The D x T grid: this rank's tensor-parallel group (counted) and, with D > 1, its
    // data-parallel group (the same tensor-parallel rank in every replica).
    let grid_groups = match comm.filter(|_| tp > 1) {
        Some(c) => Some(
            fp8lm_collectives::grid::Grid::new(c.size(), tp)
                .map_err(UsageError)?
                .groups(c)
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        ),
        None => None,
    };
    let tp_comm = grid_groups
        .as_ref()
        .map(|(t, _)| fp8lm_collectives::CountingComm::new(t));
    let dp_comm: Option<&dyn Communicator> = grid_groups
        .as_ref()
        .map(|(_, d)| d as &dyn Communicator)
        .filter(|d| d.size() > 1);
    // fp8-o3 on several data-parallel ranks builds no optimizer state here: each rank
    // builds only its own share when data parallelism is enabled.
    let mut tr = match &tp_comm {
        Some(c) => Trainer::new_tp(&cfg, data.vocab_size(), c.rank())?,
        None => Trainer::new_for_ranks(&cfg, data.vocab_size(), comm.map_or(1, |c| c.size()))?,
    };
    let mut skipped_before = 0;
    // fp8-o3 under data parallelism: the optimizer state goes to its owners (re-partitioned
    // for this number of ranks) when data parallelism is enabled.
    let zero_dist = comm.is_some() && tp == 1 && cfg.precision == Precision::Fp8O3;
    // fp8-o3 over D > 1 tensor-parallel replicas: likewise, each rank reads only its own
    // units of its shard's state when data parallelism is enabled.
    let zero_dxt = dp_comm.is_some() && cfg.precision == Precision::Fp8O3;
    let mut ck = ck;
    if let (Some(ck), false) = (ck.as_mut(), zero_dist && tr.zero_reads_f32_only()) {
        ck.load_left("model")?;
    }
    if let Some(ck) = &ck {
        if zero_dist {
            snapshot::restore_except_optimizer(&mut tr, data.as_mut(), ck)?;
        } else if zero_dxt {
            fp8lm_trainer::tensor_parallel::ckpt::restore_tp_except_optimizer(
                &mut tr,
                data.as_mut(),
                ck,
            )?;
        } else {
            snapshot::restore(&mut tr, data.as_mut(), ck)?;
        }
        skipped_before = ck
            .meta
            .extra
            .get("skipped_steps")
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        if tr.step() >= cfg.max_steps as u64 {
            bail!(
                "{}: checkpoint is at step {}, already at max_steps = {}; raise it with --set max_steps=N to train further",
                ck.dir.display(),
                tr.step(),
                cfg.max_steps
            );
        }
    }

    if let Some(c) = comm {
        // Same checkpoint on every rank: step, data position and weights (before fp8-o3
        // makes the replicas equal to the owners' masters, which would hide a mismatch).
        // (tensor-parallel ranks hold different shards by design: their weights are not
        // compared; step and data position are)
        let weights = if tp > 1 {
            0
        } else {
            agreement::weights_hash(&tr)
        };
        agreement::agree_start(c, tr.step(), data.position(), weights)?;
    }
    if let Some(c) = comm.filter(|_| tp > 1) {
        if let Some(d) = dp_comm {
            // fp8-o3: this rank's ZeRO units of its shard, read from the checkpoint.
            tr.enable_data_parallel_from_tp_checkpoint(d, c, ck.as_ref())?;
        }
        if let Some(ck) = &ck {
            // Same grid: this replica's own FP8 scaling states and all-reduce factors.
            fp8lm_trainer::tensor_parallel::ckpt::restore_tp_replica(&mut tr, ck)?;
        }
        if root {
            tracing::info!(
                "tensor parallel over {tp} ranks x {} data-parallel replicas ({}), sequence \
                 parallel {}; checkpoints: one file per shard of replica 0{}",
                c.size() / tp,
                c.backend(),
                cfg.dist.sequence_parallel,
                if tr.zero_owned_spans().is_some() {
                    ", plus one fp8-o3 optimizer share per rank"
                } else {
                    ""
                }
            );
        }
    } else if let Some(c) = comm {
        // fp8-o3: each rank reads its own units' optimizer state from the checkpoint.
        tr.enable_data_parallel_from_checkpoint(c, ck.as_ref())?;
        if let Some(ck) = &ck {
            tr.restore_dist_extra(&ck.meta.extra)
                .with_context(|| format!("{}", ck.dir.display()))?;
        }
        if root {
            tracing::info!("data parallel over {} ranks ({})", c.size(), c.backend());
        }
    }

    // The checkpoint's tensors are in the trainer now: keep only its metadata, so the
    // loaded bytes (the model, a replicated optimizer state) are not resident all run.
    let ck = ck.map(|mut c| {
        c.groups.clear();
        c
    });

    // 2. The run directory (rank 0 only). Read (and so validate) metrics.jsonl first;
    // only then write, remove or move anything.
    let metrics_path = run_dir.join("metrics.jsonl");
    let mut history = LossHistory::default();
    let mut health = HealthHistory::default();
    let mut last_losses = std::collections::VecDeque::with_capacity(10);
    let mut metrics = None;
    if root {
        if let Some(ck) = &ck {
            if let Some(missing) = resume_check::missing_metric_steps(&metrics_path, ck.meta.step)?
            {
                tracing::warn!(
                    "{}: no records for steps {missing} of the checkpoint's {} (the file was cut short or replaced); the plot and summary lack them",
                    metrics_path.display(),
                    ck.meta.step
                );
            }
        }
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("run_dir {}: cannot create", run_dir.display()))?;
        resume_check::remove_stale_temporaries(&run_dir);
        checkpoint::write_atomic(&run_dir.join("config.toml"), to_toml(&cfg).as_bytes())?;
        metrics = Some(match &ck {
            Some(ck) => {
                supersede_later_checkpoints(&run_dir.join("checkpoints"), ck.meta.step)?;
                let w = MetricsWriter::resume(&metrics_path, ck.meta.step)?;
                for_each_metric(&metrics_path, |r| {
                    history.push(&r);
                    health.push(&r);
                    push_last(&mut last_losses, r.loss);
                })?;
                w
            }
            None => MetricsWriter::create(&metrics_path)?,
        });
    }
    let plot_path = run_dir.join("loss.svg");
    let floor = data.entropy_floor();
    let title = format!(
        "{} {}L {}H {}C, {}",
        cfg.precision.name(),
        cfg.model.layers,
        cfg.model.heads,
        cfg.model.channels,
        run_dir.display()
    );

    let n_params = tr.model().num_params();
    if root {
        tracing::info!(
            "run {}: {} params, precision {}, {} steps of {} x {} tokens{}",
            run_dir.display(),
            n_params,
            cfg.precision.name(),
            cfg.max_steps,
            cfg.batch,
            cfg.model.context,
            if let Some(ck) = &ck {
                format!(", resuming at step {}", ck.meta.step)
            } else {
                String::new()
            }
        );
    }

    // 3. The loop.
    let start_step = tr.step();
    let max_steps = cfg.max_steps as u64;
    let mut progress = root.then(|| Progress::new(start_step, max_steps, cfg.log_every as u64));
    let t_run = Instant::now();
    let (mut tokens_timed, mut secs_timed) = (0usize, 0f64);
    let mut last_loss = f32::NAN;
    let mut last_val = None;
    let mut last_ckpt = None;
    let mut skip_window = std::collections::VecDeque::with_capacity(SKIP_WINDOW);
    let mut stopped_by: Option<i32> = None;
    let mut diverged: Option<String> = None;
    while tr.step() < max_steps {
        let t0 = Instant::now();
        // The one step path for every grid: the tensor-parallel group when T > 1, and
        // the data-parallel group (the replicas' when T > 1, else the world's).
        let tp_group = tp_comm.as_ref().map(|c| c as &dyn Communicator);
        let dp_group = if tp_group.is_some() { dp_comm } else { comm };
        let st = tr.train_step_on(data.as_mut(), tp_group, dp_group)?;
        let dt = t0.elapsed().as_secs_f64();
        let done = st.step + 1;
        let tok_s = st.tokens as f64 / dt.max(1e-9);
        if done > start_step + 1 || max_steps - start_step == 1 {
            // The first step of a process pays for warm-up (allocation, thread pool).
            tokens_timed += st.tokens;
            secs_timed += dt;
        }
        last_loss = st.loss;
        let fp8 = fp8_stats(&tr);
        let mut rec = MetricsRecord {
            step: done,
            loss: Some(st.loss),
            lr: Some(st.lr),
            grad_norm: Some(st.grad_norm),
            tokens_per_s: Some(tok_s),
            skipped_steps: Some(skipped_before + tr.skipped_steps()),
            elapsed_s: Some(t_run.elapsed().as_secs_f64()),
            fp8: if log_fp8_now(&cfg, done, st.skipped, &fp8) {
                fp8
            } else {
                Vec::new()
            },
            allreduce: tr
                .allreduce_tally()
                .and_then(fp8lm_trainer::metrics::AllReduceStats::from_tally),
            ..Default::default()
        };
        let eval_now =
            cfg.eval_every > 0 && (done % cfg.eval_every as u64 == 0 || done == max_steps);
        if eval_now {
            // Every rank evaluates its share of the fixed validation set (see
            // fp8lm_trainer::eval); the sums are reduced, so all ranks get the same result.
            let v = match &tp_comm {
                Some(tc) => tr.evaluate_tokens_tp(data.as_ref(), cfg.eval_tokens, tc)?,
                None => tr.evaluate_tokens(data.as_ref(), cfg.eval_tokens, comm)?,
            };
            rec.val_loss = Some(v);
            last_val = Some(v);
            if root {
                progress_note(&format!(
                    "step {done}: train loss {:.4}, val loss {v:.4}{}",
                    st.loss,
                    floor.map_or(String::new(), |f| format!(
                        " (entropy floor {f:.4}, gap {:.4})",
                        v as f64 - f
                    ))
                ));
            }
        }
        if let Some(m) = metrics.as_mut() {
            m.write(&rec)?;
        }
        history.push(&rec);
        health.push(&rec);
        push_last(&mut last_losses, rec.loss);
        if eval_now && root {
            if let Err(e) = fp8lm_trainer::plot::plot_history(&plot_path, &history, floor, &title) {
                tracing::warn!("plot {}: {e:#}", plot_path.display());
            }
            crate::report::plot_health(&run_dir, &health.records, &title);
        }
        // A diverged run: too many skipped steps among the last SKIP_WINDOW (every rank
        // skips the same steps: the skip decision follows the all-reduced gradients).
        if skip_window.len() == SKIP_WINDOW {
            skip_window.pop_front();
        }
        skip_window.push_back(st.skipped);
        let too_many = |w: &std::collections::VecDeque<bool>| {
            let k = w.iter().filter(|&&s| s).count();
            (k as f32 > cfg.max_skipped_fraction * w.len() as f32).then_some(k)
        };
        let judge =
            skip_window.len() == SKIP_WINDOW || (done == max_steps && skip_window.len() >= 10);
        if let Some(k) = too_many(&skip_window).filter(|_| judge) {
            diverged = Some(format!(
                "the run diverged: {k} of the last {} steps (up to step {done}) were skipped for non-finite gradients, more than max_skipped_fraction = {}; lower optim.lr (now {}) or resume from an earlier checkpoint",
                skip_window.len(),
                cfg.max_skipped_fraction,
                cfg.optim.lr
            ));
        }
        // Stop signals: every rank stops after the same step (the largest signal number
        // any rank saw, agreed by one scalar all-reduce).
        let mut sig = signals::received().unwrap_or(0);
        if let Some(c) = comm {
            sig = c
                .all_reduce_scalar(sig as f32, ReduceOp::Max)
                .map_err(|e| anyhow::anyhow!("{e}"))? as i32;
        }
        if sig != 0 {
            stopped_by = Some(sig);
        }
        // Replicas are bit-identical, so rank 0 writes the run's state alone, except for
        // fp8-o3's partitioned optimizer state (every rank writes its own shard) and
        // tensor parallelism (every shard of replica 0 writes its own file).
        if (cfg.checkpoint_every > 0 && done % cfg.checkpoint_every as u64 == 0)
            || done == max_steps
            || (stopped_by.is_some() && diverged.is_none())
        {
            let skipped = skipped_before + tr.skipped_steps();
            if let (Some(world), true) = (comm, tp > 1) {
                let dp_rank = dp_comm.map_or(0, |d| d.rank());
                let dir =
                    save_checkpoint_tp(&tr, data.as_ref(), &run_dir, skipped, world, dp_rank)?;
                if root {
                    last_ckpt = Some(dir);
                }
            } else if zero_dist || root {
                let zero = comm.filter(|_| zero_dist);
                let dir = save_checkpoint(&tr, data.as_ref(), &run_dir, skipped, zero)?;
                if root {
                    last_ckpt = Some(dir);
                }
            }
        }
        if let Some(p) = progress.as_mut() {
            p.step(done, st.loss, st.lr, tok_s);
        }
        if stopped_by.is_some() || diverged.is_some() {
            break;
        }
    }
    if let Some(mut p) = progress {
        p.finish();
    }
    let outcome: Option<anyhow::Error> = match (&diverged, stopped_by) {
        (Some(msg), _) => Some(Diverged(msg.clone()).into()),
        (None, Some(sig)) => Some(
            Stopped {
                signal: sig,
                step: tr.step(),
                checkpoint: last_ckpt.clone(),
                run_dir: run_dir.clone(),
            }
            .into(),
        ),
        _ => None,
    };
    if !root {
        if let (Some(c), Some(e)) = (comm, outcome) {
            // Rank 0 writes the summary; leave only once it has.
            c.barrier().map_err(|e| anyhow::anyhow!("{e}"))?;
            return Err(e);
        }
        return Ok(());
    }
    if !plot_path.exists() || outcome.is_some() {
        fp8lm_trainer::plot::plot_history(&plot_path, &history, floor, &title).ok();
        crate::report::plot_health(&run_dir, &health.records, &title);
    }

    // 4. Summary.
    let steps_run = tr.step() - start_step;
    let tokens_per_s = if secs_timed > 0.0 {
        tokens_timed as f64 / secs_timed
    } else {
        0.0
    };
    // Mean of the last 10 training losses: one batch is noisy.
    let tail: Vec<f32> = last_losses
        .iter()
        .copied()
        .filter(|l| l.is_finite())
        .collect();
    let train_tail = if tail.is_empty() {
        last_loss
    } else {
        tail.iter().sum::<f32>() / tail.len() as f32
    };
    let ledger = fp8lm_trainer::memory::MemoryLedger::for_trainer(&tr);
    let by_cat: Vec<(String, usize)> = fp8lm_trainer::memory::Category::ALL
        .iter()
        .map(|c| (c.name().to_string(), ledger.category_bytes(*c)))
        .filter(|(_, b)| *b > 0)
        .collect();
    let mut memory = serde_json::Map::new();
    for (name, b) in &by_cat {
        memory.insert(format!("{name} MiB"), json!(mb(*b)));
    }
    memory.insert(
        "optimizer+gradient+master bytes/param".into(),
        json!(ledger.state_bytes_per_param()),
    );
    if let Some(rss) = fp8lm_trainer::memory::resident_bytes() {
        memory.insert("process resident MiB".into(), json!(mb(rss)));
    }
    let summary = json!({
        "run_dir": run_dir.display().to_string(),
        "precision": cfg.precision.name(),
        "ranks": comm.map_or(1, |c| c.size()),
        "tensor_parallel": tp,
        "data_parallel": comm.map_or(1, |c| c.size()) / tp.max(1),
        "sequence_parallel": cfg.dist.sequence_parallel,
        "tensor_parallel_bytes_per_step": tp_comm.as_ref().map(|tc| tp_bytes_per_step(tc, steps_run)),
        "params": n_params,
        "steps": tr.step(),
        "max_steps": max_steps,
        "steps_this_process": steps_run,
        "final_train_loss_last10": train_tail,
        "final_val_loss": last_val,
        "entropy_floor": floor,
        "val_gap_to_floor": match (last_val, floor) { (Some(v), Some(f)) => Some(v as f64 - f), _ => None },
        "skipped_steps": skipped_before + tr.skipped_steps(),
        "tokens_per_s": tokens_per_s,
        "wall_s": t_run.elapsed().as_secs_f64(),
        "memory": memory,
        "checkpoint": last_ckpt.as_ref().map(|p| p.display().to_string()),
        "stopped_by": stopped_by.map(signals::name),
        "diverged": diverged,
    });
    checkpoint::write_atomic(
        &run_dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;

    println!("\n== fp8lm run summary: {}", run_dir.display());
    println!("precision            {}", cfg.precision.name());
    if let Some(tc) = &tp_comm {
        println!(
            "tensor parallel      {} ranks ({}), sequence parallel {}",
            tc.size(),
            tc.backend(),
            cfg.dist.sequence_parallel
        );
        println!(
            "TP bytes/step/rank   {} (sent per rank, evaluations included)",
            tp_bytes_per_step(tc, steps_run)
        );
    } else if let Some(c) = comm {
        println!("data parallel        {} ranks ({})", c.size(), c.backend());
        if let Some(b) = tr.zero_rank_bytes() {
            let mean = b.iter().sum::<usize>() as f64 / b.len().max(1) as f64;
            let most = *b.iter().max().unwrap_or(&0) as f64;
            println!(
                "fp8-o3 state/rank    {b:?} bytes; most loaded {:.3}x the mean",
                most / mean.max(1.0)
            );
        }
    }
    println!("parameters           {n_params}");
    println!(
        "steps                {} of {max_steps} ({steps_run} in this process)",
        tr.step()
    );
    println!("train loss (last 10) {train_tail:.4}");
    if let Some(v) = last_val {
        println!("val loss             {v:.4}");
    }
    if let Some(f) = floor {
        println!("entropy floor        {f:.4} nats/token");
        if let Some(v) = last_val {
            println!("gap to floor         {:.4} nats/token", v as f64 - f);
        }
    }
    println!(
        "skipped steps        {}",
        skipped_before + tr.skipped_steps()
    );
    println!("throughput           {tokens_per_s:.0} tokens/s");
    println!(
        "wall time            {:.1} s",
        t_run.elapsed().as_secs_f64()
    );
    let cats: Vec<String> = by_cat
        .iter()
        .map(|(n, b)| format!("{n} {:.2}", mb(*b)))
        .collect();
    // Under fp8-o3 the ranks hold different shares; these are rank 0's.
    let who = if comm.is_some() { ", rank 0" } else { "" };
    println!("{:<21}{}", format!("memory (MiB{who})"), cats.join(" | "));
    println!(
        "optimizer state      {:.2} bytes/param (master + gradients + moments)",
        ledger.state_bytes_per_param()
    );
    println!("files                config.toml metrics.jsonl loss.svg summary.json checkpoints/");
    if let (Some(c), Some(_)) = (comm, &outcome) {
        c.barrier().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    match outcome {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Keep the last 10 training losses (the summary's noisy-batch-free figure).
fn push_last(last: &mut std::collections::VecDeque<f32>, loss: Option<f32>) {
    if let Some(l) = loss {
        if last.len() == 10 {
            last.pop_front();
        }
        last.push_back(l);
    }
}

fn progress_note(msg: &str) {
    tracing::info!("{msg}");
}

/// Load a checkpoint and a trainer with its weights (for `eval` and `sample`).
fn trainer_from_checkpoint(
    path: &Path,
    sets: &[String],
) -> Result<(Checkpoint, RunConfig, Trainer)> {
    let ck = resume_check::find_checkpoint(path)?;
    let cfg = one_process(config_from_checkpoint(&ck, sets)?);
    ck.check_model_shape(&cfg)?;
    let mut tr = Trainer::new(&cfg, cfg.vocab())?;
    snapshot::restore_weights(&mut tr, &ck)?;
    Ok((ck, cfg, tr))
}

/// `eval` and `sample` run on one process: a checkpoint of a data- or tensor-parallel run
/// loads whole (tensor-parallel shards gathered by `snapshot::restore_weights`).
fn one_process(mut cfg: RunConfig) -> RunConfig {
    cfg.dist.tensor_parallel = 1;
    cfg.dist.sequence_parallel = false;
    cfg.dist.data_parallel = 0;
    cfg
}

pub fn eval(path: &Path, sets: &[String]) -> Result<()> {
    let ck = resume_check::find_checkpoint(path)?;
    let cfg = one_process(config_from_checkpoint(&ck, sets)?);
    crate::devices::check_run_device(&cfg.device)?;
    ck.check_model_shape(&cfg)?;
    let data = open_dataset(&cfg)?;
    let mut tr = Trainer::new(&cfg, data.vocab_size())?;
    snapshot::restore_weights(&mut tr, &ck)?;
    // The fixed validation set (fp8lm_trainer::eval); never more than the split holds.
    let t = cfg.model.context;
    let seqs = fp8lm_trainer::eval::eval_sequences(cfg.eval_tokens, t, data.val_sequence_count(t));
    if cfg.eval_tokens > seqs.len() * t {
        eprintln!(
            "eval_tokens = {} is beyond the validation set ({} sequences of {t} tokens); \
             evaluating all {} sequences (more would repeat data)",
            cfg.eval_tokens,
            seqs.len(),
            seqs.len()
        );
    }
    let batches = seqs.len().div_ceil(cfg.batch.max(1));
    let t0 = Instant::now();
    let v = tr.evaluate_tokens_with(
        data.as_ref(),
        cfg.eval_tokens,
        None,
        &mut eval_progress(batches),
    )?;
    println!("checkpoint {} (step {})", ck.dir.display(), ck.meta.step);
    println!(
        "val loss {v:.4} nats/token over {} validation sequences of {} tokens in {batches} batches ({:.1}s)",
        seqs.len(),
        cfg.model.context,
        t0.elapsed().as_secs_f64()
    );
    if let Some(f) = data.entropy_floor() {
        println!("entropy floor {f:.4}, gap {:.4}", v as f64 - f);
    }
    Ok(())
}

/// What `fp8.svg` and `allreduce.svg` are drawn from: of the steps that logged FP8 or
/// all-reduce statistics, at most `MAX` records, every 2^k-th (the stride doubles
/// whenever the list would grow past `MAX`). So memory and each redraw's cost (the SVG
/// text the plot builds, ~100 bytes per heat-map cell) stay bounded however long the run
/// (issue 10's flat RSS), and a resume rebuilds the same list from `metrics.jsonl`.
#[derive(Default)]
struct HealthHistory {
    records: Vec<MetricsRecord>,
    stride: u64,
    seen: u64,
}

impl HealthHistory {
    /// 128 step columns per tensor in the heat maps.
    const MAX: usize = 128;

    fn push(&mut self, r: &MetricsRecord) {
        if r.fp8.is_empty() && r.allreduce.is_none() {
            return;
        }
        self.stride = self.stride.max(1);
        if self.seen.is_multiple_of(self.stride) {
            self.records.push(r.clone());
            if self.records.len() > Self::MAX {
                let kept = std::mem::take(&mut self.records);
                self.records = kept.into_iter().step_by(2).collect();
                self.stride *= 2;
            }
        }
        self.seen += 1;
    }
}

/// Progress of a long evaluation, to stderr: at every tenth of an evaluation of 100
/// batches or more, and at least every 5 seconds.
fn eval_progress(batches: usize) -> impl FnMut(usize, f64) {
    let t0 = Instant::now();
    let mut last = Instant::now();
    move |done, mean_so_far| {
        let tenth = batches >= 100 && done % (batches / 10).max(1) == 0;
        if (tenth || last.elapsed().as_secs_f64() >= 5.0) && done < batches {
            last = Instant::now();
            let el = t0.elapsed().as_secs_f64();
            eprintln!(
                "eval: batch {done}/{batches}, mean loss so far {mean_so_far:.4} ({el:.0}s, ~{:.0}s left)",
                el / done as f64 * (batches - done) as f64
            );
        }
    }
}

pub fn sample(path: &Path, prompt: &str, tokens: usize, temperature: f32, seed: u64) -> Result<()> {
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(UsageError(format!(
            "--temperature {temperature}: allowed: a finite number >= 0 (0 = greedy)"
        ))
        .into());
    }
    if prompt.is_empty() {
        return Err(UsageError("--prompt: empty; give at least one character".into()).into());
    }
    let (_, cfg, mut tr) = trainer_from_checkpoint(path, &[])?;
    let tok = Tokenizer::from_name(&cfg.tokenizer)?;
    let ids = tok.encode(prompt);
    let out = tr.sample(&ids, tokens, temperature, seed)?;
    println!("{}{}", prompt, tok.decode(&out));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The FP8 health history stays bounded, evenly spaced from the first logged step, and
    /// ignores steps without FP8 or all-reduce statistics.
    #[test]
    fn health_history_is_bounded_and_evenly_spaced() {
        let mut h = HealthHistory::default();
        for step in 1..=10_000u64 {
            let mut r = MetricsRecord {
                step,
                ..Default::default()
            };
            if step % 2 == 1 {
                r.fp8.push(Fp8TensorStats::default());
            }
            h.push(&r);
        }
        // 5000 logged steps, stride 64 after halvings: 5000 / 64 = 78.1 -> 79 records.
        let steps: Vec<u64> = h.records.iter().map(|r| r.step).collect();
        assert!(steps.len() <= HealthHistory::MAX && steps.len() > HealthHistory::MAX / 2);
        assert_eq!(steps[0], 1);
        assert!(steps.iter().all(|s| s % 2 == 1), "{steps:?}");
        let gap = steps[1] - steps[0];
        assert!(steps.windows(2).all(|w| w[1] - w[0] == gap), "{steps:?}");
        assert_eq!(gap, 2 * h.stride);
    }
}
