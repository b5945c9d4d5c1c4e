//! Bulk casts over slices, returning the input's amax from the same pass.
//!
//! The portable loops here define the semantics; vectorised paths (x86-64 AVX2/F16C,
//! selected at run time) must be bit-identical to them on every input.

use crate::format::Fp8Format;
use half::{bf16, f16};

/// `dst[i] = fp8(src[i] * scale)` (saturating, RNE). Returns `max |src[i]|` over the
/// non-NaN inputs (the unscaled amax, which is what scaling recipes track); a NaN input
/// makes the returned amax NaN so callers can detect it.
pub fn f32_to_fp8_amax(fmt: Fp8Format, src: &[f32], scale: f32, dst: &mut [u8]) -> f32 {
    assert_eq!(src.len(), dst.len(), "f32_to_fp8_amax: length mismatch");
    let mut amax = 0f32;
    let mut saw_nan = false;
    for (d, &x) in dst.iter_mut().zip(src) {
        saw_nan |= x.is_nan();
        amax = amax.max(x.abs());
        *d = fmt.encode(x * scale, true);
    }
    if saw_nan {
        f32::NAN
    } else {
        amax
    }
}

/// bf16 input variant of [`f32_to_fp8_amax`].
pub fn bf16_to_fp8_amax(fmt: Fp8Format, src: &[bf16], scale: f32, dst: &mut [u8]) -> f32 {
    assert_eq!(src.len(), dst.len(), "bf16_to_fp8_amax: length mismatch");
    let mut amax = 0f32;
    let mut saw_nan = false;
    for (d, &x) in dst.iter_mut().zip(src) {
        let x = x.to_f32();
        saw_nan |= x.is_nan();
        amax = amax.max(x.abs());
        *d = fmt.encode(x * scale, true);
    }
    if saw_nan {
        f32::NAN
    } else {
        amax
    }
}

/// f16 input variant of [`f32_to_fp8_amax`].
pub fn f16_to_fp8_amax(fmt: Fp8Format, src: &[f16], scale: f32, dst: &mut [u8]) -> f32 {
    assert_eq!(src.len(), dst.len(), "f16_to_fp8_amax: length mismatch");
    let mut amax = 0f32;
    let mut saw_nan = false;
    for (d, &x) in dst.iter_mut().zip(src) {
        let x = x.to_f32();
        saw_nan |= x.is_nan();
        amax = amax.max(x.abs());
        *d = fmt.encode(x * scale, true);
    }
    if saw_nan {
        f32::NAN
    } else {
        amax
    }
}

/// `dst[i] = decode(src[i]) * inv_scale` (pass `1.0 / scale` to dequantise).
/// Returns the amax of the decoded (unscaled) FP8 values.
pub fn fp8_to_f32_amax(fmt: Fp8Format, src: &[u8], inv_scale: f32, dst: &mut [f32]) -> f32 {
    assert_eq!(src.len(), dst.len(), "fp8_to_f32_amax: length mismatch");
    let table = decode_table(fmt);
    let mut amax = 0f32;
    for (d, &b) in dst.iter_mut().zip(src) {
        let v = table[b as usize];
        amax = amax.max(v.abs());
        *d = v * inv_scale;
    }
    amax
}

/// `max |x|` over a slice; NaN if any element is NaN.
pub fn amax_f32(src: &[f32]) -> f32 {
    let mut amax = 0f32;
    let mut saw_nan = false;
    for &x in src {
        saw_nan |= x.is_nan();
        amax = amax.max(x.abs());
    }
    if saw_nan {
        f32::NAN
    } else {
        amax
    }
}

static E4M3_TABLE: [f32; 256] = build_table(Fp8Format::E4M3);
static E5M2_TABLE: [f32; 256] = build_table(Fp8Format::E5M2);

const fn build_table(fmt: Fp8Format) -> [f32; 256] {
    let mut t = [0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = fmt.decode(i as u8);
        i += 1;
    }
    t
}

/// The 256-entry decode table of a format (exact f32 values, NaN/inf included).
pub fn decode_table(fmt: Fp8Format) -> &'static [f32; 256] {
    match fmt {
        Fp8Format::E4M3 => &E4M3_TABLE,
        Fp8Format::E5M2 => &E5M2_TABLE,
    }
}
