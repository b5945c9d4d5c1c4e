//! Typed storage of one optimizer state and chunk views of it for the fused pass.

use super::{StateFormat, CHUNK};
use crate::api::StateTensor;
use crate::lanes::{f32_to_f16_with_view, fp8_to_f32_scaled};
use fp8lm_fp8::cast::{self, Backend};
use fp8lm_fp8::{CastMode, Fp8Format, ScaledF16, ScaledFp8};
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

/// One stored state tensor.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Buf {
    F32(Vec<f32>),
    F16(ScaledF16),
    Fp8(ScaledFp8),
}

impl Buf {
    pub(super) fn zeros(fmt: StateFormat, shape: &[usize]) -> Buf {
        match fmt {
            StateFormat::F32 => Buf::F32(vec![0.0; shape.iter().product()]),
            StateFormat::F16 => Buf::F16(ScaledF16::zeros(shape)),
            StateFormat::Fp8(f) => Buf::Fp8(ScaledFp8::zeros(shape, f)),
        }
    }
    pub(super) fn format(&self) -> StateFormat {
        match self {
            Buf::F32(_) => StateFormat::F32,
            Buf::F16(_) => StateFormat::F16,
            Buf::Fp8(t) => StateFormat::Fp8(t.format),
        }
    }
    pub(super) fn len(&self) -> usize {
        match self {
            Buf::F32(d) => d.len(),
            Buf::F16(t) => t.data.len(),
            Buf::Fp8(t) => t.data.len(),
        }
    }
    pub(super) fn scale(&self) -> f32 {
        match self {
            Buf::F32(_) => 1.0,
            Buf::F16(t) => t.scale,
            Buf::Fp8(t) => t.scale,
        }
    }
    pub(super) fn set_scale(&mut self, s: f32) {
        match self {
            Buf::F32(_) => {}
            Buf::F16(t) => t.scale = s,
            Buf::Fp8(t) => t.scale = s,
        }
    }
    pub(super) fn data_bytes(&self) -> usize {
        self.len() * self.format().bytes_per_elem()
    }
    pub(super) fn chunks_mut(&mut self) -> Vec<ChunkMut<'_>> {
        match self {
            Buf::F32(d) => d.chunks_mut(CHUNK).map(ChunkMut::F32).collect(),
            Buf::F16(t) => t
                .data
                .reinterpret_cast_mut()
                .chunks_mut(CHUNK)
                .map(ChunkMut::F16)
                .collect(),
            Buf::Fp8(t) => {
                let f = t.format;
                t.data
                    .chunks_mut(CHUNK)
                    .map(|c| ChunkMut::Fp8(c, f))
                    .collect()
            }
        }
    }
    /// `dst[i] = stored[c * CHUNK + i] / scale` for chunk `c` (`dst` its length).
    pub(super) fn decode_chunk(&self, c: usize, inv_scale: f32, dst: &mut [f32]) {
        let r = c * CHUNK..c * CHUNK + dst.len();
        match self {
            Buf::F32(d) => dst.copy_from_slice(&d[r]),
            Buf::F16(t) => {
                cast::f16_to_f32_amax(&t.data[r], inv_scale, dst);
            }
            Buf::Fp8(t) => fp8_to_f32_scaled(t.format, &t.data[r], inv_scale, dst),
        }
    }
    /// Real values (stored / scale).
    pub(super) fn to_f32(&self) -> Vec<f32> {
        match self {
            Buf::F32(d) => d.clone(),
            Buf::F16(t) => t.dequantize(),
            Buf::Fp8(t) => t.dequantize(),
        }
    }
    pub(super) fn as_state_ref(&self) -> crate::api::StateRef<'_> {
        use crate::api::StateRef;
        match self {
            Buf::F32(d) => StateRef::F32(d),
            Buf::F16(t) => StateRef::F16 {
                data: &t.data,
                scale: t.scale,
            },
            Buf::Fp8(t) => StateRef::Fp8(t),
        }
    }
    pub(super) fn to_state(&self) -> StateTensor {
        match self {
            Buf::F32(d) => StateTensor::F32(d.clone()),
            Buf::F16(t) => StateTensor::F16 {
                data: t.data.clone(),
                scale: t.scale,
            },
            Buf::Fp8(t) => StateTensor::Fp8(t.clone()),
        }
    }
    /// Replace the contents from a checkpoint entry of the same format and length.
    pub(super) fn load(&mut self, st: StateTensor, name: &str) -> Result<(), String> {
        let want = self.format();
        let n = self.len();
        let bad_len =
            |got: usize| format!("optimizer state {name:?}: {got} elements, the parameter has {n}");
        let bad_scale =
            |s: f32| format!("optimizer state {name:?}: scale {s} is not a positive finite number");
        match (self, st) {
            (Buf::F32(d), StateTensor::F32(v)) => {
                if v.len() != n {
                    return Err(bad_len(v.len()));
                }
                *d = v;
            }
            (Buf::F16(t), StateTensor::F16 { data, scale }) => {
                if data.len() != n {
                    return Err(bad_len(data.len()));
                }
                if !(scale.is_finite() && scale > 0.0) {
                    return Err(bad_scale(scale));
                }
                t.data = data;
                t.scale = scale;
            }
            (Buf::Fp8(t), StateTensor::Fp8(q)) => {
                if q.data.len() != n {
                    return Err(bad_len(q.data.len()));
                }
                if q.format != t.format {
                    return Err(format!(
                        "optimizer state {name:?}: stored as {}, this run keeps it as {}",
                        q.format.name(),
                        t.format.name()
                    ));
                }
                if !(q.scale.is_finite() && q.scale > 0.0) {
                    return Err(bad_scale(q.scale));
                }
                t.data = q.data;
                t.scale = q.scale;
            }
            (_, st) => {
                let got = match st {
                    StateTensor::F32(_) => "f32",
                    StateTensor::F16 { .. } => "f16",
                    StateTensor::Fp8(_) => "fp8",
                    StateTensor::Scalar(_) => "a scalar",
                };
                return Err(format!(
                    "optimizer state {name:?}: stored as {got}, this run keeps it as {}",
                    want.name()
                ));
            }
        }
        Ok(())
    }
}

