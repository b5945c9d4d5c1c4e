//! `mpirun -n 2 fp8lm train` behaves like a single-process run: rank 0 alone prints and
//! writes the run directory (metrics once per step, plot, summary, checkpoints), the
//! losses match the same run on 2 in-process ranks, and `--resume` under mpirun
//! continues an fp8-o3 run bit for bit. (Failure injection on one rank is tested with the
//! `fp8lm-dp` binary in tests/tests/mpi_dp.rs.) Built only with the `mpi` feature; FAILS
//! (never skips) when `mpirun` is missing.

#![cfg(feature = "mpi")]

use fp8lm_collectives::mpirun::run_mpirun;
use fp8lm_collectives::{run_ranks, LocalComm};
use fp8lm_trainer::config_file::load_config;
use fp8lm_trainer::distributed::train_data_parallel;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const SETS: [&str; 8] = [
    "model.channels=32",
    "batch=4",
    "max_steps=6",
    "precision=fp8-o3",
    "checkpoint_every=3",
    "eval_every=3",
    "eval_batches=2",
    "optim.warmup_steps=2",
];

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fp8lm-mpi-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `mpirun -n 2 fp8lm <args>` (one compute thread per rank): (success, stdout + stderr).
fn mpirun(args: &[&str]) -> (bool, String) {
    mpirun_n(2, args)
}

/// `mpirun -n <n> fp8lm <args>` (one compute thread per rank): (success, stdout + stderr).
fn mpirun_n(n: usize, args: &[&str]) -> (bool, String) {
    let exe = env!("CARGO_BIN_EXE_fp8lm");
    let envs = [("RAYON_NUM_THREADS", "1")];
    let o =
        run_mpirun(exe, n, args, &envs, Duration::from_secs(180)).unwrap_or_else(|e| panic!("{e}"));
    (o.success, o.text)
}

/// metrics.jsonl as (step, loss text, has val_loss); the loss in its shortest
/// round-trip form, so equal text means equal bits.
fn metrics(run: &Path) -> Vec<(u64, String, bool)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("metrics.jsonl line {l:?}: {e}"));
            (
                v["step"].as_u64().unwrap(),
                v["loss"].to_string(),
                v.get("val_loss").is_some_and(|x| !x.is_null()),
            )
        })
        .collect()
}

