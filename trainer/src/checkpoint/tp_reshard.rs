//! fp8-o3 optimizer state re-cut for another tensor-parallel layout (another T, one
//! process included, or a whole-model checkpoint into T > 1).
//!
//! fp8-o3's state is stored in units (ZeRO units, or whole tensors where one rank held
//! its shard's whole state), each in the element coordinates of the layout that wrote
//! it: a tensor-parallel shard's local order ([`super::tp::runs`] of its slice) or the
//! whole tensor's. A resuming rank wants its own units in its own layout's coordinates.
//! Both sides are mapped to runs of elements of the *full* tensor (the slice's runs,
//! restricted to the unit's local range), intersected ([`super::tp::overlaps`]), and
//! each stored unit that overlaps is read by one positioned read covering its pieces
//! (at most that unit, never a whole file): no rank reads or holds more than its share
//! plus one stored unit at a time.
//!
//! What comes back exactly:
//! - A wanted unit that covers the same full-tensor elements, in the same order, as a
//!   stored one (replicated tensors cut alike, or an identical slice): its bytes, scales
//!   and `.amax` / `.update_amax` scalars verbatim, bit for bit.
//! - Otherwise the pieces are decoded to f32 with their own stored scale (exact: the
//!   scales are powers of two) and re-encoded in the stored kind with the power-of-two
//!   scale of the assembled amax ([`crate::repartition`]'s rule, what `Fp8Adam` does
//!   after every step): f32 state exact; FP16 masters and second moments and E4M3 first
//!   moments exact when the new scale is at least the piece's (multiplying by 2^k, k >= 0,
//!   never leaves the format: the new scale keeps the amax under the format's max);
//!   with a smaller scale (the new unit joins a piece with a larger amax) only values
//!   pushed below the normal range lose bits: at most half a subnormal spacing at the
//!   new scale, 2^-25 / s (FP16), 2^-10 / s (E4M3). `.amax` becomes the assembled
//!   values' amax, `.update_amax` the max over the pieces' units (it only bounds the
//!   next step's provisional scale).
//!
//! Replicated tensors (norms, row-parallel biases) are stored once per tensor-parallel
//! rank, identical (their gradients are all-reduced over TP); each element is read from
//! the first stored unit that has it.

use anyhow::{bail, Context, Result};
use fp8lm_fp8::cast::amax_f32;
use fp8lm_optim::StateTensor;
use std::collections::HashMap;

use super::shard::ShardFile;
use super::tp::{overlaps, runs, OPTIM_PREFIX};
use super::{Checkpoint, META_FILE};
use crate::repartition::{encode_like, state_values, NamedState, UnitSpan, ZERO_UNITS_KEY};
use crate::tensor_parallel::shard::Split;

const STATES: [&str; 3] = ["master", "exp_avg", "exp_avg_sq"];

/// One stored file of fp8-o3 state: where it is, who wrote it (for errors), the prefix
/// of its entries, its units (in its layout's coordinates), and per tensor the slice of
/// the full tensor its layout holds.
struct Source {
    file: String,
    who: String,
    prefix: &'static str,
    units: Vec<UnitSpan>,
    splits: Vec<Split>,
}

/// The grid a checkpoint was written on, as `D x T` (for errors).
pub(crate) fn written_grid(ck: &Checkpoint) -> String {
    match (&ck.meta.tp_shards, &ck.meta.optimizer_shards) {
        (Some(t), _) => format!("{} x {}", t.dp, t.tp),
        (None, Some(o)) => format!("{} x 1", o.world_size),
        (None, None) => "1 x 1".to_string(),
    }
}