/// A mutable chunk of one state, typed by format.
///
/// Decodes and encodes go through the fp8 crate's bulk casts (AVX2 + F16C when the CPU
/// has them, picked at run time; bit-identical to the scalar references, which their
/// tests check on every input class). FP8 encodes use [`CastMode::SatAll`], i.e.
/// exactly `Fp8Format::encode(x, true)`: finite overflow and infinities saturate.
pub enum ChunkMut<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [u16]),
    Fp8(&'a mut [u8], Fp8Format),
}

impl ChunkMut<'_> {
    /// `dst[i] = stored[i] / scale`.
    #[inline(always)]
    pub(crate) fn decode(&self, inv_scale: f32, dst: &mut [f32]) {
        match self {
            ChunkMut::F32(s) => dst.copy_from_slice(s),
            ChunkMut::F16(s) => {
                cast::f16_to_f32_amax(s.reinterpret_cast(), inv_scale, dst);
            }
            ChunkMut::Fp8(s, f) => fp8_to_f32_scaled(*f, s, inv_scale, dst),
        }
    }
    /// `stored[i] = encode(src[i] * scale)`.
    #[inline(always)]
    pub(super) fn encode(&mut self, src: &[f32], scale: f32) {
        match self {
            ChunkMut::F32(s) => s.copy_from_slice(src),
            ChunkMut::F16(s) => {
                cast::f32_to_f16_amax(src, scale, s.reinterpret_cast_mut());
            }
            ChunkMut::Fp8(s, f) => {
                let b = Backend::detect();
                cast::f32_to_fp8_amax_with(*f, CastMode::SatAll, b, src, scale, s);
            }
        }
    }
    /// [`Self::encode`], then `view[i] = stored[i] / scale` (the compute weights).
    #[inline(always)]
    pub(super) fn encode_with_view(&mut self, src: &[f32], scale: f32, view: &mut [f32]) {
        match self {
            ChunkMut::F16(s) => f32_to_f16_with_view(src, scale, 1.0 / scale, s, view),
            _ => {
                self.encode(src, scale);
                self.decode(1.0 / scale, view);
            }
        }
    }
    /// `stored[i] = encode(decode(stored[i]) * factor)`; exact for a power-of-two factor
    /// except in the subnormal range. At most CHUNK elements (one stack row).
    pub(crate) fn rescale(&mut self, factor: f32) {
        let mut buf = [0f32; CHUNK];
        match self {
            ChunkMut::F32(_) => {}
            ChunkMut::F16(s) => {
                let buf = &mut buf[..s.len()];
                cast::f16_to_f32_amax(s.reinterpret_cast(), factor, buf);
                cast::f32_to_f16_amax(buf, 1.0, s.reinterpret_cast_mut());
            }
            ChunkMut::Fp8(s, f) => {
                let buf = &mut buf[..s.len()];
                fp8_to_f32_scaled(*f, s, factor, buf);
                let b = Backend::detect();
                cast::f32_to_fp8_amax_with(*f, CastMode::SatAll, b, buf, 1.0, s);
            }
        }
    }
}

/// A chunk of the incoming gradient with grad_scale (and the FP8 tensor's 1/scale, a
/// power of two, so the multiply equals the reference's exact division).
#[derive(Clone, Copy, Debug)]
pub enum GradChunk<'a> {
    F32(&'a [f32], f32),
    Fp8(&'a [u8], Fp8Format, f32, f32),
}

impl GradChunk<'_> {
    /// `dst[i] = g[i] / scale * grad_scale` (two multiplies, in that order).
    #[inline(always)]
    pub(super) fn decode(&self, dst: &mut [f32]) {
        match *self {
            GradChunk::F32(g, f) => {
                for (d, &x) in dst.iter_mut().zip(g) {
                    *d = x * f;
                }
            }
            GradChunk::Fp8(g, fmt, inv_scale, f) => {
                fp8_to_f32_scaled(fmt, g, inv_scale, dst);
                // x * 1.0 == x: skip the no-op multiply of the common case.
                if f != 1.0 {
                    for d in dst.iter_mut() {
                        *d *= f;
                    }
                }
            }
        }
    }
}
