//! Checkpoints of tensor-parallel trainers: saving a D x T grid's shards
//! ([`save_trainer_tp`]) and loading any tensor-parallel checkpoint into a trainer of
//! any layout, one process included ([`restore_tp_state`], [`restore_tp_weights`]). The
//! file layout, the index and the re-sharding rules are `crate::checkpoint::tp`'s.

use anyhow::{bail, Context, Result};
use fp8lm_collectives::Communicator;
use fp8lm_optim::StateTensor;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::shard::Split;
use crate::checkpoint::meta::{ShardEntry, ShardIndex};
use crate::checkpoint::shard::{save_ranked, RankFile};
use crate::checkpoint::stream::StreamTensor;
use crate::checkpoint::tp::{
    merge_scaling, read_tp_units, tp_shard_file_name, Assembled, ReplicaScaling, TpIndex, TpReader,
    TpShardEntry, TpTensor, MODEL_PREFIX, OPTIM_PREFIX,
};
use crate::checkpoint::tp_reshard::read_units_resharded;
use crate::checkpoint::Checkpoint;
use crate::data::Dataset;
use crate::model::Layout;
use crate::repartition::UnitSpan;
use crate::snapshot::{capture_meta, model_stream, scale_state_json};
use crate::train::Trainer;

/// What a writing rank reports to rank 0 for the index.
#[derive(serde::Serialize, serde::Deserialize)]
struct Report {
    dp: usize,
    tp: usize,
    tensors: Vec<TpTensor>,
    scaling: Value,
    dist_extra: Value,
    /// fp8-o3 over D > 1 replicas: the units of this rank's optimizer shard.
    #[serde(default)]
    units: Option<Vec<UnitSpan>>,
}

/// This rank's FP8 scaling states, as `checkpoint.json` stores them.
fn scaling_of(tr: &Trainer) -> Value {
    let mut m = serde_json::Map::new();
    for v in tr.fp8_tensors() {
        m.insert(v.name.clone(), scale_state_json(v.state));
    }
    Value::Object(m)
}

/// The slice of full tensor `i` this trainer holds (`Full` without tensor parallelism).
fn slice_of(tr: &Trainer, full: &Layout, i: usize) -> Split {
    let m = tr.model();
    m.tp.map_or(Split::Full, |s| s.split(&m.dims, full, i))
}

