//! Tensor-parallel checkpoints: one file per tensor-parallel shard, an index, and reading
//! any other layout's slices back by range.
//!
//! ## Layout
//! Each rank of data-parallel replica 0 of a D x T grid streams its model shard and its
//! optimizer state shard (in the formats it holds them: f32, FP16 masters and E4M3 / FP16
//! moments with their own per-shard scales) into its own file,
//! `tp.dp-DDDD-tp-TTTT-of-NNNN.safetensors` ([`tp_shard_file_name`]; DDDD = 0000), with
//! model tensors named `model/<param>` and optimizer entries `optim/<entry>`. The other
//! replicas hold bit-identical copies and write nothing. Rank 0 writes `checkpoint.json`
//! with the [`TpIndex`]: per shard its file, its (dp, tp) coordinates, its FP8 scaling
//! state, and per tensor the full shape and the slice of the full tensor it holds
//! ([`crate::tensor_parallel::shard::Split`]: replicated, row ranges (qkv: three, one per
//! q/k/v block), or a column range). An optimizer entry of parameter `p` (`adamw.m.p`,
//! `p.master`, ...) is cut like `p`. The save is atomic as a whole and names a failed rank
//! ([`super::shard::save_ranked`], shared with fp8-o3's sharded optimizer state).
//!
//! fp8-o3 with D > 1 replicas (FP8 ZeRO over the replicas of each shard,
//! `crate::parallel::zero_dxt`): every (dp, tp) rank holds another share of its shard's
//! optimizer state, so every rank writes its own file, the same name: its share's
//! entries `optim/<unit>.<state>` (`optim/step`, the units' FP16 masters and E4M3 / FP16
//! moments with their scales, `.amax` and `.update_amax` scalars), plus, on replica 0,
//! the model slices as above. `checkpoint.json` adds `optimizer_shards`
//! ([`super::meta::ShardIndex`]: dp = D, tp = T, the partition) with one entry per rank:
//! its file, its (dp, tp) coordinates and its units, in that shard's local element
//! coordinates (tensor index in the shard's layout, element offset and length), as the
//! ZeRO partition of the shard cut them. No rank gathers any other's share. A resume on
//! the same T ([`read_tp_units`]) reads, per rank, only the pieces of its own
//! tensor-parallel rank's files that overlap the units it owns under its new partition:
//! the same D copies every unit verbatim (bit for bit), another D (one replica included,
//! which takes whole tensors) re-partitions by [`crate::repartition`]'s rule, as the
//! data-parallel fp8-o3 checkpoints do. Another T (one process included) re-cuts the
//! units across tensor slices, reading by range ([`super::tp_reshard`]). The model
//! slices load anywhere, as above (`eval`, `sample`).

//! ## Re-sharding ([`TpReader`])
//! A resuming rank (any D' x T', one process included) reads, for each of its tensors,
//! only the pieces of the stored shards that overlap its own slice: both slices are turned
//! into runs of contiguous elements of the full tensor ([`runs`]), intersected
//! ([`overlaps`]), and each piece fetched by a positioned read. A tensor held whole by one
//! stored shard with the same slice (same T, same rank) is copied verbatim, scale and all:
//! the same layout resumes bit for bit. Otherwise the pieces are decoded to f32 with their
//! source shard's scale (exact: power-of-two scales) and, for scaled state, re-encoded by
//! [`crate::repartition`]'s rule (power-of-two scale of the assembled amax, i.e. the
//! smallest of the pieces' scales: nothing saturates; only values pushed below the
//! format's normal range lose bits, at most half a subnormal spacing at the new scale);
//! f32 weights and moments are exact.
//!
//! FP8 scaling state (delayed-scaling amax histories, per linear and per operand): each
//! shard's own is kept in its index entry and restored as is when T' = T. For any other
//! T' every rank takes the merged state in `checkpoint.json`'s `scaling`
//! ([`merge_scaling`]): element-wise max of the shards' amax histories and the smallest
//! scale. That is the history the unsharded tensor would have had (the amax of a tensor
//! is the max of its shards' amaxes; a replicated operand has the same amax on every
//! shard), so nothing of it is lost in either direction.

