//! Checkpoints: safetensors tensor files plus one JSON metadata file, saved atomically.
//!
//! Layout of `<run_dir>/checkpoints/step_00000100/`:
//! - `<group>.safetensors` (e.g. `model`, `optimizer`): tensors with their real dtypes.
//!   FP8 tensors use the standard `F8_E4M3` / `F8_E5M2` dtypes and their f32 scale is a
//!   separate 1-element tensor `<name>.scale` (`real = stored / scale`); FP16/BF16/F32
//!   tensors are stored as such. Any safetensors reader (Python `safetensors`) opens them.
//! - `checkpoint.json`: config, step, RNG state, data position, scaling state (amax
//!   histories), free-form extra state, and the size and CRC-32 of every tensor file. The
//!   JSON body is itself covered by a CRC-32 in the first line, so a flipped byte anywhere
//!   is caught.
//!
//! Why a directory renamed into place: a save writes everything into a hidden temporary
//! directory, fsyncs every file and the directory, renames it to `step_N` and fsyncs the
//! parent. A crash (even `kill -9`) at any point leaves either no `step_N` or a complete
//! one; the previous checkpoints are only pruned after the new one is durable.

use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use safetensors::tensor::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::ckpt_stream::{write_group, StreamTensor};
use crate::config::RunConfig;

pub const FORMAT: &str = "fp8lm-checkpoint-v1";
pub const META_FILE: &str = "checkpoint.json";

/// Element type of a stored tensor (the subset of safetensors dtypes fp8lm uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CkptDtype {
    F32,
    F16,
    BF16,
    /// FP8 E4M3 ("FN": no infinities), with a per-tensor f32 scale.
    F8E4M3,
    /// FP8 E5M2, with a per-tensor f32 scale.
    F8E5M2,
    U8,
    I64,
    F64,
}

impl CkptDtype {
    fn to_st(self) -> Dtype {
        match self {
            CkptDtype::F32 => Dtype::F32,
            CkptDtype::F16 => Dtype::F16,
            CkptDtype::BF16 => Dtype::BF16,
            CkptDtype::F8E4M3 => Dtype::F8_E4M3,
            CkptDtype::F8E5M2 => Dtype::F8_E5M2,
            CkptDtype::U8 => Dtype::U8,
            CkptDtype::I64 => Dtype::I64,
            CkptDtype::F64 => Dtype::F64,
        }
    }
    fn from_st(d: Dtype) -> Option<Self> {
        Some(match d {
            Dtype::F32 => CkptDtype::F32,
            Dtype::F16 => CkptDtype::F16,
            Dtype::BF16 => CkptDtype::BF16,
            Dtype::F8_E4M3 => CkptDtype::F8E4M3,
            Dtype::F8_E5M2 => CkptDtype::F8E5M2,
            Dtype::U8 => CkptDtype::U8,
            Dtype::I64 => CkptDtype::I64,
            Dtype::F64 => CkptDtype::F64,
            _ => return None,
        })
    }
    pub fn size(self) -> usize {
        self.to_st().size()
    }
    pub fn is_fp8(self) -> bool {
        matches!(self, CkptDtype::F8E4M3 | CkptDtype::F8E5M2)
    }
    /// The safetensors dtype string (`F8_E4M3`, ...).
    pub fn name(self) -> String {
        format!("{:?}", self.to_st())
    }
}

/// One stored tensor: raw little-endian bytes plus, for FP8, the scale.
#[derive(Clone, Debug, PartialEq)]
pub struct CkptTensor {
    pub name: String,
    pub dtype: CkptDtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
    /// `real = stored / scale`; `Some` exactly for FP8 tensors.
    pub scale: Option<f32>,
}

