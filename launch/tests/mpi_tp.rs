//! `mpirun -n 2 fp8lm train --set dist.tensor_parallel=2` (one model replica over two
//! processes) trains like the same tensor-parallel run on 2 in-process ranks: the same
//! losses, rank 0 alone writing the run directory, the summary naming the grid and the
//! bytes moved per collective kind. Built only with the `mpi` feature; FAILS (never
//! skips) when `mpirun` is missing.

#![cfg(feature = "mpi")]

use fp8lm_collectives::mpirun::run_mpirun;
use fp8lm_collectives::{run_ranks, Communicator, LocalComm};
use fp8lm_trainer::config_file::load_config;
use fp8lm_trainer::data::open_dataset;
use fp8lm_trainer::Trainer;
use std::time::Duration;

const STEPS: usize = 6;

fn losses_in_process(sets: &[String]) -> Vec<f32> {
    let cfg = load_config(None, sets).unwrap();
    let per_rank = run_ranks(2, |c: &LocalComm| {
        let mut data = open_dataset(&cfg)?;
        let mut tr = Trainer::new_tp(&cfg, data.vocab_size(), c.rank())?;
        (0..STEPS)
            .map(|_| tr.train_step_tp(data.as_mut(), c).map(|s| s.loss))
            .collect::<anyhow::Result<Vec<f32>>>()
    })
    .unwrap();
    per_rank.into_iter().next().unwrap()
}

