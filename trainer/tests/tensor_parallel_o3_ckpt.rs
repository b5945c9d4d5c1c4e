//! fp8-o3 checkpoints on a D x T grid (in-process thread ranks): FP8 ZeRO over each
//! tensor-parallel shard's D replicas, every (dp, tp) rank writing its own share.
//!
//! What is asserted, and why these bounds:
//! - Same grid (2 x 2): every rank's units are stored whole under their names and read
//!   back verbatim (bytes and scales), weights are f32 slices copied verbatim, and the
//!   FP8 scaling states and the all-reduce's mu of every replica are restored: train 3,
//!   save, resume, train 3 == train 6 straight, bit for bit on every rank's losses,
//!   weights and optimizer share.
//! - The files: one per (dp, tp) rank; replica 0's also hold its shard's model tensors;
//!   `optimizer_shards` lists the four with their coordinates and units in the shard's
//!   local element coordinates, the two replicas' units of a shard tiling it exactly.
//! - Another D, same T (2 x 2 -> 1 x 2, and a 1 x 2 checkpoint -> 2 x 2): units are cut
//!   differently (row blocks of 1/(8D) of the shard), so pieces are decoded with their
//!   stored power-of-two scales (exact) and re-encoded with the scale of the assembled
//!   amax ([`fp8lm_trainer::repartition`]): exact except values pushed below the
//!   format's normal range, which round to the subnormal grid: at most half a subnormal
//!   spacing at the smaller of the two scales, 2^-25 / s (FP16 masters and second
//!   moments), 2^-10 / s (E4M3 first moments); f32 states exact. Asserted element by
//!   element with exactly those bounds; the runs train on from there. Measured: 2 x 2 ->
//!   1 x 2, 389 of 364416 state elements not bit-identical (all within the bound);
//!   1 x 2 -> 2 x 2, none.
//! - No gathering: replica 1's file is its share (183172 bytes for 164172 bytes of
//!   state, the rest the safetensors header) of the shard's 328560; asserted: under its
//!   share + 32 KiB, the share under 60% of the shard's state.
//! - Another T (one process, 1 x 4, 2 x 1): re-cut across slices, tested in
//!   tensor_parallel_o3_reshard.rs.
//! - A rank failing to write: no checkpoint, every rank's error names it.

mod o3_grid;

use fp8lm_collectives::grid::Grid;
use fp8lm_collectives::{run_ranks, Communicator};
use fp8lm_optim::StateTensor;
use fp8lm_trainer::checkpoint::Checkpoint;
use fp8lm_trainer::data::synthetic::MarkovCorpus;
use fp8lm_trainer::data::Dataset;
use fp8lm_trainer::repartition::{state_values, UnitSpan};
use fp8lm_trainer::snapshot;
use fp8lm_trainer::tensor_parallel::ckpt::save_trainer_tp;
use fp8lm_trainer::{Precision, RunConfig, Trainer};
use o3_grid::{grid_run, half_spacing, scale_of, tmpdir};
use std::path::Path;

const STEPS: usize = 6;

