//! The custom-loop facade (`fp8lm_trainer::custom`) against the stock engine: a
//! checkpoint `fp8lm train` writes (through `Trainer`) loads into a custom loop's model
//! and gives the same loss bit for bit, a custom loop's checkpoint is one `fp8lm train`
//! can inspect (same files), and a model of another shape is refused naming the tensor.

use fp8lm_trainer::prelude::*;
use fp8lm_trainer::snapshot::save_trainer;
use fp8lm_trainer::train::linear_precision;
use fp8lm_trainer::Trainer;
use std::path::PathBuf;

fn tiny(channels: usize) -> RunConfig {
    let mut cfg = RunConfig {
        precision: Precision::Fp8O2,
        batch: 4,
        ..RunConfig::default()
    };
    cfg.model.layers = 1;
    cfg.model.channels = channels;
    cfg
}

fn dir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("custom-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn trainer_checkpoint_loads_into_a_custom_loop_bit_for_bit() {
    let cfg = tiny(32);
    let mut data = MarkovCorpus::new(5);
    let mut tr = Trainer::new(&cfg, data.vocab_size()).unwrap();
    for _ in 0..4 {
        assert!(!tr.train_step(&mut data).unwrap().skipped);
    }
    let root = dir("from-trainer");
    let ck_dir = save_trainer(&tr, &data, serde_json::json!({}), None, &root, 0).unwrap();

    let dims = Dims::from_config(&cfg, data.vocab_size()).unwrap();
    let precision = linear_precision(&cfg).unwrap();
    assert_eq!(precision, FP8, "the config's defaults are the facade's FP8");
    let cfg8 = Fp8AdamConfig::fp8_lm(AdamWHyper::default());
    let (mut model, mut opt) = fp8_o2(dims, precision, 77, cfg8).unwrap();
    let ck = load_checkpoint(&ck_dir, &mut model, &mut opt).unwrap();
    assert_eq!(ck.meta.step, 4);

    let (b, t) = (dims.b, dims.t);
    let (mut x, mut y) = (vec![0u32; b * t], vec![0u32; b * t]);
    data.val_batch(0, b, t, &mut x, &mut y);
    let stock = tr.loss_on(&x, &y, b, t).unwrap();
    let custom = forward_loss(&mut model, &opt, &x, &y, b, t, false).unwrap();
    assert_eq!(stock.to_bits(), custom.to_bits(), "{stock} vs {custom}");
    assert_eq!(weights_f32(&model, &opt), tr.weights_f32_all());

    // And the custom loop's own checkpoint is the same set of files.
    let root2 = dir("from-custom");
    let mine = save_checkpoint(&root2, 4, data.position(), &model, &opt).unwrap();
    let names = |d: &std::path::Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&mine), names(&ck_dir));
    let reread = Checkpoint::load(&mine).unwrap();
    reread.check_model_shape(&cfg).unwrap();
    assert_eq!(reread.meta.config.precision, Precision::Fp8O2);
    std::fs::remove_dir_all(&root).ok();
    std::fs::remove_dir_all(&root2).ok();
}

#[test]
fn a_model_of_another_shape_is_refused_naming_the_tensor() {
    let cfg = tiny(32);
    let dims = Dims::from_config(&cfg, 256).unwrap();
    let cfg8 = Fp8AdamConfig::fp8_lm(AdamWHyper::default());
    let (model, opt) = fp8_o2(dims, FP8, 1, cfg8).unwrap();
    let root = dir("shape");
    let ck = save_checkpoint(&root, 0, 0, &model, &opt).unwrap();

    let wide = Dims::from_config(&tiny(64), 256).unwrap();
    let (mut other, mut other_opt) = fp8_o2(wide, FP8, 1, cfg8).unwrap();
    let err = load_checkpoint(&ck, &mut other, &mut other_opt)
        .unwrap_err()
        .to_string();
    std::fs::remove_dir_all(&root).ok();
    assert!(
        err.contains("tensor wte has shape [256, 32] but the model expects [256, 64]"),
        "{err}"
    );

    // A batch that does not fit, and a token outside the vocabulary, are errors too.
    let (mut m, o) = fp8_o2(dims, FP8, 1, cfg8).unwrap();
    let (b, t) = (dims.b, dims.t);
    let x = vec![0u32; b * t];
    let e = forward_loss(&mut m, &o, &x, &x, b + 1, t, false).unwrap_err();
    assert!(e.to_string().contains("does not fit the model"), "{e}");
    let mut y = x.clone();
    y[3] = 300;
    let e = forward_loss(&mut m, &o, &x, &y, b, t, false).unwrap_err();
    assert!(
        e.to_string()
            .contains("target token id 300 at position 3 is outside the model's vocabulary of 256"),
        "{e}"
    );
}
