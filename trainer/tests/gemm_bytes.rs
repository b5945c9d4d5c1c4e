//! No silent fallback: every GEMM of every linear layer consumes exactly the bytes of its
//! precision's formats. A low-precision mode that computed some GEMM in f32 (or an FP8
//! one in bf16) would show bytes of the wrong type here; the counts are exact, derived
//! from the layer shapes: per training step a layer of c inputs, oc outputs and n = B*T
//! rows multiplies x[n,c] by w[oc,c] (forward), dy[n,oc] by w (input gradient) and dy by x
//! (weight gradient), i.e. 2nc + 2(oc)c elements of inputs and weights and 2n(oc) of
//! output gradients; FP8-LM casts the first two to E4M3 and dy to E5M2.

use fp8lm_trainer::data::synthetic::MarkovCorpus;
use fp8lm_trainer::data::Dataset;
use fp8lm_trainer::model::OperandBytes;
use fp8lm_trainer::{Arch, Precision, RunConfig, Trainer};

#[test]
fn each_precision_feeds_its_gemms_only_its_own_formats() {
    for arch in [Arch::Gpt2, Arch::Llama] {
        for (precision, recipe) in [
            (Precision::Fp32, "delayed"),
            (Precision::Bf16, "delayed"),
            (Precision::Fp8O1, "delayed"),
            (Precision::Fp8O2, "current"),
            (Precision::Fp8O1, "block"),
            (Precision::Fp8O2, "block"),
        ] {
            let mut cfg = RunConfig {
                precision,
                batch: 2,
                ..RunConfig::default()
            };
            cfg.fp8.recipe = recipe.into();
            cfg.model.arch = arch;
            cfg.model.channels = 32;
            let mut data = MarkovCorpus::new(1);
            let mut tr = Trainer::new(&cfg, data.vocab_size()).unwrap();
            let steps = 2u64;
            for _ in 0..steps {
                tr.train_step(&mut data).unwrap();
            }
            let n = (cfg.batch * cfg.model.context) as u64;
            let lins = &tr.model().linears;
            assert!(
                lins.len() >= 4 * cfg.model.layers,
                "{arch:?}: {} linears",
                lins.len()
            );
            for l in lins {
                let (c, oc) = (l.c as u64, l.oc as u64);
                let xw = steps * (2 * n * c + 2 * oc * c);
                let dy = steps * 2 * n * oc;
                let want = match precision {
                    Precision::Fp32 => OperandBytes {
                        f32: 4 * (xw + dy),
                        ..Default::default()
                    },
                    Precision::Bf16 => OperandBytes {
                        bf16: 2 * (xw + dy),
                        ..Default::default()
                    },
                    _ => OperandBytes {
                        e4m3: xw,
                        e5m2: dy,
                        ..Default::default()
                    },
                };
                assert_eq!(
                    l.operand_bytes,
                    want,
                    "{arch:?} {} {recipe}: linear {} ({c} -> {oc})",
                    precision.name(),
                    l.name
                );
            }
        }
    }
}