fn cfg(tp: usize) -> RunConfig {
    let mut c = RunConfig {
        batch: 4,
        max_steps: STEPS,
        precision: Precision::Fp8O3,
        ..RunConfig::default()
    };
    c.model.context = 32;
    c.dist.tensor_parallel = tp;
    c
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn state_bits(s: &StateTensor) -> (Vec<u8>, u32) {
    match s {
        StateTensor::F32(v) => (v.iter().flat_map(|x| x.to_le_bytes()).collect(), 0),
        StateTensor::F16 { data, scale } => (
            data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            scale.to_bits(),
        ),
        StateTensor::Fp8(t) => (t.data.clone(), t.scale.to_bits()),
        StateTensor::Scalar(x) => (x.to_le_bytes().to_vec(), 0),
    }
}

/// One rank's end: its coordinates, losses, weights, optimizer state and (under ZeRO)
/// its units; the names of its shard's tensors.
struct End {
    dp: usize,
    tp: usize,
    losses: Vec<f32>,
    weights: Vec<f32>,
    state: Vec<(String, StateTensor)>,
    units: Option<Vec<UnitSpan>>,
    names: Vec<String>,
    /// Bytes of optimizer state this rank holds.
    state_bytes: usize,
}

fn end(tr: &Trainer, dp: usize, tp: usize, losses: Vec<f32>) -> End {
    End {
        dp,
        tp,
        losses,
        weights: tr.weights_f32_all(),
        state: tr.optimizer().export_state(),
        units: tr.zero_owned_spans(),
        state_bytes: tr.optimizer().state_bytes(),
        names: tr
            .model()
            .layout
            .metas
            .iter()
            .map(|m| m.name.clone())
            .collect(),
    }
}

/// How a grid run starts.
#[derive(Clone, Copy)]
enum Start<'a> {
    Fresh,
    Resume(&'a Path),
}

/// `d` x 2 ranks: start, `steps` steps, then (with `save`) a checkpoint. With `d` = 1
/// the T ranks run without data parallelism (fp8-o3 then holds each shard whole).
fn grid(d: usize, start: Start<'_>, steps: usize, save: Option<&Path>) -> Vec<End> {
    let resume = match start {
        Start::Fresh => None,
        Start::Resume(root) => Some(root),
    };
    let g = Grid::new(2 * d, 2).unwrap();
    grid_run(&cfg(2), &g, resume, steps, save, end)
}

#[test]
fn grid_2x2_fp8_o3_resumes_bit_for_bit() {
    let root = tmpdir("same");
    let straight = grid(2, Start::Fresh, STEPS, None);
    let first = grid(2, Start::Fresh, STEPS / 2, Some(&root));
    let dir = root.join("step_00000003");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "checkpoint.json",
            "tp.dp-0000-tp-0000-of-0002.safetensors",
            "tp.dp-0000-tp-0001-of-0002.safetensors",
            "tp.dp-0001-tp-0000-of-0002.safetensors",
            "tp.dp-0001-tp-0001-of-0002.safetensors",
        ]
    );
    let ck = Checkpoint::load(&dir).unwrap();
    let tp_idx = ck.meta.tp_shards.as_ref().unwrap();
    assert_eq!((tp_idx.dp, tp_idx.tp, tp_idx.shards.len()), (2, 2, 2));
    let idx = ck.meta.optimizer_shards.as_ref().expect("optimizer_shards");
    assert_eq!((idx.world_size, idx.dp, idx.tp), (4, 2, 2));
    assert_eq!(idx.shards.len(), 4);
    for e in &idx.shards {
        let r = first
            .iter()
            .find(|r| (r.dp, r.tp) == (e.dp_rank, e.tp_rank));
        let r = r.unwrap();
        assert_eq!(e.rank, 2 * e.dp_rank + e.tp_rank, "grid rank of {}", e.file);
        assert_eq!(
            e.file,
            format!(
                "tp.dp-{:04}-tp-{:04}-of-0002.safetensors",
                e.dp_rank, e.tp_rank
            )
        );
        // The units each rank held, in its shard's local coordinates.
        assert_eq!(Some(&e.units), r.units.as_ref(), "{}", e.file);
    }
    // A shard's two replicas' units tile the shard exactly (every element once).
    for t in 0..2 {
        let r0 = first.iter().find(|r| (r.dp, r.tp) == (0, t)).unwrap();
        let total: usize = r0.weights.len();
        let mut cover = vec![0u8; total];
        let offsets = {
            let c = cfg(2);
            let tr = Trainer::new_tp(&c, MarkovCorpus::new(3).vocab_size(), t).unwrap();
            let lay = &tr.model().layout;
            assert_eq!(lay.total, total);
            lay.offsets.clone()
        };
        for e in idx.shards.iter().filter(|e| e.tp_rank == t) {
            for u in &e.units {
                for x in &mut cover[offsets[u.tensor] + u.offset..][..u.numel] {
                    *x += 1;
                }
            }
        }
        assert!(cover.iter().all(|&x| x == 1), "tp {t}: units do not tile");
        // Replica 1's file holds optimizer state only; replica 0's the model too.
        let size = |d: usize| {
            std::fs::metadata(dir.join(format!("tp.dp-{d:04}-tp-{t:04}-of-0002.safetensors")))
                .unwrap()
                .len()
        };
        // Replica 1's file is its share (plus the safetensors header), not the shard's
        // whole state: no rank gathered the others' units.
        let share = first.iter().find(|r| (r.dp, r.tp) == (1, t)).unwrap();
        let shard_state: usize = first
            .iter()
            .filter(|r| r.tp == t)
            .map(|r| r.state_bytes)
            .sum();
        eprintln!(
            "tp {t}: replica 0's file {} bytes, replica 1's {} bytes; replica 1 holds {} \
             bytes of optimizer state, the shard {shard_state}",
            size(0),
            size(1),
            share.state_bytes
        );
        assert!(size(1) < size(0), "tp {t}");
        assert!(
            (size(1) as usize) < share.state_bytes + 32 * 1024,
            "tp {t}: replica 1's file {} bytes for a share of {}",
            size(1),
            share.state_bytes
        );
        assert!(
            share.state_bytes * 10 < shard_state * 6,
            "tp {t}: a share of {} bytes of the shard's {shard_state}",
            share.state_bytes
        );
    }

    let second = grid(2, Start::Resume(&root), STEPS - STEPS / 2, None);
    for r in 0..4 {
        let mut losses = first[r].losses.clone();
        losses.extend(&second[r].losses);
        assert_eq!(bits(&losses), bits(&straight[r].losses), "rank {r} losses");
        assert_eq!(
            bits(&second[r].weights),
            bits(&straight[r].weights),
            "rank {r} weights"
        );
        assert_eq!(second[r].units, straight[r].units, "rank {r} units");
        assert_eq!(second[r].state.len(), straight[r].state.len());
        for ((n, a), (m, b)) in second[r].state.iter().zip(&straight[r].state) {
            assert_eq!(n, m);
            assert_eq!(state_bits(a), state_bits(b), "rank {r} state {n}");
        }
    }
    std::fs::remove_dir_all(&root).ok();
}