use anyhow::{bail, Context, Result};
use fp8lm_optim::StateTensor;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::shard::{read_units_from, ShardFile, UnitSource};
use super::{Checkpoint, META_FILE};
use crate::repartition::{state_values, NamedState, UnitSpan};
use crate::tensor_parallel::shard::Split;

/// Prefix of model tensors in a shard file.
pub const MODEL_PREFIX: &str = "model/";
/// Prefix of optimizer state entries in a shard file.
pub const OPTIM_PREFIX: &str = "optim/";

/// File name of the model + optimizer shard of grid rank (dp, tp) of `t` shards.
pub fn tp_shard_file_name(dp: usize, tp: usize, t: usize) -> String {
    format!("tp.dp-{dp:04}-tp-{tp:04}-of-{t:04}.safetensors")
}

/// The index of a tensor-parallel checkpoint, in `checkpoint.json` (module docs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TpIndex {
    /// Ranks of the grid that wrote the checkpoint (`dp * tp`).
    pub world_size: usize,
    /// Data-parallel and tensor-parallel extents of the grid.
    pub dp: usize,
    pub tp: usize,
    /// One entry per shard file, in tensor-parallel rank order.
    pub shards: Vec<TpShardEntry>,
    /// The FP8 scaling states of the other replicas' ranks (dp > 0): their activations
    /// and gradients see other rows, so their amax histories differ from replica 0's.
    /// Restored only on the same D x T ([`TpIndex::scaling_of`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<ReplicaScaling>,
}

/// The FP8 scaling state of grid rank (dp, tp) of a replica that wrote no file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReplicaScaling {
    pub rank: usize,
    pub dp_rank: usize,
    pub tp_rank: usize,
    pub scaling: Value,
}

impl TpIndex {
    /// The FP8 scaling state grid rank (`dp`, `tp`) of a `d` x `t` grid resumes with
    /// (module docs): its own on the same grid; on the same T, its shard's (replica
    /// 0's); `None` on any other T (the merged state in `checkpoint.json` then).
    pub fn scaling_of(&self, d: usize, t: usize, dp: usize, tp: usize) -> Option<&Value> {
        if t != self.tp {
            return None;
        }
        let own = self
            .replicas
            .iter()
            .find(|r| d == self.dp && r.dp_rank == dp && r.tp_rank == tp)
            .map(|r| &r.scaling);
        own.or_else(|| {
            self.shards
                .iter()
                .find(|e| e.tp_rank == tp)
                .map(|e| &e.scaling)
        })
    }
}

/// One shard file of a tensor-parallel checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TpShardEntry {
    /// File name inside the checkpoint directory (also listed in `files`).
    pub file: String,
    /// Global rank that wrote it and its grid coordinates.
    pub rank: usize,
    pub dp_rank: usize,
    pub tp_rank: usize,
    /// Every model tensor of the shard: full shape and the slice held.
    pub tensors: Vec<TpTensor>,
    /// This shard's own FP8 scaling states (as `checkpoint.json`'s `scaling`).
    #[serde(default)]
    pub scaling: Value,
    /// This shard's data-parallel state (the FP8 all-reduce's auto-scaling factors, the
    /// same on every replica of the shard): `Trainer::dist_checkpoint_extra`.
    #[serde(default)]
    pub dist_extra: Value,
}

/// A tensor of a shard: its name, the full (unsharded) shape and the slice held.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TpTensor {
    pub name: String,
    pub full_shape: Vec<usize>,
    pub split: Split,
}

/// The elements of the full tensor (`numel` elements) that `split` keeps, as runs
/// `(start in the full tensor, length)` in the shard's local order (ascending).
pub fn runs(split: &Split, numel: usize) -> Result<Vec<(usize, usize)>> {
    Ok(match split {
        Split::Full => vec![(0, numel)],
        Split::Rows { rows, width } => {
            let out: Vec<(usize, usize)> = rows
                .iter()
                .map(|r| (r.start * width, r.len() * width))
                .collect();
            if out.iter().any(|&(s, l)| s + l > numel) {
                bail!("rows {rows:?} of width {width} exceed {numel} elements");
            }
            out
        }
        Split::Cols { cols, width } => {
            if *width == 0 || !numel.is_multiple_of(*width) || cols.end > *width {
                bail!("columns {cols:?} of width {width} do not fit {numel} elements");
            }
            (0..numel / width)
                .map(|row| (row * width + cols.start, cols.len()))
                .collect()
        }
    })
}

