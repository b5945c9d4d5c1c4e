//! `Tensor`: storage, shape, element type and scaling, kept together so that an FP8
//! tensor's scale and amax travel with its bytes.
//!
//! - [`DType`]: f32, bf16, f16, E4M3, E5M2.
//! - [`Storage`]: where the elements live. Today only [`Storage::Host`] (both CPU
//!   backends work on host memory); the enum is `#[non_exhaustive]` so that a device
//!   backend adds its own variant (a device allocation and the stream it is ordered on)
//!   and host code that matches on storage must say what it does with one.
//! - [`Scaling`]: none (f32 / bf16 / f16 compute tensors), one per-tensor scale with
//!   the amax of the values the bytes were cast from, or one scale per tile (the block
//!   recipe: `fp8lm_fp8::block`). `real = stored / scale`.
//!
//! Scales and amaxes stay with their tensors on the backend that wrote them: the cast
//! ([`crate::Backend::cast_fp8_tensor`]) writes bytes, scale and amax in one call, and
//! the GEMM reads the scale from the tensor ([`Tensor::mat`]). A GPU backend keeps them
//! in device memory next to the bytes and must not synchronise with the host for each
//! tensor's amax; the host reads them only when it reports metrics. (On the host
//! backends the scale and amax are plain f32 fields.)

use crate::gemm::blockscaled::{BlockFp8, BlockOperand};
use crate::MatRef;
use fp8lm_fp8::Fp8Format;
use half::{bf16, f16};

/// Element type of a [`Tensor`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    Bf16,
    F16,
    E4M3,
    E5M2,
}

impl DType {
    pub fn of_fp8(format: Fp8Format) -> DType {
        match format {
            Fp8Format::E4M3 => DType::E4M3,
            Fp8Format::E5M2 => DType::E5M2,
        }
    }
    /// The FP8 format, for the FP8 types.
    pub fn fp8(self) -> Option<Fp8Format> {
        match self {
            DType::E4M3 => Some(Fp8Format::E4M3),
            DType::E5M2 => Some(Fp8Format::E5M2),
            _ => None,
        }
    }
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 | DType::F16 => 2,
            DType::E4M3 | DType::E5M2 => 1,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
            DType::E4M3 => "e4m3",
            DType::E5M2 => "e5m2",
        }
    }
}

/// Host elements of one [`DType`] (FP8 as raw codes).
#[derive(Clone, Debug, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
    Fp8(Vec<u8>),
}

/// Where a tensor's elements live (see the module docs).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Storage {
    Host(HostData),
}

/// How stored values relate to real ones: `real = stored / scale`.
#[derive(Clone, Debug, PartialEq)]
pub enum Scaling {
    /// Stored values are the real ones.
    None,
    /// One scale for the tensor, and the amax (unscaled) of the values it was cast from.
    PerTensor { scale: f32, amax: f32 },
    /// One scale per `tile` (rows x cols) of a `[rows, cols]` matrix, row-major grid,
    /// and the amax of the whole matrix.
    Blocks {
        cols: usize,
        tile: (usize, usize),
        scales: Vec<f32>,
        amax: f32,
    },
}

/// A tensor: storage owned by a backend, shape, element type and scaling.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    storage: Storage,
    shape: Vec<usize>,
    dtype: DType,
    scaling: Scaling,
}

