//! Trainer state <-> [`Checkpoint`]: everything a resumed run needs to continue bit for
//! bit: the model's f32 parameters, the optimizer's state (in its own formats: FP16
//! masters and FP8 moments keep their dtypes and scales), the step counter, the RNG, the
//! data position and every FP8 scaling state (scale and amax history).
//!
//! Floats in the JSON scaling state are f32 printed by serde_json's shortest round-trip
//! formatting, so they parse back to the identical bits; a non-finite `last_amax` (a
//! report-only field) is stored as `null`.

use anyhow::{bail, Context, Result};
use fp8lm_fp8::{Fp8Format, ScaleState, ScaledFp8};
use fp8lm_optim::StateTensor;
use half::f16;
use serde_json::{json, Value};
use std::collections::BTreeMap;

use crate::checkpoint::{Checkpoint, CheckpointMeta, CkptDtype, CkptTensor, FORMAT};
use crate::data::Dataset;
use crate::repartition::{NamedState, UnitSpan, ZERO_UNITS_KEY};
use crate::train::Trainer;

pub(crate) fn scale_state_json(s: &ScaleState) -> Value {
    json!({
        "format": format!("{:?}", s.format),
        "scale": s.scale,
        "amax_history": s.amax_history,
        "zero_amax_count": s.zero_amax_count,
        "nonfinite_amax_count": s.nonfinite_amax_count,
        "last_amax": if s.last_amax.is_finite() { json!(s.last_amax) } else { Value::Null },
    })
}

pub(crate) fn restore_scale_state(name: &str, s: &mut ScaleState, v: &Value) -> Result<()> {
    let f = |k: &str| -> Result<f32> {
        v.get(k)
            .and_then(Value::as_f64)
            .map(|x| x as f32)
            .with_context(|| format!("scaling state {name}: missing or non-numeric `{k}`"))
    };
    let u = |k: &str| -> Result<u64> {
        v.get(k)
            .and_then(Value::as_u64)
            .with_context(|| format!("scaling state {name}: missing `{k}`"))
    };
    let fmt = v.get("format").and_then(Value::as_str).unwrap_or("");
    if fmt != format!("{:?}", s.format) {
        bail!(
            "scaling state {name}: format {fmt:?} in checkpoint, {:?} in this model",
            s.format
        );
    }
    s.scale = f("scale")?;
    s.amax_history = v
        .get("amax_history")
        .and_then(Value::as_array)
        .with_context(|| format!("scaling state {name}: missing `amax_history`"))?
        .iter()
        .map(|x| x.as_f64().map(|x| x as f32))
        .collect::<Option<Vec<f32>>>()
        .with_context(|| format!("scaling state {name}: non-numeric amax history"))?;
    s.zero_amax_count = u("zero_amax_count")?;
    s.nonfinite_amax_count = u("nonfinite_amax_count")?;
    s.last_amax = v
        .get("last_amax")
        .and_then(Value::as_f64)
        .map_or(f32::NAN, |x| x as f32);
    Ok(())
}

fn state_to_tensor(name: &str, st: &StateTensor) -> CkptTensor {
    match st {
        StateTensor::F32(v) => CkptTensor::f32(name, &[v.len()], v),
        StateTensor::F16 { data, scale } => {
            CkptTensor::f16(name, &[data.len()], data, Some(*scale))
        }
        StateTensor::Fp8(t) => CkptTensor::from_scaled_fp8(name, t),
        StateTensor::Scalar(x) => CkptTensor::f64(name, &[1], &[*x]),
    }
}

