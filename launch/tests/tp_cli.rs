//! `fp8lm train` with `dist.tensor_parallel` outside what is wired in: refused up front
//! (usage error, exit 2), naming the values, before a run directory is written. (The
//! runs themselves: `mpi_tp.rs`, `trainer/tests/tensor_parallel_model.rs`.)

mod common;
use common::{fp8lm, text, TINY};

#[test]
fn train_refuses_tensor_parallel_shapes_and_grids_it_cannot_run() {
    let dir = common::tmp_dir("tp", "refuse");
    let run = dir.join("run");
    let rd = format!("run_dir={}", run.display());
    // (settings, text the error must contain)
    for (sets, want) in [
        // one process for a 2-way group
        (vec!["dist.tensor_parallel=2"], "mpirun -n 2"),
        // TINY has 2 heads
        (vec!["dist.tensor_parallel=4"], "model.heads"),
        (
            vec!["dist.sequence_parallel=true"],
            "dist.sequence_parallel",
        ),
    ] {
        let mut args = vec!["train", "--set", rd.as_str()];
        args.extend_from_slice(TINY);
        for s in &sets {
            args.extend(["--set", s]);
        }
        let o = fp8lm(&args);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(2), "{sets:?}: {t}");
        assert!(t.contains(want), "{sets:?}: {t}");
        assert!(
            !run.exists(),
            "{sets:?}: a refused run wrote {}",
            run.display()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `fp8lm bench train --dist --tp 1,2` on 2 in-process ranks: one row per precision
/// (fp32, bf16, fp8-o1, fp8-o3) and grid (2x1; 1x2 with SP off and on), bf16 included;
/// bf16 with SP moves its norm outputs as bf16 (all-gather bytes below fp32's at the
/// same grid, above 0).
#[test]
fn bench_train_grid_has_a_row_per_precision_and_grid() {
    let mut args = vec![
        "bench", "train", "--dist", "--ranks", "2", "--tp", "1,2", "--steps", "1",
    ];
    args.extend_from_slice(TINY);
    let o = fp8lm(&args);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let rows: Vec<Vec<&str>> = t
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| w.len() == 14 && ["2x1", "1x2"].contains(&w[1]))
        .collect();
    for p in ["fp32", "bf16", "fp8-o1", "fp8-o3"] {
        for (g, sp) in [("2x1", "off"), ("1x2", "off"), ("1x2", "on")] {
            let n = rows
                .iter()
                .filter(|w| w[0] == p && w[1] == g && w[2] == sp)
                .count();
            assert_eq!(n, 1, "{p} {g} SP {sp}: {n} rows in\n{t}");
        }
    }
    // AG B (f32/bf16 all-gather bytes) of the 1x2 SP-on rows.
    let ag = |p: &str| -> u64 {
        let w = rows
            .iter()
            .find(|w| w[0] == p && w[1] == "1x2" && w[2] == "on")
            .unwrap();
        w[9].parse().unwrap()
    };
    assert!(ag("bf16") > 0 && ag("bf16") < ag("fp32"), "{t}");
}