/// Every file of `ck` holding fp8-o3 (or whole-tensor `Fp8Adam`) state, with its units.
/// `names` / `numels`: the model's tensors (the same order in every layout).
fn sources(ck: &Checkpoint, names: &[String], numels: &[usize]) -> Result<Vec<Source>> {
    let dir = ck.dir.display();
    let tp_splits = |tp: usize| -> Result<Vec<Split>> {
        let idx = ck
            .meta
            .tp_shards
            .as_ref()
            .expect("a tensor-parallel checkpoint");
        let e = idx
            .shards
            .iter()
            .find(|e| e.tp_rank == tp)
            .with_context(|| format!("{dir}/{META_FILE}: no shard of tensor-parallel rank {tp}"))?;
        names
            .iter()
            .map(|n| {
                e.tensors
                    .iter()
                    .find(|t| &t.name == n)
                    .map(|t| t.split.clone())
                    .with_context(|| {
                        format!("{dir}/{META_FILE}: shard {} lists no tensor {n}", e.file)
                    })
            })
            .collect()
    };
    // Whole tensors of a layout as units (how a rank holding all of its layout's state
    // stores it: entries named by the parameter).
    let whole = |splits: &[Split]| -> Result<Vec<UnitSpan>> {
        names
            .iter()
            .zip(numels)
            .zip(splits)
            .enumerate()
            .map(|(i, ((n, &full), s))| {
                Ok(UnitSpan {
                    name: n.clone(),
                    tensor: i,
                    offset: 0,
                    numel: runs(s, full)?.iter().map(|r| r.1).sum(),
                })
            })
            .collect()
    };
    let full = vec![Split::Full; names.len()];
    Ok(match (&ck.meta.tp_shards, &ck.meta.optimizer_shards) {
        (Some(idx), Some(os)) => os
            .shards
            .iter()
            .map(|e| {
                Ok(Source {
                    file: e.file.clone(),
                    who: format!(
                        "fp8-o3 optimizer shard of rank {} (dp {}, tp {} of {})",
                        e.rank, e.dp_rank, e.tp_rank, idx.tp
                    ),
                    prefix: OPTIM_PREFIX,
                    units: e.units.clone(),
                    splits: tp_splits(e.tp_rank)?,
                })
            })
            .collect::<Result<_>>()?,
        (Some(idx), None) => idx
            .shards
            .iter()
            .map(|e| {
                let splits = tp_splits(e.tp_rank)?;
                Ok(Source {
                    file: e.file.clone(),
                    who: format!(
                        "tensor-parallel shard of rank {} (dp {}, tp {} of {})",
                        e.rank, e.dp_rank, e.tp_rank, idx.tp
                    ),
                    prefix: OPTIM_PREFIX,
                    units: whole(&splits)?,
                    splits,
                })
            })
            .collect::<Result<_>>()?,
        (None, Some(os)) => os
            .shards
            .iter()
            .map(|e| Source {
                file: e.file.clone(),
                who: super::shard::shard_owner(e, os),
                prefix: "",
                units: e.units.clone(),
                splits: full.clone(),
            })
            .collect(),
        (None, None) => {
            // One process's state (or the old gathered fp8-o3 format, its units in
            // `extra.zero_units`) in optimizer.safetensors.
            let units = match ck.meta.extra.get(ZERO_UNITS_KEY) {
                None | Some(serde_json::Value::Null) => whole(&full)?,
                Some(v) => serde_json::from_value(v.clone()).with_context(|| {
                    format!("{dir}/{META_FILE}: extra.{ZERO_UNITS_KEY} is not a unit list")
                })?,
            };
            vec![Source {
                file: "optimizer.safetensors".into(),
                who: "the optimizer state".into(),
                prefix: "",
                units,
                splits: full,
            }]
        }
    })
}

fn scalar_of(st: &StateTensor) -> f64 {
    match st {
        StateTensor::Scalar(x) => *x,
        other => state_values(other).first().copied().unwrap_or(0.0) as f64,
    }
}

/// Local positions `off..off + n` of the runs `r` (full-tensor runs in local order), as
/// runs of the full tensor; adjacent runs merged, so equal element sequences compare
/// equal.
fn restrict(r: &[(usize, usize)], off: usize, n: usize) -> Vec<(usize, usize)> {
    let (mut out, mut pos): (Vec<(usize, usize)>, usize) = (Vec::new(), 0);
    for &(s, l) in r {
        let lo = off.max(pos);
        let hi = (off + n).min(pos + l);
        if lo < hi {
            let run = (s + lo - pos, hi - lo);
            match out.last_mut() {
                Some(p) if p.0 + p.1 == run.0 => p.1 += run.1,
                _ => out.push(run),
            }
        }
        pos += l;
        if pos >= off + n {
            break;
        }
    }
    out
}

/// Runs of full-tensor elements `(start, length)`, in a layout's local order.
type Runs = Vec<(usize, usize)>;

/// The stored units of a checkpoint, their full-tensor runs, and their files (opened on
/// first use: headers only; tensors are read by range).
struct Stored<'a> {
    ck: &'a Checkpoint,
    srcs: Vec<Source>,
    /// Per source, per unit: its runs.
    runs: Vec<Vec<Runs>>,
    files: HashMap<usize, ShardFile>,
}

