//! Loss parity: on the default small model and the built-in corpus, bf16 and FP8-O1 reach
//! a validation loss within 2% of fp32 after the same number of steps (the config's
//! `max_steps`). Prints all three. Release-mode test (about 10-40 s on 2 cores). The
//! GPT-2 test runs the default seed; the LLaMA one asserts on the mean over four seeds.
//!
//! The corpus is a second-order Markov source: predicting a token needs the two before it,
//! so a model must learn to attend to the previous position. Until it does, the loss sits
//! at ~ln(19) = 2.94 (the alphabet's size); the fp32 run must get clearly below that for
//! the comparison to mean anything.

#![allow(clippy::field_reassign_with_default)] // configs read best as default + overrides

use fp8lm_trainer::data::synthetic::MarkovCorpus;
use fp8lm_trainer::data::Dataset;
use fp8lm_trainer::{Arch, Precision, RunConfig, Trainer};

fn val_loss(cfg: &RunConfig) -> f32 {
    let mut data = MarkovCorpus::new(cfg.seed);
    let mut tr = Trainer::new(cfg, data.vocab_size()).unwrap();
    for _ in 0..cfg.max_steps {
        let st = tr.train_step(&mut data).unwrap();
        assert!(
            !st.skipped,
            "{} step {} skipped",
            cfg.precision.name(),
            st.step
        );
    }
    tr.evaluate(&data, cfg.eval_batches).unwrap()
}

/// Runs fp32, bf16 and fp8-o1 for every seed; asserts on the mean over the seeds.
fn parity(arch: Arch, seeds: &[u64], fp32_must_beat: f32) {
    let mut cfg = RunConfig::default();
    cfg.model.arch = arch;
    let precisions = [Precision::Fp32, Precision::Bf16, Precision::Fp8O1];
    let mut mean = [0f32; 3];
    for &seed in seeds {
        cfg.seed = seed;
        let floor = MarkovCorpus::new(cfg.seed).entropy_floor().unwrap();
        let mut out = vec![];
        for p in precisions {
            cfg.precision = p;
            out.push(val_loss(&cfg));
        }
        for (i, (p, l)) in precisions.iter().zip(&out).enumerate() {
            mean[i] += l / seeds.len() as f32;
            println!(
                "{arch:?} seed {seed} after {} steps: {:>6} val loss {l:.4} ({:+.2}% vs fp32; floor {floor:.4})",
                cfg.max_steps,
                p.name(),
                100.0 * (l - out[0]) / out[0]
            );
        }
    }
    let l32 = mean[0];
    if seeds.len() > 1 {
        for (p, l) in precisions.iter().zip(&mean) {
            println!(
                "{arch:?} mean over seeds {seeds:?}: {:>6} val loss {l:.4} ({:+.2}% vs fp32)",
                p.name(),
                100.0 * (l - l32) / l32
            );
        }
    }
    assert!(
        l32 < fp32_must_beat,
        "fp32 val loss {l32} did not get below {fp32_must_beat}: nothing was learned"
    );
    for (p, l) in precisions.iter().zip(&mean).skip(1) {
        assert!(
            ((l - l32) / l32).abs() < 0.02,
            "{arch:?} {}: val loss {l} not within 2% of fp32 {l32}",
            p.name()
        );
    }
}

#[test]
fn gpt2_default_bf16_and_fp8_o1_match_fp32_within_2_percent() {
    parity(Arch::Gpt2, &[RunConfig::default().seed], 2.75);
}

#[test]
fn llama_bf16_and_fp8_o1_match_fp32_within_2_percent() {
    // The mean over seeds, as in parity_fp8_o2.rs: after 300 steps this model is still in
    // its learning transition, where any perturbation of the trajectory moves a single
    // seed's loss by a few percent either way (seed 1337: fp8-o1 between -1.5% and -2.9%
    // of fp32 depending on the f32 exp's last bit); the mean measures the format.
    parity(Arch::Llama, &[1, 2, 3, 4], 2.0);
}