/// Save a checkpoint of a tensor-parallel trainer (after `tr.step()` steps) under `root`
/// (`crate::checkpoint::tp`): every rank of the grid calls it with the world
/// communicator `world` and its data-parallel coordinate `dp_rank`; the T ranks of
/// replica 0 each stream their model and optimizer shard into their own file, rank 0
/// writes the index. fp8-o3 over D > 1 replicas: every rank streams its own ZeRO share
/// of its shard's optimizer state into its own file (replica 0's with the model
/// slices), listed in `optimizer_shards`; nothing is gathered. Atomic as a whole; on a
/// failure of any rank every rank returns an error naming it and no checkpoint is left.
/// `hook` runs after this rank's file is written (failure tests). Returns the
/// checkpoint directory on every rank.
#[allow(clippy::too_many_arguments)]
pub fn save_trainer_tp(
    tr: &Trainer,
    data: &dyn Dataset,
    extra: Value,
    world: &dyn Communicator,
    dp_rank: usize,
    root: &Path,
    keep: usize,
    hook: &mut dyn FnMut(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let shard = tr.tp_shard().with_context(|| {
        format!(
            "rank {} of {}: a tensor-parallel checkpoint needs a tensor-parallel trainer \
             (Trainer::new_tp)",
            world.rank(),
            world.size()
        )
    })?;
    let t = shard.size;
    if !world.size().is_multiple_of(t) || dp_rank >= world.size() / t {
        bail!(
            "rank {} of {}: data-parallel rank {dp_rank} does not fit a grid of \
             dist.tensor_parallel = {t}",
            world.rank(),
            world.size()
        );
    }
    let d = world.size() / t;
    // fp8-o3 over D > 1 replicas: this rank's ZeRO share of its shard's optimizer state
    // (units in the shard's local coordinates); every rank writes it, none gathers.
    let zero_units = tr.zero_owned_spans();
    let meta = capture_meta(tr, data, extra);
    let m = tr.model();
    let full = Layout::new(&m.dims);
    let tensors: Vec<TpTensor> = (0..m.layout.metas.len())
        .map(|i| TpTensor {
            name: m.layout.metas[i].name.clone(),
            full_shape: full.metas[i].shape.clone(),
            split: slice_of(tr, &full, i),
        })
        .collect();
    // Replica 0 writes the shards' model slices (and, replicated precisions, their
    // optimizer state); under fp8-o3 every rank writes its own ZeRO share. Replicas that
    // write nothing report their scaling states.
    let write_model = dp_rank == 0;
    let local = if write_model || zero_units.is_some() {
        let mut st: Vec<StreamTensor<'_>> = if write_model {
            model_stream(tr)
                .into_iter()
                .map(|mut s| {
                    s.name = format!("{MODEL_PREFIX}{}", s.name);
                    s
                })
                .collect()
        } else {
            Vec::new()
        };
        tr.optimizer().visit_state(&mut |n, s| {
            st.push(StreamTensor::from_state(&format!("{OPTIM_PREFIX}{n}"), s))
        });
        let what = match (write_model, zero_units.is_some()) {
            (true, false) => "tensor-parallel shard",
            (true, true) => "tensor-parallel shard and fp8-o3 optimizer shard",
            _ => "fp8-o3 optimizer shard",
        };
        Some(RankFile {
            file: tp_shard_file_name(dp_rank, shard.rank, t),
            what: format!(
                "{what} of rank {} (dp {dp_rank}, tp {} of {t})",
                world.rank(),
                shard.rank
            ),
            tensors: st,
        })
    } else {
        None
    };
    let report = Report {
        dp: dp_rank,
        tp: shard.rank,
        tensors: if write_model { tensors } else { Vec::new() },
        scaling: scaling_of(tr),
        dist_extra: Value::Object(tr.dist_checkpoint_extra()),
        units: zero_units,
    };
    let partition = tr.cfg.dist.zero_partition.name().to_string();
    save_ranked(
        &meta,
        local,
        serde_json::to_value(report)?,
        world,
        root,
        keep,
        hook,
        &mut |_, meta, reports| {
            let (mut shards, mut replicas) = (Vec::with_capacity(t), Vec::new());
            let mut zero_shards = Vec::new();
            for (q, r) in reports.into_iter().enumerate() {
                let rep: Report = serde_json::from_value(r.report)
                    .with_context(|| format!("the shard report of rank {q}"))?;
                if let Some(units) = rep.units {
                    let file = r.file.clone().with_context(|| {
                        format!(
                            "fp8-o3: rank {q} (dp {}, tp {}) wrote no file",
                            rep.dp, rep.tp
                        )
                    })?;
                    zero_shards.push(ShardEntry {
                        file,
                        rank: q,
                        dp_rank: rep.dp,
                        tp_rank: rep.tp,
                        units,
                    });
                }
                match r.file {
                    Some(file) if rep.dp == 0 => shards.push(TpShardEntry {
                        file,
                        rank: q,
                        dp_rank: rep.dp,
                        tp_rank: rep.tp,
                        tensors: rep.tensors,
                        scaling: rep.scaling,
                        dist_extra: rep.dist_extra,
                    }),
                    _ => replicas.push(ReplicaScaling {
                        rank: q,
                        dp_rank: rep.dp,
                        tp_rank: rep.tp,
                        scaling: rep.scaling,
                    }),
                }
            }
            if !zero_shards.is_empty() {
                if zero_shards.len() != world.size() {
                    bail!(
                        "tensor-parallel checkpoint: {} of the {} ranks reported fp8-o3 \
                         optimizer shards",
                        zero_shards.len(),
                        world.size()
                    );
                }
                meta.optimizer_shards = Some(ShardIndex {
                    world_size: world.size(),
                    dp: d,
                    tp: t,
                    partition: partition.clone(),
                    shards: zero_shards,
                });
            }
            shards.sort_by_key(|e| e.tp_rank);
            if shards.len() != t || shards.iter().enumerate().any(|(k, e)| e.tp_rank != k) {
                bail!(
                    "tensor-parallel checkpoint: {} shard files for dist.tensor_parallel = {t}",
                    shards.len()
                );
            }
            let all: Vec<&Value> = shards.iter().map(|e| &e.scaling).collect();
            meta.scaling = merge_scaling(&all);
            meta.tp_shards = Some(TpIndex {
                world_size: world.size(),
                dp: d,
                tp: t,
                shards,
                replicas,
            });
            Ok(())
        },
    )
}