#[test]
fn mpirun_tensor_parallel_train_matches_in_process_ranks() {
    for (precision, sp) in [("fp32", false), ("fp8-o1", true)] {
        let dir =
            std::env::temp_dir().join(format!("fp8lm-mpi-tp-{precision}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let run = dir.join("run");
        let mut sets: Vec<String> = [
            "model.channels=32",
            "batch=4",
            "eval_every=3",
            "eval_tokens=256",
            "optim.warmup_steps=2",
            "dist.tensor_parallel=2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        sets.push(format!("max_steps={STEPS}"));
        sets.push(format!("precision={precision}"));
        sets.push(format!("dist.sequence_parallel={sp}"));
        sets.push(format!("run_dir={}", run.display()));
        let mut args = vec!["train".to_string()];
        for s in &sets {
            args.extend(["--set".to_string(), s.clone()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let exe = env!("CARGO_BIN_EXE_fp8lm");
        let o = run_mpirun(
            exe,
            2,
            &args,
            &[("RAYON_NUM_THREADS", "1")],
            Duration::from_secs(120),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(o.success, "{precision}: mpirun failed:\n{}", o.text);
        assert!(
            o.text.contains("tensor parallel      2 ranks (mpi)"),
            "{}",
            o.text
        );
        let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        let mpi: Vec<f32> = metrics
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["loss"].as_f64().unwrap() as f32
            })
            .collect();
        let local = losses_in_process(&sets);
        assert_eq!(mpi.len(), STEPS, "one metrics line per step (rank 0 only)");
        // The same ring order on both backends; the GEMMs' thread count (1 under mpirun)
        // may change their summation order: the fp32 regrouping bound of
        // trainer/tests/tensor_parallel_model.rs (1e-5), FP8's 2e-3 for fp8-o1.
        let bound = if precision == "fp32" { 1e-5 } else { 2e-3 };
        let worst = mpi
            .iter()
            .zip(&local)
            .map(|(a, b)| ((a - b) / b).abs())
            .fold(0f32, f32::max);
        println!("{precision} SP {sp}: mpirun vs in-process max relative {worst:.2e}");
        for (a, b) in mpi.iter().zip(&local) {
            assert!(
                ((a - b) / b).abs() <= bound,
                "{precision}: mpirun {mpi:?} vs in-process {local:?}"
            );
        }
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap())
                .unwrap();
        assert_eq!(summary["tensor_parallel"], 2);
        let bytes = &summary["tensor_parallel_bytes_per_step"];
        println!("{precision} SP {sp}: bytes per step {bytes}");
        if sp {
            assert!(bytes["all_gather_fp8"].as_u64().unwrap() > 0, "{bytes}");
            assert!(bytes["reduce_scatter"].as_u64().unwrap() > 0, "{bytes}");
        } else {
            assert!(bytes["all_reduce"].as_u64().unwrap() > 0, "{bytes}");
            assert_eq!(bytes["all_gather_fp8"], 0, "{bytes}");
        }
        assert!(
            !dir.join("run-2").exists(),
            "a second rank wrote a run directory"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The in-process D = 2 x T = 2 grid's losses (rank 0's; every rank reports the same).
fn losses_grid_in_process(sets: &[String]) -> Vec<f32> {
    let cfg = load_config(None, sets).unwrap();
    let grid = fp8lm_collectives::grid::Grid::new(4, 2).unwrap();
    let per_rank = run_ranks(4, |w: &LocalComm| {
        let (tp, dp) = grid.groups(w)?;
        let mut data = open_dataset(&cfg)?;
        let mut tr = Trainer::new_tp(&cfg, data.vocab_size(), tp.rank())?;
        tr.enable_data_parallel(&dp)?;
        (0..STEPS)
            .map(|_| tr.train_step_dxt(data.as_mut(), &tp, &dp).map(|s| s.loss))
            .collect::<anyhow::Result<Vec<f32>>>()
    })
    .unwrap();
    per_rank.into_iter().next().unwrap()
}

/// `mpirun -n 4 fp8lm train --set dist.tensor_parallel=2`: two replicas of a 2-way
/// tensor-parallel model (world = D x T) train like the in-process 2 x 2 grid, within
/// the fp32 regrouping bound (1e-5: the GEMMs' thread count differs, as above).
#[test]
fn mpirun_data_parallel_over_tensor_parallel_matches_in_process_grid() {
    dxt_matches_in_process("fp32", 1e-5);
}

fn dxt_matches_in_process(precision: &str, bound: f32) {
    let dir =
        std::env::temp_dir().join(format!("fp8lm-mpi-dxt-{precision}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = dir.join("run");
    let mut sets: Vec<String> = [
        "model.channels=32",
        "batch=4",
        "eval_every=3",
        "eval_tokens=256",
        "optim.warmup_steps=2",
        "dist.tensor_parallel=2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    sets.push(format!("precision={precision}"));
    sets.push(format!("max_steps={STEPS}"));
    sets.push(format!("run_dir={}", run.display()));
    let mut args = vec!["train".to_string()];
    for s in &sets {
        args.extend(["--set".to_string(), s.clone()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run_mpirun(
        env!("CARGO_BIN_EXE_fp8lm"),
        4,
        &args,
        &[("RAYON_NUM_THREADS", "1")],
        Duration::from_secs(180),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(o.success, "mpirun -n 4 failed:\n{}", o.text);
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let mpi: Vec<f32> = metrics
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["loss"].as_f64().unwrap() as f32
        })
        .collect();
    assert_eq!(mpi.len(), STEPS, "one metrics line per step (rank 0 only)");
    let local = losses_grid_in_process(&sets);
    let worst = mpi
        .iter()
        .zip(&local)
        .map(|(a, b)| ((a - b) / b).abs())
        .fold(0f32, f32::max);
    println!("{precision} 2 x 2: mpirun vs in-process grid max relative {worst:.2e}");
    assert!(
        worst <= bound,
        "mpirun {mpi:?} vs in-process {local:?}: {worst:.2e}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["tensor_parallel"], 2);
    assert_eq!(summary["data_parallel"], 2);
    assert_eq!(summary["steps"].as_u64(), Some(STEPS as u64), "{summary}");
    assert!(
        !dir.join("run-2").exists(),
        "a second rank wrote a run directory"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// What the grid refuses under mpirun, naming the values: a world that is not a
/// multiple of T.
#[test]
fn mpirun_refuses_ragged_worlds() {
    let dir = std::env::temp_dir().join(format!("fp8lm-mpi-dxt-refuse-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = dir.join("run");
    let rd = format!("run_dir={}", run.display());
    for (n, precision, want) in [(
        3,
        "fp32",
        "needs a multiple of 2 ranks (D x T), this job has 3",
    )] {
        let p = format!("precision={precision}");
        let mut args = vec!["train"];
        for s in [
            "model.channels=32",
            "max_steps=2",
            "dist.tensor_parallel=2",
            p.as_str(),
            rd.as_str(),
        ] {
            args.extend(["--set", s]);
        }
        let o = run_mpirun(
            env!("CARGO_BIN_EXE_fp8lm"),
            n,
            &args,
            &[("RAYON_NUM_THREADS", "1")],
            Duration::from_secs(120),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(!o.success, "-n {n} {precision}: not refused:\n{}", o.text);
        assert!(o.text.contains(want), "-n {n} {precision}:\n{}", o.text);
        assert!(
            !run.exists(),
            "-n {n} {precision}: a refused run wrote its directory"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
