//! The D x T grid run and the state helpers shared by the fp8-o3 grid checkpoint tests
//! (`tensor_parallel_o3_ckpt.rs`: same T, another D; `tensor_parallel_o3_reshard.rs`:
//! another T): one rank's start (fresh, or resumed as `fp8lm train` resumes a grid
//! checkpoint), its steps and its save; a scratch directory per test; a state tensor's
//! scale and the half subnormal spacing of its format (the re-encoding bound, each
//! file's module docs). Each test keeps what it asserts, and what it keeps of a rank's
//! end, to itself.

use fp8lm_collectives::grid::Grid;
use fp8lm_collectives::{run_ranks, Communicator};
use fp8lm_optim::StateTensor;
use fp8lm_trainer::checkpoint::Checkpoint;
use fp8lm_trainer::data::synthetic::MarkovCorpus;
use fp8lm_trainer::data::Dataset;
use fp8lm_trainer::snapshot;
use fp8lm_trainer::tensor_parallel::ckpt::{
    restore_tp_except_optimizer, restore_tp_replica, save_trainer_tp,
};
use fp8lm_trainer::{RunConfig, Trainer};
use std::path::{Path, PathBuf};

/// A fresh scratch directory `name` of this test binary (and process).
pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "fp8lm-{}-{name}-{}",
        env!("CARGO_CRATE_NAME"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The ranks of grid `g` (`g.data_parallel` x `g.tensor_parallel`, thread ranks) with
/// config `c` on `MarkovCorpus::new(3)`: each starts fresh or from the checkpoint at
/// `resume` (D > 1: everything but the optimizer, the data-parallel set-up from the
/// checkpoint, then the replica's state; D = 1: `snapshot::restore`, fp8-o3 then holds
/// each shard whole), runs `steps` steps and (with `save`) writes its share of a
/// checkpoint; `end(trainer, dp rank, tp rank, losses)` is what each rank returns.
pub fn grid_run<E: Send>(
    c: &RunConfig,
    g: &Grid,
    resume: Option<&Path>,
    steps: usize,
    save: Option<&Path>,
    end: impl Fn(&Trainer, usize, usize, Vec<f32>) -> E + Sync,
) -> Vec<E> {
    let d = g.data_parallel;
    run_ranks(g.world(), |world| {
        let (tp, dp) = g.groups(world)?;
        let mut data = MarkovCorpus::new(3);
        let mut tr = Trainer::new_tp(c, data.vocab_size(), tp.rank())?;
        let ck = resume.map(Checkpoint::load).transpose()?;
        if d > 1 {
            if let Some(ck) = &ck {
                restore_tp_except_optimizer(&mut tr, &mut data, ck)?;
            }
            tr.enable_data_parallel_from_tp_checkpoint(&dp, world, ck.as_ref())?;
            if let Some(ck) = &ck {
                restore_tp_replica(&mut tr, ck)?;
            }
        } else if let Some(ck) = &ck {
            snapshot::restore(&mut tr, &mut data, ck)?;
        }
        // The data-parallel group exactly when the trainer is set up for it (D > 1).
        let dp_on = (d > 1).then_some(&dp as &dyn Communicator);
        let losses = (0..steps)
            .map(|_| {
                tr.train_step_on(&mut data, Some(&tp), dp_on)
                    .map(|s| s.loss)
            })
            .collect::<anyhow::Result<Vec<f32>>>()?;
        if let Some(root) = save {
            let e = serde_json::Value::Object(tr.dist_checkpoint_extra());
            save_trainer_tp(&tr, &data, e, world, dp.rank(), root, 0, &mut |_| Ok(()))?;
        }
        anyhow::Ok(end(&tr, dp.rank(), tp.rank(), losses))
    })
    .unwrap()
}

/// The power-of-two scale `s` is stored with (1 for f32).
pub fn scale_of(s: &StateTensor) -> f32 {
    match s {
        StateTensor::F16 { scale, .. } => *scale,
        StateTensor::Fp8(t) => t.scale,
        _ => 1.0,
    }
}

/// Half a subnormal spacing of `s`'s format at scale 1 (0 for f32: exact).
pub fn half_spacing(s: &StateTensor) -> f32 {
    match s {
        StateTensor::F16 { .. } => 2f32.powi(-25),
        StateTensor::Fp8(_) => 2f32.powi(-10),
        _ => 0.0,
    }
}
