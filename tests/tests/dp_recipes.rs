//! Recipe knobs of data-parallel FP8 training on in-process ranks: the gradient
//! all-reduce's mu rule (`dist.fp8_allreduce`) reaches both the replicated all-reduce and
//! fp8-o3's reduce-scatter and is reported per step; `dist.zero_partition` chooses
//! between whole tensors and row blocks.

use fp8lm_collectives::{run_ranks, LocalComm};
use fp8lm_trainer::config::ZeroPartition;
use fp8lm_trainer::data::synthetic::MarkovCorpus;
use fp8lm_trainer::data::Dataset;
use fp8lm_trainer::{Precision, RunConfig, Trainer};

fn small(precision: Precision) -> RunConfig {
    let mut cfg = RunConfig {
        precision,
        batch: 2,
        max_steps: 20,
        ..RunConfig::default()
    };
    cfg.model.channels = 32;
    cfg
}

struct Out {
    /// Per step: (mu min, mu max, overflow fraction, underflow fraction, elements).
    tally: Vec<(f32, f32, f64, f64, u64)>,
    owned: Option<Vec<String>>,
    losses: Vec<f32>,
}

fn run(cfg: &RunConfig, ranks: usize, steps: usize) -> Vec<Out> {
    run_ranks(ranks, |c: &LocalComm| -> anyhow::Result<Out> {
        let mut data = MarkovCorpus::new(cfg.seed);
        let mut tr = Trainer::new(cfg, data.vocab_size())?;
        tr.enable_data_parallel(c)?;
        let mut out = Out {
            tally: vec![],
            owned: tr.zero_owned_units(),
            losses: vec![],
        };
        for _ in 0..steps {
            let st = tr.train_step_dist(&mut data, c)?;
            out.losses.push(st.loss);
            let t = tr
                .allreduce_tally()
                .expect("an FP8 data-parallel step reports");
            let (lo, _, hi) = t.mu_range().unwrap();
            // One FP8 weight gradient per FP8 weight: the step reduced all their elements.
            let w: u64 = tr
                .fp8_tensors()
                .iter()
                .filter(|v| v.name.ends_with(".w"))
                .map(|v| v.stats.numel)
                .sum();
            assert_eq!(t.elements, w, "elements reduced per step");
            assert_eq!(
                t.mu.len(),
                tr.fp8_tensors().len() / 3,
                "one mu per FP8 weight"
            );
            out.tally.push((
                lo,
                hi,
                t.overflow_fraction(),
                t.underflow_fraction(),
                t.elements,
            ));
        }
        Ok(out)
    })
    .unwrap()
}

#[test]
fn mu_rule_is_configured_and_reported_in_both_fp8_reductions() {
    for precision in [Precision::Fp8O1, Precision::Fp8O3] {
        // Default rule: mu starts at 1 = max_mu, so it stays at or below 1.
        let cfg = small(precision);
        let out = run(&cfg, 2, 3);
        for (s, &(lo, hi, of, uf, n)) in out[0].tally.iter().enumerate() {
            assert!(
                lo > 0.0 && hi <= 1.0,
                "{precision:?} step {s}: mu {lo}..{hi}"
            );
            assert!((0.0..=1.0).contains(&of) && (0.0..=1.0).contains(&uf));
            assert!(n > 0, "{precision:?} step {s}");
        }
        // All ranks agree on mu (it is computed from the agreed saturation counts).
        for o in &out {
            let a: Vec<_> = o.tally.iter().map(|t| (t.0, t.1, t.2)).collect();
            let b: Vec<_> = out[0].tally.iter().map(|t| (t.0, t.1, t.2)).collect();
            assert_eq!(a, b, "{precision:?}");
        }
        // max_mu = 0.5: after the first update every tensor's mu is exactly 0.5 (grown
        // and capped, or halved from 1 on overflow), on the replicated all-reduce and on
        // fp8-o3's reduce-scatter alike.
        let mut c = small(precision);
        c.dist.fp8_allreduce.max_mu = 0.5;
        let out = run(&c, 2, 2);
        assert_eq!(
            (out[0].tally[0].0, out[0].tally[0].1),
            (0.5, 0.5),
            "{precision:?}"
        );
        // Pre-scaling: mu fixed at 1/N, never adapted.
        let mut c = small(precision);
        c.dist.fp8_allreduce.method = "fp8-prescale".into();
        let out = run(&c, 4, 2);
        for t in &out[0].tally {
            assert_eq!((t.0, t.1), (0.25, 0.25), "{precision:?}");
        }
        assert!(out[0].losses.iter().all(|l| l.is_finite()));
    }
}

#[test]
fn zero_partition_whole_tensor_keeps_tensors_whole_row_blocks_cuts_them() {
    let mut names = std::collections::HashMap::new();
    for mode in [ZeroPartition::WholeTensor, ZeroPartition::RowBlocks] {
        let mut cfg = small(Precision::Fp8O3);
        cfg.dist.zero_partition = mode;
        let out = run(&cfg, 4, 3);
        let mut all: Vec<String> = out.iter().flat_map(|o| o.owned.clone().unwrap()).collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "{mode:?}: a unit owned twice");
        assert!(
            out[0].losses[2] < out[0].losses[0],
            "{mode:?}: {:?}",
            out[0].losses
        );
        names.insert(mode.name(), all);
    }
    // This model's wte (256 x 32) exceeds 1/(8*4) of its parameters: row blocks cut it.
    assert!(names["whole-tensor"].iter().all(|u| !u.contains('[')));
    assert!(names["row-blocks"].iter().any(|u| u.starts_with("wte[")));
    // The start-up/bench table: with a vocabulary of 4096 the embedding (4096 x 32) is
    // over half the model, so whole tensors cannot balance 4 ranks and row blocks can.
    let mut big_vocab = small(Precision::Fp8O3);
    big_vocab.model.vocab = 4096;
    let t = fp8lm_trainer::distributed::zero_imbalance_table(&big_vocab, 4096, &[4]).unwrap();
    println!("{t}");
    let row: Vec<f64> = t
        .lines()
        .last()
        .unwrap()
        .split(['|', ' '])
        .filter_map(|x| x.parse::<f64>().ok())
        .collect();
    // ranks, whole units, whole max/mean, block units, block max/mean
    assert_eq!(row.len(), 5, "{t}");
    assert!(row[2] > 1.5, "whole tensors: {t}");
    assert!(row[4] < 1.15, "row blocks: {t}");
}