impl CkptTensor {
    pub fn f32(name: &str, shape: &[usize], data: &[f32]) -> Self {
        Self::raw(
            name,
            CkptDtype::F32,
            shape,
            data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            None,
        )
    }
    pub fn f16(name: &str, shape: &[usize], data: &[f16], scale: Option<f32>) -> Self {
        Self::raw(
            name,
            CkptDtype::F16,
            shape,
            data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            scale,
        )
    }
    pub fn f64(name: &str, shape: &[usize], data: &[f64]) -> Self {
        Self::raw(
            name,
            CkptDtype::F64,
            shape,
            data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            None,
        )
    }
    pub fn bf16(name: &str, shape: &[usize], data: &[bf16]) -> Self {
        Self::raw(
            name,
            CkptDtype::BF16,
            shape,
            data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            None,
        )
    }
    /// FP8 bits (`dtype` F8E4M3 or F8E5M2) with their scale.
    pub fn fp8(name: &str, dtype: CkptDtype, shape: &[usize], bits: &[u8], scale: f32) -> Self {
        assert!(
            dtype.is_fp8(),
            "CkptTensor::fp8 needs an FP8 dtype, got {dtype:?}"
        );
        Self::raw(name, dtype, shape, bits.to_vec(), Some(scale))
    }
    pub fn from_scaled_fp8(name: &str, t: &fp8lm_fp8::ScaledFp8) -> Self {
        let dtype = match t.format {
            fp8lm_fp8::Fp8Format::E4M3 => CkptDtype::F8E4M3,
            fp8lm_fp8::Fp8Format::E5M2 => CkptDtype::F8E5M2,
        };
        Self::fp8(name, dtype, &t.shape, &t.data, t.scale)
    }
    fn raw(
        name: &str,
        dtype: CkptDtype,
        shape: &[usize],
        bytes: Vec<u8>,
        scale: Option<f32>,
    ) -> Self {
        let n: usize = shape.iter().product();
        assert_eq!(
            bytes.len(),
            n * dtype.size(),
            "tensor {name}: {} bytes for shape {shape:?}",
            bytes.len()
        );
        CkptTensor {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            bytes,
            scale,
        }
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Values as f32 (FP8 and scaled FP16 divided by their scale), for any float dtype.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let inv = 1.0 / self.scale.unwrap_or(1.0);
        Ok(match self.dtype {
            CkptDtype::F32 => self
                .bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            CkptDtype::F16 => self
                .bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32() * inv)
                .collect(),
            CkptDtype::BF16 => self
                .bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            CkptDtype::F8E4M3 => self
                .bytes
                .iter()
                .map(|&b| fp8lm_fp8::Fp8Format::E4M3.decode(b) * inv)
                .collect(),
            CkptDtype::F8E5M2 => self
                .bytes
                .iter()
                .map(|&b| fp8lm_fp8::Fp8Format::E5M2.decode(b) * inv)
                .collect(),
            other => bail!(
                "tensor {}: dtype {} is not a float type",
                self.name,
                other.name()
            ),
        })
    }
    /// Values of an F64 tensor (optimizer scalars), refusing any other dtype.
    pub fn as_f64_exact(&self) -> Result<Vec<f64>> {
        if self.dtype != CkptDtype::F64 {
            bail!(
                "tensor {}: stored as {}, expected F64",
                self.name,
                self.dtype.name()
            );
        }
        Ok(self
            .bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect())
    }
    /// Values of an F32 tensor, refusing any other dtype (exact restore of fp32 state).
    pub fn as_f32_exact(&self) -> Result<Vec<f32>> {
        if self.dtype != CkptDtype::F32 {
            bail!(
                "tensor {}: stored as {}, expected F32",
                self.name,
                self.dtype.name()
            );
        }
        self.to_f32()
    }
}

/// Size and CRC-32 of one file of a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileSum {
    pub bytes: u64,
    pub crc32: String,
}

/// Everything in `checkpoint.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format: String,
    /// Optimizer steps completed.
    pub step: u64,
    pub config: RunConfig,
    /// Trainer RNG state (dropout, sampling), restored verbatim.
    pub rng_state: u64,
    /// `Dataset::position()` after `step` steps.
    pub data_position: u64,
    /// FP8 scaling state (scales, amax histories, auto-scaling factors); trainer-defined.
    pub scaling: serde_json::Value,
    /// Any other state the trainer needs (e.g. loss history for the plot).
    pub extra: serde_json::Value,
    /// Tensor files and their checksums.
    pub files: BTreeMap<String, FileSum>,
}