/// The target slices of `tr`'s tensors and the full shapes.
struct Target {
    full: Layout,
    names: Vec<String>,
}

impl Target {
    fn of(tr: &Trainer) -> Target {
        let m = tr.model();
        Target {
            full: Layout::new(&m.dims),
            names: m.layout.metas.iter().map(|x| x.name.clone()).collect(),
        }
    }
    fn index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }
}

/// Load the model weights of a tensor-parallel checkpoint into `tr` (any layout; its
/// slices re-sharded, `crate::checkpoint::tp`). For `eval` / `sample` and as the first
/// part of [`restore_tp_state`].
pub fn restore_tp_weights(tr: &mut Trainer, ck: &Checkpoint) -> Result<()> {
    let mut rd = TpReader::new(ck)?;
    let tg = Target::of(tr);
    for (i, name) in tg.names.iter().enumerate() {
        let dst = slice_of(tr, &tg.full, i);
        let a = rd.read(
            &format!("{MODEL_PREFIX}{name}"),
            name,
            &tg.full.metas[i].shape,
            &dst,
        )?;
        let v = a.values();
        if tr.model().param_is_f32(i) {
            tr.model_mut()
                .set_param(name, &v)
                .map_err(|e| anyhow::anyhow!("{}: {name}: {e}", ck.dir.display()))?;
        } else {
            tr.optimizer_mut()
                .load_master(i, &v)
                .map_err(|e| anyhow::anyhow!("{}: {name}: {e}", ck.dir.display()))?;
        }
    }
    Ok(())
}

/// The parameter an optimizer state entry belongs to (`adamw.m.<p>`, `adamw.v.<p>`,
/// `<p>.master`, `<p>.exp_avg`, `<p>.exp_avg_sq`), `None` for the global scalars.
fn param_of(entry: &str) -> Option<&str> {
    if let Some(p) = entry
        .strip_prefix("adamw.m.")
        .or_else(|| entry.strip_prefix("adamw.v."))
    {
        return Some(p);
    }
    ["master", "exp_avg", "exp_avg_sq"]
        .iter()
        .find_map(|s| entry.strip_suffix(&format!(".{s}")))
}

/// Load the whole state of a tensor-parallel checkpoint into `tr` (weights and optimizer
/// state re-sharded for `tr`'s layout; fp8-o3's ZeRO shares, `optimizer_shards`, on the
/// re-cut for `tr`'s layout and units, [`read_units_for`]); returns the FP8 scaling states to
/// restore: the shard's own when `tr` has the checkpoint's T (and so the same slices),
/// else the merged ones (`crate::checkpoint::tp`). The caller restores them with step,
/// RNG and data position.
pub fn restore_tp_state(tr: &mut Trainer, ck: &Checkpoint) -> Result<Value> {
    restore_tp_weights(tr, ck)?;
    if ck.meta.optimizer_shards.is_some() {
        restore_tp_zero_units(tr, ck)?;
        return Ok(tp_scaling(tr, ck));
    }
    let mut rd = TpReader::new(ck)?;
    let tg = Target::of(tr);
    let dir = ck.dir.display().to_string();
    let template = tr.optimizer().export_state();
    // Amax of each rebuilt state (verbatim ones keep their stored `.amax`), and the
    // source of each verbatim one.
    let mut rebuilt_amax: HashMap<String, f64> = HashMap::new();
    let mut verbatim: HashMap<String, usize> = HashMap::new();
    let mut state = Vec::with_capacity(template.len());
    let first = 0;
    for (name, tmpl) in &template {
        let entry = format!("{OPTIM_PREFIX}{name}");
        let st = if let Some(p) = param_of(name).filter(|_| !matches!(tmpl, StateTensor::Scalar(_)))
        {
            let i = tg.index(p).with_context(|| {
                format!("{dir}: optimizer state {name}: the model has no parameter {p}")
            })?;
            let dst = slice_of(tr, &tg.full, i);
            match rd.read(&entry, p, &tg.full.metas[i].shape, &dst)? {
                Assembled::Verbatim { state, source } => {
                    verbatim.insert(name.clone(), source);
                    state
                }
                Assembled::Values { values, .. } => {
                    rebuilt_amax.insert(name.clone(), fp8lm_fp8::cast::amax_f32(&values) as f64);
                    crate::repartition::encode_like(tmpl, &values)
                }
            }
        } else if let Some(s) = name.strip_suffix(".amax") {
            // A state's amax: the rebuilt values' own, or the stored one of its source.
            match (rebuilt_amax.get(s), verbatim.get(s)) {
                (Some(&a), _) => StateTensor::Scalar(a),
                (None, Some(&k)) => StateTensor::Scalar(rd.scalar(k, &entry)?),
                (None, None) => bail!("{dir}: optimizer state {name}: no state {s} before it"),
            }
        } else if let Some(p) = name.strip_suffix(".update_amax") {
            // Bounds the next step's provisional scale: the max over the sources.
            let i = tg.index(p).with_context(|| {
                format!("{dir}: optimizer state {name}: the model has no parameter {p}")
            })?;
            let dst = slice_of(tr, &tg.full, i);
            let mut m = 0f64;
            for k in rd.sources_of(p, &tg.full.metas[i].shape, &dst)? {
                m = m.max(rd.scalar(k, &entry)?);
            }
            StateTensor::Scalar(m)
        } else {
            // Global scalars (the step count): the same on every shard.
            StateTensor::Scalar(rd.scalar(first, &entry)?)
        };
        state.push((name.clone(), st));
    }
    tr.optimizer_mut()
        .import_state(state)
        .map_err(|e| anyhow::anyhow!("{dir}: optimizer state: {e}"))?;
    Ok(tp_scaling(tr, ck))
}