impl Stored<'_> {
    fn file(&mut self, k: usize) -> Result<&ShardFile> {
        if let std::collections::hash_map::Entry::Vacant(v) = self.files.entry(k) {
            let s = &self.srcs[k];
            v.insert(ShardFile::open(self.ck.dir.join(&s.file), s.who.clone())?);
        }
        Ok(&self.files[&k])
    }

    /// A stored unit holding exactly the elements `dst` of tensor `tensor`.
    fn same_as(&self, tensor: usize, dst: &Runs) -> Option<(usize, usize)> {
        (0..self.srcs.len()).find_map(|k| {
            let units = &self.srcs[k].units;
            (0..units.len())
                .find(|&j| units[j].tensor == tensor && self.runs[k][j] == *dst)
                .map(|j| (k, j))
        })
    }

    /// Unit `u`'s entries copied from stored unit `j` of source `k` (bytes, scales and
    /// amax scalars as stored).
    fn verbatim(&mut self, u: &UnitSpan, (k, j): (usize, usize)) -> Result<Vec<NamedState>> {
        let (pre, o) = (self.srcs[k].prefix, self.srcs[k].units[j].clone());
        let f = self.file(k)?;
        let mut out = Vec::with_capacity(7);
        for s in STATES {
            let src = format!("{pre}{}.{s}", o.name);
            out.push((format!("{}.{s}", u.name), f.state(&src, 0, o.numel)?));
            let a = f.state(&format!("{src}.amax"), 0, 1)?;
            out.push((format!("{}.{s}.amax", u.name), a));
        }
        let ua = f.state(&format!("{pre}{}.update_amax", o.name), 0, 1)?;
        out.push((format!("{}.update_amax", u.name), ua));
        Ok(out)
    }

    /// Unit `u` (elements `dst`) assembled from every stored unit that overlaps it, each
    /// read once over the range of its pieces, and re-encoded (module docs).
    fn assemble(&mut self, u: &UnitSpan, dst: &Runs) -> Result<Vec<NamedState>> {
        let mut vals: [Vec<f32>; 3] = std::array::from_fn(|_| vec![0f32; u.numel]);
        // Each state's stored kind (format; data left empty), for the re-encoding.
        let mut kinds: [Option<StateTensor>; 3] = [None, None, None];
        let mut filled = vec![false; u.numel];
        let (mut covered, mut ratio) = (0usize, 0f64);
        for k in 0..self.srcs.len() {
            for j in 0..self.srcs[k].units.len() {
                if covered == u.numel {
                    break;
                }
                if self.srcs[k].units[j].tensor != u.tensor {
                    continue;
                }
                // (offset in the stored unit, offset in the wanted one, length), for
                // elements not taken yet (replicated tensors: from the first source).
                let pieces: Vec<_> = overlaps(dst, &self.runs[k][j])
                    .into_iter()
                    .filter(|&(_, d, n)| filled[d..d + n].iter().any(|x| !x))
                    .collect();
                let (Some(lo), Some(hi)) = (
                    pieces.iter().map(|p| p.0).min(),
                    pieces.iter().map(|p| p.0 + p.2).max(),
                ) else {
                    continue;
                };
                let (pre, name) = (self.srcs[k].prefix, self.srcs[k].units[j].name.clone());
                let f = self.file(k)?;
                for (si, s) in STATES.iter().enumerate() {
                    let st = f.state(&format!("{pre}{name}.{s}"), lo, hi)?;
                    let v = state_values(&st);
                    for &(sp, d, n) in &pieces {
                        for q in 0..n {
                            if !filled[d + q] {
                                vals[si][d + q] = v[sp - lo + q];
                            }
                        }
                    }
                    kinds[si].get_or_insert_with(|| empty_like(&st, u.numel));
                }
                for &(_, d, n) in &pieces {
                    for x in &mut filled[d..d + n] {
                        covered += usize::from(!*x);
                        *x = true;
                    }
                }
                let ua = f.state(&format!("{pre}{name}.update_amax"), 0, 1)?;
                ratio = ratio.max(scalar_of(&ua));
            }
        }
        if covered != u.numel {
            bail!(
                "the stored units cover {covered} of the {} elements of unit {}",
                u.numel,
                u.name
            );
        }
        let mut out = Vec::with_capacity(7);
        for (si, s) in STATES.iter().enumerate() {
            let kind = kinds[si].take().expect("covered, so read");
            let v = std::mem::take(&mut vals[si]);
            out.push((format!("{}.{s}", u.name), encode_like(&kind, &v)));
            let a = StateTensor::Scalar(amax_f32(&v) as f64);
            out.push((format!("{}.{s}.amax", u.name), a));
        }
        out.push((
            format!("{}.update_amax", u.name),
            StateTensor::Scalar(ratio),
        ));
        Ok(out)
    }
}

/// `st`'s kind and format with no data, shaped as a unit of `numel` elements.
fn empty_like(st: &StateTensor, numel: usize) -> StateTensor {
    match st {
        StateTensor::F32(_) => StateTensor::F32(Vec::new()),
        StateTensor::F16 { scale, .. } => StateTensor::F16 {
            data: Vec::new(),
            scale: *scale,
        },
        StateTensor::Fp8(t) => StateTensor::Fp8(fp8lm_fp8::ScaledFp8 {
            data: Vec::new(),
            shape: vec![numel],
            format: t.format,
            scale: t.scale,
        }),
        StateTensor::Scalar(x) => StateTensor::Scalar(*x),
    }
}