/// `whole` holds every tensor of a shard whole (`names`); `parts` the units `units` of
/// the same shard. Every element of every unit's states agrees with the whole tensor's
/// within the re-encoding bound (module docs). Returns the elements compared and how
/// many of them differ at all.
fn check_units(
    whole: &[(String, StateTensor)],
    names: &[String],
    parts: &[(String, StateTensor)],
    units: &[UnitSpan],
) -> (usize, usize) {
    let find = |st: &[(String, StateTensor)], k: &str| -> StateTensor {
        st.iter()
            .find(|(n, _)| n == k)
            .unwrap_or_else(|| panic!("no state {k}"))
            .1
            .clone()
    };
    let (mut n, mut differ) = (0, 0);
    for u in units {
        for s in ["master", "exp_avg", "exp_avg_sq"] {
            let w = find(whole, &format!("{}.{s}", names[u.tensor]));
            let p = find(parts, &format!("{}.{s}", u.name));
            let bound = half_spacing(&w) / scale_of(&w).min(scale_of(&p));
            let wv = state_values(&w);
            let pv = state_values(&p);
            assert_eq!(pv.len(), u.numel, "{} {s}", u.name);
            for (k, (a, b)) in pv.iter().zip(&wv[u.offset..u.offset + u.numel]).enumerate() {
                differ += usize::from(a.to_bits() != b.to_bits());
                assert!(
                    (a - b).abs() <= bound,
                    "{} {s}[{k}]: {a} vs {b} (bound {bound:e})",
                    u.name
                );
            }
            n += u.numel;
        }
    }
    (n, differ)
}

