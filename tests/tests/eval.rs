//! The validation loss is a property of the weights and the validation set, not of the
//! batch size or the number of data-parallel ranks: one fixed set of sequences, shared out
//! over the ranks and reduced (`fp8lm_trainer::eval`).

use fp8lm_collectives::{run_ranks, Communicator, LocalComm};
use fp8lm_trainer::data::synthetic::MarkovCorpus;
use fp8lm_trainer::data::{open_dataset, Dataset};
use fp8lm_trainer::{Precision, RunConfig, Trainer};

fn cfg(precision: Precision, batch: usize) -> RunConfig {
    let mut c = RunConfig {
        precision,
        batch,
        max_steps: 12,
        ..RunConfig::default()
    };
    c.model.channels = 32;
    c
}

/// Weights after a few training steps (at initialisation every sequence scores ~ln V).
fn trained(precision: Precision, data: &mut dyn Dataset) -> Vec<f32> {
    let mut tr = Trainer::new(&cfg(precision, 8), data.vocab_size()).unwrap();
    for _ in 0..12 {
        tr.train_step(data).unwrap();
    }
    tr.model().params.clone()
}

/// `evaluate_tokens` on `ranks` in-process ranks with per-rank batch `batch`.
fn eval_on(
    precision: Precision,
    params: &[f32],
    ranks: usize,
    batch: usize,
    tokens: usize,
    open: &(dyn Fn() -> Box<dyn Dataset> + Sync),
) -> f32 {
    let vals = run_ranks(ranks, |c: &LocalComm| -> anyhow::Result<f32> {
        let data = open();
        let mut tr = Trainer::new(&cfg(precision, batch), data.vocab_size())?;
        tr.model_mut().params.copy_from_slice(params);
        let comm: Option<&dyn Communicator> = Some(c);
        tr.evaluate_tokens(data.as_ref(), tokens, comm)
    })
    .unwrap();
    // Every rank holds the reduced figure.
    assert!(
        vals.iter().all(|v| v.to_bits() == vals[0].to_bits()),
        "{vals:?}"
    );
    vals[0]
}

/// The reference: every sequence of the set on its own (batch 1), summed in f64.
fn reference(precision: Precision, params: &[f32], tokens: usize, data: &dyn Dataset) -> f64 {
    let c = cfg(precision, 1);
    let t = c.model.context;
    let mut tr = Trainer::new(&c, data.vocab_size()).unwrap();
    tr.model_mut().params.copy_from_slice(params);
    let seqs = fp8lm_trainer::eval::eval_sequences(tokens, t, data.val_sequence_count(t));
    let (mut x, mut y) = (vec![0; t], vec![0; t]);
    let mut sum = 0f64;
    for &s in &seqs {
        data.val_rows(&[s], t, &mut x, &mut y);
        sum += tr.loss_on(&x, &y, 1, t).unwrap() as f64;
    }
    sum / seqs.len() as f64
}

// Tolerance: each batch's loss is an f32 mean over its B*T tokens (relative rounding at
// most B*T * 2^-24 for a sequential sum), scaled back to a sum in f64; the ranks' sums
// travel as an f32 pair (error ~2^-48, negligible). So two layouts agree to
// (B_max * T) * 2^-24 relative: with B = 8, T = 16, 7.6e-6.
const T: usize = 16;
const TOL: f64 = (8 * T) as f64 / (1u64 << 24) as f64;

fn check(
    precision: Precision,
    params: &[f32],
    tokens: usize,
    open: &(dyn Fn() -> Box<dyn Dataset> + Sync),
) {
    let want = reference(precision, params, tokens, open().as_ref());
    for (ranks, batch) in [(1, 8), (2, 4), (3, 5), (4, 1)] {
        let v = eval_on(precision, params, ranks, batch, tokens, open) as f64;
        let rel = (v - want).abs() / want;
        println!("{precision:?} {ranks} ranks x batch {batch}: val {v:.6} vs reference {want:.6} (rel {rel:.2e})");
        assert!(
            rel <= TOL,
            "{ranks} x {batch}: {v} vs {want}: rel {rel:.2e} > {TOL:.2e}"
        );
    }
}

#[test]
fn val_loss_is_independent_of_batch_and_rank_count() {
    let mut data = MarkovCorpus::new(1337);
    let params = trained(Precision::Fp32, &mut data);
    let open = || -> Box<dyn Dataset> { Box::new(MarkovCorpus::new(1337)) };
    // 37 sequences: not a multiple of any layout's ranks x batch (ragged last batches).
    check(Precision::Fp32, &params, 37 * T, &open);

    // The old per-batch evaluation (eval_batches x B sequences, the same on every rank)
    // does depend on B, by far more than the tolerance: the test can tell them apart.
    let old = |b: usize| {
        let mut tr = Trainer::new(&cfg(Precision::Fp32, b), 256).unwrap();
        tr.model_mut().params.copy_from_slice(&params);
        tr.evaluate(&MarkovCorpus::new(1337), 2).unwrap() as f64
    };
    let (a, b) = (old(8), old(4));
    assert!((a - b).abs() / a > 10.0 * TOL, "old evaluation: {a} vs {b}");

    // FP8 with delayed scaling: evaluation casts use the recorded scales, so the figure is
    // batch-independent there too (current scaling would take each batch's amax).
    let mut data = MarkovCorpus::new(1337);
    let params = trained(Precision::Fp8O1, &mut data);
    check(Precision::Fp8O1, &params, 21 * T, &open);
}

#[test]
fn a_finite_split_is_evaluated_whole_by_default() {
    let dir = std::env::temp_dir().join(format!("fp8lm-eval-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("text.txt");
    let text: String = (0..3000)
        .map(|i| {
            ((b'a' + (i * 7 % 26) as u8) as char).to_string() + if i % 11 == 0 { " " } else { "" }
        })
        .collect();
    std::fs::write(&path, text).unwrap();
    let mut c = cfg(Precision::Fp32, 8);
    c.data.path = path.display().to_string();
    let open = || open_dataset(&c).unwrap();
    let n = open().val_sequence_count(T).unwrap();
    assert!(n > 10 && n < 1000, "{n} validation sequences");
    let seqs = fp8lm_trainer::eval::eval_sequences(0, T, Some(n));
    assert_eq!(
        seqs,
        (0..n).collect::<Vec<_>>(),
        "eval_tokens = 0: the whole split"
    );
    let mut data = open();
    let params = trained(Precision::Fp32, data.as_mut());
    check(Precision::Fp32, &params, 0, &open);
    std::fs::remove_dir_all(&dir).ok();
}
