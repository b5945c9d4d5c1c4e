//! Sharded optimizer state: fp8-o3 checkpoints without gathering the state anywhere.
//!
//! Each rank streams its own optimizer state (the ZeRO units it owns, in the formats it
//! holds them: FP16 masters, E4M3 and FP16 moments with their scales) into its own file,
//! `optim.rank-RRRR-of-NNNN.safetensors`; rank 0 also writes the model tensors and
//! `checkpoint.json`, whose [`ShardIndex`] says which file holds which units, and under
//! which partition and grid. No rank ever holds more than its own share, while saving or
//! while resuming.
//!
//! ## Atomic as a whole ([`save_sharded`])
//! 1. the ranks agree on one temporary directory (rank 0's process id names it) and
//!    rank 0 creates it;
//! 2. every rank writes and fsyncs its shard into it;
//! 3. the ranks exchange their outcome (size and CRC-32 of the shard, or the error);
//!    if any rank failed, rank 0 removes the temporary directory and every rank returns
//!    an error naming the failed ranks and their errors: no partial checkpoint;
//! 4. otherwise rank 0 writes the model tensors and `checkpoint.json` (every file's size
//!    and CRC, the index), fsyncs, renames the directory into place ([`super::fs`]),
//!    and tells every rank the outcome.
//!
//! Every step is a collective every rank takes part in whatever happened before, so a
//! failure on one rank never leaves the others waiting. The ranks must share the
//! checkpoint folder's file system (one host, or a shared file system).
//!
//! ## Reading ([`read_units`])
//! A resuming rank reads, from each shard file, only the units (and within a unit only
//! the element range) that overlap the units it owns under the new partition: the file's
//! safetensors header gives each tensor's byte range, and positioned reads fetch just
//! those bytes. A unit stored whole and wanted whole keeps its name and is copied
//! verbatim (same partition: bit-identical resume); any other piece is named
//! `<unit>@<lo>..<hi>` (element range inside the stored unit) and re-encoded by
//! [`crate::repartition::repartition_state`].

use anyhow::{anyhow, bail, Context, Result};
use fp8lm_collectives::Communicator;
use fp8lm_fp8::{Fp8Format, ScaledFp8};
use fp8lm_optim::StateTensor;
use half::f16;
use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::CkptDtype;
use super::meta::{
    encode_meta, CheckpointMeta, FileSum, ShardEntry, ShardIndex, FORMAT, META_FILE,
};
use super::stream::{write_group, StreamTensor};
use super::{fs, safetensors_metadata, Checkpoint};
use crate::repartition::{NamedState, UnitSpan};

/// File name of rank `rank`'s optimizer shard among `world` ranks.
pub fn shard_file_name(rank: usize, world: usize) -> String {
    format!("optim.rank-{rank:04}-of-{world:04}.safetensors")
}

fn comm_err(e: fp8lm_collectives::CommError) -> anyhow::Error {
    anyhow!("{e}")
}

/// Every rank contributes its outcome of `what`; returns every rank's payload, or (on
/// every rank alike) an error naming each rank that failed and its error.
pub fn agree_outcome(
    comm: &dyn Communicator,
    what: &str,
    local: Result<String>,
) -> Result<Vec<String>> {
    let n = comm.size();
    let mut mine = match &local {
        Ok(s) => {
            let mut v = vec![1u8];
            v.extend_from_slice(s.as_bytes());
            v
        }
        Err(e) => {
            let mut v = vec![0u8];
            v.extend_from_slice(format!("{e:#}").as_bytes());
            v
        }
    };
    let lens: Vec<usize> = comm
        .all_gather_bytes(&(mine.len() as u64).to_le_bytes())
        .map_err(comm_err)?
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")) as usize)
        .collect();
    let seg = lens.iter().copied().max().unwrap_or(0);
    mine.resize(seg, 0);
    let all = comm.all_gather_bytes(&mine).map_err(comm_err)?;
    let (mut out, mut failed) = (Vec::with_capacity(n), Vec::new());
    for (q, &len) in lens.iter().enumerate() {
        let b = &all[q * seg..q * seg + len];
        let text = String::from_utf8_lossy(&b[1..]).into_owned();
        if b[0] == 1 {
            out.push(text);
        } else {
            failed.push(format!("rank {q} of {n}: {text}"));
        }
    }
    if !failed.is_empty() {
        bail!("{what} failed on {}", failed.join("; "));
    }
    Ok(out)
}