pub(crate) fn tensor_to_state(t: &CkptTensor, template: &StateTensor) -> Result<StateTensor> {
    let n = t.numel();
    let want = match template {
        StateTensor::F32(v) => v.len(),
        StateTensor::F16 { data, .. } => data.len(),
        StateTensor::Fp8(s) => s.data.len(),
        StateTensor::Scalar(_) => 1,
    };
    if n != want {
        bail!(
            "optimizer state {}: {n} elements in checkpoint, {want} expected",
            t.name
        );
    }
    Ok(match template {
        StateTensor::F32(_) => StateTensor::F32(t.as_f32_exact()?),
        StateTensor::Scalar(_) => StateTensor::Scalar(t.as_f64_exact()?[0]),
        StateTensor::F16 { .. } => {
            if t.dtype != CkptDtype::F16 {
                bail!(
                    "optimizer state {}: stored as {}, expected F16",
                    t.name,
                    t.dtype.name()
                );
            }
            let data = t
                .bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]))
                .collect();
            StateTensor::F16 {
                data,
                scale: t.scale.unwrap_or(1.0),
            }
        }
        StateTensor::Fp8(tmpl) => {
            let format = match t.dtype {
                CkptDtype::F8E4M3 => Fp8Format::E4M3,
                CkptDtype::F8E5M2 => Fp8Format::E5M2,
                other => bail!(
                    "optimizer state {}: stored as {}, expected FP8",
                    t.name,
                    other.name()
                ),
            };
            if format != tmpl.format {
                bail!(
                    "optimizer state {}: {format:?} in checkpoint, {:?} expected",
                    t.name,
                    tmpl.format
                );
            }
            StateTensor::Fp8(ScaledFp8 {
                data: t.bytes.clone(),
                shape: tmpl.shape.clone(),
                format,
                scale: t.scale.unwrap_or(1.0),
            })
        }
    })
}

pub(crate) fn capture_meta(tr: &Trainer, data: &dyn Dataset, extra: Value) -> CheckpointMeta {
    let mut scaling = serde_json::Map::new();
    for v in tr.fp8_tensors() {
        scaling.insert(v.name.clone(), scale_state_json(v.state));
    }
    CheckpointMeta {
        format: FORMAT.into(),
        step: tr.step(),
        config: tr.cfg.clone(),
        rng_state: tr.rng.state,
        data_position: data.position(),
        scaling: Value::Object(scaling),
        extra,
        files: BTreeMap::new(),
        optimizer_shards: None,
        tp_shards: None,
    }
}

/// Capture a trainer (after `trainer.step()` steps) and its data position.
pub fn capture(tr: &Trainer, data: &dyn Dataset, extra: Value) -> Checkpoint {
    capture_with_state(tr, data, extra, tr.optimizer().export_state(), None)
}

/// [`capture`] with the given optimizer state (e.g. fp8-o3's, gathered from every owner
/// by `Trainer::gather_optimizer_state`) and, when that state is cut into ZeRO units,
/// their list (stored as `extra.zero_units`, see [`crate::repartition`]).
pub fn capture_with_state(
    tr: &Trainer,
    data: &dyn Dataset,
    mut extra: Value,
    opt_state: Vec<(String, StateTensor)>,
    units: Option<Vec<UnitSpan>>,
) -> Checkpoint {
    if let Some(units) = units {
        if !extra.is_object() {
            extra = json!({});
        }
        extra[ZERO_UNITS_KEY] = json!(units);
    }
    let mut ck = Checkpoint::new(capture_meta(tr, data, extra));
    // fp8-o2's linear weights have no f32 copy: their FP16 master is the weight.
    // fp8-o3 with E4M3 weight storage: no master on this rank but its own units'; the
    // linears are what the rank computes with (`Trainer::weight_f32`; a resume takes
    // the masters from the optimizer state, `save_trainer_sharded` gathers them exact).
    let m = tr.model();
    let zero_e4m3 = tr.zero_holds_e4m3();
    let model: Vec<CkptTensor> = m
        .named_params()
        .enumerate()
        .map(|(i, (meta, p))| match tr.optimizer().master_f16(i) {
            _ if zero_e4m3 && !m.param_is_f32(i) => {
                CkptTensor::f32(&meta.name, &meta.shape, &tr.weight_f32(i))
            }
            Some((h, scale)) if !m.param_is_f32(i) => {
                CkptTensor::f16(&meta.name, &meta.shape, h, Some(scale))
            }
            _ => CkptTensor::f32(&meta.name, &meta.shape, p),
        })
        .collect();
    ck.groups.insert("model".into(), model);
    let opt: Vec<CkptTensor> = opt_state
        .iter()
        .map(|(n, s)| state_to_tensor(n, s))
        .collect();
    ck.groups.insert("optimizer".into(), opt);
    let scales = crate::block_scales::weight_scale_tensors(tr);
    if !scales.is_empty() {
        ck.groups.insert(crate::block_scales::GROUP.into(), scales);
    }
    ck
}