impl Tensor {
    /// Zeros of `dtype` in host memory. FP8 tensors start per-tensor scaled with scale
    /// 1 and amax 0 (nothing cast yet).
    pub fn zeros(dtype: DType, shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        let data = match dtype {
            DType::F32 => HostData::F32(vec![0.0; n]),
            DType::Bf16 => HostData::Bf16(vec![bf16::ZERO; n]),
            DType::F16 => HostData::F16(vec![f16::ZERO; n]),
            DType::E4M3 | DType::E5M2 => HostData::Fp8(vec![0; n]),
        };
        let scaling = match dtype.fp8() {
            Some(_) => Scaling::PerTensor {
                scale: 1.0,
                amax: 0.0,
            },
            None => Scaling::None,
        };
        Tensor {
            storage: Storage::Host(data),
            shape: shape.to_vec(),
            dtype,
            scaling,
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Bytes of the elements (scales not counted).
    pub fn size_bytes(&self) -> usize {
        self.numel() * self.dtype.size_bytes()
    }
    pub fn scaling(&self) -> &Scaling {
        &self.scaling
    }
    pub fn set_scaling(&mut self, s: Scaling) {
        self.scaling = s;
    }
    pub fn scaling_mut(&mut self) -> &mut Scaling {
        &mut self.scaling
    }
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The per-tensor scale, or the smallest tile scale of a block-scaled tensor (None
    /// for unscaled tensors).
    pub fn scale(&self) -> Option<f32> {
        match &self.scaling {
            Scaling::None => None,
            Scaling::PerTensor { scale, .. } => Some(*scale),
            Scaling::Blocks { scales, .. } => {
                Some(scales.iter().copied().fold(f32::INFINITY, f32::min))
            }
        }
    }
    /// The amax recorded with the bytes (None for unscaled tensors).
    pub fn amax(&self) -> Option<f32> {
        match &self.scaling {
            Scaling::None => None,
            Scaling::PerTensor { amax, .. } | Scaling::Blocks { amax, .. } => Some(*amax),
        }
    }
    /// The tile scales of a block-scaled tensor (empty otherwise).
    pub fn block_scales(&self) -> &[f32] {
        match &self.scaling {
            Scaling::Blocks { scales, .. } => scales,
            _ => &[],
        }
    }

    /// The FP8 codes (panics for another dtype: a programming error).
    pub fn fp8_bytes(&self) -> &[u8] {
        match &self.storage {
            Storage::Host(HostData::Fp8(v)) => v,
            _ => panic!("fp8_bytes: tensor is {}", self.dtype.name()),
        }
    }
    /// The FP8 codes, mutable.
    pub fn fp8_bytes_mut(&mut self) -> &mut [u8] {
        self.fp8_parts_mut().0
    }
    /// The FP8 codes and the scaling, both mutable (what a cast writes).
    pub fn fp8_parts_mut(&mut self) -> (&mut [u8], &mut Scaling) {
        match &mut self.storage {
            Storage::Host(HostData::Fp8(v)) => (v, &mut self.scaling),
            _ => panic!("fp8_parts_mut: tensor is {}", self.dtype.name()),
        }
    }

    /// Reshape to a flat `[n]`, growing the storage if needed (zeros) and keeping what is
    /// held (for buffers lent to tensors of several sizes).
    pub fn ensure_len(&mut self, n: usize) {
        if self.numel() >= n {
            return;
        }
        match &mut self.storage {
            Storage::Host(HostData::F32(v)) => v.resize(n, 0.0),
            Storage::Host(HostData::Bf16(v)) => v.resize(n, bf16::ZERO),
            Storage::Host(HostData::F16(v)) => v.resize(n, f16::ZERO),
            Storage::Host(HostData::Fp8(v)) => v.resize(n, 0),
        }
        self.shape = vec![n];
    }

    /// The first `len` elements as a GEMM operand, with the tensor's per-tensor scale
    /// (panics for a block-scaled tensor: use [`Tensor::block_operand`]).
    pub fn mat(&self, len: usize) -> MatRef<'_> {
        match (&self.storage, &self.scaling) {
            (Storage::Host(HostData::F32(v)), _) => MatRef::F32(&v[..len]),
            (Storage::Host(HostData::Bf16(v)), _) => MatRef::Bf16(&v[..len]),
            (Storage::Host(HostData::Fp8(v)), Scaling::PerTensor { scale, .. }) => MatRef::Fp8 {
                data: &v[..len],
                format: self.dtype.fp8().expect("FP8 storage has an FP8 dtype"),
                scale: *scale,
            },
            _ => panic!(
                "mat: a {} tensor with {:?} scaling is not a per-tensor GEMM operand",
                self.dtype.name(),
                self.scaling
            ),
        }
    }

    /// The first `len` elements as an operand of `Backend::gemm_blocks`: block-scaled
    /// FP8 when the tensor is, else [`Tensor::mat`].
    pub fn block_operand(&self, len: usize) -> BlockOperand<'_> {
        match &self.scaling {
            Scaling::Blocks {
                cols, tile, scales, ..
            } => BlockOperand::Blocks(BlockFp8 {
                data: &self.fp8_bytes()[..len],
                format: self.dtype.fp8().expect("block scaling on an FP8 tensor"),
                rows: len / (*cols).max(1),
                cols: *cols,
                block: *tile,
                scales,
            }),
            _ => BlockOperand::Mat(self.mat(len)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_tensor_carries_its_scale_into_the_gemm_operand() {
        let mut t = Tensor::zeros(DType::E5M2, &[2, 3]);
        assert_eq!((t.numel(), t.size_bytes()), (6, 6));
        assert_eq!((t.scale(), t.amax()), (Some(1.0), Some(0.0)));
        t.set_scaling(Scaling::PerTensor {
            scale: 8.0,
            amax: 3.5,
        });
        match t.mat(6) {
            MatRef::Fp8 { format, scale, .. } => {
                assert_eq!((format, scale), (Fp8Format::E5M2, 8.0))
            }
            m => panic!("{m:?}"),
        }
        t.ensure_len(10);
        assert_eq!((t.shape(), t.fp8_bytes().len()), (&[10][..], 10));
        let f = Tensor::zeros(DType::Bf16, &[4]);
        assert_eq!((f.scale(), f.size_bytes()), (None, 8));
    }

    #[test]
    #[should_panic(expected = "fp8_bytes: tensor is f32")]
    fn fp8_bytes_of_an_f32_tensor_is_refused() {
        Tensor::zeros(DType::F32, &[1]).fp8_bytes();
    }
}
