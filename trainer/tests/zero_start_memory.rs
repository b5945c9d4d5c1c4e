//! fp8-o3 ranks never hold a transient full-precision copy of the whole model, at
//! start-up or on resume (issue #11; `trainer/src/parallel/zero_start.rs`).
//!
//! Measured on the process's resident set (Linux `VmHWM`, reset with
//! `/proc/self/clear_refs` before each phase), 2 in-process ranks: the peak of the
//! start-up (or resume) against the peak of the training step that follows it (reset in
//! between), which holds everything the ranks keep plus the step's own buffers (the
//! owners' all-gather, activations, gradients). The target: within 10% of it.
//! The control: the start-up and resume this replaced (`Trainer::zero_draw_whole_model`,
//! the whole model group loaded) measured the same way peak above the new ones by at
//! least 0.9 of one rank's whole f32 model (4 B/param) on resume, else the measurement
//! could not see what it is meant to catch; the start-up gap depends on scheduling and is
//! printed (see the test).
//!
//! One test in this binary: each measurement is of the whole process.

use fp8lm_collectives::{run_ranks, Communicator, LocalComm};
use fp8lm_trainer::checkpoint::Checkpoint;
use fp8lm_trainer::data::synthetic::MarkovCorpus;
use fp8lm_trainer::data::Dataset;
use fp8lm_trainer::memory::peak_resident_bytes;
use fp8lm_trainer::snapshot;
use fp8lm_trainer::{Precision, RunConfig, Trainer};
use std::path::Path;

const RANKS: usize = 2;

fn cfg() -> RunConfig {
    let mut cfg = RunConfig {
        precision: Precision::Fp8O3,
        batch: 2,
        max_steps: 20,
        ..RunConfig::default()
    };
    (cfg.model.layers, cfg.model.heads, cfg.model.channels) = (2, 8, 512);
    (cfg.model.context, cfg.model.vocab) = (32, 16384);
    cfg
}

fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The process's peak since the last reset, read by rank 0 while every rank still holds
/// what it keeps (all ranks wait for it), then reset.
fn peak(c: &LocalComm) -> anyhow::Result<usize> {
    c.barrier()?;
    let p = if c.rank() == 0 {
        let p = peak_resident_bytes().unwrap();
        assert!(reset_peak());
        p
    } else {
        0
    };
    c.barrier()?;
    Ok(p)
}

/// Fresh start (`whole`: the old one), then one step, then a sharded checkpoint into
/// `dir`: (peak of the start-up, peak of the step).
fn start(whole: bool, dir: &Path) -> (usize, usize) {
    let cfg = cfg();
    assert!(reset_peak());
    let out = run_ranks(RANKS, |c: &LocalComm| -> anyhow::Result<(usize, usize)> {
        let mut data = MarkovCorpus::new(cfg.seed);
        let mut tr = Trainer::new_for_ranks(&cfg, data.vocab_size(), RANKS)?;
        if whole {
            tr.zero_draw_whole_model()?;
        }
        tr.enable_data_parallel(c)?;
        let at_start = peak(c)?;
        tr.train_step_dist(&mut data, c)?;
        let step = peak(c)?;
        snapshot::save_trainer_sharded(
            &tr,
            &data,
            serde_json::Value::Null,
            c,
            dir,
            1,
            &mut |_| Ok(()),
        )?;
        Ok((at_start, step))
    })
    .unwrap();
    out[0]
}

/// Resume from `dir` (`whole`: the old resume, the whole model group loaded), then one
/// step: (peak of the resume, peak of the step).
fn resume(whole: bool, dir: &Path) -> (usize, usize) {
    let cfg = cfg();
    assert!(reset_peak());
    let out = run_ranks(RANKS, |c: &LocalComm| -> anyhow::Result<(usize, usize)> {
        let leave: &[&str] = if whole { &[] } else { &["model"] };
        let ck = Checkpoint::load_leaving(dir, leave)?;
        let mut data = MarkovCorpus::new(cfg.seed);
        let mut tr = Trainer::new_for_ranks(&cfg, data.vocab_size(), RANKS)?;
        if whole {
            tr.zero_draw_whole_model()?;
        }
        snapshot::restore_except_optimizer(&mut tr, &mut data, &ck)?;
        tr.enable_data_parallel_from_checkpoint(c, Some(&ck))?;
        drop(ck);
        let at_resume = peak(c)?;
        tr.train_step_dist(&mut data, c)?;
        Ok((at_resume, peak(c)?))
    })
    .unwrap();
    out[0]
}

#[test]
fn o3_start_up_and_resume_hold_no_transient_f32_model() {
    if !reset_peak() || peak_resident_bytes().is_none() {
        // Linux (where CI runs) has both; elsewhere say plainly that nothing was measured.
        if cfg!(target_os = "linux") {
            panic!("/proc/self/clear_refs or VmHWM unavailable: the peak cannot be measured");
        }
        eprintln!("skipped: this system cannot reset or read the peak resident set");
        return;
    }
    let params = {
        let c = cfg();
        Trainer::new(&c, MarkovCorpus::new(c.seed).vocab_size())
            .unwrap()
            .model()
            .num_params()
    };
    let f32_model = 4 * params;
    let dir = std::env::temp_dir().join(format!("fp8lm-zero-start-mem-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (new_start, old_start) = (start(false, &dir), start(true, &dir.join("old")));
    let (new_resume, old_resume) = (resume(false, &dir), resume(true, &dir));
    let _ = std::fs::remove_dir_all(&dir);
    let mb = |b: usize| b as f64 / 1e6;
    eprintln!(
        "{params} params, f32 model {:.1} MB per rank, {RANKS} ranks; process peak MB \
         (phase / the step after it): start-up new {:.1} / {:.1}, old {:.1} / {:.1}; \
         resume new {:.1} / {:.1}, old {:.1} / {:.1}",
        mb(f32_model),
        mb(new_start.0),
        mb(new_start.1),
        mb(old_start.0),
        mb(old_start.1),
        mb(new_resume.0),
        mb(new_resume.1),
        mb(old_resume.0),
        mb(old_resume.1),
    );
    // The old resume holds its whole f32 model and the model group's f32 bytes on every
    // rank across the phase: at least one f32 model apart, asserted (the control that
    // the measurement sees an f32 model). The old start-up's f32 model is freed before
    // its owners' all-gather, and how much of it overlaps the rest of the peak depends on
    // when the scheduler runs the two ranks: 0.16 to 1.7 f32 models apart were seen (0.16
    // on a loaded CI machine), so that gap is printed, not asserted.
    for (what, new, old, control) in [
        ("start-up", new_start, old_start, None),
        ("resume", new_resume, old_resume, Some(f32_model * 9 / 10)),
    ] {
        eprintln!(
            "{what}: old {:.1} MB vs new {:.1} MB ({:.2} f32 models apart)",
            mb(old.0),
            mb(new.0),
            (old.0 as f64 - new.0 as f64) / f32_model as f64
        );
        if let Some(control) = control {
            assert!(
                old.0 >= new.0 + control,
                "control: the old {what} peaked at {:.1} MB, the new at {:.1} MB: less than \
                 {:.1} MB apart, so the measurement does not see the f32 model",
                mb(old.0),
                mb(new.0),
                mb(control)
            );
        }
        assert!(
            new.0 as f64 <= 1.1 * new.1 as f64,
            "fp8-o3 {what} peaked at {:.1} MB, over 1.1 x the {:.1} MB of the step after it",
            mb(new.0),
            mb(new.1)
        );
    }
}
