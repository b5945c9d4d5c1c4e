//! fp8-o2 checkpoints: the FP16 master, E4M3 first moment and FP16 second moment are
//! written with their scales (safetensors F16 / F8_E4M3 + `.scale`), and a run resumed
//! from disk continues bit for bit.

use fp8lm_trainer::checkpoint::Checkpoint;
use fp8lm_trainer::data::synthetic::MarkovCorpus;
use fp8lm_trainer::data::Dataset;
use fp8lm_trainer::snapshot::{capture, restore};
use fp8lm_trainer::{Precision, RunConfig, Trainer};

#[test]
fn fp8_o2_resume_from_disk_is_bit_exact() {
    let cfg = RunConfig {
        precision: Precision::Fp8O2,
        max_steps: 12,
        ..RunConfig::default()
    };
    let dir = std::env::temp_dir().join(format!("fp8lm-resume-o2-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut data = MarkovCorpus::new(cfg.seed);
    let mut a = Trainer::new(&cfg, data.vocab_size()).unwrap();
    for _ in 0..6 {
        a.train_step(&mut data).unwrap();
    }
    let path = capture(&a, &data, serde_json::Value::Null)
        .save(&dir, 2)
        .unwrap();
    let ck = Checkpoint::load(&path).unwrap();
    let opt = &ck.groups["optimizer"];
    let dtypes: Vec<String> = opt.iter().map(|t| format!("{:?}", t.dtype)).collect();
    assert!(dtypes.iter().any(|d| d.contains("F8E4M3")), "{dtypes:?}");
    assert!(dtypes.iter().any(|d| d.contains("F16")), "{dtypes:?}");
    let mut data_b = MarkovCorpus::new(cfg.seed);
    let mut b = Trainer::new(&cfg, data_b.vocab_size()).unwrap();
    restore(&mut b, &mut data_b, &ck).unwrap();
    for _ in 6..12 {
        let la = a.train_step(&mut data).unwrap().loss;
        let lb = b.train_step(&mut data_b).unwrap().loss;
        assert_eq!(la.to_bits(), lb.to_bits(), "losses after resume");
    }
    assert_eq!(a.optimizer().export_state(), b.optimizer().export_state());
    assert_eq!(a.model().params, b.model().params);
    // fp8-o2's linears compute with the E4M3 copy the optimizer writes: the same bytes.
    for (la, lb) in a.model().linears.iter().zip(&b.model().linears) {
        let (fa, fb) = (la.fp8.as_ref().unwrap(), lb.fp8.as_ref().unwrap());
        assert_eq!(fa.w.data(), fb.w.data(), "{} E4M3 weight", la.name);
        assert_eq!(fa.w.held_scale(), fb.w.held_scale(), "{}", la.name);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