/// The FP8 scaling states `tr` resumes with from tensor-parallel checkpoint `ck`
/// ([`TpIndex::scaling_of`], else the merged ones).
fn tp_scaling(tr: &Trainer, ck: &Checkpoint) -> Value {
    let t = tr.tp_shard().map_or(1, |s| s.size);
    let tp = tr.tp_shard().map_or(0, |s| s.rank);
    let (d, dp) = tr.dist.as_ref().map_or((1, 0), |s| (s.size, s.rank));
    ck.meta
        .tp_shards
        .as_ref()
        .and_then(|idx| idx.scaling_of(d, t, dp, tp))
        .unwrap_or(&ck.meta.scaling)
        .clone()
}

/// `tr`'s grid as (D, T, tensor-parallel rank); D is 1 before data parallelism is
/// enabled.
fn grid_of(tr: &Trainer) -> (usize, usize, usize) {
    let d = tr.dist.as_ref().map_or(1, |s| s.size);
    tr.tp_shard().map_or((d, 1, 0), |s| (d, s.size, s.rank))
}

/// The fp8-o3 optimizer state of checkpoint `ck` (written in ZeRO units, or whole
/// per tensor-parallel shard) into `tr`, which holds its shard's whole state (one
/// replica, one process included): its tensors are read by range as units
/// ([`read_units_for`]) and become its state.
fn restore_tp_zero_units(tr: &mut Trainer, ck: &Checkpoint) -> Result<()> {
    let dir = ck.dir.display().to_string();
    let want = tr
        .zero_owned_spans()
        .unwrap_or_else(|| crate::snapshot::whole_tensor_units(tr));
    let (stored, old) = read_units_for(tr, ck, grid_of(tr).0, &want)?;
    let template = tr.optimizer().export_state();
    let state = crate::repartition::repartition_state_owned(stored, &old, &template, &want)
        .with_context(|| format!("{dir}: fp8-o3 optimizer state"))?;
    tr.optimizer_mut()
        .import_state(state)
        .map_err(|e| anyhow::anyhow!("{dir}: optimizer state: {e}"))
}

/// This rank's fp8-o3 units `want` (in its own layout's coordinates) of a run on `d`
/// replicas of `tr`'s tensor-parallel layout, from `ck`, read by range: on the
/// checkpoint's own T from its tensor-parallel rank's files ([`read_tp_units`]: the
/// same D verbatim, another D re-partitioned); from any other layout (another T, or a
/// whole-model checkpoint) re-cut across tensor slices
/// ([`crate::checkpoint::tp_reshard`]).
pub(crate) fn read_units_for(
    tr: &Trainer,
    ck: &Checkpoint,
    d: usize,
    want: &[UnitSpan],
) -> Result<(Vec<crate::repartition::NamedState>, Vec<UnitSpan>)> {
    let (_, t, tp) = grid_of(tr);
    if ck.meta.tp_shards.as_ref().is_some_and(|i| i.tp == t) {
        let whole = crate::snapshot::whole_tensor_units(tr);
        return read_tp_units(ck, (d, t, tp), &whole, want);
    }
    let full = Layout::new(&tr.model().dims);
    let names: Vec<String> = full.metas.iter().map(|m| m.name.clone()).collect();
    let numels: Vec<usize> = full.metas.iter().map(|m| m.numel()).collect();
    let grid = format!("{d} x {t}");
    read_units_resharded(
        ck,
        &names,
        &numels,
        &|i| slice_of(tr, &full, i),
        want,
        &grid,
    )
}