/// fp8-o3's optimizer state gathered from its owners, with its ZeRO units.
pub type GatheredState = (Vec<(String, StateTensor)>, Option<Vec<UnitSpan>>);

/// Save a checkpoint of `tr` (after `tr.step()` steps) under `root`, streaming every
/// tensor from where it lives: the model's weights from its buffers (fp8-o2's linear
/// weights from the optimizer's FP16 master) and the optimizer's state borrowed through
/// [`fp8lm_optim::Optimizer::visit_state`], or from `opt_state` when given (fp8-o3's
/// gathered state, with its ZeRO `units`). No copy of the state is made, so saving costs
/// only I/O buffers. Same files and metadata as [`capture`] + `Checkpoint::save`.
pub fn save_trainer(
    tr: &Trainer,
    data: &dyn Dataset,
    mut extra: Value,
    opt_state: Option<GatheredState>,
    root: &std::path::Path,
    keep: usize,
) -> Result<std::path::PathBuf> {
    use crate::ckpt_stream::StreamTensor;
    if tr.zero_holds_e4m3() {
        anyhow::bail!(
            "rank {}: an fp8-o3 rank holding E4M3 weights has no f32 copy of the model; \
             save with save_trainer_sharded (it gathers the owners' masters)",
            tr.rank()
        );
    }
    let units = opt_state.as_ref().and_then(|(_, u)| u.clone());
    if let Some(units) = units {
        if !extra.is_object() {
            extra = json!({});
        }
        extra[ZERO_UNITS_KEY] = json!(units);
    }
    let meta = capture_meta(tr, data, extra);
    let model = model_stream(tr);
    let mut opt: Vec<StreamTensor<'_>> = Vec::new();
    match &opt_state {
        Some((st, _)) => {
            for (n, s) in st {
                opt.push(StreamTensor::from_state(n, s.as_ref()));
            }
        }
        None => tr
            .optimizer()
            .visit_state(&mut |n, s| opt.push(StreamTensor::from_state(n, s))),
    }
    let groups = vec![("model".to_string(), model), ("optimizer".to_string(), opt)];
    crate::checkpoint::save_streamed(&meta, &groups, root, keep, &mut |_| Ok(()))
}

/// The model's tensors as a checkpoint streams them: each weight from the model's
/// buffer, or (fp8-o2's linears, which have no f32 copy) from the optimizer's FP16
/// master.
pub(crate) fn model_stream(tr: &Trainer) -> Vec<crate::checkpoint::stream::StreamTensor<'_>> {
    use crate::checkpoint::stream::{StreamTensor, TensorData};
    let m = tr.model();
    m.named_params()
        .enumerate()
        .map(|(i, (meta, p))| match tr.optimizer().master_f16(i) {
            Some((h, scale)) if !m.param_is_f32(i) => StreamTensor {
                name: meta.name.clone(),
                dtype: CkptDtype::F16,
                shape: meta.shape.clone(),
                scale: Some(scale),
                data: TensorData::F16(h),
            },
            _ => StreamTensor {
                name: meta.name.clone(),
                dtype: CkptDtype::F32,
                shape: meta.shape.clone(),
                scale: None,
                data: TensorData::F32(p),
            },
        })
        .collect()
}

/// The model's tensors streamed from `all`, every tensor's f32 weights flat in layout
/// order ([`Trainer::gather_weights_f32`]).
pub(crate) fn model_stream_f32<'a>(
    tr: &'a Trainer,
    all: &'a [f32],
) -> Vec<crate::checkpoint::stream::StreamTensor<'a>> {
    use crate::checkpoint::stream::{StreamTensor, TensorData};
    let m = tr.model();
    m.layout
        .metas
        .iter()
        .enumerate()
        .map(|(i, meta)| StreamTensor {
            name: meta.name.clone(),
            dtype: CkptDtype::F32,
            shape: meta.shape.clone(),
            scale: None,
            data: TensorData::F32(&all[m.layout.range(i)]),
        })
        .collect()
}