/// A checkpoint in memory: metadata plus tensor groups (one file per group).
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    pub groups: BTreeMap<String, Vec<CkptTensor>>,
    /// Directory it was loaded from (empty when built in memory).
    pub dir: PathBuf,
}

fn crc_hex(bytes: &[u8]) -> String {
    format!("{:08x}", crc32fast::hash(bytes))
}

fn fsync_dir(dir: &Path) -> Result<()> {
    // Directory fsync makes a rename durable; not all platforms allow opening a dir.
    if let Ok(d) = File::open(dir) {
        d.sync_all().ok();
    }
    Ok(())
}

/// Write a file atomically: `<path>.tmp-<pid>`, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file path", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mut f = File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("{}: write failed", tmp.display()))?;
    f.sync_all()
        .with_context(|| format!("{}: fsync failed", tmp.display()))?;
    drop(f);
    fs::rename(&tmp, path)
        .with_context(|| format!("{}: rename from {} failed", path.display(), tmp.display()))?;
    fsync_dir(dir)
}

/// Read one safetensors file on its own (no checksum: that lives in `checkpoint.json`),
/// pairing FP8 tensors with their `.scale` tensors.
pub fn read_safetensors_file(file: &Path) -> Result<Vec<CkptTensor>> {
    let bytes = fs::read(file).with_context(|| format!("{}: cannot read", file.display()))?;
    parse_group(file, &bytes)
}

fn parse_group(file: &Path, bytes: &[u8]) -> Result<Vec<CkptTensor>> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e:?}", file.display()))?;
    let mut raw: BTreeMap<String, (CkptDtype, Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for (name, view) in st.tensors() {
        let dt = CkptDtype::from_st(view.dtype()).with_context(|| {
            format!(
                "{}: tensor {name} has unsupported dtype {:?}",
                file.display(),
                view.dtype()
            )
        })?;
        raw.insert(name, (dt, view.shape().to_vec(), view.data().to_vec()));
    }
    let mut out = Vec::new();
    for (name, (dtype, shape, bytes)) in &raw {
        if let Some(base) = name.strip_suffix(".scale") {
            if raw.contains_key(base) {
                continue;
            }
        }
        let scale = match raw.get(&format!("{name}.scale")) {
            Some((CkptDtype::F32, s, b)) if s.iter().product::<usize>() == 1 => {
                Some(f32::from_le_bytes(b[..4].try_into().unwrap()))
            }
            Some(_) => bail!("{}: {name}.scale is not a single F32 value", file.display()),
            None if dtype.is_fp8() => bail!(
                "{}: FP8 tensor {name} has no {name}.scale tensor",
                file.display()
            ),
            None => None,
        };
        out.push(CkptTensor {
            name: name.clone(),
            dtype: *dtype,
            shape: shape.clone(),
            bytes: bytes.clone(),
            scale,
        });
    }
    Ok(out)
}

/// Serialize the metadata with a CRC of its body in the first line. The file stays valid
/// JSON: `{"crc32": "...", "meta":` newline, body, newline `}`.
fn encode_meta(meta: &CheckpointMeta) -> Result<Vec<u8>> {
    let body = serde_json::to_string_pretty(meta)?;
    Ok(format!(
        "{{\"crc32\": \"{}\", \"meta\":\n{body}\n}}\n",
        crc_hex(body.as_bytes())
    )
    .into_bytes())
}

fn decode_meta(file: &Path, bytes: &[u8]) -> Result<CheckpointMeta> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| anyhow::anyhow!("{}: corrupted: not UTF-8", file.display()))?;
    let (head, rest) = text
        .split_once('\n')
        .with_context(|| format!("{}: truncated: no header line", file.display()))?;
    let want = head
        .strip_prefix("{\"crc32\": \"")
        .and_then(|h| h.strip_suffix("\", \"meta\":"))
        .with_context(|| format!("{}: corrupted: bad header line {head:?}", file.display()))?;
    let body = rest
        .strip_suffix("\n}\n")
        .with_context(|| format!("{}: truncated: missing the closing brace", file.display()))?;
    let got = crc_hex(body.as_bytes());
    if got != want {
        bail!(
            "{}: corrupted: checksum of the metadata is {got}, expected {want}",
            file.display()
        );
    }
    let meta: CheckpointMeta = serde_json::from_str(body)
        .with_context(|| format!("{}: metadata does not parse", file.display()))?;
    if meta.format != FORMAT {
        bail!(
            "{}: format {:?}, this build reads {FORMAT:?}",
            file.display(),
            meta.format
        );
    }
    Ok(meta)
}

