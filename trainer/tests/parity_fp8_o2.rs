//! Loss parity of the FP8-LM optimizer: on the default small model and the built-in
//! corpus, `precision = "fp8-o2"` (FP8 linears as in O1, plus the optimizer with FP16
//! master weights, E4M3 first moment and FP16 second moment for the linears' weights)
//! reaches a validation loss within 2% of fp32 after the same steps. Prints every run.
//! Release-mode test (8 short runs, about 30-60 s on 2 cores).
//!
//! Why a mean over seeds: after the default 300 steps this model is in the middle of its
//! learning transition (the loss falls from ~ln 19 towards the corpus' floor as attention
//! to the previous token forms), where *any* perturbation of the trajectory (FP8 O1
//! included) shifts the validation loss by several percent either way for a single seed;
//! e.g. the default seed 1337 gives fp32 2.566, fp8-o1 2.574, fp8-o2 2.681, and at 600
//! steps fp32 2.107, fp8-o1 2.005, fp8-o2 1.863. The mean over seeds measures the
//! systematic effect of the optimizer's formats, which is what parity is about.

use fp8lm_trainer::data::synthetic::MarkovCorpus;
use fp8lm_trainer::data::Dataset;
use fp8lm_trainer::{Precision, RunConfig, Trainer};

fn run(cfg: &RunConfig) -> (f32, usize) {
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
    let state = tr.optimizer().state_bytes();
    (tr.evaluate(&data, cfg.eval_batches).unwrap(), state)
}

#[test]
fn gpt2_default_fp8_o2_matches_fp32_within_2_percent_over_seeds() {
    let seeds = [1u64, 2, 3, 4];
    let (mut sum32, mut sum8) = (0f64, 0f64);
    for &seed in &seeds {
        let mut cfg = RunConfig {
            seed,
            ..RunConfig::default()
        };
        let (l32, s32) = run(&cfg);
        cfg.precision = Precision::Fp8O2;
        let (l8, s8) = run(&cfg);
        println!(
            "seed {seed}, {} steps: fp32 val loss {l32:.4}, fp8-o2 {l8:.4} ({:+.2}%); optimizer state {s32} B vs {s8} B",
            cfg.max_steps,
            100.0 * (l8 - l32) / l32
        );
        assert!(l8.is_finite(), "seed {seed}: fp8-o2 diverged");
        assert!(
            s8 < s32,
            "fp8-o2 optimizer state {s8} B not below fp32's {s32} B"
        );
        sum32 += l32 as f64;
        sum8 += l8 as f64;
    }
    let (m32, m8) = (sum32 / seeds.len() as f64, sum8 / seeds.len() as f64);
    let rel = (m8 - m32) / m32;
    println!(
        "mean over seeds {seeds:?}: fp32 {m32:.4}, fp8-o2 {m8:.4} ({:+.2}%)",
        100.0 * rel
    );
    assert!(
        m32 < 2.8,
        "fp32 mean val loss {m32}: nothing was learned (ln 19 = 2.94)"
    );
    assert!(
        rel.abs() < 0.02,
        "fp8-o2 mean val loss {m8} not within 2% of fp32 {m32}"
    );
}
