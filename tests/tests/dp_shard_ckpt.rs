//! Sharded fp8-o3 checkpoints on in-process ranks (`checkpoint::shard`): every rank
//! writes its own optimizer shard, rank 0 the model and the index; resume reads per
//! rank only the units it owns under the new partition.
//! - 4 -> 4 continues bit for bit (units copied verbatim);
//! - 4 -> 2, 4 -> 1 (one data-parallel rank, and one plain process), 1 -> 4: the
//!   re-partitioned state equals the checkpoint's within the re-encoding bound of
//!   `repartition` (derived in `dp_resume.rs`), and each element of the state is read
//!   by exactly one rank;
//! - start-up builds only the rank's own share;
//! - a damaged or missing shard, or a rank failing while saving, is an error naming the
//!   file and the rank, and leaves no partial checkpoint.

use fp8lm_collectives::{run_ranks, Communicator, LocalComm};
use fp8lm_optim::StateTensor;
use fp8lm_trainer::checkpoint::shard::{read_units, shard_file_name};
use fp8lm_trainer::checkpoint::Checkpoint;
use fp8lm_trainer::data::synthetic::MarkovCorpus;
use fp8lm_trainer::data::Dataset;
use fp8lm_trainer::repartition::{repartition_state, state_values, UnitSpan};
use fp8lm_trainer::{snapshot, Precision, RunConfig, Trainer};
use std::path::{Path, PathBuf};

fn small() -> RunConfig {
    let mut cfg = RunConfig {
        precision: Precision::Fp8O3,
        batch: 2,
        max_steps: 8,
        ..RunConfig::default()
    };
    cfg.model.channels = 32;
    cfg.optim.warmup_steps = 2;
    cfg
}

