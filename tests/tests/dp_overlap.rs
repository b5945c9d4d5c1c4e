//! Gradient communication overlapped with the backward pass (`dist.overlap`): the
//! backward hands out groups of finished gradients in reverse layer order, each group
//! really is final when handed out, overlap on and off train bit-identically (replicated
//! precisions and fp8-o3), and a
//! backward that fails mid-step on one rank ends the job with an error naming the rank.

use fp8lm_collectives::{run_ranks, Communicator, LocalComm};
use fp8lm_trainer::config::Arch;
use fp8lm_trainer::config::Overlap;
use fp8lm_trainer::data::synthetic::MarkovCorpus;
use fp8lm_trainer::data::Dataset;
use fp8lm_trainer::model::GradGroup;
use fp8lm_trainer::{Precision, RunConfig, Trainer};
use std::sync::mpsc;
use std::time::Duration;

fn small(precision: Precision, arch: Arch, overlap: bool) -> RunConfig {
    let mut cfg = RunConfig {
        precision,
        batch: 2,
        max_steps: 20,
        ..RunConfig::default()
    };
    cfg.model.arch = arch;
    cfg.model.channels = 32;
    cfg.model.layers = 3;
    cfg.dist.overlap = if overlap { Overlap::On } else { Overlap::Off };
    cfg
}

/// Per rank: the global losses and the final weights.
fn dp_run(cfg: &RunConfig, ranks: usize, steps: usize) -> Vec<(Vec<f32>, Vec<f32>)> {
    run_ranks(ranks, |c: &LocalComm| -> anyhow::Result<_> {
        let mut data = MarkovCorpus::new(cfg.seed);
        let mut tr = Trainer::new(cfg, data.vocab_size())?;
        tr.enable_data_parallel(c)?;
        let mut losses = vec![];
        for _ in 0..steps {
            let st = tr.train_step_dist(&mut data, c)?;
            assert!(!st.skipped);
            assert!(
                st.comm_exposed <= st.comm,
                "exposed {:?} > comm {:?}",
                st.comm_exposed,
                st.comm
            );
            // Without overlap the step waits for all of its communication.
            if cfg.dist.overlap == Overlap::Off {
                assert_eq!(st.comm_exposed, st.comm);
            }
            assert!(st.comm > std::time::Duration::ZERO);
            losses.push(st.loss);
        }
        Ok((losses, tr.weights_f32_all()))
    })
    .unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn overlap_on_and_off_train_bit_identically() {
    for (p, arch, ranks) in [
        (Precision::Fp32, Arch::Gpt2, 3),
        (Precision::Fp8O1, Arch::Gpt2, 2),
        (Precision::Fp8O1, Arch::Llama, 3),
        (Precision::Bf16, Arch::Llama, 2),
        (Precision::Fp8O3, Arch::Gpt2, 3),
        (Precision::Fp8O3, Arch::Llama, 2),
    ] {
        let off = dp_run(&small(p, arch, false), ranks, 4);
        let on = dp_run(&small(p, arch, true), ranks, 4);
        for r in 0..ranks {
            assert_eq!(
                bits(&on[r].0),
                bits(&off[r].0),
                "{p:?} {arch:?}: losses, rank {r}"
            );
            assert!(
                bits(&on[r].1) == bits(&off[r].1),
                "{p:?} {arch:?}: weights differ on rank {r}"
            );
            assert_eq!(bits(&on[r].1), bits(&on[0].1), "{p:?}: replicas differ");
        }
        // The run did train: the weights moved and the losses are finite.
        assert!(on[0].0.iter().all(|l| l.is_finite()));
    }
}

#[test]
fn backward_hands_out_final_gradient_groups_in_reverse_layer_order() {
    for (p, arch) in [
        (Precision::Fp32, Arch::Gpt2),
        (Precision::Fp8O1, Arch::Gpt2),
        (Precision::Fp8O1, Arch::Llama),
    ] {
        let cfg = small(p, arch, true);
        let mut data = MarkovCorpus::new(cfg.seed);
        let mut tr = Trainer::new(&cfg, data.vocab_size()).unwrap();
        let (b, t) = (cfg.batch, cfg.model.context);
        let (mut x, mut y) = (vec![0; b * t], vec![0; b * t]);
        data.next_train_batch(b, t, &mut x, &mut y);
        let model = tr.model_mut();
        let specs = model.grad_groups();
        model.forward(&x, Some(&y), b, t, true).unwrap();
        // Snapshot each group when handed out: f32 values and FP8 weight gradients.
        let mut seen = Vec::new();
        model.backward_with(&mut |g| {
            let fp8: Vec<(Vec<u8>, f32)> = g
                .linears
                .iter()
                .filter_map(|l| {
                    l.fp8
                        .as_ref()
                        .map(|f| (f.wgrad.data.clone(), f.wgrad.scale))
                })
                .collect();
            seen.push((g.group, g.offset, g.grads.to_vec(), fp8));
        });
        let l_n = cfg.model.layers;
        let mut want = vec![GradGroup::Head];
        want.extend((0..l_n).rev().map(GradGroup::Block));
        want.push(GradGroup::Embedding);
        let got: Vec<GradGroup> = seen.iter().map(|s| s.0).collect();
        assert_eq!(got, want, "{p:?} {arch:?}");
        let mut covered = 0;
        for ((group, offset, grads, fp8), spec) in seen.iter().zip(&specs) {
            assert_eq!((*group, *offset), (spec.group, spec.range.start));
            assert_eq!(grads.len(), spec.range.len());
            covered += grads.len();
            // Not touched after it was handed out.
            assert_eq!(
                bits(grads),
                bits(&model.grads[spec.range.clone()]),
                "{p:?} {arch:?}: group {group:?} changed after it was handed out"
            );
            let now: Vec<(Vec<u8>, f32)> = model.linears[spec.linears.clone()]
                .iter()
                .filter_map(|l| {
                    l.fp8
                        .as_ref()
                        .map(|f| (f.wgrad.data.clone(), f.wgrad.scale))
                })
                .collect();
            assert_eq!(
                fp8, &now,
                "{p:?} {arch:?}: FP8 gradients of {group:?} changed"
            );
            assert_eq!(!fp8.is_empty(), p.is_fp8() && !spec.linears.is_empty());
            assert!(
                grads.iter().any(|&g| g != 0.0),
                "{group:?}: all-zero gradients"
            );
        }
        assert_eq!(covered, model.num_params(), "groups cover the buffer");
    }
}

/// Run `f` on a thread; fail the test if it takes longer than `limit` (a hang).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .expect("data-parallel run hung after an injected failure")
}

