//! Scaled tensors: low-precision values plus one f32 scale, `real = stored / scale`.
//!
//! Casting in computes the input's amax in the same pass as the cast (what delayed
//! scaling records); the current recipe needs the amax *before* casting and so reads
//! the input once more (a SIMD amax pass, much cheaper than the cast).

use crate::cast;
use crate::format::Fp8Format;
use crate::scaling::{scale_for_amax, ScaleRounding, ScaleState};
use half::f16;

fn numel(shape: &[usize], len: usize, what: &str) -> usize {
    let n: usize = shape.iter().product();
    assert_eq!(
        n, len,
        "{what}: shape {shape:?} holds {n} elements but the input has {len}"
    );
    n
}

/// Why a scaled tensor could not be built from parts (e.g. loaded from a checkpoint).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScaledError {
    #[error("shape {shape:?} holds {expected} elements but the data has {actual}")]
    Length {
        shape: Vec<usize>,
        expected: usize,
        actual: usize,
    },
    #[error("scale {0} is not a positive finite number (real = stored / scale)")]
    Scale(f32),
}

fn check_parts(shape: &[usize], len: usize, scale: f32) -> Result<(), ScaledError> {
    let expected: usize = shape.iter().product();
    if expected != len {
        return Err(ScaledError::Length {
            shape: shape.to_vec(),
            expected,
            actual: len,
        });
    }
    if !(scale.is_finite() && scale > 0.0) {
        return Err(ScaledError::Scale(scale));
    }
    Ok(())
}

/// An FP8 tensor with a per-tensor scale.
#[derive(Clone, Debug, PartialEq)]
pub struct ScaledFp8 {
    /// FP8 codes of `real * scale`, row-major.
    pub data: Vec<u8>,
    pub shape: Vec<usize>,
    pub format: Fp8Format,
    /// `stored = fp8(real * scale)`, `real = stored / scale`.
    pub scale: f32,
}

impl ScaledFp8 {
    /// Build from parts, checking that `data` fills `shape` and the scale is usable.
    pub fn from_parts(
        data: Vec<u8>,
        shape: &[usize],
        format: Fp8Format,
        scale: f32,
    ) -> Result<Self, ScaledError> {
        check_parts(shape, data.len(), scale)?;
        Ok(ScaledFp8 {
            data,
            shape: shape.to_vec(),
            format,
            scale,
        })
    }

    pub fn zeros(shape: &[usize], format: Fp8Format) -> Self {
        ScaledFp8 {
            data: vec![0; shape.iter().product()],
            shape: shape.to_vec(),
            format,
            scale: 1.0,
        }
    }

    /// Quantise with current scaling (scale from this tensor's amax, power of two,
    /// `margin` binades of head-room). Returns the tensor and the input amax. An
    /// all-zero or non-finite input gets scale 1.
    pub fn quantize_current(
        src: &[f32],
        shape: &[usize],
        format: Fp8Format,
        margin: i32,
    ) -> (Self, f32) {
        numel(shape, src.len(), "ScaledFp8::quantize_current");
        let amax = cast::amax_f32(src);
        let scale =
            scale_for_amax(format.max(), amax, margin, ScaleRounding::PowerOfTwo).unwrap_or(1.0);
        let mut t = Self::zeros(shape, format);
        t.scale = scale;
        cast::f32_to_fp8_amax(format, src, scale, &mut t.data);
        (t, amax)
    }

    /// Quantise under a scaling recipe's state (current or delayed; the state's format
    /// is used). Returns the tensor and the input amax.
    pub fn quantize(src: &[f32], shape: &[usize], state: &mut ScaleState) -> (Self, f32) {
        let mut t = Self::zeros(shape, state.format);
        let amax = t.requantize(src, state);
        (t, amax)
    }

    /// Re-fill this tensor from `src` under `state` (same shape; format becomes the
    /// state's). Returns the input amax.
    pub fn requantize(&mut self, src: &[f32], state: &mut ScaleState) -> f32 {
        numel(&self.shape, src.len(), "ScaledFp8::requantize");
        self.format = state.format;
        let q = state.quantize(src, &mut self.data);
        self.scale = q.scale;
        q.amax
    }

    /// Quantise with a given scale; returns the input amax from the same pass.
    pub fn quantize_with_scale(&mut self, src: &[f32], scale: f32) -> f32 {
        numel(&self.shape, src.len(), "ScaledFp8::quantize_with_scale");
        self.scale = scale;
        cast::f32_to_fp8_amax(self.format, src, scale, &mut self.data)
    }

    /// `dst[i] = decode(data[i]) / scale` (as a multiply by `1/scale`, exact for the
    /// default power-of-two scales).
    pub fn dequantize_into(&self, dst: &mut [f32]) {
        cast::fp8_to_f32_amax(self.format, &self.data, 1.0 / self.scale, dst);
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let mut v = vec![0f32; self.data.len()];
        self.dequantize_into(&mut v);
        v
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// An FP16 tensor with a per-tensor scale (master weights, second moments).
#[derive(Clone, Debug, PartialEq)]
pub struct ScaledF16 {
    pub data: Vec<f16>,
    pub shape: Vec<usize>,
    /// `stored = f16(real * scale)`, `real = stored / scale`.
    pub scale: f32,
}

impl ScaledF16 {
    /// Largest finite f16.
    pub const FMT_MAX: f32 = 65504.0;

    /// Build from parts, checking that `data` fills `shape` and the scale is usable.
    pub fn from_parts(data: Vec<f16>, shape: &[usize], scale: f32) -> Result<Self, ScaledError> {
        check_parts(shape, data.len(), scale)?;
        Ok(ScaledF16 {
            data,
            shape: shape.to_vec(),
            scale,
        })
    }

    pub fn zeros(shape: &[usize]) -> Self {
        ScaledF16 {
            data: vec![f16::ZERO; shape.iter().product()],
            shape: shape.to_vec(),
            scale: 1.0,
        }
    }

    /// Quantise with a power-of-two scale from the input amax (margin in binades).
    /// Returns the tensor and the input amax. An all-zero or non-finite input gets
    /// scale 1.
    pub fn quantize_current(src: &[f32], shape: &[usize], margin: i32) -> (Self, f32) {
        numel(shape, src.len(), "ScaledF16::quantize_current");
        let amax = cast::amax_f32(src);
        let scale =
            scale_for_amax(Self::FMT_MAX, amax, margin, ScaleRounding::PowerOfTwo).unwrap_or(1.0);
        let mut t = Self::zeros(shape);
        t.quantize_with_scale(src, scale);
        (t, amax)
    }

    /// Quantise with a given scale (round to nearest even); returns the input amax.
    pub fn quantize_with_scale(&mut self, src: &[f32], scale: f32) -> f32 {
        numel(&self.shape, src.len(), "ScaledF16::quantize_with_scale");
        self.scale = scale;
        cast::f32_to_f16_amax(src, scale, &mut self.data)
    }

    pub fn dequantize_into(&self, dst: &mut [f32]) {
        cast::f16_to_f32_amax(&self.data, 1.0 / self.scale, dst);
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let mut v = vec![0f32; self.data.len()];
        self.dequantize_into(&mut v);
        v
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}