/// What one rank contributes to a sharded save.
pub struct ShardSave<'a> {
    /// This rank's optimizer state entries, streamed from where they live.
    pub tensors: Vec<StreamTensor<'a>>,
    /// The units they belong to.
    pub units: Vec<UnitSpan>,
    /// `dist.zero_partition` (recorded in the index).
    pub partition: String,
}

/// Save a checkpoint with a sharded optimizer state (module docs): every rank calls it
/// with its own shard; `model_groups` (the model's tensors, streamed) and `meta` are
/// used on rank 0 only. `hook` runs after this rank's shard file is written (tests use
/// it to fail one rank). Returns the checkpoint directory on every rank.
#[allow(clippy::too_many_arguments)]
pub fn save_sharded(
    meta: &CheckpointMeta,
    model_groups: &[(String, Vec<StreamTensor<'_>>)],
    shard: ShardSave<'_>,
    comm: &dyn Communicator,
    root: &Path,
    keep: usize,
    hook: &mut dyn FnMut(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let (rank, n) = (comm.rank(), comm.size());
    let local = RankFile {
        file: shard_file_name(rank, n),
        what: format!("optimizer shard of rank {rank} of {n}"),
        tensors: shard.tensors,
    };
    let report = serde_json::to_value(&shard.units)?;
    let partition = shard.partition;
    save_ranked(
        meta,
        Some(local),
        report,
        comm,
        root,
        keep,
        hook,
        &mut |tmp, meta, reports| {
            let st_meta = safetensors_metadata(meta.step);
            for (group, tensors) in model_groups {
                let fname = format!("{group}.safetensors");
                let (bytes, crc32) = write_group(&tmp.join(&fname), tensors, &st_meta)
                    .with_context(|| format!("checkpoint group {group}"))?;
                meta.files.insert(fname, FileSum { bytes, crc32 });
            }
            let mut shards = Vec::with_capacity(n);
            for (q, r) in reports.into_iter().enumerate() {
                let file = r
                    .file
                    .with_context(|| format!("rank {q} of {n} wrote no shard"))?;
                let units: Vec<UnitSpan> = serde_json::from_value(r.report)
                    .with_context(|| format!("the shard report of rank {q} of {n}"))?;
                shards.push(ShardEntry {
                    file,
                    rank: q,
                    dp_rank: q,
                    tp_rank: 0,
                    units,
                });
            }
            meta.optimizer_shards = Some(ShardIndex {
                world_size: n,
                dp: n,
                tp: 1,
                partition: partition.clone(),
                shards,
            });
            Ok(())
        },
    )
}

/// One rank's own file of a checkpoint written by every rank ([`save_ranked`]).
pub struct RankFile<'a> {
    /// File name inside the checkpoint directory.
    pub file: String,
    /// What it is, for errors ("optimizer shard of rank 1 of 4").
    pub what: String,
    pub tensors: Vec<StreamTensor<'a>>,
}

/// Rank 0's last part of [`save_ranked`]: the temporary directory (for more files), the
/// metadata to complete (the index), every rank's report in rank order.
pub type FinishFn<'a> = dyn FnMut(&Path, &mut CheckpointMeta, Vec<RankReport>) -> Result<()> + 'a;

/// What rank 0 learns of each rank: its file's name (its size and CRC are in `files`
/// already), if it wrote one, and its report.
pub struct RankReport {
    pub file: Option<String>,
    pub report: serde_json::Value,
}

/// The protocol of a checkpoint that every rank writes part of (module docs, "Atomic as
/// a whole"): one temporary directory, every rank's own file (`local`; `None` for a rank
/// that writes none, e.g. a data-parallel replica of tensor-parallel shards) and its
/// `report` (JSON, whatever rank 0 needs for the index), the outcomes exchanged (any
/// failure: the directory is removed and every rank errs naming the failed ranks), then
/// rank 0 runs `finish` (more files, the index; the reports in rank order), writes `checkpoint.json` with every
/// file's size and CRC-32 and renames the directory into place. Every rank calls it;
/// returns the checkpoint directory on every rank.
#[allow(clippy::too_many_arguments)]
pub fn save_ranked(
    meta: &CheckpointMeta,
    local: Option<RankFile<'_>>,
    report: serde_json::Value,
    comm: &dyn Communicator,
    root: &Path,
    keep: usize,
    hook: &mut dyn FnMut(&Path) -> Result<()>,
    finish: &mut FinishFn<'_>,
) -> Result<PathBuf> {
    let rank = comm.rank();
    // 1. One temporary directory, named by rank 0's process id.
    let pids = comm
        .all_gather_bytes(&std::process::id().to_le_bytes())
        .map_err(comm_err)?;
    let token = u32::from_le_bytes(pids[..4].try_into().expect("4 bytes"));
    let tmp = fs::tmp_dir(root, meta.step, token);
    let made = if rank == 0 {
        fs::create_tmp_dir(root, &tmp).map(|_| String::new())
    } else {
        Ok(String::new())
    };
    agree_outcome(comm, "creating the checkpoint's temporary directory", made)?;

    // 2-3. Every rank's own file.
    let st_meta = safetensors_metadata(meta.step);
    let written = (|| -> Result<String> {
        let file = match &local {
            None => None,
            Some(local) => {
                let path = tmp.join(&local.file);
                let (bytes, crc32) = write_group(&path, &local.tensors, &st_meta)
                    .with_context(|| format!("{}: {}", path.display(), local.what))?;
                hook(&path)?;
                Some((&local.file, bytes, crc32))
            }
        };
        Ok(serde_json::to_string(&(file, &report))?)
    })();
    let outcomes = match agree_outcome(comm, "writing the checkpoint shards", written) {
        Ok(v) => v,
        Err(e) => {
            if rank == 0 {
                std::fs::remove_dir_all(&tmp).ok();
            }
            return Err(e);
        }
    };

    // 4. Rank 0: the rest, metadata with the index, rename into place.
    let committed = if rank == 0 {
        let r = (|| -> Result<String> {
            let mut meta = meta.clone();
            meta.format = FORMAT.into();
            meta.files.clear();
            let mut reports = Vec::with_capacity(outcomes.len());
            for (q, o) in outcomes.iter().enumerate() {
                type Outcome = (Option<(String, u64, String)>, serde_json::Value);
                let (file, report): Outcome = serde_json::from_str(o)
                    .with_context(|| format!("the shard report of rank {q}"))?;
                let file = file.map(|(file, bytes, crc32)| {
                    meta.files.insert(file.clone(), FileSum { bytes, crc32 });
                    file
                });
                reports.push(RankReport { file, report });
            }
            finish(&tmp, &mut meta, reports)?;
            fs::write_synced(&tmp.join(META_FILE), &encode_meta(&meta)?)?;
            let dir = fs::commit(root, &tmp, meta.step, keep)?;
            Ok(dir.to_string_lossy().into_owned())
        })();
        if r.is_err() {
            std::fs::remove_dir_all(&tmp).ok();
        }
        r
    } else {
        Ok(String::new())
    };
    let dirs = agree_outcome(comm, "committing the checkpoint", committed)?;
    Ok(PathBuf::from(&dirs[0]))
}

/// Check a shard file's size and CRC-32 against `checkpoint.json` by streaming it (it is
/// never held in memory). `who` names the rank that wrote it.
pub(crate) fn verify_file(path: &Path, sum: &FileSum, who: &str) -> Result<()> {
    let mut f = File::open(path)
        .with_context(|| format!("{} ({who}): missing or unreadable", path.display()))?;
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let k = f
            .read(&mut buf)
            .with_context(|| format!("{} ({who}): read failed", path.display()))?;
        if k == 0 {
            break;
        }
        crc.update(&buf[..k]);
        total += k as u64;
    }
    if total != sum.bytes {
        bail!(
            "{} ({who}): {}: {total} bytes, expected {} (per {META_FILE})",
            path.display(),
            if total < sum.bytes {
                "truncated"
            } else {
                "wrong size"
            },
            sum.bytes
        );
    }
    let got = format!("{:08x}", crc.finalize());
    if got != sum.crc32 {
        bail!(
            "{} ({who}): corrupted: CRC-32 is {got}, expected {} (per {META_FILE})",
            path.display(),
            sum.crc32
        );
    }
    Ok(())
}

/// "optimizer shard of rank r of n", for errors.
pub(crate) fn shard_owner(e: &ShardEntry, idx: &ShardIndex) -> String {
    format!(
        "optimizer shard of rank {} of {} (dp {}, tp {})",
        e.rank, idx.world_size, e.dp_rank, e.tp_rank
    )
}

/// One shard file opened for positioned reads of its tensors.
pub(crate) struct ShardFile {
    pub(crate) path: PathBuf,
    pub(crate) who: String,
    file: File,
    /// name -> (dtype, element count, absolute byte range in the file).
    pub(crate) tensors: HashMap<String, (CkptDtype, usize, u64, u64)>,
    /// name -> shape, as the header gives it.
    pub(crate) shapes: HashMap<String, Vec<usize>>,
}

impl ShardFile {
    pub(crate) fn open(path: PathBuf, who: String) -> Result<ShardFile> {
        let file = File::open(&path)
            .with_context(|| format!("{} ({who}): missing or unreadable", path.display()))?;
        let len = file
            .metadata()
            .with_context(|| format!("{} ({who}): cannot stat", path.display()))?
            .len();
        let bad = |what: String| {
            anyhow!(
                "{} ({who}): not a valid safetensors file: {what}",
                path.display()
            )
        };
        let mut n8 = [0u8; 8];
        file.read_exact_at(&mut n8, 0)
            .map_err(|e| bad(format!("no header length ({e})")))?;
        let hlen = u64::from_le_bytes(n8);
        if hlen > len.saturating_sub(8) || hlen > (100 << 20) {
            return Err(bad(format!(
                "header length {hlen} in a file of {len} bytes"
            )));
        }
        let mut h = vec![0u8; hlen as usize];
        file.read_exact_at(&mut h, 8)
            .map_err(|e| bad(format!("header unreadable ({e})")))?;
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&h).map_err(|e| bad(format!("header is not JSON ({e})")))?;
        let base = 8 + hlen;
        let mut tensors = HashMap::new();
        let mut shapes = HashMap::new();
        for (name, v) in header {
            if name == "__metadata__" {
                continue;
            }
            let dtype = v["dtype"].as_str().unwrap_or("");
            let dt = [
                CkptDtype::F32,
                CkptDtype::F16,
                CkptDtype::BF16,
                CkptDtype::F8E4M3,
                CkptDtype::F8E5M2,
                CkptDtype::U8,
                CkptDtype::I64,
                CkptDtype::F64,
            ]
            .into_iter()
            .find(|d| d.name() == dtype)
            .ok_or_else(|| bad(format!("tensor {name} has unsupported dtype {dtype:?}")))?;
            let shape: Vec<usize> = serde_json::from_value(v["shape"].clone())
                .map_err(|_| bad(format!("tensor {name} has no shape")))?;
            let off: [u64; 2] = serde_json::from_value(v["data_offsets"].clone())
                .map_err(|_| bad(format!("tensor {name} has no data_offsets")))?;
            let numel: usize = shape.iter().product();
            if off[1] < off[0]
                || off[1] - off[0] != (numel * dt.size()) as u64
                || base + off[1] > len
            {
                return Err(bad(format!(
                    "tensor {name}: bytes {}..{} do not hold shape {shape:?} inside the file",
                    off[0], off[1]
                )));
            }
            tensors.insert(name.clone(), (dt, numel, base + off[0], base + off[1]));
            shapes.insert(name, shape);
        }
        Ok(ShardFile {
            path,
            who,
            file,
            tensors,
            shapes,
        })
    }

    pub(crate) fn bytes(&self, name: &str, lo: usize, hi: usize) -> Result<(CkptDtype, Vec<u8>)> {
        let &(dt, numel, start, _) = self
            .tensors
            .get(name)
            .with_context(|| format!("{} ({}): no tensor {name}", self.path.display(), self.who))?;
        if lo > hi || hi > numel {
            bail!(
                "{} ({}): tensor {name} has {numel} elements, elements {lo}..{hi} were asked for",
                self.path.display(),
                self.who
            );
        }
        let sz = dt.size();
        let mut b = vec![0u8; (hi - lo) * sz];
        self.file
            .read_exact_at(&mut b, start + (lo * sz) as u64)
            .with_context(|| format!("{} ({}): reading {name}", self.path.display(), self.who))?;
        Ok((dt, b))
    }

    pub(crate) fn scale(&self, name: &str) -> Result<Option<f32>> {
        let key = format!("{name}.scale");
        if !self.tensors.contains_key(&key) {
            return Ok(None);
        }
        match self.bytes(&key, 0, 1)? {
            (CkptDtype::F32, b) => Ok(Some(f32::from_le_bytes(b[..4].try_into().expect("4")))),
            (dt, _) => bail!(
                "{} ({}): {key} is {}, not a single F32 value",
                self.path.display(),
                self.who,
                dt.name()
            ),
        }
    }

    /// Elements `lo..hi` of state entry `name`, in the kind it is stored as.
    pub(crate) fn state(&self, name: &str, lo: usize, hi: usize) -> Result<StateTensor> {
        let (dt, b) = self.bytes(name, lo, hi)?;
        let scale = self.scale(name)?;
        let need_scale = || {
            scale.with_context(|| {
                format!(
                    "{} ({}): {} tensor {name} has no {name}.scale",
                    self.path.display(),
                    self.who,
                    dt.name()
                )
            })
        };
        Ok(match dt {
            CkptDtype::F32 => StateTensor::F32(
                b.chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
                    .collect(),
            ),
            CkptDtype::F64 if hi - lo == 1 => {
                StateTensor::Scalar(f64::from_le_bytes(b[..8].try_into().expect("8")))
            }
            CkptDtype::F16 => StateTensor::F16 {
                data: b
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]))
                    .collect(),
                scale: scale.unwrap_or(1.0),
            },
            CkptDtype::F8E4M3 | CkptDtype::F8E5M2 => StateTensor::Fp8(ScaledFp8 {
                shape: vec![b.len()],
                data: b,
                format: if dt == CkptDtype::F8E4M3 {
                    Fp8Format::E4M3
                } else {
                    Fp8Format::E5M2
                },
                scale: need_scale()?,
            }),
            other => bail!(
                "{} ({}): {name}: dtype {} is not an optimizer state kind",
                self.path.display(),
                self.who,
                other.name()
            ),
        })
    }
}