/// Directory name of the checkpoint after `step` steps.
pub fn step_dir_name(step: u64) -> String {
    format!("step_{step:08}")
}

/// Complete checkpoints under `root`, oldest first: `(step, dir)`.
pub fn list_checkpoints(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    if !root.exists() {
        return Ok(out);
    }
    for e in fs::read_dir(root).with_context(|| format!("{}: cannot list", root.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(n) = name
            .strip_prefix("step_")
            .and_then(|n| n.parse::<u64>().ok())
        {
            if e.path().join(META_FILE).is_file() {
                out.push((n, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

impl Checkpoint {
    pub fn new(meta: CheckpointMeta) -> Self {
        Checkpoint {
            meta,
            groups: BTreeMap::new(),
            dir: PathBuf::new(),
        }
    }

    /// Save under `root` as `step_N` (atomically; see module docs) and keep the newest
    /// `keep` checkpoints (0 keeps all). Returns the checkpoint directory.
    pub fn save(&self, root: &Path, keep: usize) -> Result<PathBuf> {
        self.save_with_hook(root, keep, &mut |_| Ok(()))
    }

    /// [`Checkpoint::save`] with a hook called after each file is written into the
    /// temporary directory (tests use it to simulate a crash mid-save).
    pub fn save_with_hook(
        &self,
        root: &Path,
        keep: usize,
        hook: &mut dyn FnMut(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        let groups: Vec<(String, Vec<StreamTensor<'_>>)> = self
            .groups
            .iter()
            .map(|(g, ts)| (g.clone(), ts.iter().map(StreamTensor::from_ckpt).collect()))
            .collect();
        save_streamed(&self.meta, &groups, root, keep, hook)
    }
}

/// Save a checkpoint whose tensors are written straight from where they live (see
/// [`crate::ckpt_stream`]): `groups` are (file stem, tensors). Atomic as
/// [`Checkpoint::save`] (temporary directory, fsync, rename, fsync); keeps the newest
/// `keep`; `hook` runs after each file is written (crash tests).
pub fn save_streamed(
    meta: &CheckpointMeta,
    groups: &[(String, Vec<StreamTensor<'_>>)],
    root: &Path,
    keep: usize,
    hook: &mut dyn FnMut(&Path) -> Result<()>,
) -> Result<PathBuf> {
    {
        fs::create_dir_all(root)
            .with_context(|| format!("{}: cannot create checkpoint folder", root.display()))?;
        let name = step_dir_name(meta.step);
        let final_dir = root.join(&name);
        let tmp = root.join(format!(".{name}.tmp-{}", std::process::id()));
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;

        let mut meta = meta.clone();
        meta.format = FORMAT.into();
        meta.files.clear();
        let st_meta: BTreeMap<String, String> = [
            ("format".to_string(), "pt".to_string()),
            ("fp8lm.format".to_string(), FORMAT.to_string()),
            ("fp8lm.step".to_string(), meta.step.to_string()),
        ]
        .into();
        for (group, tensors) in groups {
            let fname = format!("{group}.safetensors");
            let path = tmp.join(&fname);
            let (bytes, crc32) = write_group(&path, tensors, &st_meta)
                .with_context(|| format!("checkpoint group {group}"))?;
            meta.files.insert(fname, FileSum { bytes, crc32 });
            hook(&path)?;
        }
        let mpath = tmp.join(META_FILE);
        let mut f = File::create(&mpath)?;
        f.write_all(&encode_meta(&meta)?)?;
        f.sync_all()?;
        hook(&mpath)?;
        fsync_dir(&tmp)?;

        // Re-saving a step (e.g. after a resume) replaces the old directory: move it
        // aside first, since rename cannot replace a non-empty directory.
        let old = root.join(format!(".{name}.old-{}", std::process::id()));
        if final_dir.exists() {
            fs::rename(&final_dir, &old)?;
        }
        fs::rename(&tmp, &final_dir)
            .with_context(|| format!("{}: rename into place failed", final_dir.display()))?;
        fsync_dir(root)?;
        if old.exists() {
            fs::remove_dir_all(&old).ok();
        }
        prune(root, keep)?;
        Ok(final_dir)
    }
}

impl Checkpoint {
    /// Load and verify a checkpoint. `path` may be a checkpoint directory, a folder of
    /// checkpoints (the newest is taken) or a run directory (its `checkpoints/`).
    pub fn load(path: &Path) -> Result<Checkpoint> {
        let dir = resolve(path)?;
        let mpath = dir.join(META_FILE);
        let mbytes =
            fs::read(&mpath).with_context(|| format!("{}: cannot read", mpath.display()))?;
        let meta = decode_meta(&mpath, &mbytes)?;
        let mut groups = BTreeMap::new();
        for (fname, sum) in &meta.files {
            let p = dir.join(fname);
            let bytes =
                fs::read(&p).with_context(|| format!("{}: missing or unreadable", p.display()))?;
            if bytes.len() as u64 != sum.bytes {
                bail!(
                    "{}: {}: {} bytes, expected {} (per {META_FILE})",
                    p.display(),
                    if (bytes.len() as u64) < sum.bytes {
                        "truncated"
                    } else {
                        "wrong size"
                    },
                    bytes.len(),
                    sum.bytes
                );
            }
            let crc = crc_hex(&bytes);
            if crc != sum.crc32 {
                bail!(
                    "{}: corrupted: CRC-32 is {crc}, expected {} (per {META_FILE})",
                    p.display(),
                    sum.crc32
                );
            }
            let group = fname.trim_end_matches(".safetensors").to_string();
            groups.insert(group, parse_group(&p, &bytes)?);
        }
        Ok(Checkpoint { meta, groups, dir })
    }

    /// Refuse a checkpoint whose model shape differs from `cfg`'s, naming the keys.
    pub fn check_model_shape(&self, cfg: &RunConfig) -> Result<()> {
        let (a, b) = (&self.meta.config.model, &cfg.model);
        let mut diffs = Vec::new();
        let mut cmp = |k: &str, x: String, y: String| {
            if x != y {
                diffs.push(format!(
                    "model.{k} is {x} in the checkpoint but {y} in the config"
                ));
            }
        };
        cmp("arch", format!("{:?}", a.arch), format!("{:?}", b.arch));
        cmp("layers", a.layers.to_string(), b.layers.to_string());
        cmp("heads", a.heads.to_string(), b.heads.to_string());
        cmp("channels", a.channels.to_string(), b.channels.to_string());
        cmp("context", a.context.to_string(), b.context.to_string());
        cmp(
            "vocab",
            self.meta.config.vocab().to_string(),
            cfg.vocab().to_string(),
        );
        if !diffs.is_empty() {
            bail!(
                "{}: model shape mismatch: {}",
                self.dir.display(),
                diffs.join("; ")
            );
        }
        Ok(())
    }

    /// A tensor by group and name, checking its shape.
    pub fn tensor(&self, group: &str, name: &str, shape: &[usize]) -> Result<&CkptTensor> {
        let g = self.groups.get(group).with_context(|| {
            format!(
                "{}: no {group}.safetensors in checkpoint",
                self.dir.display()
            )
        })?;
        let t = g.iter().find(|t| t.name == name).with_context(|| {
            format!(
                "{}/{group}.safetensors: no tensor {name}",
                self.dir.display()
            )
        })?;
        if t.shape != shape {
            bail!(
                "{}/{group}.safetensors: tensor {name} has shape {:?} but the model expects {shape:?}",
                self.dir.display(),
                t.shape
            );
        }
        Ok(t)
    }
}

fn prune(root: &Path, keep: usize) -> Result<()> {
    // Leftovers of interrupted saves are never loadable; drop them.
    for e in fs::read_dir(root)? {
        let e = e?;
        let n = e.file_name().to_string_lossy().to_string();
        if n.starts_with(".step_") && (n.contains(".tmp-") || n.contains(".old-")) {
            fs::remove_dir_all(e.path()).ok();
        }
    }
    if keep > 0 {
        let all = list_checkpoints(root)?;
        if all.len() > keep {
            for (_, dir) in &all[..all.len() - keep] {
                fs::remove_dir_all(dir)
                    .with_context(|| format!("{}: cannot remove old checkpoint", dir.display()))?;
            }
        }
    }
    Ok(())
}

/// Find the checkpoint directory `path` refers to (see [`Checkpoint::load`]).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join(META_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    if !path.exists() {
        bail!("{}: no such checkpoint or run directory", path.display());
    }
    for root in [path.join("checkpoints"), path.to_path_buf()] {
        if let Some((_, dir)) = list_checkpoints(&root)?.pop() {
            return Ok(dir);
        }
    }
    bail!(
        "{}: no complete checkpoint found (looked for {META_FILE} in it, in step_* folders, and in checkpoints/step_*)",
        path.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("fp8lm-ckpt-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn sorted(mut ck: Checkpoint) -> BTreeMap<String, Vec<CkptTensor>> {
        for g in ck.groups.values_mut() {
            g.sort_by(|a, b| a.name.cmp(&b.name));
        }
        ck.groups
    }

    pub(crate) fn sample_checkpoint(step: u64) -> Checkpoint {
        let mut meta = CheckpointMeta {
            format: FORMAT.into(),
            step,
            config: RunConfig::default(),
            rng_state: 0xDEAD_BEEF_0123_4567 ^ step,
            data_position: 17 * step,
            scaling: serde_json::json!({"h.0.attn.w": {"scale": 0.5, "amax_history": [1.0, 2.5, 0.125]}}),
            extra: serde_json::json!({"losses": [5.5, 4.25]}),
            files: BTreeMap::new(),
        };
        meta.config.max_steps = 1000;
        let mut ck = Checkpoint::new(meta);
        let w: Vec<f32> = (0..24).map(|i| i as f32 * 0.25 - 3.0).collect();
        let bits: Vec<u8> = (0..12).map(|i| i * 9).collect();
        let h: Vec<f16> = (0..6).map(|i| f16::from_f32(i as f32 * 1.5)).collect();
        ck.groups.insert(
            "model".into(),
            vec![
                CkptTensor::f32("wte", &[4, 6], &w),
                CkptTensor::fp8("h.0.attn.w", CkptDtype::F8E4M3, &[3, 4], &bits, 0.5),
                CkptTensor::fp8("h.0.attn.grad", CkptDtype::F8E5M2, &[12], &bits, 1024.0),
            ],
        );
        ck.groups.insert(
            "optimizer".into(),
            vec![CkptTensor::f16("m.wte", &[2, 3], &h, Some(8.0))],
        );
        ck
    }

    #[test]
    fn save_load_round_trip_is_exact() {
        let d = tmpdir("rt");
        let ck = sample_checkpoint(100);
        let dir = ck.save(&d, 3).unwrap();
        assert_eq!(dir.file_name().unwrap(), "step_00000100");
        let back = Checkpoint::load(&d).unwrap();
        assert_eq!(back.meta.step, 100);
        assert_eq!(back.meta.rng_state, ck.meta.rng_state);
        assert_eq!(back.meta.scaling, ck.meta.scaling);
        assert_eq!(back.meta.config, ck.meta.config);
        assert_eq!(back.groups, sorted(ck.clone()));
        let w = back.tensor("model", "h.0.attn.w", &[3, 4]).unwrap();
        assert_eq!(w.scale, Some(0.5));
        // stored / scale: E4M3 bit 9*1 = 0x09 = 2^-6 * (1 + 1/8) -> 0.017578125 / 0.5.
        assert_eq!(
            w.to_f32().unwrap()[1],
            fp8lm_fp8::Fp8Format::E4M3.decode(9) * 2.0
        );
        let e = back
            .tensor("model", "wte", &[6, 4])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("wte") && e.contains("[4, 6]") && e.contains("[6, 4]"),
            "{e}"
        );
    }

    #[test]
    fn keeps_last_k_and_resolves_newest() {
        let d = tmpdir("keep");
        for s in [10, 20, 30, 40] {
            sample_checkpoint(s).save(&d, 2).unwrap();
        }
        let steps: Vec<u64> = list_checkpoints(&d).unwrap().iter().map(|c| c.0).collect();
        assert_eq!(steps, vec![30, 40]);
        assert_eq!(Checkpoint::load(&d).unwrap().meta.step, 40);
        assert_eq!(
            Checkpoint::load(&d.join("step_00000030"))
                .unwrap()
                .meta
                .step,
            30
        );
    }

    #[test]
    fn crash_mid_save_leaves_previous_checkpoint_loadable() {
        let d = tmpdir("crash");
        sample_checkpoint(10).save(&d, 2).unwrap();
        // Simulate a kill after the first tensor file of step 20 is on disk.
        let r = sample_checkpoint(20).save_with_hook(&d, 2, &mut |p: &Path| {
            if p.ends_with("model.safetensors") {
                bail!("simulated crash")
            }
            Ok(())
        });
        assert!(r.is_err());
        let leftovers: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            leftovers
                .iter()
                .any(|n| n.to_string_lossy().contains(".tmp-")),
            "{leftovers:?}"
        );
        let back = Checkpoint::load(&d).unwrap();
        assert_eq!(back.meta.step, 10);
        assert_eq!(back.groups, sorted(sample_checkpoint(10)));
        // The next successful save cleans the partial directory up.
        sample_checkpoint(30).save(&d, 2).unwrap();
        let names: Vec<String> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
    }

    #[test]
    fn truncated_and_corrupted_files_are_refused_by_name() {
        let d = tmpdir("corrupt");
        let dir = sample_checkpoint(5).save(&d, 0).unwrap();
        let model = dir.join("model.safetensors");
        let good = fs::read(&model).unwrap();

        fs::write(&model, &good[..good.len() - 7]).unwrap();
        let e = format!("{:#}", Checkpoint::load(&dir).unwrap_err());
        assert!(
            e.contains("model.safetensors") && e.contains("truncated"),
            "{e}"
        );

        let mut flipped = good.clone();
        let n = flipped.len();
        flipped[n - 3] ^= 0x10;
        fs::write(&model, &flipped).unwrap();
        let e = format!("{:#}", Checkpoint::load(&dir).unwrap_err());
        assert!(
            e.contains("model.safetensors") && e.contains("corrupted"),
            "{e}"
        );
        fs::write(&model, &good).unwrap();

        let meta = dir.join(META_FILE);
        let text = fs::read_to_string(&meta).unwrap();
        fs::write(&meta, text.replace("\"step\": 5", "\"step\": 6")).unwrap();
        let e = format!("{:#}", Checkpoint::load(&dir).unwrap_err());
        assert!(e.contains(META_FILE) && e.contains("checksum"), "{e}");
        fs::write(&meta, &text[..text.len() / 2]).unwrap();
        let e = format!("{:#}", Checkpoint::load(&dir).unwrap_err());
        assert!(e.contains(META_FILE) && e.contains("truncated"), "{e}");
        fs::write(&meta, &text).unwrap();
        assert!(Checkpoint::load(&dir).is_ok());
    }

    #[test]
    fn other_model_shape_is_refused_naming_the_mismatch() {
        let ck = sample_checkpoint(1);
        let mut cfg = ck.meta.config.clone();
        assert!(ck.check_model_shape(&cfg).is_ok());
        cfg.model.channels = 128;
        cfg.model.layers = 3;
        let e = ck.check_model_shape(&cfg).unwrap_err().to_string();
        assert!(
            e.contains("model.channels is 64 in the checkpoint but 128"),
            "{e}"
        );
        assert!(
            e.contains("model.layers is 2 in the checkpoint but 3"),
            "{e}"
        );
    }
}