/// Where the elements of `dst` (runs of the full tensor, in local order) are found in
/// `src`: pieces `(offset in src's local order, offset in dst's, length)`, adjacent
/// pieces merged (so an identical slice is one piece per contiguous stretch).
pub fn overlaps(dst: &[(usize, usize)], src: &[(usize, usize)]) -> Vec<(usize, usize, usize)> {
    let local = |r: &[(usize, usize)]| {
        let mut off = 0;
        let mut v: Vec<(usize, usize, usize)> = r
            .iter()
            .map(|&(s, l)| {
                off += l;
                (s, l, off - l)
            })
            .collect();
        v.sort_unstable();
        v
    };
    let (d, s) = (local(dst), local(src));
    let mut out: Vec<(usize, usize, usize)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < d.len() && j < s.len() {
        let (ds, dl, dloc) = d[i];
        let (ss, sl, sloc) = s[j];
        let lo = ds.max(ss);
        let hi = (ds + dl).min(ss + sl);
        if lo < hi {
            let piece = (sloc + lo - ss, dloc + lo - ds, hi - lo);
            match out.last_mut() {
                Some(p) if p.0 + p.2 == piece.0 && p.1 + p.2 == piece.1 => p.2 += piece.2,
                _ => out.push(piece),
            }
        }
        if ds + dl <= ss + sl {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// The merged FP8 scaling state of the shards (module docs): per state name, the
/// element-wise max of the amax histories (the longest history's length), the smallest
/// scale, the max of the counters and of `last_amax`.
pub fn merge_scaling(shards: &[&Value]) -> Value {
    let mut out = serde_json::Map::new();
    let Some(first) = shards.first().and_then(|v| v.as_object()) else {
        return Value::Object(out);
    };
    for (name, v0) in first {
        let all: Vec<&Value> = shards.iter().filter_map(|s| s.get(name)).collect();
        let mut m = v0.clone();
        let fmax = |k: &str| {
            all.iter()
                .filter_map(|v| v.get(k).and_then(Value::as_f64))
                .fold(None, |a: Option<f64>, x| Some(a.map_or(x, |a| a.max(x))))
        };
        let fmin = |k: &str| {
            all.iter()
                .filter_map(|v| v.get(k).and_then(Value::as_f64))
                .fold(None, |a: Option<f64>, x| Some(a.map_or(x, |a| a.min(x))))
        };
        if let Some(s) = fmin("scale") {
            m["scale"] = serde_json::json!(s as f32);
        }
        for k in ["zero_amax_count", "nonfinite_amax_count"] {
            let c = all
                .iter()
                .filter_map(|v| v.get(k).and_then(Value::as_u64))
                .max();
            if let Some(c) = c {
                m[k] = serde_json::json!(c);
            }
        }
        if let Some(a) = fmax("last_amax") {
            m["last_amax"] = serde_json::json!(a as f32);
        }
        let hists: Vec<Vec<f64>> = all
            .iter()
            .map(|v| {
                v.get("amax_history")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_f64).collect())
                    .unwrap_or_default()
            })
            .collect();
        let n = hists.iter().map(Vec::len).max().unwrap_or(0);
        let merged: Vec<f32> = (0..n)
            .map(|k| {
                hists
                    .iter()
                    .filter_map(|h| h.get(k))
                    .fold(0f64, |a, &x| a.max(x)) as f32
            })
            .collect();
        m["amax_history"] = serde_json::json!(merged);
        out.insert(name.clone(), m);
    }
    Value::Object(out)
}

/// One tensor of this rank's slice, assembled from a tensor-parallel checkpoint.
pub enum Assembled {
    /// Held whole, with the same slice, by one stored shard: its bytes and scale as
    /// stored (shard `source` of the index).
    Verbatim { state: StateTensor, source: usize },
    /// Assembled from pieces of the stored shards `sources`, decoded to f32.
    Values {
        values: Vec<f32>,
        sources: Vec<usize>,
    },
}

impl Assembled {
    /// The real values (decoded when verbatim).
    pub fn values(&self) -> Vec<f32> {
        match self {
            Assembled::Verbatim { state, .. } => state_values(state),
            Assembled::Values { values, .. } => values.clone(),
        }
    }
    pub fn sources(&self) -> Vec<usize> {
        match self {
            Assembled::Verbatim { source, .. } => vec![*source],
            Assembled::Values { sources, .. } => sources.clone(),
        }
    }
}

/// Reads slices of tensors from a tensor-parallel checkpoint's shard files (module
/// docs); files are opened once, on first use.
pub struct TpReader<'a> {
    ck: &'a Checkpoint,
    pub idx: &'a TpIndex,
    files: Vec<Option<ShardFile>>,
}

