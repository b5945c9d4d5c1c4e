//! fp8-o2 keeps no f32 copy of the linears' weights: the E4M3 weight the GEMMs read is
//! written by the FP8-LM optimizer in its update pass, the tied embedding is looked up
//! from the FP16 master, and the FP8 weight gradients leave the dW GEMM through one f32
//! scratch. The reference is the same optimizer over f32 weights the linears cast
//! themselves (what fp8-o3 does on a single rank): every value must agree bit for bit,
//! since both cast the same f32 view of the same FP16 master with the same scale.

use fp8lm_trainer::data::synthetic::MarkovCorpus;
use fp8lm_trainer::data::Dataset;
use fp8lm_trainer::{Precision, RunConfig, Trainer};

fn run(precision: Precision, recipe: &str, steps: usize) -> (Vec<u32>, Trainer) {
    let mut cfg = RunConfig {
        precision,
        max_steps: steps,
        ..RunConfig::default()
    };
    cfg.fp8.recipe = recipe.into();
    let mut data = MarkovCorpus::new(cfg.seed);
    let mut tr = Trainer::new(&cfg, data.vocab_size()).unwrap();
    let mut losses = Vec::new();
    for _ in 0..steps {
        losses.push(tr.train_step(&mut data).unwrap().loss.to_bits());
    }
    losses.push(tr.evaluate(&data, 2).unwrap().to_bits());
    (losses, tr)
}

#[test]
fn optimizer_written_e4m3_weights_match_casting_f32_weights() {
    for recipe in ["delayed", "current"] {
        let (a, ta) = run(Precision::Fp8O2, recipe, 8);
        let (b, tb) = run(Precision::Fp8O3, recipe, 8);
        assert_eq!(
            a, b,
            "{recipe}: losses (bits) of fp8-o2 storage vs f32 weights"
        );
        assert!(ta.model().weights_from_optimizer() && !tb.model().weights_from_optimizer());
        assert_eq!(
            ta.optimizer().export_state(),
            tb.optimizer().export_state(),
            "{recipe}: optimizer state"
        );
        for (la, lb) in ta.model().linears.iter().zip(&tb.model().linears) {
            let (fa, fb) = (la.fp8.as_ref().unwrap(), lb.fp8.as_ref().unwrap());
            assert_eq!(
                fa.w.data(),
                fb.w.data(),
                "{recipe}: {} E4M3 weight",
                la.name
            );
            assert_eq!(fa.w.held_scale(), fb.w.held_scale(), "{}", la.name);
            assert_eq!(
                fa.w.stats, fb.w.stats,
                "{recipe}: {} weight cast stats",
                la.name
            );
            assert_eq!(
                fa.w.state, fb.w.state,
                "{recipe}: {} weight scaling",
                la.name
            );
            assert_eq!(fa.wgrad, fb.wgrad, "{recipe}: {} E5M2 gradient", la.name);
        }
        // The linears' weights have no f32 storage: their pages were never written.
        let m = ta.model();
        for i in 0..m.layout.metas.len() {
            if !m.param_is_f32(i) {
                assert!(m.params[m.layout.range(i)].iter().all(|&x| x == 0.0));
                assert!(m.grads[m.layout.range(i)].iter().all(|&x| x == 0.0));
            }
        }
    }
}