#[test]
fn a_backward_that_fails_mid_step_on_one_rank_fails_the_job_naming_the_rank() {
    for (p, overlap, after) in [
        (Precision::Fp32, true, 2),
        (Precision::Fp8O1, true, 0),
        (Precision::Fp8O1, true, 4),
        (Precision::Fp32, false, 1),
        (Precision::Fp8O3, true, 3),
    ] {
        let cfg = small(p, Arch::Gpt2, overlap);
        let err = within(Duration::from_secs(60), move || {
            run_ranks(2, |c: &LocalComm| -> anyhow::Result<()> {
                let mut data = MarkovCorpus::new(cfg.seed);
                let mut tr = Trainer::new(&cfg, data.vocab_size())?;
                tr.enable_data_parallel(c)?;
                tr.train_step_dist(&mut data, c)?;
                if c.rank() == 1 {
                    tr.inject_backward_panic(Some(after));
                }
                for _ in 0..3 {
                    tr.train_step_dist(&mut data, c)?;
                }
                Ok(())
            })
        })
        .expect_err("the run succeeded despite the injected failure")
        .to_string();
        assert!(err.contains("rank 1"), "{p:?} overlap={overlap}: {err}");
        assert!(
            err.contains("injected failure"),
            "{p:?} overlap={overlap}: {err}"
        );
    }
}
