//! fp8-o3 start-up and resume that build only what a rank keeps
//! (`trainer/src/parallel/zero_start.rs`) give the same bits as the path they replace,
//! which drew the whole f32 model on every rank (`Trainer::zero_draw_whole_model`) and
//! loaded the whole model group of the checkpoint (`Checkpoint::load`):
//! - fresh start: losses, evaluation, the exact weights gathered from the owners, every
//!   linear's E4M3 bytes and scale, after 3 steps; GPT-2 (tied embedding, row-block
//!   units) and LLaMA, delayed and current scaling, 2 and 4 ranks;
//! - resume from a sharded checkpoint at step 3 (model group left on disk, only the f32
//!   tensors read by range), on the same and another rank count: the same bits as the
//!   old resume; on the same rank count the losses of the uninterrupted run.
//!
//! Tolerance: none; every comparison is of bit patterns.

use fp8lm_collectives::{run_ranks, Communicator, LocalComm};
use fp8lm_trainer::checkpoint::Checkpoint;
use fp8lm_trainer::config::Arch;
use fp8lm_trainer::data::synthetic::MarkovCorpus;
use fp8lm_trainer::data::Dataset;
use fp8lm_trainer::snapshot;
use fp8lm_trainer::{Precision, RunConfig, Trainer};
use std::path::{Path, PathBuf};

fn small(arch: Arch, recipe: &str) -> RunConfig {
    let mut cfg = RunConfig {
        precision: Precision::Fp8O3,
        batch: 2,
        max_steps: 20,
        ..RunConfig::default()
    };
    cfg.model.arch = arch;
    cfg.model.channels = 32;
    cfg.model.layers = 2;
    cfg.fp8.recipe = recipe.into();
    cfg.optim.warmup_steps = 2;
    cfg
}

/// What a rank ends with, as bit patterns.
#[derive(Debug, PartialEq)]
struct End {
    losses: Vec<u32>,
    eval: u32,
    weights: Vec<u32>,
    e4m3: Vec<(Vec<u8>, u32)>,
}

fn end(
    tr: &mut Trainer,
    c: &LocalComm,
    data: &MarkovCorpus,
    losses: Vec<u32>,
) -> anyhow::Result<End> {
    let eval = tr.evaluate(data, 1)?.to_bits();
    let weights = tr.gather_weights_f32(c)?;
    let e4m3 = tr
        .model()
        .linears
        .iter()
        .map(|l| {
            let f = l.fp8.as_ref().expect("FP8 linears");
            (f.w.data().to_vec(), f.w.held_scale().to_bits())
        })
        .collect();
    Ok(End {
        losses,
        eval,
        weights: weights.iter().map(|x| x.to_bits()).collect(),
        e4m3,
    })
}

/// `steps` steps from a fresh start (`whole`: the old start-up), saving a sharded
/// checkpoint into `save` after step `save.1` when given.
fn fresh(
    cfg: &RunConfig,
    ranks: usize,
    steps: usize,
    whole: bool,
    save: Option<(&Path, usize)>,
) -> Vec<End> {
    run_ranks(ranks, |c: &LocalComm| -> anyhow::Result<End> {
        let mut data = MarkovCorpus::new(cfg.seed);
        let mut tr = Trainer::new_for_ranks(cfg, data.vocab_size(), ranks)?;
        if whole {
            tr.zero_draw_whole_model()?;
        }
        tr.enable_data_parallel(c)?;
        let e4m3 = cfg.fp8.recipe != "block";
        assert_eq!(
            tr.zero_holds_e4m3(),
            e4m3,
            "rank {}: E4M3 storage",
            c.rank()
        );
        let mut losses = vec![];
        for s in 0..steps {
            let st = tr.train_step_dist(&mut data, c)?;
            assert!(!st.skipped, "rank {} step {s} skipped", c.rank());
            losses.push(st.loss.to_bits());
            if let Some((dir, k)) = save.filter(|&(_, k)| k == s + 1) {
                let extra = serde_json::Value::Object(tr.dist_checkpoint_extra());
                snapshot::save_trainer_sharded(&tr, &data, extra, c, dir, 1, &mut |_| Ok(()))?;
                let _ = k;
            }
        }
        end(&mut tr, c, &data, losses)
    })
    .unwrap()
}