/// fp8-o3 over D > 1 tensor-parallel replicas, resumed from `ck`: everything
/// [`crate::snapshot::restore`] restores except the optimizer state (weights re-sharded
/// as [`restore_tp_weights`] does, FP8 scaling states, step, RNG, data position), which
/// [`Trainer::enable_data_parallel_from_tp_checkpoint`] then reads, each rank only its
/// own units. `ck` must be a tensor-parallel checkpoint.
pub fn restore_tp_except_optimizer(
    tr: &mut Trainer,
    data: &mut dyn Dataset,
    ck: &Checkpoint,
) -> Result<()> {
    ck.check_model_shape(&tr.cfg)?;
    let scaling = if ck.meta.tp_shards.is_some() {
        restore_tp_weights(tr, ck)?;
        tp_scaling(tr, ck)
    } else {
        // A whole-model checkpoint: each tensor cut to this rank's slice.
        restore_whole_into_shard(tr, ck, true)?
    };
    crate::snapshot::restore_scaling(tr, ck, &scaling)?;
    tr.set_step(ck.meta.step);
    tr.rng.state = ck.meta.rng_state;
    data.set_position(ck.meta.data_position);
    crate::snapshot::sync_compute_weights(tr)
}

/// This rank's fp8-o3 optimizer units (tensor-parallel rank `tp_rank`'s shard, ZeRO
/// partition `want`) from tensor-parallel checkpoint `ck`, read by range: for
/// [`Trainer::enable_data_parallel_from_tp_checkpoint`].
pub(crate) fn read_own_units(
    tr: &Trainer,
    ck: &Checkpoint,
    d: usize,
    want: &[UnitSpan],
) -> Result<(Vec<crate::repartition::NamedState>, Vec<UnitSpan>)> {
    read_units_for(tr, ck, d, want)
}

/// After data parallelism is enabled on a trainer resumed from a tensor-parallel
/// checkpoint (`snapshot::restore` ran first, as `fp8lm train` does): on the same D x T
/// grid, this replica's own FP8 scaling states (replicas see other rows, so their
/// activation and gradient amax histories differ) and its shard's data-parallel state
/// (the FP8 all-reduce's auto-scaling factors). On another grid nothing changes: the
/// states restored are the shard's (same T) or merged, and the factors start afresh.
pub fn restore_tp_replica(tr: &mut Trainer, ck: &Checkpoint) -> Result<()> {
    let (Some(idx), Some(s), Some((d, dp))) = (
        ck.meta.tp_shards.as_ref(),
        tr.tp_shard(),
        tr.dist.as_ref().map(|x| (x.size, x.rank)),
    ) else {
        return Ok(());
    };
    if idx.tp != s.size || idx.dp != d {
        return Ok(());
    }
    if let Some(sc) = idx.scaling_of(d, s.size, dp, s.rank) {
        crate::snapshot::restore_scaling(tr, ck, sc)?;
    }
    if let Some(x) = tp_dist_extra(tr, ck) {
        tr.restore_dist_extra(&x)
            .with_context(|| format!("{}", ck.dir.display()))?;
    }
    Ok(())
}

/// The data-parallel state (`Trainer::restore_dist_extra`) of this trainer's shard in a
/// tensor-parallel checkpoint with the same T; `None` for another layout (the defaults
/// then apply: the FP8 all-reduce's auto-scaling factors start afresh).
pub fn tp_dist_extra(tr: &Trainer, ck: &Checkpoint) -> Option<Value> {
    let idx = ck.meta.tp_shards.as_ref()?;
    let s = tr.tp_shard()?;
    if idx.tp != s.size {
        return None;
    }
    idx.shards
        .iter()
        .find(|e| e.tp_rank == s.rank)
        .map(|e| e.dist_extra.clone())
        .filter(|v| v.as_object().is_some_and(|o| !o.is_empty()))
        .or_else(|| Some(json!({})))
}

