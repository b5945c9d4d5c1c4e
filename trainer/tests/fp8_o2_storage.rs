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
        for i in 0..ta.model().layout.metas.len() {
            if ta.model().param_is_f32(i) {
                let r = ta.model().layout.range(i);
                assert_eq!(
                    ta.model().params[r.clone()],
                    tb.model().params[r],
                    "{recipe}: {}",
                    ta.model().layout.metas[i].name
                );
            }
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

/// Loading only the weights of an fp8-o2 checkpoint (what `fp8lm eval` / `sample` do)
/// gives the model that was saved: the FP16 masters, hence the same E4M3 weights, and
/// the same validation loss as an fp8-o3 (f32 weights) model loaded the same way.
#[test]
fn weights_only_restore_of_fp8_o2_matches_f32_weights() {
    let mut losses = Vec::new();
    for precision in [Precision::Fp8O2, Precision::Fp8O3] {
        let (_, tr) = run(precision, "delayed", 6);
        let data = MarkovCorpus::new(tr.cfg.seed);
        let dir = std::env::temp_dir().join(format!(
            "fp8lm-o2-weights-{}-{}",
            precision.name(),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let path = fp8lm_trainer::snapshot::save_trainer(
            &tr,
            &data,
            serde_json::Value::Null,
            None,
            &dir,
            1,
        )
        .unwrap();
        let ck = fp8lm_trainer::checkpoint::Checkpoint::load(&path).unwrap();
        let mut fresh = Trainer::new(&tr.cfg, data.vocab_size()).unwrap();
        fp8lm_trainer::snapshot::restore_weights(&mut fresh, &ck).unwrap();
        // (fp8-o2 holds its E4M3 weights from the restore on; fp8-o3 casts in the forward)
        if precision == Precision::Fp8O2 {
            for (la, lb) in tr.model().linears.iter().zip(&fresh.model().linears) {
                let (fa, fb) = (la.fp8.as_ref().unwrap(), lb.fp8.as_ref().unwrap());
                assert_eq!(fa.w.held_scale(), fb.w.held_scale(), "{}", la.name);
                assert_eq!(fa.w.data(), fb.w.data(), "{} E4M3 weight", la.name);
            }
        }
        losses.push(fresh.evaluate(&data, 2).unwrap().to_bits());
        let _ = std::fs::remove_dir_all(&dir);
    }
    assert_eq!(losses[0], losses[1]);
}