/// Resume from the newest checkpoint in `dir` on `ranks` ranks, `steps` more steps
/// (`whole`: the old resume, the whole model drawn and the whole model group loaded).
fn resume(cfg: &RunConfig, dir: &Path, ranks: usize, steps: usize, whole: bool) -> Vec<End> {
    run_ranks(ranks, |c: &LocalComm| -> anyhow::Result<End> {
        let leave: &[&str] = if whole { &[] } else { &["model"] };
        let mut ck = Checkpoint::load_leaving(dir, leave)?;
        let mut data = MarkovCorpus::new(cfg.seed);
        let mut tr = Trainer::new_for_ranks(cfg, data.vocab_size(), ranks)?;
        if whole {
            tr.zero_draw_whole_model()?;
        }
        // As `fp8lm train --resume` does: the model group read whole only where needed.
        if !tr.zero_reads_f32_only() {
            ck.load_left("model")?;
        }
        let e4m3 = cfg.fp8.recipe != "block";
        assert_eq!(
            ck.groups.contains_key("model"),
            whole || !e4m3,
            "model group in memory"
        );
        snapshot::restore_except_optimizer(&mut tr, &mut data, &ck)?;
        tr.enable_data_parallel_from_checkpoint(c, Some(&ck))?;
        tr.restore_dist_extra(&ck.meta.extra)?;
        let mut losses = vec![];
        for _ in 0..steps {
            losses.push(tr.train_step_dist(&mut data, c)?.loss.to_bits());
        }
        end(&mut tr, c, &data, losses)
    })
    .unwrap()
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fp8lm-zero-start-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn same(what: &str, a: &[End], b: &[End]) {
    assert_eq!(a.len(), b.len(), "{what}: ranks");
    for (r, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.losses, y.losses, "{what}: rank {r} losses (bits)");
        assert_eq!(x.eval, y.eval, "{what}: rank {r} evaluation loss (bits)");
        let bad = (0..x.weights.len())
            .filter(|&i| x.weights[i] != y.weights[i])
            .count();
        assert_eq!(bad, 0, "{what}: rank {r}: {bad} weights differ (bits)");
        for (k, (p, q)) in x.e4m3.iter().zip(&y.e4m3).enumerate() {
            assert_eq!(p.1, q.1, "{what}: rank {r} linear {k}: E4M3 scale");
            assert!(p.0 == q.0, "{what}: rank {r} linear {k}: E4M3 bytes differ");
        }
    }
}

#[test]
fn drawing_only_the_share_starts_bit_for_bit_like_the_whole_model() {
    for (arch, recipe, ranks) in [
        (Arch::Gpt2, "delayed", 4),
        (Arch::Gpt2, "current", 2),
        (Arch::Llama, "delayed", 2),
        (Arch::Llama, "current", 4),
    ] {
        let cfg = small(arch, recipe);
        let what = format!("{arch:?} {recipe} on {ranks} ranks");
        same(
            &what,
            &fresh(&cfg, ranks, 3, false, None),
            &fresh(&cfg, ranks, 3, true, None),
        );
    }
}

#[test]
fn resuming_from_the_f32_tensors_and_the_shards_is_bit_for_bit_the_old_resume() {
    for (arch, recipe, ranks, again) in [
        (Arch::Gpt2, "delayed", 4, 2),
        (Arch::Llama, "current", 2, 4),
    ] {
        let cfg = small(arch, recipe);
        let what = format!("{arch:?} {recipe}, {ranks} ranks");
        let dir = tmp(&format!("{arch:?}-{recipe}"));
        let full = fresh(&cfg, ranks, 5, false, Some((&dir, 3)));
        let new = resume(&cfg, &dir, ranks, 2, false);
        same(
            &format!("{what}: resume vs old resume"),
            &new,
            &resume(&cfg, &dir, ranks, 2, true),
        );
        // Against the uninterrupted run: the losses after the save, bit for bit. (Its
        // final masters are not compared: there, old and new resume alike end with a
        // couple of f32 values an ulp away from the uninterrupted run's, which this
        // change does not touch.)
        for (r, (x, y)) in new.iter().zip(&full).enumerate() {
            assert_eq!(
                x.losses,
                y.losses[3..],
                "{what}: rank {r}: resume vs uninterrupted"
            );
        }
        // Another rank count: the state re-partitioned; old and new resume agree.
        same(
            &format!("{what}: resumed on {again} ranks"),
            &resume(&cfg, &dir, again, 2, false),
            &resume(&cfg, &dir, again, 2, true),
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The paths that keep the f32 view of the masters (the block recipe; the test hook
/// `keep_zero_f32_view`) still draw and read the whole model: a block-recipe run resumes
/// from its sharded checkpoint with the uninterrupted run's losses.
#[test]
fn the_block_recipe_keeps_the_whole_f32_view_and_resumes() {
    let cfg = small(Arch::Gpt2, "block");
    let dir = tmp("block");
    let full = fresh(&cfg, 2, 5, false, Some((&dir, 3)));
    let new = resume(&cfg, &dir, 2, 2, false);
    for (r, (x, y)) in new.iter().zip(&full).enumerate() {
        assert_eq!(
            x.losses,
            y.losses[3..],
            "block recipe: rank {r}: resume vs uninterrupted"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