/// Save a checkpoint of an fp8-o3 data-parallel trainer with its optimizer state
/// sharded (see [`crate::checkpoint::shard`]): every rank streams its own units' state
/// into its own file; rank 0 also writes the model and `checkpoint.json` with the shard
/// index. Every rank must call it; returns the checkpoint directory on every rank, or
/// on every rank an error naming the ranks that failed (no partial checkpoint is left).
/// `hook` runs after this rank's shard is written (failure tests).
pub fn save_trainer_sharded(
    tr: &Trainer,
    data: &dyn Dataset,
    extra: Value,
    comm: &dyn fp8lm_collectives::Communicator,
    root: &std::path::Path,
    keep: usize,
    hook: &mut dyn FnMut(&std::path::Path) -> Result<()>,
) -> Result<std::path::PathBuf> {
    use crate::checkpoint::shard::{save_sharded, ShardSave};
    use crate::checkpoint::stream::StreamTensor;
    let units = tr.zero_owned_spans().with_context(|| {
        format!(
            "rank {} of {}: a sharded checkpoint needs fp8-o3 with data parallelism enabled",
            comm.rank(),
            comm.size()
        )
    })?;
    let meta = capture_meta(tr, data, extra);
    // fp8-o3 with E4M3 weight storage: no rank holds the f32 weights; the owners'
    // masters are gathered for the model group (a transient of the save).
    let gathered = if tr.zero_holds_e4m3() {
        tr.gather_weights_f32_to(comm, 0)?
    } else {
        None
    };
    let model = match (comm.rank(), &gathered) {
        (0, None) => model_stream(tr),
        (0, Some(w)) => model_stream_f32(tr, w),
        _ => Vec::new(),
    };
    let mut tensors = Vec::new();
    tr.optimizer()
        .visit_state(&mut |n, s| tensors.push(StreamTensor::from_state(n, s)));
    let shard = ShardSave {
        tensors,
        units,
        partition: tr.cfg.dist.zero_partition.name().to_string(),
    };
    let groups = vec![("model".to_string(), model)];
    save_sharded(&meta, &groups, shard, comm, root, keep, hook)
}

/// Load model weights only (for `eval` / `sample`), checking names and shapes.
pub fn restore_weights(tr: &mut Trainer, ck: &Checkpoint) -> Result<()> {
    ck.check_model_shape(&tr.cfg)?;
    if tr.zero_holds_e4m3() {
        bail!(
            "rank {}: an fp8-o3 rank holding E4M3 weights takes its weights from the \
             owners' masters; restore the checkpoint before enable_data_parallel \
             (restore_except_optimizer, then enable_data_parallel_from_checkpoint)",
            tr.rank()
        );
    }
    if tr.zero_weights == crate::parallel::zero_start::ZeroWeights::Undrawn {
        if ck.meta.tp_shards.is_none() && tr.zero_reads_f32_only() {
            // fp8-o3 built for several ranks: the linears' weights come from the owners'
            // masters (the optimizer shards); only the f32 tensors are read.
            return crate::parallel::zero_start::restore_f32_tensors(tr, ck);
        }
        crate::parallel::zero_start::materialize(tr)?;
    }
    if tr.tp_shard().is_some() && ck.meta.tp_shards.is_none() {
        crate::tensor_parallel::ckpt::restore_whole_into_shard(tr, ck, true)?;
        return sync_compute_weights(tr);
    }
    if ck.meta.tp_shards.is_some() {
        crate::tensor_parallel::ckpt::restore_tp_weights(tr, ck)?;
        return sync_compute_weights(tr);
    }
    let metas: Vec<_> = tr.model().layout.metas.clone();
    for (i, m) in metas.iter().enumerate() {
        let t = ck.tensor("model", &m.name, &m.shape)?;
        let v = t.to_f32()?;
        if tr.model().param_is_f32(i) {
            tr.model_mut()
                .set_param(&m.name, &v)
                .map_err(|e| anyhow::anyhow!("{}: {e}", ck.dir.display()))?;
        } else {
            tr.optimizer_mut()
                .load_master(i, &v)
                .map_err(|e| anyhow::anyhow!("{}: {}: {e}", ck.dir.display(), m.name))?;
        }
    }
    sync_compute_weights(tr)
}

