//! The tensor format: safetensors files with their real dtypes. FP8 tensors use the
//! standard `F8_E4M3` / `F8_E5M2` dtypes, and their f32 scale is a separate 1-element
//! tensor `<name>.scale` (`real = stored / scale`), so any safetensors reader (Python
//! `safetensors`) opens them. Written by [`super::stream`]; read whole here, or by range
//! ([`super::shard`]).

use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use safetensors::tensor::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

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
    pub(crate) fn to_st(self) -> Dtype {
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
    pub(crate) fn from_st(d: Dtype) -> Option<Self> {
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

/// Read one safetensors file on its own (no checksum: that lives in `checkpoint.json`),
/// pairing FP8 tensors with their `.scale` tensors.
pub fn read_safetensors_file(file: &Path) -> Result<Vec<CkptTensor>> {
    let bytes = fs::read(file).with_context(|| format!("{}: cannot read", file.display()))?;
    parse_group(file, &bytes)
}

pub(crate) fn parse_group(file: &Path, bytes: &[u8]) -> Result<Vec<CkptTensor>> {
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
