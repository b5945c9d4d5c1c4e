//! `fp8lm bench train --dist --tp` (`distributed::bench_train_grid`): on 4 in-process
//! ranks, the bytes a grid's rank 0 counts per step in its tensor-parallel and
//! data-parallel groups (D x T = 2 x 2 and 4 x 1) are what `plan` predicts for that D x T grid (within 1%: the plan
//! leaves out the one-element amax, loss and norm agreements), FP8's SP gathers move FP8
//! bytes, and every figure of the row is measured (positive, finite). No timing is
//! asserted.

use fp8lm_collectives::run_ranks;
use fp8lm_trainer::data::Dataset;
use fp8lm_trainer::distributed::bench_train_grid;
use fp8lm_trainer::plan::{plan, PlanGrid};
use fp8lm_trainer::{Precision, RunConfig};

fn planned(cfg: &RunConfig, vocab: usize, grid: PlanGrid, group: &str) -> u64 {
    plan(cfg, vocab, grid)
        .unwrap()
        .collectives
        .iter()
        .filter(|c| c.group == group)
        .map(|c| c.bytes)
        .sum()
}

#[test]
fn grid_bench_counts_the_planned_bytes_per_group() {
    let vocab = fp8lm_trainer::data::synthetic::MarkovCorpus::new(0).vocab_size();
    for (p, t, sp) in [
        (Precision::Fp32, 2, true),
        (Precision::Bf16, 2, true),
        (Precision::Fp8O1, 2, true),
        (Precision::Fp8O1, 2, false),
        (Precision::Fp8O1, 1, false),
    ] {
        let mut cfg = RunConfig {
            precision: p,
            ..RunConfig::default()
        };
        (cfg.dist.tensor_parallel, cfg.dist.sequence_parallel) = (t, sp);
        let what = format!("{} {} x {t} SP {sp}", p.name(), 4 / t);
        let rows = run_ranks(4, |c| bench_train_grid(&cfg, c, 1, 2)).unwrap();
        let b = &rows[0];
        assert_eq!((b.dp, b.tp, b.sp), (4 / t, t, sp), "{what}");
        assert!(b.step_s > 0.0 && b.step_s.is_finite(), "{what}: {b:?}");
        let grid = PlanGrid {
            dp: 4 / t,
            tp: t,
            sp,
        };
        let tb = b.tp_bytes;
        let tp_moved = tb.all_reduce + tb.reduce_scatter + tb.all_gather + tb.all_gather_fp8;
        let tp_plan = planned(&cfg, vocab, grid, "tensor-parallel");
        // (the FP8-LM all-reduce's fused ring is counted as "other": all of the DP group)
        let dp_moved = b.dp_bytes.total();
        let dp_plan = planned(&cfg, vocab, grid, "data-parallel");
        println!("{what}: TP {tp_moved} B (plan {tp_plan}), DP {dp_moved} B (plan {dp_plan})");
        for (moved, planned, g) in [(tp_moved, tp_plan, "TP"), (dp_moved, dp_plan, "DP")] {
            let rel = (moved as f64 - planned as f64).abs() / (planned.max(1) as f64);
            assert!(
                rel < 0.01,
                "{what}: {g} moved {moved} B/step, plan {planned}"
            );
        }
        if t == 1 {
            assert_eq!(tp_moved, 0, "{what}: a group of one sends nothing");
            assert_eq!(b.tp_comm_s, 0.0, "{what}");
        } else {
            assert!(b.tp_comm_s > 0.0, "{what}: TP collectives were not timed");
        }
        // FP8 with SP gathers E4M3 / E5M2 bytes; fp32 none.
        assert_eq!(
            tb.all_gather_fp8 > 0,
            sp && p.is_fp8(),
            "{what}: FP8 all-gather bytes {}",
            tb.all_gather_fp8
        );
        assert!(
            b.exposed_s() <= b.tp_comm_s + b.dp_comm_s + 1e-9,
            "{what}: {b:?}"
        );
    }
}