/// fp8-o2: re-write the E4M3 compute weights from the (restored) masters with the
/// (restored) scaling states.
pub(crate) fn sync_compute_weights(tr: &mut Trainer) -> Result<()> {
    let (model, opt) = tr.model_and_optimizer_mut();
    model.write_compute_weights(opt).map_err(anyhow::Error::msg)
}

/// The unit list of a checkpoint whose optimizer state is cut into ZeRO units (fp8-o3).
pub fn zero_units(ck: &Checkpoint) -> Result<Option<Vec<UnitSpan>>> {
    match ck.meta.extra.get(ZERO_UNITS_KEY) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone())
            .map(Some)
            .with_context(|| {
                format!(
                    "{}/{}: extra.{ZERO_UNITS_KEY} is not a unit list",
                    ck.dir.display(),
                    crate::checkpoint::META_FILE
                )
            }),
    }
}

/// A checkpoint's optimizer state as stored (kinds from the stored dtypes), and the units
/// it is cut into: `extra.zero_units` for an fp8-o3 checkpoint, else whole tensors of
/// `tr`'s model.
pub fn stored_optimizer_state(
    tr: &Trainer,
    ck: &Checkpoint,
) -> Result<(Vec<NamedState>, Vec<UnitSpan>)> {
    if ck.meta.optimizer_shards.is_some() {
        // Every unit of every shard: the whole state (one process taking all of it).
        return crate::checkpoint::shard::read_units(ck, &whole_tensor_units(tr));
    }
    let stored = ck
        .groups
        .get("optimizer")
        .with_context(|| format!("{}: no optimizer.safetensors", ck.dir.display()))?;
    let mut out = Vec::with_capacity(stored.len());
    for t in stored {
        let st = match t.dtype {
            CkptDtype::F32 => StateTensor::F32(t.as_f32_exact()?),
            CkptDtype::F64 => {
                let v = t.as_f64_exact()?;
                if v.len() != 1 {
                    bail!(
                        "{}/optimizer.safetensors: {}: {} values where a scalar is stored",
                        ck.dir.display(),
                        t.name,
                        v.len()
                    );
                }
                StateTensor::Scalar(v[0])
            }
            CkptDtype::F16 => StateTensor::F16 {
                data: t
                    .bytes
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]))
                    .collect(),
                scale: t.scale.unwrap_or(1.0),
            },
            CkptDtype::F8E4M3 | CkptDtype::F8E5M2 => StateTensor::Fp8(ScaledFp8 {
                data: t.bytes.clone(),
                shape: vec![t.numel()],
                format: if t.dtype == CkptDtype::F8E4M3 {
                    Fp8Format::E4M3
                } else {
                    Fp8Format::E5M2
                },
                scale: t.scale.unwrap_or(1.0),
            }),
            other => bail!(
                "{}/optimizer.safetensors: {}: dtype {} is not an optimizer state kind",
                ck.dir.display(),
                t.name,
                other.name()
            ),
        };
        out.push((t.name.clone(), st));
    }
    let units = match zero_units(ck)? {
        Some(u) => u,
        None => whole_tensor_units(tr),
    };
    Ok((out, units))
}

/// Every parameter tensor of `tr`'s model as one unit (how replicated optimizers hold them).
pub fn whole_tensor_units(tr: &Trainer) -> Vec<UnitSpan> {
    tr.model()
        .layout
        .metas
        .iter()
        .enumerate()
        .map(|(i, m)| UnitSpan {
            name: m.name.clone(),
            tensor: i,
            offset: 0,
            numel: m.numel(),
        })
        .collect()
}

/// Everything [`capture`] saved except the optimizer state: weights, FP8 scaling state,
/// step, RNG, data position. For fp8-o3 under data parallelism, whose optimizer state
/// goes to `Trainer::enable_data_parallel_resume` instead.
pub fn restore_except_optimizer(
    tr: &mut Trainer,
    data: &mut dyn Dataset,
    ck: &Checkpoint,
) -> Result<()> {
    restore_weights(tr, ck)?;
    restore_rest(tr, data, ck)
}