#[test]
fn mpirun_fp8lm_train_writes_one_run_dir_and_resumes_bit_identically() {
    let d = tmp("resume");
    let run = d.join("run");
    let rd = format!("run_dir={}", run.display());
    let mut args = vec!["train", "--set", rd.as_str()];
    for s in SETS {
        args.extend(["--set", s]);
    }
    let (ok, text) = mpirun(&args);
    assert!(ok, "{text}");
    // Rank 0 alone writes and prints: one metrics line per step, one summary, and no
    // `run-2` directory picked by the other rank.
    let full = metrics(&run);
    let steps: Vec<u64> = full.iter().map(|m| m.0).collect();
    assert_eq!(steps, (1..=6).collect::<Vec<_>>(), "{text}");
    assert_eq!(
        full.iter().filter(|m| m.2).map(|m| m.0).collect::<Vec<_>>(),
        vec![3, 6],
        "val_loss every eval_every = 3 steps"
    );
    for f in ["config.toml", "loss.svg", "summary.json"] {
        assert!(run.join(f).is_file(), "missing {f}");
    }
    assert!(
        !d.join("run-2").exists(),
        "a second rank wrote a run directory"
    );
    assert_eq!(text.matches("fp8lm run summary").count(), 1, "{text}");
    assert!(
        text.contains("data parallel        2 ranks (mpi)"),
        "{text}"
    );
    let ck3 = run.join("checkpoints/step_00000003");
    assert!(ck3.join("checkpoint.json").is_file(), "{text}");
    // fp8-o3: one optimizer shard per rank and an index, no gathered state.
    let meta = std::fs::read_to_string(ck3.join("checkpoint.json")).unwrap();
    assert!(
        meta.contains("optimizer_shards"),
        "fp8-o3 checkpoint indexes its shards"
    );
    for r in 0..2 {
        let f = format!("optim.rank-{r:04}-of-0002.safetensors");
        assert!(ck3.join(&f).is_file(), "missing {f}");
    }
    assert!(!ck3.join("optimizer.safetensors").exists());

    // The same losses as 2 in-process ranks (RAYON_NUM_THREADS=1 under mpirun may change
    // the GEMMs' summation order: 1e-6 relative).
    let sets: Vec<String> = SETS.iter().map(|s| s.to_string()).collect();
    let cfg = load_config(None, &sets).unwrap();
    let local = run_ranks(2, |c: &LocalComm| {
        let mut l = vec![];
        train_data_parallel(&cfg, c, 6, |_, st| l.push(st.loss)).map(|_| l)
    })
    .unwrap();
    for ((_, m, _), l) in full.iter().zip(&local[0]) {
        let m: f32 = m.parse().unwrap();
        assert!(
            (m - l).abs() <= 1e-6 * l.abs(),
            "mpirun {full:?} vs in-process {:?}",
            local[0]
        );
    }

    // --resume from step 3 under mpirun: steps 4..6 reproduce the uninterrupted run.
    let (ok, text) = mpirun(&["train", "--resume", ck3.to_str().unwrap()]);
    assert!(ok, "{text}");
    assert_eq!(
        metrics(&run),
        full,
        "losses after the mpirun resume differ from the uninterrupted run:\n{text}"
    );
    assert!(run
        .join("checkpoints/step_00000006/checkpoint.json")
        .is_file());

    // One process resumes the 2-rank fp8-o3 checkpoint (its units merged into whole
    // tensors) and trains on.
    let o = Command::new(env!("CARGO_BIN_EXE_fp8lm"))
        .args(["train", "--resume", ck3.to_str().unwrap()])
        .output()
        .unwrap();
    let t = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{t}");
    let one = metrics(&run);
    assert_eq!(one.len(), 6, "{t}");
    assert_eq!(one[..3], full[..3]);
    assert!(one[3..]
        .iter()
        .all(|m| m.1.parse::<f32>().is_ok_and(|x| x.is_finite())));
}

/// `mpirun -n 4 fp8lm train` (fp8-o3) writes four optimizer shards; `mpirun -n 2` resumes
/// them re-partitioned for two ranks (each reading only its own units' ranges), and
/// trains on with finite losses; the first 3 steps stay the 4-rank run's.
#[test]
fn mpirun_four_rank_sharded_checkpoint_resumes_on_two_ranks() {
    let d = tmp("shard4to2");
    let run = d.join("run");
    let rd = format!("run_dir={}", run.display());
    let mut args = vec!["train", "--set", rd.as_str()];
    for s in SETS {
        args.extend(["--set", s]);
    }
    let (ok, text) = mpirun_n(4, &args);
    assert!(ok, "{text}");
    let full = metrics(&run);
    assert_eq!(full.len(), 6, "{text}");
    let ck3 = run.join("checkpoints/step_00000003");
    for r in 0..4 {
        let f = format!("optim.rank-{r:04}-of-0004.safetensors");
        assert!(ck3.join(&f).is_file(), "missing {f}");
    }
    let (ok, text) = mpirun_n(2, &["train", "--resume", ck3.to_str().unwrap()]);
    assert!(ok, "{text}");
    let two = metrics(&run);
    assert_eq!(two.len(), 6, "{text}");
    assert_eq!(two[..3], full[..3]);
    assert!(two[3..]
        .iter()
        .all(|m| m.1.parse::<f32>().is_ok_and(|x| x.is_finite())));
    let ck6 = run.join("checkpoints/step_00000006");
    for r in 0..2 {
        let f = format!("optim.rank-{r:04}-of-0002.safetensors");
        assert!(
            ck6.join(&f).is_file(),
            "missing {f} after the 2-rank resume"
        );
    }
    let _ = std::fs::remove_dir_all(&d);
}