/// Load a whole-model checkpoint (`model.safetensors` + `optimizer.safetensors`, written
/// without tensor parallelism, replicated optimizer state) into a tensor-parallel rank:
/// each tensor cut to this rank's slice ([`super::TpShard::shard`]). f32 weights and
/// moments are exact slices; scaled state (fp8-o2's FP16 masters, E4M3 / FP16 moments)
/// is decoded and re-encoded with the slice's own power-of-two scale (the repartition
/// rule, `crate::checkpoint::tp`); replicated tensors are copied verbatim. Every rank
/// starts from the whole tensors' FP8 scaling states (their amax bounds each slice's).
/// With `weights_only` the optimizer state is left alone. Returns the scaling states to
/// restore. fp8-o3 checkpoints (state cut into ZeRO units of the whole model) are
/// re-cut into the slice's tensors by range ([`read_units_for`]).
pub fn restore_whole_into_shard(
    tr: &mut Trainer,
    ck: &Checkpoint,
    weights_only: bool,
) -> Result<Value> {
    let dir = ck.dir.display().to_string();
    let Some(shard) = tr.tp_shard() else {
        bail!("{dir}: restore_whole_into_shard needs a tensor-parallel trainer");
    };
    let tg = Target::of(tr);
    let dims = tr.model().dims;
    let cut = |i: usize, full: &[f32]| shard.shard(&dims, &tg.full, i, full);
    for (i, name) in tg.names.iter().enumerate() {
        let t = ck.tensor("model", name, &tg.full.metas[i].shape)?;
        let v = cut(i, &t.to_f32()?);
        if tr.model().param_is_f32(i) {
            tr.model_mut()
                .set_param(name, &v)
                .map_err(|e| anyhow::anyhow!("{dir}: {name}: {e}"))?;
        } else {
            tr.optimizer_mut()
                .load_master(i, &v)
                .map_err(|e| anyhow::anyhow!("{dir}: {name}: {e}"))?;
        }
    }
    if weights_only {
        return Ok(ck.meta.scaling.clone());
    }
    if ck.meta.optimizer_shards.is_some() || crate::snapshot::zero_units(ck)?.is_some() {
        // fp8-o3 state in ZeRO units of the whole model: re-cut into this slice's
        // tensors, read by range.
        restore_tp_zero_units(tr, ck)?;
        return Ok(ck.meta.scaling.clone());
    }
    let stored = ck
        .groups
        .get("optimizer")
        .with_context(|| format!("{dir}: no optimizer.safetensors"))?;
    let find = |name: &str| {
        stored.iter().find(|t| t.name == name).with_context(|| {
            format!("{dir}/optimizer.safetensors: no state tensor {name} (another optimizer or precision?)")
        })
    };
    let template = tr.optimizer().export_state();
    let mut rebuilt_amax: HashMap<String, f64> = HashMap::new();
    let mut state = Vec::with_capacity(template.len());
    for (name, tmpl) in &template {
        let t = find(name)?;
        let scalar = matches!(tmpl, StateTensor::Scalar(_));
        let st = match param_of(name).filter(|_| !scalar) {
            Some(p) => {
                let i = tg.index(p).with_context(|| {
                    format!("{dir}: optimizer state {name}: the model has no parameter {p}")
                })?;
                if shard.is_sharded(&dims, &tg.full, i) {
                    let v = cut(i, &t.to_f32()?);
                    rebuilt_amax.insert(name.clone(), fp8lm_fp8::cast::amax_f32(&v) as f64);
                    crate::repartition::encode_like(tmpl, &v)
                } else {
                    crate::snapshot::tensor_to_state(t, tmpl)
                        .with_context(|| format!("{dir}/optimizer.safetensors"))?
                }
            }
            None => match name.strip_suffix(".amax").and_then(|s| rebuilt_amax.get(s)) {
                Some(&a) => StateTensor::Scalar(a),
                None => crate::snapshot::tensor_to_state(t, tmpl)
                    .with_context(|| format!("{dir}/optimizer.safetensors"))?,
            },
        };
        state.push((name.clone(), st));
    }
    tr.optimizer_mut()
        .import_state(state)
        .map_err(|e| anyhow::anyhow!("{dir}/optimizer.safetensors: {e}"))?;
    Ok(ck.meta.scaling.clone())
}