/// Restore everything [`capture`] saved, so training continues bit for bit. The optimizer
/// state of an fp8-o3 checkpoint (cut into ZeRO units) is re-assembled into this
/// trainer's whole tensors (see [`crate::repartition`]).
pub fn restore(tr: &mut Trainer, data: &mut dyn Dataset, ck: &Checkpoint) -> Result<()> {
    if ck.meta.tp_shards.is_some() {
        // Written by tensor-parallel ranks: each slice re-sharded for this trainer.
        ck.check_model_shape(&tr.cfg)?;
        let scaling = crate::tensor_parallel::ckpt::restore_tp_state(tr, ck)?;
        return restore_rest_with(tr, data, ck, &scaling);
    }
    if tr.tp_shard().is_some() {
        // A whole-model checkpoint into a tensor-parallel rank: each tensor cut.
        ck.check_model_shape(&tr.cfg)?;
        let scaling = crate::tensor_parallel::ckpt::restore_whole_into_shard(tr, ck, false)?;
        return restore_rest_with(tr, data, ck, &scaling);
    }
    restore_weights(tr, ck)?;
    if zero_units(ck)?.is_some() || ck.meta.optimizer_shards.is_some() {
        let (stored, old) = stored_optimizer_state(tr, ck)?;
        let template = tr.optimizer().export_state();
        let new = whole_tensor_units(tr);
        let state = crate::repartition::repartition_state_owned(stored, &old, &template, &new)
            .with_context(|| format!("{}: optimizer state", ck.dir.display()))?;
        tr.optimizer_mut()
            .import_state(state)
            .map_err(|e| anyhow::anyhow!("{}/optimizer.safetensors: {e}", ck.dir.display()))?;
        return restore_rest(tr, data, ck);
    }
    let template = tr.optimizer().export_state();
    let stored = ck
        .groups
        .get("optimizer")
        .with_context(|| format!("{}: no optimizer.safetensors", ck.dir.display()))?;
    let mut state = Vec::with_capacity(template.len());
    for (name, tmpl) in &template {
        let t = stored.iter().find(|t| &t.name == name).with_context(|| {
            format!(
                "{}/optimizer.safetensors: no state tensor {name} (was the checkpoint written with another optimizer or precision?)",
                ck.dir.display()
            )
        })?;
        state.push((name.clone(), tensor_to_state(t, tmpl)?));
    }
    tr.optimizer_mut()
        .import_state(state)
        .map_err(|e| anyhow::anyhow!("{}/optimizer.safetensors: {e}", ck.dir.display()))?;
    restore_rest(tr, data, ck)
}

fn restore_rest(tr: &mut Trainer, data: &mut dyn Dataset, ck: &Checkpoint) -> Result<()> {
    restore_rest_with(tr, data, ck, &ck.meta.scaling)
}

/// [`restore_rest`] with the FP8 scaling states `scaling` (a tensor-parallel shard's
/// own, or the merged ones: `checkpoint::tp`).
fn restore_rest_with(
    tr: &mut Trainer,
    data: &mut dyn Dataset,
    ck: &Checkpoint,
    scaling: &Value,
) -> Result<()> {
    restore_scaling(tr, ck, scaling)?;
    tr.set_step(ck.meta.step);
    tr.rng.state = ck.meta.rng_state;
    data.set_position(ck.meta.data_position);
    sync_compute_weights(tr)
}

/// Restore every FP8 scaling state of `tr` from `scaling` (`checkpoint.json`'s
/// `scaling`, or a tensor-parallel shard's own, `checkpoint::tp`), naming a missing one.
pub fn restore_scaling(tr: &mut Trainer, ck: &Checkpoint, scaling: &Value) -> Result<()> {
    let scaling = scaling.as_object().cloned().unwrap_or_default();
    for (name, st) in tr.fp8_scale_states_mut() {
        let v = scaling.get(&name).with_context(|| {
            format!(
                "{}: no FP8 scaling state for {name} (checkpoint precision differs?)",
                ck.dir.display()
            )
        })?;
        restore_scale_state(&name, st, v)?;
    }
    Ok(())
}