impl<'a> TpReader<'a> {
    pub fn new(ck: &'a Checkpoint) -> Result<TpReader<'a>> {
        let idx = ck.meta.tp_shards.as_ref().with_context(|| {
            format!(
                "{}: not a tensor-parallel checkpoint (no tp_shards in {META_FILE})",
                ck.dir.display()
            )
        })?;
        if idx.shards.is_empty() {
            bail!(
                "{}/{META_FILE}: the tensor-parallel index lists no shards",
                ck.dir.display()
            );
        }
        Ok(TpReader {
            ck,
            idx,
            files: (0..idx.shards.len()).map(|_| None).collect(),
        })
    }

    fn who(&self, k: usize) -> String {
        let e = &self.idx.shards[k];
        format!(
            "tensor-parallel shard of rank {} (dp {}, tp {} of {})",
            e.rank, e.dp_rank, e.tp_rank, self.idx.tp
        )
    }

    fn file(&mut self, k: usize) -> Result<&ShardFile> {
        if self.files[k].is_none() {
            let path = self.ck.dir.join(&self.idx.shards[k].file);
            self.files[k] = Some(ShardFile::open(path, self.who(k))?);
        }
        Ok(self.files[k].as_ref().expect("opened above"))
    }

    fn file_path(&self, k: usize) -> std::path::PathBuf {
        self.ck.dir.join(&self.idx.shards[k].file)
    }

    /// A scalar entry (`optim/step`, `.update_amax`, ...) of shard `k`.
    pub fn scalar(&mut self, k: usize, entry: &str) -> Result<f64> {
        let path = self.file_path(k);
        let who = self.who(k);
        match self.file(k)?.state(entry, 0, 1)? {
            StateTensor::Scalar(x) => Ok(x),
            StateTensor::F32(v) if v.len() == 1 => Ok(v[0] as f64),
            _ => bail!("{} ({who}): {entry} is not a scalar", path.display()),
        }
    }

    /// The slice `dst` of stored entry `entry` (cut like model tensor `param`, whose
    /// full shape is `full_shape`): verbatim when one shard holds exactly that slice,
    /// else assembled from the overlapping pieces of every shard (each element read
    /// once: a replicated tensor from the first shard).
    pub fn read(
        &mut self,
        entry: &str,
        param: &str,
        full_shape: &[usize],
        dst: &Split,
    ) -> Result<Assembled> {
        let idx = self.idx;
        let full_numel: usize = full_shape.iter().product();
        let dir = self.ck.dir.display().to_string();
        let dst_runs = runs(dst, full_numel)
            .with_context(|| format!("{dir}: tensor {param}: this rank's slice"))?;
        let local: usize = dst_runs.iter().map(|r| r.1).sum();
        let mut values: Option<Vec<f32>> = None;
        let mut filled = vec![false; local];
        let mut covered = 0usize;
        let mut sources = Vec::new();
        for k in 0..idx.shards.len() {
            if covered == local {
                break;
            }
            let path = self.file_path(k);
            let who = self.who(k);
            let t = idx.shards[k]
                .tensors
                .iter()
                .find(|t| t.name == param)
                .with_context(|| {
                    format!(
                        "{} ({who}): the index in {META_FILE} lists no tensor {param}",
                        path.display()
                    )
                })?;
            if t.full_shape != full_shape {
                bail!(
                    "{} ({who}): tensor {param} has full shape {:?} in {META_FILE}, the \
                     model's is {full_shape:?}",
                    path.display(),
                    t.full_shape
                );
            }
            let src_runs = runs(&t.split, full_numel).with_context(|| {
                format!(
                    "{} ({who}): tensor {param}: the stored slice",
                    path.display()
                )
            })?;
            let src_len: usize = src_runs.iter().map(|r| r.1).sum();
            let pieces = overlaps(&dst_runs, &src_runs);
            if pieces.is_empty() {
                continue;
            }
            if values.is_none() && src_len == local && pieces == [(0, 0, local)] {
                let state = self.file(k)?.state(entry, 0, local)?;
                return Ok(Assembled::Verbatim { state, source: k });
            }
            let vals = values.get_or_insert_with(|| vec![0f32; local]);
            let f = self.file(k)?;
            let mut used = false;
            for (s, d, n) in pieces {
                if filled[d..d + n].iter().all(|&x| x) {
                    continue;
                }
                let v = state_values(&f.state(entry, s, s + n)?);
                for (q, x) in v.into_iter().enumerate() {
                    if !filled[d + q] {
                        filled[d + q] = true;
                        vals[d + q] = x;
                        covered += 1;
                    }
                }
                used = true;
            }
            if used {
                sources.push(k);
            }
        }
        if covered != local {
            bail!(
                "{dir}: tensor {param}: the shards listed in {META_FILE} cover {covered} of \
                 the {local} elements this rank holds"
            );
        }
        Ok(Assembled::Values {
            values: values.unwrap_or_default(),
            sources,
        })
    }

    /// The shards that hold part of `dst` of `param` (for scalars merged over them).
    pub fn sources_of(&self, param: &str, full_shape: &[usize], dst: &Split) -> Result<Vec<usize>> {
        let n: usize = full_shape.iter().product();
        let d = runs(dst, n)?;
        let mut out = Vec::new();
        for (k, e) in self.idx.shards.iter().enumerate() {
            if let Some(t) = e.tensors.iter().find(|t| t.name == param) {
                if !overlaps(&d, &runs(&t.split, n)?).is_empty() {
                    out.push(k);
                }
            }
        }
        Ok(out)
    }
}

/// fp8-o3: the optimizer state of tensor-parallel rank `tp_rank` of a `d` x `t` grid
/// that overlaps the units `want` (in that shard's local element coordinates, as the
/// ZeRO partition of the shard cuts them), read by range as
/// [`super::shard::read_units`] reads a data-parallel checkpoint's; ready for
/// [`crate::repartition::repartition_state`]. From the (dp, tp) files of a checkpoint
/// written under fp8-o3 over D > 1 replicas (`optimizer_shards`: only the entries of
/// `tp_rank`), or, from one written with one replica, from shard `tp_rank`'s file, whose
/// optimizer state is held whole per tensor (`whole`: the shard's tensors as units). The
/// units are the shard's own, so `t` must be the checkpoint's T (another T is refused
/// here, naming both grids; [`super::tp_reshard`] re-cuts them for it).
pub fn read_tp_units(
    ck: &Checkpoint,
    (d, t, tp_rank): (usize, usize, usize),
    whole: &[UnitSpan],
    want: &[UnitSpan],
) -> Result<(Vec<NamedState>, Vec<UnitSpan>)> {
    let dir = ck.dir.display();
    let idx = ck.meta.tp_shards.as_ref().with_context(|| {
        format!("{dir}: not a tensor-parallel checkpoint (no tp_shards in {META_FILE})")
    })?;
    if idx.tp != t {
        bail!(
            "{dir}: an fp8-o3 tensor-parallel checkpoint written on a {} x {} grid (D x T) \
             cannot be resumed under fp8-o3 on a {d} x {t} grid: its ZeRO units are cut \
             from each tensor-parallel shard, and re-cutting them across tensor slices is \
             not supported; resume with dist.tensor_parallel = {} (any number of \
             replicas), or use fp8-o2",
            idx.dp,
            idx.tp,
            idx.tp
        );
    }
    let sources: Vec<UnitSource<'_>> = match &ck.meta.optimizer_shards {
        Some(os) => {
            if os.tp != idx.tp || os.dp != idx.dp {
                bail!(
                    "{dir}/{META_FILE}: optimizer_shards says a {} x {} grid, tp_shards a \
                     {} x {} one",
                    os.dp,
                    os.tp,
                    idx.dp,
                    idx.tp
                );
            }
            os.shards
                .iter()
                .filter(|e| e.tp_rank == tp_rank)
                .map(|e| UnitSource {
                    file: &e.file,
                    who: format!(
                        "fp8-o3 optimizer shard of rank {} (dp {}, tp {} of {})",
                        e.rank, e.dp_rank, e.tp_rank, idx.tp
                    ),
                    units: &e.units,
                })
                .collect()
        }
        None => idx
            .shards
            .iter()
            .filter(|e| e.tp_rank == tp_rank)
            .map(|e| UnitSource {
                file: &e.file,
                who: format!(
                    "tensor-parallel shard of rank {} (dp {}, tp {} of {})",
                    e.rank, e.dp_rank, e.tp_rank, idx.tp
                ),
                units: whole,
            })
            .collect(),
    };
    if sources.is_empty() {
        bail!("{dir}/{META_FILE}: no optimizer state of tensor-parallel rank {tp_rank} listed");
    }
    read_units_from(ck, &sources, OPTIM_PREFIX, want).with_context(|| {
        format!("{dir}: fp8-o3 optimizer state of tensor-parallel rank {tp_rank} of {t}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // one row range of a Rows split
    fn overlaps_of_rows_and_cols() {
        // A [4, 6] tensor, columns split 2 ways vs 3 ways.
        let a = runs(
            &Split::Cols {
                cols: 0..3,
                width: 6,
            },
            24,
        )
        .unwrap();
        let b = runs(
            &Split::Cols {
                cols: 2..4,
                width: 6,
            },
            24,
        )
        .unwrap();
        // b's column 2 of each row is a's local column 2.
        assert_eq!(
            overlaps(&b, &a),
            vec![(2, 0, 1), (5, 2, 1), (8, 4, 1), (11, 6, 1)]
        );
        // Whole tensor from two row halves: two pieces.
        let full = runs(&Split::Full, 24).unwrap();
        let top = runs(
            &Split::Rows {
                rows: vec![0..2],
                width: 6,
            },
            24,
        )
        .unwrap();
        assert_eq!(overlaps(&full, &top), vec![(0, 0, 12)]);
        // qkv-like three row ranges, the same slice: identity, merged per stretch.
        let q = Split::Rows {
            rows: vec![0..1, 2..3],
            width: 6,
        };
        let r = runs(&q, 24).unwrap();
        assert_eq!(overlaps(&r, &r), vec![(0, 0, 12)]);
        assert!(runs(
            &Split::Cols {
                cols: 0..7,
                width: 6
            },
            24
        )
        .is_err());
    }

    #[test]
    fn merged_scaling_is_max_history_min_scale() {
        let a = serde_json::json!({"l.w": {"format": "E4M3", "scale": 4.0, "amax_history": [1.0, 3.0], "zero_amax_count": 0, "nonfinite_amax_count": 0, "last_amax": 3.0}});
        let b = serde_json::json!({"l.w": {"format": "E4M3", "scale": 2.0, "amax_history": [2.0, 0.5], "zero_amax_count": 1, "nonfinite_amax_count": 0, "last_amax": 0.5}});
        let m = merge_scaling(&[&a, &b]);
        assert_eq!(m["l.w"]["scale"], 2.0);
        assert_eq!(m["l.w"]["amax_history"], serde_json::json!([2.0, 3.0]));
        assert_eq!(m["l.w"]["zero_amax_count"], 1);
        assert_eq!(m["l.w"]["last_amax"], 3.0);
    }
}
