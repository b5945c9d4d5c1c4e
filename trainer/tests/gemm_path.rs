//! The training step's GEMMs run on the CPU's matrix units where it has them: a bf16 or
//! FP8 step that silently fell back to the f32 FMA kernel (e.g. a model change that
//! hands the GEMM an f32 operand, or a path selection bug) fails here. Counted by the
//! kernels' per-path GEMM counters around one step; this file holds one test so no
//! other test of the binary moves the counters meanwhile.

#![allow(clippy::field_reassign_with_default)] // configs read best as default + overrides

use fp8lm_kernels::{path_calls, GemmPath};
use fp8lm_trainer::data::synthetic::MarkovCorpus;
use fp8lm_trainer::data::Dataset;
use fp8lm_trainer::{Precision, RunConfig, Trainer};

#[test]
fn training_step_runs_the_best_gemm_path() {
    // Unforced, the process must pick the best path this machine has (AMX where present);
    // forced by FP8LM_GEMM, the named one.
    let forced = std::env::var(fp8lm_kernels::gemm::GEMM_ENV)
        .ok()
        .filter(|v| !v.is_empty());
    let want = match &forced {
        None => GemmPath::best(),
        Some(v) => *GemmPath::ALL
            .iter()
            .find(|p| p.name() == v)
            .expect("FP8LM_GEMM names a path"),
    };
    assert_eq!(GemmPath::detect(), want, "FP8LM_GEMM={forced:?}");
    if forced.is_none() && GemmPath::Amx.check().is_ok() {
        assert_eq!(
            want,
            GemmPath::Amx,
            "AMX is available, so it must be chosen"
        );
    }
    eprintln!(
        "GEMM path here: {} ({:?})",
        want.name(),
        GemmPath::available()
    );

    for p in [
        Precision::Fp32,
        Precision::Bf16,
        Precision::Fp8O1,
        Precision::Fp8O2,
    ] {
        let mut cfg = RunConfig::default();
        cfg.precision = p;
        cfg.model.channels = 32;
        cfg.batch = 4;
        cfg.max_steps = 2;
        let mut data = MarkovCorpus::new(cfg.seed);
        let mut tr = Trainer::new(&cfg, data.vocab_size()).unwrap();
        let linears = tr.model().linears.len() as u64;
        let before = path_calls();
        tr.train_step(&mut data).unwrap();
        let d = path_calls().since(before);
        if p == Precision::Fp32 {
            // The reference path: f32 FMA, no low-precision GEMM at all.
            assert_eq!(d.amx + d.avx512bf16 + d.fma_lowp, 0, "{p:?}: {d:?}");
            assert!(d.fma_f32 >= 3 * linears, "{p:?}: {d:?}");
            continue;
        }
        // Forward, dinp and dW of every linear layer, on the chosen path.
        assert!(
            d.lowp_on(want) >= 3 * linears,
            "{p:?}: {d:?}, want >= {} GEMMs on {}",
            3 * linears,
            want.name()
        );
        if want != GemmPath::Fma {
            assert_eq!(
                d.fma_lowp, 0,
                "{p:?}: low-precision GEMMs silently ran on the FMA kernel: {d:?}"
            );
        }
    }
}
