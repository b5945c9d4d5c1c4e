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
