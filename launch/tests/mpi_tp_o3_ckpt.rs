//! fp8-o3 on a 2 x 2 grid under `mpirun -n 4 fp8lm train --set dist.tensor_parallel=2`
//! (FP8 ZeRO over each tensor-parallel shard's two replicas): every rank writes its own
//! optimizer share (four files; replica 0's also hold the model slices), `--resume` on
//! the same 4 ranks continues bit for bit (losses, val losses, and the final checkpoints'
//! files byte for byte: same units, same bytes, same scales), on 2 ranks (1 x 2: the
//! shards' states re-assembled from both replicas' files) it trains on, and on another
//! T (one process with `batch=8`, and `mpirun -n 2` with `dist.tensor_parallel=1`, both
//! taking the grid's 8 rows a step) the state is re-cut across the tensor slices
//! (`trainer::checkpoint::tp_reshard`) and the run continues within 4e-3 relative of the
//! straight 2 x 2 run's losses (the bound of trainer/tests/tensor_parallel_o3_reshard.rs:
//! FP8 noise of another layout, T vs 1 plus D vs 1, each within 2e-3; measured 5.5e-5
//! and 2.0e-6), the first half of the metrics bit for bit; `fp8lm eval` and `sample` on
//! one process load its weights. Built only with the `mpi` feature; FAILS (never skips)
//! when `mpirun` is missing.

#![cfg(feature = "mpi")]

mod common;

use std::path::Path;
use std::time::Duration;

const STEPS: usize = 6;

use common::{copy_dir, losses};

fn mpi(n: usize, args: &[String]) -> String {
    common::mpirun_ok(n, args, Duration::from_secs(240))
}

fn sets(run: &Path, steps: usize) -> Vec<String> {
    let mut v = vec!["train".to_string()];
    for s in [
        "model.channels=32",
        "batch=4",
        "eval_every=3",
        "eval_tokens=256",
        "optim.warmup_steps=2",
        "dist.tensor_parallel=2",
        "checkpoint_every=3",
        "precision=fp8-o3",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        format!("run_dir={}", run.display()),
        format!("max_steps={steps}"),
    ]) {
        v.extend(["--set".to_string(), s]);
    }
    v
}

fn resume(run: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        "train".to_string(),
        "--resume".to_string(),
        run.display().to_string(),
        "--set".to_string(),
        format!("max_steps={STEPS}"),
    ];
    for s in extra {
        v.extend(["--set".to_string(), s.to_string()]);
    }
    v
}

fn files_of(ck: &Path) -> Vec<String> {
    let mut f: Vec<String> = std::fs::read_dir(ck)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    f.sort();
    f
}

#[test]
fn mpirun_fp8_o3_grid_2x2_checkpoint_resumes_bit_for_bit_and_on_another_t() {
    let dir = common::tmp_dir("mpi-tp-o3-ckpt", "grid");
    let (a, b, c, d) = (dir.join("a"), dir.join("b"), dir.join("c"), dir.join("d"));
    // Straight: 6 steps. Split: 3 steps (its checkpoint), copied, resumed on 4 ranks.
    let text = mpi(4, &sets(&a, STEPS));
    assert!(
        text.contains("plus one fp8-o3 optimizer share per rank"),
        "{text}"
    );
    mpi(4, &sets(&b, STEPS / 2));
    let ck = b.join("checkpoints/step_00000003");
    let shard_files = [
        "tp.dp-0000-tp-0000-of-0002.safetensors",
        "tp.dp-0000-tp-0001-of-0002.safetensors",
        "tp.dp-0001-tp-0000-of-0002.safetensors",
        "tp.dp-0001-tp-0001-of-0002.safetensors",
    ];
    let mut want = vec!["checkpoint.json".to_string()];
    want.extend(shard_files.iter().map(|s| s.to_string()));
    assert_eq!(files_of(&ck), want);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("checkpoint.json")).unwrap())
            .unwrap();
    let os = &meta["meta"]["optimizer_shards"];
    assert_eq!((os["dp"].as_u64(), os["tp"].as_u64()), (Some(2), Some(2)));
    let coords: Vec<(u64, u64)> = os["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["dp_rank"].as_u64().unwrap(),
                e["tp_rank"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(coords, [(0, 0), (0, 1), (1, 0), (1, 1)]);
    copy_dir(&b, &c);
    copy_dir(&b, &d);

    mpi(4, &resume(&b, &[]));
    let (la, lb) = (losses(&a), losses(&b));
    assert_eq!(la.len(), STEPS);
    assert_eq!(lb.len(), STEPS, "{lb:?}");
    for (x, y) in la.iter().zip(&lb) {
        assert_eq!(x.1.to_bits(), y.1.to_bits(), "{la:?} vs {lb:?}");
        assert_eq!(x.2.map(f32::to_bits), y.2.map(f32::to_bits), "val");
    }
    // The final checkpoints: every rank's file byte for byte (model slices, optimizer
    // shares with their scales, the same step in the metadata).
    let (fa, fb) = (
        a.join("checkpoints/step_00000006"),
        b.join("checkpoints/step_00000006"),
    );
    assert_eq!(files_of(&fa), files_of(&fb));
    for f in shard_files {
        assert!(
            std::fs::read(fa.join(f)).unwrap() == std::fs::read(fb.join(f)).unwrap(),
            "{f} differs between the straight and the resumed run"
        );
    }

    // 1 x 2 (same T, one replica): each shard's state re-assembled from both replicas'
    // shares; it trains on.
    mpi(2, &resume(&c, &[]));
    let lc = losses(&c);
    assert_eq!(lc.len(), STEPS, "{lc:?}");
    assert!(lc.iter().all(|x| x.1.is_finite() && x.1 < 6.0), "{lc:?}");

    // Another T: one process (1 x 1) and 2 x 1, each with the grid's 8 rows a step.
    let e = dir.join("e");
    copy_dir(&d, &e);
    let o = common::fp8lm(
        &resume(&d, &["dist.tensor_parallel=1", "batch=8"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(o.status.success(), "{}", common::text(&o));
    mpi(2, &resume(&e, &["dist.tensor_parallel=1"]));
    for (what, run) in [("1 x 1", &d), ("2 x 1", &e)] {
        let l = losses(run);
        assert_eq!(l.len(), STEPS, "{what}: {l:?}");
        let mut worst = 0f32;
        for (x, y) in la.iter().zip(&l) {
            assert_eq!(x.0, y.0);
            let rel = ((x.1 - y.1) / x.1).abs();
            worst = worst.max(rel);
            // The first half is the copied metrics of the same run: bit for bit.
            if y.0 <= (STEPS / 2) as u64 {
                assert_eq!(x.1.to_bits(), y.1.to_bits(), "{what}: step {}", y.0);
            }
            assert!(
                rel < 4e-3,
                "{what} step {}: {} vs {} ({rel:.2e})",
                y.0,
                y.1,
                x.1
            );
        }
        println!("2 x 2 -> {what}: max relative loss difference {worst:.2e}");
    }

    // Its weights load anywhere: eval on one process.
    let o = common::fp8lm(&["eval", "--checkpoint", a.to_str().unwrap()]);
    let t = common::text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("val loss "), "{t}");
    // And sample on one process (the run resumed on one process, too).
    for run in [&a, &d] {
        let o = common::fp8lm(&[
            "sample",
            "--checkpoint",
            run.to_str().unwrap(),
            "--prompt",
            "the ",
            "--tokens",
            "8",
        ]);
        assert!(o.status.success(), "{}", common::text(&o));
        assert!(String::from_utf8_lossy(&o.stdout).starts_with("the "));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