/// A fresh folder under the target directory (not /tmp), removed when dropped.
struct Dir(PathBuf);
impl Dir {
    fn new(name: &str) -> Dir {
        let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("shard-ckpt-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
}
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Train `total` steps on `ranks` in-process ranks, saving a sharded checkpoint after
/// step `k` (as `fp8lm train` does). Returns (losses, final weights, checkpoint dir).
fn train_sharded(
    cfg: &RunConfig,
    ranks: usize,
    k: usize,
    total: usize,
    root: &Path,
) -> (Vec<f32>, Vec<f32>, PathBuf) {
    let out = run_ranks(ranks, |c: &LocalComm| -> anyhow::Result<_> {
        let mut data = MarkovCorpus::new(cfg.seed);
        let mut tr = Trainer::new_for_ranks(cfg, data.vocab_size(), c.size())?;
        tr.enable_data_parallel(c)?;
        let (mut losses, mut saved) = (vec![], None);
        for s in 0..total {
            losses.push(tr.train_step_dist(&mut data, c)?.loss);
            if s + 1 == k {
                let extra = serde_json::Value::Object(tr.dist_checkpoint_extra());
                saved = Some(snapshot::save_trainer_sharded(
                    &tr,
                    &data,
                    extra,
                    c,
                    root,
                    3,
                    &mut |_| Ok(()),
                )?);
            }
        }
        Ok((losses, tr.weights_f32_all(), saved.unwrap()))
    })
    .unwrap();
    for o in &out {
        assert_eq!(
            o.2, out[0].2,
            "every rank returns the same checkpoint directory"
        );
    }
    (out[0].0.clone(), out[0].1.clone(), out[0].2.clone())
}

struct Resumed {
    losses: Vec<f32>,
    params: Vec<f32>,
    /// The whole optimizer state right after the resume (gathered, for comparison).
    state0: (Vec<(String, StateTensor)>, Option<Vec<UnitSpan>>),
    /// Elements of optimizer state this rank read from the checkpoint.
    read_numel: usize,
}

/// Resume `dir` on `ranks` in-process ranks as `fp8lm train --resume` does; train `steps`.
fn resume(cfg: &RunConfig, ranks: usize, dir: &Path, steps: usize) -> Vec<Resumed> {
    let ck = Checkpoint::load(dir).unwrap();
    run_ranks(ranks, |c: &LocalComm| -> anyhow::Result<Resumed> {
        let mut data = MarkovCorpus::new(cfg.seed);
        let mut tr = Trainer::new_for_ranks(cfg, data.vocab_size(), c.size())?;
        snapshot::restore_except_optimizer(&mut tr, &mut data, &ck)?;
        tr.enable_data_parallel_from_checkpoint(c, Some(&ck))?;
        tr.restore_dist_extra(&ck.meta.extra)?;
        let mine = tr.zero_owned_spans().unwrap();
        let read_numel = match ck.meta.optimizer_shards {
            Some(_) => read_units(&ck, &mine)?.1.iter().map(|u| u.numel).sum(),
            None => 0,
        };
        let state0 = tr.gather_optimizer_state(c)?;
        let mut losses = vec![];
        for _ in 0..steps {
            let st = tr.train_step_dist(&mut data, c)?;
            assert!(!st.skipped, "rank {} step {} skipped", c.rank(), st.step);
            losses.push(st.loss);
        }
        Ok(Resumed {
            losses,
            params: tr.weights_f32_all(),
            state0,
            read_numel,
        })
    })
    .unwrap()
}

/// Re-assemble a state cut into `units` into whole tensors (a common frame).
fn whole(
    tr: &Trainer,
    st: &[(String, StateTensor)],
    units: &[UnitSpan],
) -> Vec<(String, StateTensor)> {
    let template = tr.optimizer().export_state();
    repartition_state(st, units, &template, &snapshot::whole_tensor_units(tr)).unwrap()
}

/// `b` equals `a` within the re-encoding bound of `repartition` (as in `dp_resume.rs`:
/// f32 and FP16 states to 2^-24 of their amax, FP8 E4M3 moments and the other scalars
/// to 2^-16 of theirs: half a subnormal E4M3 step at the new scale is 2^-10 / 448 <
/// 2^-18 of the amax). The `.amax` prediction scalars: a unit copied verbatim keeps the
/// optimizer's (the amax before the state was rounded to its format), a rebuilt one
/// gets its stored values' true amax, so they differ by the rounding: at most half an
/// ulp of the coarsest state format, E4M3's 2^-4 relative.
fn assert_state_close(a: &[(String, StateTensor)], b: &[(String, StateTensor)], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    let mut fp8 = 0;
    for ((na, sa), (nb, sb)) in a.iter().zip(b) {
        assert_eq!(na, nb, "{what}");
        let (va, vb) = (state_values(sa), state_values(sb));
        assert_eq!(va.len(), vb.len(), "{what}: {na}");
        let amax = va.iter().fold(0f32, |m, x| m.max(x.abs()));
        let tol = match sa {
            StateTensor::Fp8(_) => {
                fp8 += 1;
                amax * 2f32.powi(-16)
            }
            StateTensor::Scalar(_) if na.ends_with(".amax") => amax * 2f32.powi(-4),
            StateTensor::Scalar(_) => amax * 2f32.powi(-16),
            _ => amax * 2f32.powi(-24),
        };
        for (x, y) in va.iter().zip(&vb) {
            assert!(
                (x - y).abs() <= tol,
                "{what}: {na}: {x} vs {y} (tolerance {tol})"
            );
        }
    }
    assert!(fp8 > 0, "{what}: no FP8 moments compared");
}

/// The checkpoint's whole optimizer state (every shard), in whole tensors.
fn checkpoint_state(cfg: &RunConfig, dir: &Path) -> Vec<(String, StateTensor)> {
    let ck = Checkpoint::load(dir).unwrap();
    let tr = Trainer::new(cfg, MarkovCorpus::new(cfg.seed).vocab_size()).unwrap();
    let (st, units) = snapshot::stored_optimizer_state(&tr, &ck).unwrap();
    whole(&tr, &st, &units)
}

fn total_numel(cfg: &RunConfig) -> usize {
    let tr = Trainer::new(cfg, MarkovCorpus::new(cfg.seed).vocab_size()).unwrap();
    tr.model().layout.total
}

#[test]
fn four_ranks_write_one_shard_each_and_an_index() {
    let cfg = small();
    let d = Dir::new("index");
    let (_, _, dir) = train_sharded(&cfg, 4, 2, 2, &d.0);
    let ck = Checkpoint::load(&dir).unwrap();
    let idx = ck.meta.optimizer_shards.as_ref().expect("a shard index");
    assert_eq!((idx.world_size, idx.dp, idx.tp), (4, 4, 1));
    assert_eq!(idx.partition, "row-blocks");
    assert!(
        !dir.join("optimizer.safetensors").exists(),
        "no gathered state"
    );
    assert!(ck.meta.extra.get("zero_units").is_none());
    let mut covered = 0;
    for (r, e) in idx.shards.iter().enumerate() {
        assert_eq!(e.file, shard_file_name(r, 4));
        assert_eq!((e.rank, e.dp_rank, e.tp_rank), (r, r, 0));
        assert!(dir.join(&e.file).is_file(), "{}", e.file);
        assert!(
            ck.meta.files.contains_key(&e.file),
            "{} has a checksum",
            e.file
        );
        assert!(!e.units.is_empty(), "rank {r} owns units");
        covered += e.units.iter().map(|u| u.numel).sum::<usize>();
    }
    assert_eq!(
        covered,
        total_numel(&cfg),
        "the shards cover the model once"
    );
    // Nothing of the optimizer state is loaded with the checkpoint.
    assert!(!ck.groups.contains_key("optimizer"));
    let names: Vec<_> = std::fs::read_dir(&d.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(
        names,
        vec!["step_00000002".to_string()],
        "no temporaries left"
    );
}

#[test]
fn start_up_builds_only_the_ranks_own_share_with_the_same_weights() {
    let cfg = small();
    let vocab = MarkovCorpus::new(cfg.seed).vocab_size();
    let out = run_ranks(4, |c: &LocalComm| -> anyhow::Result<_> {
        let mut lean = Trainer::new_for_ranks(&cfg, vocab, 4)?;
        let before = lean.optimizer().state_bytes();
        assert!(lean.train_step(&mut MarkovCorpus::new(cfg.seed)).is_err());
        lean.enable_data_parallel(c)?;
        let mut full = Trainer::new(&cfg, vocab)?;
        full.enable_data_parallel(c)?;
        let share = lean.zero_rank_bytes().unwrap()[c.rank()];
        Ok((
            before,
            lean.optimizer().state_bytes(),
            share,
            bits(&lean.weights_f32_all()) == bits(&full.weights_f32_all()),
            full.optimizer().state_bytes(),
        ))
    })
    .unwrap();
    for (r, (before, after, share, same, full)) in out.into_iter().enumerate() {
        assert!(
            before <= 64,
            "rank {r}: {before} bytes of state before the share is built"
        );
        assert_eq!(after, full, "rank {r}: the same share either way");
        // The partition's estimate counts the per-unit scalars; the optimizer its own
        // (8 bytes of step): they agree within those.
        assert!(
            after.abs_diff(share) <= 64,
            "rank {r}: holds {after}, partition says {share}"
        );
        assert!(
            same,
            "rank {r}: weights differ from Trainer::new + enable_data_parallel"
        );
    }
}

#[test]
fn four_to_four_resumes_bit_identically() {
    let cfg = small();
    let d = Dir::new("4to4");
    let (full, final_params, dir) = train_sharded(&cfg, 4, 3, 6, &d.0);
    let res = resume(&cfg, 4, &dir, 3);
    for (r, x) in res.iter().enumerate() {
        assert_eq!(
            bits(&x.losses),
            bits(&full[3..]),
            "rank {r}: {:?} vs {:?}",
            x.losses,
            &full[3..]
        );
        assert_eq!(
            bits(&x.params),
            bits(&final_params),
            "rank {r}: final weights differ"
        );
    }
    let read: usize = res.iter().map(|x| x.read_numel).sum();
    assert_eq!(
        read,
        total_numel(&cfg),
        "each state element is read by one rank"
    );
}

/// Resume a checkpoint written on `from` ranks on `to` ranks: the state equals the
/// checkpoint's within the re-encoding bound, replicas agree, each element is read by
/// exactly one rank, and training goes on.
fn check_repartitioned_resume(from: usize, to: usize) {
    let cfg = small();
    let d = Dir::new(&format!("{from}to{to}"));
    let (_, _, dir) = train_sharded(&cfg, from, 3, 3, &d.0);
    let want = checkpoint_state(&cfg, &dir);
    let res = resume(&cfg, to, &dir, 2);
    let tr = Trainer::new(&cfg, MarkovCorpus::new(cfg.seed).vocab_size()).unwrap();
    let (st, units) = &res[0].state0;
    let got = whole(&tr, st, units.as_ref().unwrap());
    assert_state_close(&want, &got, &format!("{from} -> {to} ranks"));
    for (r, x) in res.iter().enumerate() {
        assert_eq!(bits(&x.losses), bits(&res[0].losses), "rank {r}");
        assert!(
            x.losses.iter().all(|l| l.is_finite()),
            "rank {r}: {:?}",
            x.losses
        );
    }
    let read: usize = res.iter().map(|x| x.read_numel).sum();
    assert_eq!(
        read,
        total_numel(&cfg),
        "{from} -> {to}: each element read by one rank"
    );
}

#[test]
fn four_to_two_repartitions() {
    check_repartitioned_resume(4, 2);
}

#[test]
fn four_to_one_rank_repartitions() {
    check_repartitioned_resume(4, 1);
}

#[test]
fn one_to_four_repartitions() {
    check_repartitioned_resume(1, 4);
}

#[test]
fn one_plain_process_resumes_a_four_rank_checkpoint() {
    let cfg = small();
    let d = Dir::new("4toplain");
    let (_, _, dir) = train_sharded(&cfg, 4, 3, 3, &d.0);
    let want = checkpoint_state(&cfg, &dir);
    let ck = Checkpoint::load(&dir).unwrap();
    let mut data = MarkovCorpus::new(cfg.seed);
    let mut tr = Trainer::new(&cfg, data.vocab_size()).unwrap();
    snapshot::restore(&mut tr, &mut data, &ck).unwrap();
    assert_eq!(tr.step(), 3);
    assert_state_close(
        &want,
        &tr.optimizer().export_state(),
        "4 ranks -> one process",
    );
    let st = tr.train_step(&mut data).unwrap();
    assert!(st.loss.is_finite() && !st.skipped);
}

#[test]
fn a_damaged_or_missing_shard_is_refused_naming_the_file_and_rank() {
    let cfg = small();
    let d = Dir::new("damaged");
    let (_, _, dir) = train_sharded(&cfg, 4, 1, 1, &d.0);
    let f = dir.join(shard_file_name(2, 4));
    let mut b = std::fs::read(&f).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x40;
    std::fs::write(&f, &b).unwrap();
    let e = format!("{:#}", Checkpoint::load(&dir).unwrap_err());
    assert!(e.contains("optim.rank-0002-of-0004.safetensors"), "{e}");
    assert!(e.contains("rank 2 of 4") && e.contains("corrupted"), "{e}");
    std::fs::remove_file(&f).unwrap();
    let e = format!("{:#}", Checkpoint::load(&dir).unwrap_err());
    assert!(e.contains("optim.rank-0002-of-0004.safetensors"), "{e}");
    assert!(e.contains("rank 2 of 4") && e.contains("missing"), "{e}");
}

#[test]
fn a_rank_failing_while_saving_fails_every_rank_and_leaves_no_checkpoint() {
    let cfg = small();
    let d = Dir::new("failsave");
    let out = run_ranks(4, |c: &LocalComm| -> anyhow::Result<String> {
        let mut data = MarkovCorpus::new(cfg.seed);
        let mut tr = Trainer::new_for_ranks(&cfg, data.vocab_size(), 4)?;
        tr.enable_data_parallel(c)?;
        tr.train_step_dist(&mut data, c)?;
        let rank = c.rank();
        let r = snapshot::save_trainer_sharded(
            &tr,
            &data,
            serde_json::Value::Null,
            c,
            &d.0,
            3,
            &mut |p| {
                if rank == 3 {
                    anyhow::bail!("{}: injected write failure", p.display())
                }
                Ok(())
            },
        );
        Ok(format!("{:#}", r.unwrap_err()))
    })
    .unwrap();
    for (r, e) in out.iter().enumerate() {
        assert!(
            e.contains("rank 3 of 4") && e.contains("injected write failure"),
            "rank {r}: {e}"
        );
        assert!(
            e.contains("optim.rank-0003-of-0004.safetensors"),
            "rank {r}: {e}"
        );
    }
    let left: Vec<_> = std::fs::read_dir(&d.0).unwrap().collect();
    assert!(left.is_empty(), "a failed save left {left:?}");
}

/// Checkpoints written before sharding (every owner's units gathered into
/// `optimizer.safetensors`, their list in `extra.zero_units`) still resume, through the
/// same entry point `fp8lm train` uses, bit for bit on the same number of ranks.
#[test]
fn a_gathered_checkpoint_of_the_old_format_still_resumes_bit_identically() {
    let cfg = small();
    let d = Dir::new("oldformat");
    let out = run_ranks(4, |c: &LocalComm| -> anyhow::Result<_> {
        let mut data = MarkovCorpus::new(cfg.seed);
        let mut tr = Trainer::new(&cfg, data.vocab_size())?;
        tr.enable_data_parallel(c)?;
        let (mut losses, mut saved) = (vec![], None);
        for s in 0..6 {
            losses.push(tr.train_step_dist(&mut data, c)?.loss);
            if s == 2 {
                let (opt, units) = tr.gather_optimizer_state(c)?;
                if c.rank() == 0 {
                    let extra = serde_json::Value::Object(tr.dist_checkpoint_extra());
                    let ck = snapshot::capture_with_state(&tr, &data, extra, opt, units);
                    saved = Some(ck.save(&d.0, 3)?);
                }
            }
        }
        Ok((losses, tr.weights_f32_all(), saved))
    })
    .unwrap();
    let dir = out[0].2.clone().unwrap();
    let ck = Checkpoint::load(&dir).unwrap();
    assert!(ck.meta.optimizer_shards.is_none() && ck.groups.contains_key("optimizer"));
    let res = resume(&cfg, 4, &dir, 3);
    for (r, x) in res.iter().enumerate() {
        assert_eq!(bits(&x.losses), bits(&out[0].0[3..]), "rank {r}");
        assert_eq!(
            bits(&x.params),
            bits(&out[0].1),
            "rank {r}: final weights differ"
        );
    }
}
