//! Scaled tensors: low-precision values plus one f32 scale, `real = stored / scale`.

use crate::cast;
use crate::format::Fp8Format;
use crate::scaling::{scale_for_amax, ScaleRounding};
use half::f16;

/// An FP8 tensor with a per-tensor scale.
#[derive(Clone, Debug, PartialEq)]
pub struct ScaledFp8 {
    pub data: Vec<u8>,
    pub shape: Vec<usize>,
    pub format: Fp8Format,
    pub scale: f32,
}

impl ScaledFp8 {
    pub fn zeros(shape: &[usize], format: Fp8Format) -> Self {
        ScaledFp8 {
            data: vec![0; shape.iter().product()],
            shape: shape.to_vec(),
            format,
            scale: 1.0,
        }
    }

    /// Quantise with current scaling (scale from this tensor's amax, power of two).
    /// Returns the tensor and the input amax.
    pub fn quantize_current(
        src: &[f32],
        shape: &[usize],
        format: Fp8Format,
        margin: i32,
    ) -> (Self, f32) {
        let amax = cast::amax_f32(src);
        let scale =
            scale_for_amax(format.max(), amax, margin, ScaleRounding::PowerOfTwo).unwrap_or(1.0);
        let mut t = Self::zeros(shape, format);
        t.scale = scale;
        cast::f32_to_fp8_amax(format, src, scale, &mut t.data);
        (t, amax)
    }

    /// Quantise with a given scale; returns the input amax from the same pass.
    pub fn quantize_with_scale(&mut self, src: &[f32], scale: f32) -> f32 {
        self.scale = scale;
        cast::f32_to_fp8_amax(self.format, src, scale, &mut self.data)
    }

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
    pub scale: f32,
}

impl ScaledF16 {
    pub const FMT_MAX: f32 = 65504.0;

    pub fn zeros(shape: &[usize]) -> Self {
        ScaledF16 {
            data: vec![f16::ZERO; shape.iter().product()],
            shape: shape.to_vec(),
            scale: 1.0,
        }
    }

    /// Quantise with a power-of-two scale from the input amax (margin in binades).
    pub fn quantize_current(src: &[f32], shape: &[usize], margin: i32) -> (Self, f32) {
        let amax = cast::amax_f32(src);
        let scale =
            scale_for_amax(Self::FMT_MAX, amax, margin, ScaleRounding::PowerOfTwo).unwrap_or(1.0);
        let data = src.iter().map(|&x| f16::from_f32(x * scale)).collect();
        (
            ScaledF16 {
                data,
                shape: shape.to_vec(),
                scale,
            },
            amax,
        )
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let inv = 1.0 / self.scale;
        self.data.iter().map(|x| x.to_f32() * inv).collect()
    }
}