/// The stored fp8-o3 state that overlaps the units `want` of a layout whose tensor `i`
/// holds slice `dst_split(i)` of the full tensor (`names`, `numels`: the model's full
/// tensors), re-cut from any stored layout (module docs). Returns `step` first, then
/// per wanted unit its entries under its own name, and the wanted units as the spans:
/// ready for [`crate::repartition::repartition_state`] (which then copies them).
/// `grid` names the resuming grid in errors.
pub(crate) fn read_units_resharded(
    ck: &Checkpoint,
    names: &[String],
    numels: &[usize],
    dst_split: &dyn Fn(usize) -> Split,
    want: &[UnitSpan],
    grid: &str,
) -> Result<(Vec<NamedState>, Vec<UnitSpan>)> {
    let dir = ck.dir.display().to_string();
    let ctx = || {
        format!(
            "{dir}: fp8-o3 optimizer state written on a {} grid (D x T), re-cut for a {grid} grid",
            written_grid(ck)
        )
    };
    let srcs = sources(ck, names, numels).with_context(ctx)?;
    if srcs.is_empty() {
        bail!("{}: no optimizer state files listed", ctx());
    }
    let mut all_runs = Vec::with_capacity(srcs.len());
    for s in &srcs {
        let mut v = Vec::with_capacity(s.units.len());
        for o in &s.units {
            let (Some(split), Some(&full)) = (s.splits.get(o.tensor), numels.get(o.tensor)) else {
                bail!(
                    "{}: {}: unit {} of tensor {} the model does not have",
                    ctx(),
                    s.who,
                    o.name,
                    o.tensor
                );
            };
            let r =
                runs(split, full).with_context(|| format!("{}: {}: {}", ctx(), s.who, o.name))?;
            v.push(restrict(&r, o.offset, o.numel));
        }
        all_runs.push(v);
    }
    let mut st = Stored {
        ck,
        srcs,
        runs: all_runs,
        files: HashMap::new(),
    };
    let pre = st.srcs[0].prefix;
    let step = st
        .file(0)?
        .state(&format!("{pre}step"), 0, 1)
        .with_context(ctx)?;
    let mut out: Vec<NamedState> = vec![("step".to_string(), step)];
    for u in want {
        let full = *numels
            .get(u.tensor)
            .with_context(|| format!("{}: unit {} of tensor {}", ctx(), u.name, u.tensor))?;
        let dst = restrict(&runs(&dst_split(u.tensor), full)?, u.offset, u.numel);
        if dst.iter().map(|r| r.1).sum::<usize>() != u.numel {
            bail!("{}: unit {} does not fit its tensor's slice", ctx(), u.name);
        }
        let entries = match st.same_as(u.tensor, &dst) {
            Some(kj) => st.verbatim(u, kj),
            None => st.assemble(u, &dst),
        };
        out.extend(entries.with_context(ctx)?);
    }
    Ok((out, want.to_vec()))
}

/// [`read_units_resharded`] for a rank without tensor parallelism (units of whole
/// tensors) from a tensor-parallel checkpoint: the model's tensors are the index's.
pub(crate) fn read_units_untp(
    ck: &Checkpoint,
    want: &[UnitSpan],
) -> Result<(Vec<NamedState>, Vec<UnitSpan>)> {
    let dir = ck.dir.display();
    let idx = ck
        .meta
        .tp_shards
        .as_ref()
        .with_context(|| format!("{dir}: not a tensor-parallel checkpoint"))?;
    let first = idx
        .shards
        .first()
        .with_context(|| format!("{dir}/{META_FILE}: the tensor-parallel index lists no shards"))?;
    let names: Vec<String> = first.tensors.iter().map(|t| t.name.clone()).collect();
    let numels: Vec<usize> = first
        .tensors
        .iter()
        .map(|t| t.full_shape.iter().product())
        .collect();
    read_units_resharded(
        ck,
        &names,
        &numels,
        &|_| Split::Full,
        want,
        "data-parallel (T = 1)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::single_range_in_vec_init)]
    fn restrict_cuts_and_merges() {
        // Columns 2..4 of a [3, 6] tensor: runs (2,2), (8,2), (14,2); local 1..5.
        let r = runs(
            &Split::Cols {
                cols: 2..4,
                width: 6,
            },
            18,
        )
        .unwrap();
        assert_eq!(restrict(&r, 1, 4), vec![(3, 1), (8, 2), (14, 1)]);
        // Adjacent row ranges merge into one run.
        let r = runs(
            &Split::Rows {
                rows: vec![0..1, 1..3],
                width: 4,
            },
            12,
        )
        .unwrap();
        assert_eq!(restrict(&r, 0, 12), vec![(0, 12)]);
        assert_eq!(restrict(&r, 2, 3), vec![(2, 3)]);
    }
}
