//! Streaming safetensors writer: checkpoints write each tensor straight from where it
//! lives (model buffers, optimizer state) to the file, so saving holds no second copy of
//! the state. The file is a standard safetensors file (8-byte little-endian header
//! length, JSON header padded with spaces to 8 bytes, then the tensors' bytes in header
//! order); its size and CRC-32 are computed while it is written.

use super::format::{CkptDtype, CkptTensor};
use anyhow::{bail, Context, Result};
use fp8lm_optim::StateRef;
use half::f16;
use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// Where a tensor's bytes come from (borrowed: nothing is copied before writing).
pub enum TensorData<'a> {
    /// Already little-endian bytes (a loaded or in-memory [`CkptTensor`]).
    Raw(&'a [u8]),
    F32(&'a [f32]),
    F16(&'a [f16]),
    F64(Vec<f64>),
}

impl TensorData<'_> {
    fn byte_len(&self) -> usize {
        match self {
            TensorData::Raw(b) => b.len(),
            TensorData::F32(v) => 4 * v.len(),
            TensorData::F16(v) => 2 * v.len(),
            TensorData::F64(v) => 8 * v.len(),
        }
    }

    /// Little-endian bytes to `out`, 64 KiB at a time.
    fn write(&self, out: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        const N: usize = 1 << 14;
        let mut buf = Vec::with_capacity(8 * N);
        match self {
            TensorData::Raw(b) => return out(b),
            TensorData::F32(v) => {
                for c in v.chunks(N) {
                    buf.clear();
                    c.iter()
                        .for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
                    out(&buf)?;
                }
            }
            TensorData::F16(v) => {
                for c in v.chunks(N) {
                    buf.clear();
                    c.iter()
                        .for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
                    out(&buf)?;
                }
            }
            TensorData::F64(v) => {
                for c in v.chunks(N) {
                    buf.clear();
                    c.iter()
                        .for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
                    out(&buf)?;
                }
            }
        }
        Ok(())
    }
}

/// One tensor to write: name, dtype, shape, FP8 scale (written as `<name>.scale`).
pub struct StreamTensor<'a> {
    pub name: String,
    pub dtype: CkptDtype,
    pub shape: Vec<usize>,
    pub scale: Option<f32>,
    pub data: TensorData<'a>,
}

impl<'a> StreamTensor<'a> {
    pub fn from_ckpt(t: &'a CkptTensor) -> Self {
        StreamTensor {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            scale: t.scale,
            data: TensorData::Raw(&t.bytes),
        }
    }

    /// An optimizer state entry as checkpoints store it (see `snapshot`).
    pub fn from_state(name: &str, st: StateRef<'a>) -> Self {
        let (dtype, shape, scale, data) = match st {
            StateRef::F32(v) => (CkptDtype::F32, vec![v.len()], None, TensorData::F32(v)),
            StateRef::F16 { data, scale } => (
                CkptDtype::F16,
                vec![data.len()],
                Some(scale),
                TensorData::F16(data),
            ),
            StateRef::Fp8(t) => (
                match t.format {
                    fp8lm_fp8::Fp8Format::E4M3 => CkptDtype::F8E4M3,
                    fp8lm_fp8::Fp8Format::E5M2 => CkptDtype::F8E5M2,
                },
                t.shape.clone(),
                Some(t.scale),
                TensorData::Raw(&t.data),
            ),
            StateRef::Scalar(x) => (CkptDtype::F64, vec![1], None, TensorData::F64(vec![x])),
        };
        StreamTensor {
            name: name.into(),
            dtype,
            shape,
            scale,
            data,
        }
    }
}

/// Write `tensors` (and their scales) as one safetensors file at `path`, fsynced.
/// Returns (bytes, CRC-32 as 8 hex digits).
pub fn write_group(
    path: &Path,
    tensors: &[StreamTensor<'_>],
    meta: &BTreeMap<String, String>,
) -> Result<(u64, String)> {
    let mut names = HashSet::new();
    for t in tensors {
        if !names.insert(t.name.clone()) {
            bail!("duplicate tensor name {}", t.name);
        }
        if t.dtype.is_fp8() && t.scale.is_none() {
            bail!("tensor {}: FP8 tensor without a scale", t.name);
        }
        let n: usize = t.shape.iter().product();
        if n * t.dtype.size() != t.data.byte_len() {
            bail!(
                "tensor {}: {} bytes for shape {:?}",
                t.name,
                t.data.byte_len(),
                t.shape
            );
        }
    }
    for t in tensors.iter().filter(|t| t.scale.is_some()) {
        let n = format!("{}.scale", t.name);
        if names.contains(&n) {
            bail!(
                "tensor name {n} collides with the scale of tensor {}",
                t.name
            );
        }
    }
    // Header: tensors in order, then the scales (one F32 each).
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!(meta));
    let mut off = 0usize;
    for t in tensors {
        let len = t.data.byte_len();
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [off, off + len]}),
        );
        off += len;
    }
    for t in tensors.iter().filter(|t| t.scale.is_some()) {
        header.insert(
            format!("{}.scale", t.name),
            serde_json::json!({"dtype": "F32", "shape": [1], "data_offsets": [off, off + 4]}),
        );
        off += 4;
    }
    let mut h = serde_json::to_string(&serde_json::Value::Object(header))?.into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let f = File::create(path).with_context(|| format!("{}: cannot create", path.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, f);
    let mut crc = crc32fast::Hasher::new();
    let mut total = 0u64;
    let mut put = |b: &[u8]| -> Result<()> {
        crc.update(b);
        total += b.len() as u64;
        w.write_all(b)
            .with_context(|| format!("{}: write failed", path.display()))
    };
    put(&(h.len() as u64).to_le_bytes())?;
    put(&h)?;
    for t in tensors {
        t.data.write(&mut put)?;
    }
    for t in tensors {
        if let Some(s) = t.scale {
            put(&s.to_le_bytes())?;
        }
    }
    let f = w
        .into_inner()
        .map_err(|e| anyhow::anyhow!("{}: write failed: {e}", path.display()))?;
    f.sync_all()
        .with_context(|| format!("{}: fsync failed", path.display()))?;
    Ok((total, format!("{:08x}", crc.finalize())))
}
