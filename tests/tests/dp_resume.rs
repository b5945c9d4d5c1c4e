//! Data-parallel checkpoints and resume on in-process ranks: rank 0 writes the checkpoint
//! (fp8-o3: the owners' optimizer state gathered to it), every rank loads it.
//! - fp32 and fp8-o3 resumed on the same number of ranks continue bit for bit;
//! - fp8-o3 written on 4 ranks and resumed on 2 re-partitions its optimizer state: the
//!   state matches the checkpoint's within the re-encoding bound, the weights are the
//!   checkpoint's, and the first resumed loss is exactly that of those weights on the
//!   2-rank batch.

use fp8lm_collectives::{run_ranks, Communicator, LocalComm};
use fp8lm_optim::StateTensor;
use fp8lm_trainer::checkpoint::Checkpoint;
use fp8lm_trainer::data::synthetic::MarkovCorpus;
use fp8lm_trainer::data::Dataset;
use fp8lm_trainer::repartition::{repartition_state, state_values, UnitSpan};
use fp8lm_trainer::{snapshot, Precision, RunConfig, Trainer};
use std::path::PathBuf;

fn small(precision: Precision) -> RunConfig {
    let mut cfg = RunConfig {
        precision,
        batch: 2,
        max_steps: 8,
        ..RunConfig::default()
    };
    cfg.model.channels = 32;
    cfg.optim.warmup_steps = 2;
    cfg
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fp8lm-dpres-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Train `total` steps on `ranks` ranks; after step `k`, checkpoint as `fp8lm train`
/// does (gather, rank 0 saves to `dir`). Returns (losses of every step, final weights,
/// the loaded checkpoint).
fn run_with_checkpoint(
    cfg: &RunConfig,
    ranks: usize,
    k: usize,
    total: usize,
    dir: &std::path::Path,
) -> (Vec<f32>, Vec<f32>, Checkpoint) {
    let out = run_ranks(ranks, |c: &LocalComm| -> anyhow::Result<_> {
        let mut data = MarkovCorpus::new(cfg.seed);
        let mut tr = Trainer::new(cfg, data.vocab_size())?;
        tr.enable_data_parallel(c)?;
        let mut losses = vec![];
        let mut saved = None;
        for s in 0..total {
            losses.push(tr.train_step_dist(&mut data, c)?.loss);
            if s + 1 == k {
                let (opt, units) = tr.gather_optimizer_state(c)?;
                if c.rank() == 0 {
                    let extra = serde_json::Value::Object(tr.dist_checkpoint_extra());
                    let ck = snapshot::capture_with_state(&tr, &data, extra, opt, units);
                    saved = Some(ck.save(dir, 3)?);
                }
            }
        }
        Ok((losses, tr.weights_f32_all(), saved))
    })
    .unwrap();
    let ck = Checkpoint::load(out[0].2.as_ref().unwrap()).unwrap();
    (out[0].0.clone(), out[0].1.clone(), ck)
}

struct Resumed {
    /// Weights right after the resume (before any step).
    params0: Vec<f32>,
    losses: Vec<f32>,
    params: Vec<f32>,
    /// The whole optimizer state right after the resume, gathered as for a checkpoint.
    state0: (Vec<(String, StateTensor)>, Option<Vec<UnitSpan>>),
}

/// Resume `ck` on `ranks` ranks, as `fp8lm train --resume` does, and train `steps`.
fn resume(cfg: &RunConfig, ranks: usize, ck: &Checkpoint, steps: usize) -> Vec<Resumed> {
    run_ranks(ranks, |c: &LocalComm| -> anyhow::Result<Resumed> {
        let mut data = MarkovCorpus::new(cfg.seed);
        let mut tr = Trainer::new(cfg, data.vocab_size())?;
        if cfg.precision == Precision::Fp8O3 {
            snapshot::restore_except_optimizer(&mut tr, &mut data, ck)?;
            let (st, units) = snapshot::stored_optimizer_state(&tr, ck)?;
            tr.enable_data_parallel_resume(c, Some((&st, &units)))?;
        } else {
            snapshot::restore(&mut tr, &mut data, ck)?;
            tr.enable_data_parallel(c)?;
        }
        tr.restore_dist_extra(&ck.meta.extra)?;
        let params0 = tr.weights_f32_all();
        let state0 = tr.gather_optimizer_state(c)?;
        let mut losses = vec![];
        for _ in 0..steps {
            let st = tr.train_step_dist(&mut data, c)?;
            assert!(!st.skipped, "rank {} step {} skipped", c.rank(), st.step);
            losses.push(st.loss);
        }
        Ok(Resumed {
            params0,
            losses,
            params: tr.weights_f32_all(),
            state0,
        })
    })
    .unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn assert_bit_identical_resume(precision: Precision, ranks: usize) {
    let cfg = small(precision);
    let dir = tmp(&format!("{}-{ranks}", precision.name()));
    let (full, final_params, ck) = run_with_checkpoint(&cfg, ranks, 3, 6, &dir);
    assert_eq!(ck.meta.step, 3);
    let res = resume(&cfg, ranks, &ck, 3);
    for (r, x) in res.iter().enumerate() {
        assert_eq!(
            bits(&x.losses),
            bits(&full[3..]),
            "{}: rank {r} resumed losses {:?} vs uninterrupted {:?}",
            precision.name(),
            x.losses,
            &full[3..]
        );
        assert_eq!(
            bits(&x.params),
            bits(&final_params),
            "{}: rank {r} final weights differ",
            precision.name()
        );
    }
}

#[test]
fn fp32_two_ranks_resume_bit_identically() {
    assert_bit_identical_resume(Precision::Fp32, 2);
}

#[test]
fn fp8_o3_four_ranks_resume_on_four_bit_identically() {
    assert_bit_identical_resume(Precision::Fp8O3, 4);
}

/// The state re-assembled into whole tensors, by name (a common frame for states cut
/// into different units).
fn whole(
    tr: &Trainer,
    state: &(Vec<(String, StateTensor)>, Option<Vec<UnitSpan>>),
) -> Vec<(String, StateTensor)> {
    let new = snapshot::whole_tensor_units(tr);
    let template = tr.optimizer().export_state();
    repartition_state(&state.0, state.1.as_ref().unwrap(), &template, &new).unwrap()
}

#[test]
fn fp8_o3_four_ranks_resume_on_two_with_repartitioned_state() {
    let cfg = small(Precision::Fp8O3);
    let dir = tmp("o3-4to2");
    let (_, _, ck) = run_with_checkpoint(&cfg, 4, 3, 3, &dir);
    let res = resume(&cfg, 2, &ck, 3);

    // Replicas agree and hold the checkpoint's weights (the owners' FP16 masters are
    // re-encoded per new unit; at most half an FP16 subnormal step at the new scale).
    let ck_params: Vec<f32> = {
        let mut data = MarkovCorpus::new(cfg.seed);
        let mut tr = Trainer::new(&cfg, data.vocab_size()).unwrap();
        snapshot::restore_except_optimizer(&mut tr, &mut data, &ck).unwrap();
        tr.weights_f32_all()
    };
    let amax = ck_params.iter().fold(0f32, |m, x| m.max(x.abs()));
    for (r, x) in res.iter().enumerate() {
        assert_eq!(bits(&x.params0), bits(&res[0].params0), "rank {r}");
        assert_eq!(bits(&x.losses), bits(&res[0].losses), "rank {r}");
        let worst = x
            .params0
            .iter()
            .zip(&ck_params)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= amax * 2f32.powi(-24),
            "rank {r}: weights moved by {worst}"
        );
    }

    // The 2-rank state, gathered and brought to whole tensors, equals the 4-rank
    // checkpoint's: f32 and scalars exactly or to the re-encoding bound, FP16 states to
    // 2^-24 of their amax, FP8 E4M3 moments to 2^-16 of theirs (half a subnormal step of
    // E4M3 at the new scale is 2^-10 / 448 < 2^-18 of the amax).
    let mut data = MarkovCorpus::new(cfg.seed);
    let mut tr1 = Trainer::new(&cfg, data.vocab_size()).unwrap();
    let (st4, u4) = snapshot::stored_optimizer_state(&tr1, &ck).unwrap();
    let u2 = res[0].state0.1.as_ref().unwrap();
    assert!(
        u2.iter().any(|u| !u4.contains(u)),
        "the 2-rank units equal the 4-rank ones: nothing was re-blocked"
    );
    let a = whole(&tr1, &(st4, Some(u4)));
    let b = whole(&tr1, &res[0].state0);
    assert_eq!(a.len(), b.len());
    let mut compared_fp8 = 0;
    for ((na, sa), (nb, sb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        let (va, vb) = (state_values(sa), state_values(sb));
        let amax = va.iter().fold(0f32, |m, x| m.max(x.abs()));
        let tol = match sa {
            StateTensor::Fp8(_) => {
                compared_fp8 += 1;
                amax * 2f32.powi(-16)
            }
            StateTensor::Scalar(_) => amax * 2f32.powi(-16),
            _ => amax * 2f32.powi(-24),
        };
        for (x, y) in va.iter().zip(&vb) {
            assert!((x - y).abs() <= tol, "{na}: {x} vs {y} (tolerance {tol})");
        }
    }
    assert!(compared_fp8 > 0, "no FP8 moments compared");

    // The first resumed loss is that of the checkpoint's weights on the 2-rank batch:
    // the mean of the two ranks' row blocks (loss_on is the same forward, no update).
    snapshot::restore(&mut tr1, &mut data, &ck).unwrap();
    let (b_, t_) = (cfg.batch, cfg.model.context);
    let (mut x, mut y) = (vec![0u32; 2 * b_ * t_], vec![0u32; 2 * b_ * t_]);
    data.next_train_batch(2 * b_, t_, &mut x, &mut y);
    let h = b_ * t_;
    let l0 = tr1.loss_on(&x[..h], &y[..h], b_, t_).unwrap();
    let l1 = tr1.loss_on(&x[h..], &y[h..], b_, t_).unwrap();
    let want = (l0 + l1) / 2.0;
    let got = res[0].losses[0];
    assert!(
        (got - want).abs() <= 1e-6 * want.abs(),
        "first resumed loss {got} vs {want} from the checkpoint's weights"
    );
    assert!(res[0].losses.iter().all(|l| l.is_finite()));
}