/// The three element-wise states of a unit (the rest are scalars).
const STATES: [&str; 3] = ["master", "exp_avg", "exp_avg_sq"];

/// The stored optimizer state that overlaps the units `want` (this rank's units under
/// its partition), read from a sharded checkpoint by range (module docs): the
/// optimizer's `step` first, then per stored piece its entries, and the pieces as unit
/// spans in ascending (tensor, offset) order, ready for
/// [`crate::repartition::repartition_state`]. Nothing outside `want`
/// is read, beyond the `step` scalar and the files' headers.
pub fn read_units(ck: &Checkpoint, want: &[UnitSpan]) -> Result<(Vec<NamedState>, Vec<UnitSpan>)> {
    if ck.meta.tp_shards.is_some() {
        // Units cut from tensor-parallel shards: re-cut into whole tensors' coordinates.
        return super::tp_reshard::read_units_untp(ck, want);
    }
    let idx = ck.meta.optimizer_shards.as_ref().with_context(|| {
        format!(
            "{}: the optimizer state is not sharded (no optimizer_shards in {META_FILE})",
            ck.dir.display()
        )
    })?;
    let sources: Vec<UnitSource<'_>> = idx
        .shards
        .iter()
        .map(|e| UnitSource {
            file: &e.file,
            who: shard_owner(e, idx),
            units: &e.units,
        })
        .collect();
    read_units_from(ck, &sources, "", want)
}