#[test]
fn fp8_o3_grid_checkpoints_resume_on_another_number_of_replicas() {
    // 2 x 2 -> 1 x 2: every TP rank assembles its shard's whole state from the two
    // replicas' files (its own tensor-parallel rank's only).
    let root = tmpdir("d-change");
    let saved = grid(2, Start::Fresh, STEPS / 2, Some(&root));
    let one = grid(1, Start::Resume(&root), 2, None);
    // (the 1 x 2 trainer's state after 2 more steps is not the saved one: check the
    // restored state before training, below; here, that it trains)
    for e in &one {
        assert!(
            e.losses.iter().all(|l| l.is_finite() && *l < 6.0),
            "{:?}",
            e.losses
        );
    }
    let restored = grid(1, Start::Resume(&root), 0, None);
    let (mut compared, mut differ) = (0, 0);
    for r in &restored {
        assert!(r.units.is_none());
        for s in saved.iter().filter(|s| s.tp == r.tp) {
            let (n, k) = check_units(&r.state, &r.names, &s.state, s.units.as_ref().unwrap());
            (compared, differ) = (compared + n, differ + k);
            // Weights: f32 slices, copied exactly (replica 0's).
            assert_eq!(bits(&r.weights), bits(&s.weights), "tp {} weights", r.tp);
        }
    }
    eprintln!("2x2 -> 1x2: {compared} state elements within the bound, {differ} not exact");
    std::fs::remove_dir_all(&root).ok();

    // 1 x 2 -> 2 x 2: each rank takes its units from its shard's whole-tensor state.
    let root = tmpdir("d-change-up");
    let saved = grid(1, Start::Fresh, STEPS / 2, Some(&root));
    let ck = Checkpoint::load(&root).unwrap();
    assert!(
        ck.meta.optimizer_shards.is_none(),
        "one replica: no ZeRO files"
    );
    let restored = grid(2, Start::Resume(&root), 0, None);
    let (mut compared, mut differ) = (0, 0);
    for r in &restored {
        let s = saved.iter().find(|s| s.tp == r.tp).unwrap();
        let (n, k) = check_units(&s.state, &s.names, &r.state, r.units.as_ref().unwrap());
        (compared, differ) = (compared + n, differ + k);
        assert_eq!(bits(&r.weights), bits(&s.weights), "tp {} weights", r.tp);
    }
    eprintln!("1x2 -> 2x2: {compared} state elements within the bound, {differ} not exact");
    let more = grid(2, Start::Resume(&root), 2, None);
    for e in &more {
        assert!(
            e.losses.iter().all(|l| l.is_finite() && *l < 6.0),
            "{:?}",
            e.losses
        );
    }
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn fp8_o3_grid_checkpoint_loads_weights_anywhere_and_names_failed_ranks() {
    // (another T resumes the whole state: tensor_parallel_o3_reshard.rs)
    let root = tmpdir("refuse");
    grid(2, Start::Fresh, 1, Some(&root));
    let ck = Checkpoint::load(&root).unwrap();
    let mut one = Trainer::new(&cfg(1), MarkovCorpus::new(3).vocab_size()).unwrap();
    // Its weights load anywhere (eval / sample): one process.
    snapshot::restore_weights(&mut one, &ck).unwrap();
    std::fs::remove_dir_all(&root).ok();

    // A rank failing to write its share (rank 3: dp 1, tp 1): no checkpoint, every rank
    // names it.
    let root = tmpdir("fail");
    let c = cfg(2);
    let g = Grid::new(4, 2).unwrap();
    let errs = run_ranks(4, |world| {
        let (tp, dp) = g.groups(world)?;
        let mut data = MarkovCorpus::new(3);
        let mut tr = Trainer::new_tp(&c, data.vocab_size(), tp.rank())?;
        tr.enable_data_parallel(&dp)?;
        tr.train_step_dxt(&mut data, &tp, &dp)?;
        let r = save_trainer_tp(
            &tr,
            &data,
            serde_json::json!({}),
            world,
            dp.rank(),
            &root,
            0,
            &mut |_| {
                if world.rank() == 3 {
                    anyhow::bail!("simulated disk full")
                }
                Ok(())
            },
        );
        anyhow::Ok(format!("{:#}", r.unwrap_err()))
    })
    .unwrap();
    for e in &errs {
        assert!(
            e.contains("rank 3 of 4") && e.contains("simulated disk full"),
            "{e}"
        );
    }
    let left: Vec<_> = std::fs::read_dir(&root).unwrap().collect();
    assert!(left.is_empty(), "nothing left behind: {left:?}");

    // A replica's share missing or damaged: named by file at load.
    grid(2, Start::Fresh, 1, Some(&root));
    let dir = root.join("step_00000001");
    let f = dir.join("tp.dp-0001-tp-0000-of-0002.safetensors");
    let good = std::fs::read(&f).unwrap();
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 3] ^= 0x10;
    std::fs::write(&f, &bad).unwrap();
    let e = format!("{:#}", Checkpoint::load(&dir).unwrap_err());
    assert!(
        e.contains("tp.dp-0001-tp-0000-of-0002.safetensors") && e.contains("corrupted"),
        "{e}"
    );
    std::fs::remove_file(&f).unwrap();
    let e = format!("{:#}", Checkpoint::load(&dir).unwrap_err());
    assert!(
        e.contains("tp.dp-0001-tp-0000-of-0002.safetensors") && e.contains("missing"),
        "{e}"
    );
    std::fs::remove_dir_all(&root).ok();
}