/// One file holding optimizer state cut into units, for [`read_units_from`]: its name in
/// the checkpoint directory, who wrote it (for errors), the units it holds.
pub(crate) struct UnitSource<'a> {
    pub(crate) file: &'a str,
    pub(crate) who: String,
    pub(crate) units: &'a [UnitSpan],
}

/// [`read_units`] over the files `sources`, whose entries are named `<prefix><unit>.<state>`
/// (and `<prefix>step`): the fp8-o3 files of a tensor-parallel checkpoint use `optim/`
/// (`super::tp`), the data-parallel ones no prefix. The entries returned carry no prefix.
pub(crate) fn read_units_from(
    ck: &Checkpoint,
    sources: &[UnitSource<'_>],
    prefix: &str,
    want: &[UnitSpan],
) -> Result<(Vec<NamedState>, Vec<UnitSpan>)> {
    let mut out: Vec<NamedState> = Vec::new();
    let mut spans = Vec::new();
    let mut step = None;
    for e in sources {
        // (stored unit, element range inside it) for every overlap with a wanted unit.
        let mut pieces = Vec::new();
        for o in e.units {
            for w in want.iter().filter(|w| w.tensor == o.tensor) {
                let lo = w.offset.max(o.offset);
                let hi = (w.offset + w.numel).min(o.offset + o.numel);
                if lo < hi {
                    pieces.push((o, lo - o.offset, hi - o.offset, w.name == o.name));
                }
            }
        }
        if pieces.is_empty() && step.is_some() {
            continue;
        }
        let f = ShardFile::open(ck.dir.join(e.file), e.who.clone())?;
        if step.is_none() {
            step = Some(f.state(&format!("{prefix}step"), 0, 1)?);
        }
        for (o, lo, hi, same) in pieces {
            let name = if same && lo == 0 && hi == o.numel {
                o.name.clone()
            } else {
                format!("{}@{lo}..{hi}", o.name)
            };
            for s in STATES {
                let src = format!("{prefix}{}.{s}", o.name);
                out.push((format!("{name}.{s}"), f.state(&src, lo, hi)?));
                out.push((
                    format!("{name}.{s}.amax"),
                    f.state(&format!("{src}.amax"), 0, 1)?,
                ));
            }
            let ua = format!("{prefix}{}.update_amax", o.name);
            out.push((format!("{name}.update_amax"), f.state(&ua, 0, 1)?));
            spans.push(UnitSpan {
                name,
                tensor: o.tensor,
                offset: o.offset + lo,
                numel: hi - lo,
            });
        }
    }
    // `repartition_state` concatenates a unit's sources in list order: ascending.
    spans.sort_by_key(|u| (u.tensor, u.offset));
    let step =
        step.with_context(|| format!("{}: the shard index lists no shards", ck.dir.display()))?;
    out.insert(0, ("step".to_string(), step));
    Ok((out, spans))
}
