//! Branch-free, auto-vectorisable casts for the optimizer's inner loop.
//!
//! The reference casts (`Fp8Format::encode`, `half::f16::from_f32`) branch per element
//! (and `half` checks CPU features per call), which keeps LLVM from vectorising the
//! optimizer's fused loop. These are the same roundings written as integer bit tricks
//! with selects instead of branches; every function is tested bit for bit against the
//! reference on all FP8 bytes, all f16 bit patterns and millions of seeded f32 inputs.
//!
//! Semantics (identical to the references):
//! - f32 -> FP8: round to nearest even, finite overflow and infinities saturate to +-max,
//!   NaN -> the format's canonical NaN with the input's sign (`Fp8Format::encode(x, true)`).
//! - f32 -> f16: IEEE round to nearest even, overflow -> inf, NaN -> quiet NaN.
//! - decodes are exact. f16/FP8 subnormals are decoded through an int -> float
//!   conversion so no f32 denormal ever enters a multiply (denormal operands are
//!   microcoded, ~100x slower, on many x86 cores).

use fp8lm_fp8::Fp8Format;

/// Constants of one FP8 format for the bit tricks below.
#[derive(Clone, Copy, Debug)]
pub struct Fp8Lane {
    /// Mantissa bits m.
    mbits: u32,
    /// f32 biased exponent of the smallest FP8 normal.
    min_normal_exp: u32,
    /// f32 bits of 2^(quantum_exp + 23): adding it rounds |x| to the subnormal grid.
    sub_magic: u32,
    /// Amount added to f32 bits to move the exponent bias from 127 to the format's.
    rebias: u32,
    max_bits: u32,
    nan_bits: u32,
    /// Subnormal quantum 2^(1 - bias - m), for decoding.
    quantum: f32,
}

impl Fp8Lane {
    pub const fn new(fmt: Fp8Format) -> Self {
        let m = fmt.mantissa_bits();
        let bias = fmt.exponent_bias() as u32;
        let qexp = 1i32 - bias as i32 - m as i32; // log2 of the subnormal quantum
        Fp8Lane {
            mbits: m,
            min_normal_exp: 127 + 1 - bias,
            sub_magic: ((127 + qexp + 23) as u32) << 23,
            rebias: (bias.wrapping_sub(127)) << 23,
            max_bits: fmt.max_bits() as u32,
            nan_bits: fmt.nan_bits() as u32,
            quantum: f32::from_bits(((127 + qexp) as u32) << 23),
        }
    }

    /// `Fp8Format::encode(x, true)`, branch-free.
    #[inline(always)]
    pub fn encode(&self, x: f32) -> u8 {
        let bits = x.to_bits();
        let sign = (bits >> 24) & 0x80;
        let a = bits & 0x7FFF_FFFF;
        let shift = 23 - self.mbits;
        // Normal range: round the f32 mantissa to m bits (ties to even) and rebias.
        let odd = (a >> shift) & 1;
        let norm = a
            .wrapping_add(self.rebias)
            .wrapping_add((1 << (shift - 1)) - 1 + odd)
            >> shift;
        // Subnormal range: the FPU rounds |x| onto the quantum grid when adding a magic
        // number whose ulp is the quantum.
        let sub = (f32::from_bits(a) + f32::from_bits(self.sub_magic))
            .to_bits()
            .wrapping_sub(self.sub_magic);
        let mut o = if a < (self.min_normal_exp << 23) {
            sub
        } else {
            norm
        };
        o = if a >= 0x7F80_0000 || o > self.max_bits {
            self.max_bits
        } else {
            o
        };
        o = if a > 0x7F80_0000 { self.nan_bits } else { o };
        (o | sign) as u8
    }

    /// Exact decode of an FP8 byte (NaN/inf included), branch-free.
    #[inline(always)]
    pub fn decode(&self, b: u8) -> f32 {
        let b = b as u32;
        let sign = (b & 0x80) << 24;
        let mag = b & 0x7F;
        let e = mag >> self.mbits;
        let emax = (1 << (7 - self.mbits)) - 1;
        let mut norm = (mag << (23 - self.mbits)).wrapping_add(self.rebias.wrapping_neg());
        if self.mbits == 3 {
            // E4M3 FN: only S.1111.111 is special (NaN).
            norm = if mag == 0x7F { 0x7FC0_0000 } else { norm };
        } else {
            // E5M2: exponent all ones is inf (mantissa 0) or NaN.
            let inf = if mag == 0x7C {
                0x7F80_0000
            } else {
                0x7FC0_0000
            };
            norm = if e == emax { inf } else { norm };
        }
        let sub = ((mag & ((1 << self.mbits) - 1)) as f32 * self.quantum).to_bits();
        f32::from_bits(if e == 0 { sub } else { norm } | sign)
    }
}

pub const E4M3_LANE: Fp8Lane = Fp8Lane::new(Fp8Format::E4M3);
pub const E5M2_LANE: Fp8Lane = Fp8Lane::new(Fp8Format::E5M2);

pub fn fp8_lane(fmt: Fp8Format) -> &'static Fp8Lane {
    match fmt {
        Fp8Format::E4M3 => &E4M3_LANE,
        Fp8Format::E5M2 => &E5M2_LANE,
    }
}

/// f32 -> f16 bits, IEEE round to nearest even (as `half::f16::from_f32`), branch-free.
#[inline(always)]
pub fn f16_encode(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = (bits >> 16) & 0x8000;
    let a = bits & 0x7FFF_FFFF;
    let odd = (a >> 13) & 1;
    let norm = a
        .wrapping_add((15u32.wrapping_sub(127)) << 23)
        .wrapping_add(0xFFF + odd)
        >> 13;
    // 0.5 has an f32 ulp of 2^-24, the f16 subnormal quantum.
    let sub = (f32::from_bits(a) + 0.5)
        .to_bits()
        .wrapping_sub(0x3F00_0000);
    let mut o = if a < (113 << 23) { sub } else { norm };
    // 65520 and above round to infinity.
    o = if a >= ((127 + 16) << 23) { 0x7C00 } else { o };
    o = if a > 0x7F80_0000 { 0x7E00 } else { o };
    (o | sign) as u16
}

/// f16 bits -> f32, exact, branch-free.
#[inline(always)]
pub fn f16_decode(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let e = h & 0x7C00;
    let mut norm = ((h & 0x7FFF) << 13).wrapping_add(112 << 23);
    norm = if e == 0x7C00 {
        norm.wrapping_add(112 << 23)
    } else {
        norm
    };
    let sub = ((h & 0x3FF) as f32 * f32::from_bits((127 - 24) << 23)).to_bits();
    f32::from_bits(if e == 0 { sub } else { norm } | sign)
}

// Slice loops. `#[inline(always)]` so that they are compiled inside the optimizer's
// multiversioned kernel (AVX2 when the CPU has it), and each format's constants fold.

macro_rules! per_format {
    ($fmt:expr, $lane:ident => $body:expr) => {
        match $fmt {
            Fp8Format::E4M3 => {
                let $lane = &E4M3_LANE;
                $body
            }
            Fp8Format::E5M2 => {
                let $lane = &E5M2_LANE;
                $body
            }
        }
    };
}

/// `dst[i] = decode(src[i]) * a * b` (two multiplies, in that order).
#[inline(always)]
pub fn fp8_decode_slice(fmt: Fp8Format, src: &[u8], a: f32, b: f32, dst: &mut [f32]) {
    per_format!(fmt, lane => {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = lane.decode(x) * a * b;
        }
    })
}

/// `dst[i] = encode(src[i] * scale)`.
#[inline(always)]
pub fn fp8_encode_slice(fmt: Fp8Format, src: &[f32], scale: f32, dst: &mut [u8]) {
    per_format!(fmt, lane => {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = lane.encode(x * scale);
        }
    })
}

/// `x[i] = encode(decode(x[i]) * factor)`.
#[inline(always)]
pub fn fp8_rescale_slice(fmt: Fp8Format, x: &mut [u8], factor: f32) {
    per_format!(fmt, lane => {
        for b in x.iter_mut() {
            *b = lane.encode(lane.decode(*b) * factor);
        }
    })
}

/// `dst[i] = f16(src[i]) * a`.
#[inline(always)]
pub fn f16_decode_slice(src: &[u16], a: f32, dst: &mut [f32]) {
    for (d, &h) in dst.iter_mut().zip(src) {
        *d = f16_decode(h) * a;
    }
}

/// `dst[i] = f16(src[i] * scale)`.
#[inline(always)]
pub fn f16_encode_slice(src: &[f32], scale: f32, dst: &mut [u16]) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = f16_encode(x * scale);
    }
}

// Bulk casts the optimizer needs beyond the fp8 crate's: FP8 decode through F16C (no
// gather) and the master's f16 encode fused with the f32 view the model computes with.

#[cfg(target_arch = "x86_64")]
fn f16c_available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c")
}

/// `dst[i] = decode(src[i]) * a`, bit-identical to `Fp8Format::decode(src[i]) * a`
/// (NaN codes give a NaN). AVX2 + F16C when available: an FP8 value is exactly an f16
/// (E5M2 is f16's top byte; E4M3 re-biased by 2^8), so F16C decodes it without a table.
pub fn fp8_to_f32_scaled(fmt: Fp8Format, src: &[u8], a: f32, dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "fp8_to_f32_scaled: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if f16c_available() {
        // SAFETY: AVX2 and F16C detected just above.
        unsafe { avx2::fp8_to_f32(fmt, src, a, dst) };
        return;
    }
    fp8_decode_slice(fmt, src, a, 1.0, dst);
}

/// `h[i] = f16(src[i] * scale)` and `view[i] = f32(h[i]) * inv_scale`: the master's
/// encode and the compute weights' refresh in one pass. Bit-identical to
/// `half::f16::from_f32` followed by `to_f32`.
pub fn f32_to_f16_with_view(
    src: &[f32],
    scale: f32,
    inv_scale: f32,
    h: &mut [u16],
    view: &mut [f32],
) {
    assert!(
        src.len() == h.len() && src.len() == view.len(),
        "f32_to_f16_with_view: lengths differ"
    );
    #[cfg(target_arch = "x86_64")]
    if f16c_available() {
        // SAFETY: AVX2 and F16C detected just above.
        unsafe { avx2::f32_to_f16_with_view(src, scale, inv_scale, h, view) };
        return;
    }
    for ((&x, h), p) in src.iter().zip(h.iter_mut()).zip(view.iter_mut()) {
        let y = half::f16::from_f32(x * scale);
        *h = y.to_bits();
        *p = y.to_f32() * inv_scale;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{f16_decode, fp8_lane};
    use fp8lm_fp8::Fp8Format;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn fp8_to_f32(fmt: Fp8Format, src: &[u8], a: f32, dst: &mut [f32]) {
        let va = _mm256_set1_ps(a);
        let n8 = src.len() / 8;
        match fmt {
            Fp8Format::E5M2 => {
                for i in 0..n8 {
                    let b = _mm_loadl_epi64(src.as_ptr().add(8 * i) as *const __m128i);
                    let h = _mm_slli_epi16::<8>(_mm_cvtepu8_epi16(b));
                    let x = _mm256_cvtph_ps(h);
                    _mm256_storeu_ps(dst.as_mut_ptr().add(8 * i), _mm256_mul_ps(x, va));
                }
            }
            Fp8Format::E4M3 => {
                let mag_mask = _mm_set1_epi16(0x7F);
                let nan_h = _mm_set1_epi16(0x7E00);
                let rebias = _mm256_set1_ps(256.0);
                for i in 0..n8 {
                    let b = _mm_loadl_epi64(src.as_ptr().add(8 * i) as *const __m128i);
                    let w = _mm_cvtepu8_epi16(b);
                    let mag = _mm_and_si128(w, mag_mask);
                    let sign = _mm_slli_epi16::<8>(_mm_andnot_si128(mag_mask, w));
                    // S.EEEE.MMM -> f16 S.0EEEE.MMM0000000 = value * 2^-8, exact
                    // (E4M3 subnormals land on f16 subnormals); S.1111.111 is NaN.
                    let h = _mm_slli_epi16::<7>(mag);
                    let h = _mm_blendv_epi8(h, nan_h, _mm_cmpeq_epi16(mag, mag_mask));
                    let x = _mm256_mul_ps(_mm256_cvtph_ps(_mm_or_si128(h, sign)), rebias);
                    _mm256_storeu_ps(dst.as_mut_ptr().add(8 * i), _mm256_mul_ps(x, va));
                }
            }
        }
        let lane = fp8_lane(fmt);
        for i in 8 * n8..src.len() {
            dst[i] = lane.decode(src[i]) * a;
        }
    }

    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn f32_to_f16_with_view(
        src: &[f32],
        scale: f32,
        inv_scale: f32,
        h: &mut [u16],
        view: &mut [f32],
    ) {
        let (vs, vi) = (_mm256_set1_ps(scale), _mm256_set1_ps(inv_scale));
        let n8 = src.len() / 8;
        for i in 0..n8 {
            let x = _mm256_mul_ps(_mm256_loadu_ps(src.as_ptr().add(8 * i)), vs);
            let y = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x);
            _mm_storeu_si128(h.as_mut_ptr().add(8 * i) as *mut __m128i, y);
            let back = _mm256_mul_ps(_mm256_cvtph_ps(y), vi);
            _mm256_storeu_ps(view.as_mut_ptr().add(8 * i), back);
        }
        for i in 8 * n8..src.len() {
            let y = half::f16::from_f32(src[i] * scale).to_bits();
            h[i] = y;
            view[i] = f16_decode(y) * inv_scale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    fn same(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    #[test]
    fn fp8_decode_all_bytes() {
        for fmt in [Fp8Format::E4M3, Fp8Format::E5M2] {
            for b in 0..=255u8 {
                let (r, f) = (fmt.decode(b), fp8_lane(fmt).decode(b));
                assert!(same(r, f), "{fmt:?} {b:#04x}: ref {r} fast {f}");
            }
        }
    }

    /// Inputs that probe every rounding boundary: all FP8 values, midpoints and their
    /// f32 neighbours, specials, plus seeded random f32 of all magnitudes.
    fn probe_inputs(fmt: Fp8Format) -> Vec<f32> {
        let mut v = vec![
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MAX,
        ];
        v.push(f32::from_bits(1));
        let vals: Vec<f32> = (0..=255u8)
            .map(|b| fmt.decode(b))
            .filter(|x| x.is_finite())
            .collect();
        for &a in &vals {
            for &b in &vals {
                let mid = (a + b) * 0.5;
                for x in [a, mid, f32::from_bits(mid.to_bits().wrapping_add(1))] {
                    v.push(x);
                    v.push(f32::from_bits(x.to_bits().wrapping_sub(1)));
                }
            }
        }
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..2_000_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            v.push(f32::from_bits(s as u32));
        }
        v
    }

    #[test]
    fn fp8_encode_matches_reference() {
        for fmt in [Fp8Format::E4M3, Fp8Format::E5M2] {
            let lane = fp8_lane(fmt);
            for x in probe_inputs(fmt) {
                assert_eq!(
                    lane.encode(x),
                    fmt.encode(x, true),
                    "{fmt:?} {x:e} ({:#x})",
                    x.to_bits()
                );
            }
        }
    }

    #[test]
    fn f16_decode_all_patterns_and_encode_roundtrip() {
        for h in 0..=u16::MAX {
            let r = f16::from_bits(h).to_f32();
            assert!(same(r, f16_decode(h)), "{h:#06x}");
            if r.is_finite() {
                assert_eq!(f16_encode(r), h, "{h:#06x}");
            }
        }
    }

    #[test]
    fn f16_encode_matches_half() {
        // Midpoints between neighbouring f16 values (ties), their f32 neighbours, and
        // seeded random f32 across all magnitudes.
        let mut xs = vec![
            65504.0,
            65519.99,
            65520.0,
            1e30,
            f32::INFINITY,
            -f32::INFINITY,
        ];
        for h in 0..0x7C00u16 {
            let a = f16::from_bits(h).to_f32();
            let b = f16::from_bits(h + 1).to_f32();
            let mid = (a + b) * 0.5;
            for x in [
                mid,
                f32::from_bits(mid.to_bits() + 1),
                f32::from_bits(mid.to_bits() - 1),
            ] {
                xs.push(x);
                xs.push(-x);
            }
        }
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..2_000_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            xs.push(f32::from_bits(s as u32));
        }
        for x in xs {
            let r = f16::from_f32(x);
            let f = f16_encode(x);
            if r.is_nan() {
                assert!(f16::from_bits(f).is_nan(), "{x}");
                assert_eq!(r.to_bits() & 0x8000, f & 0x8000);
            } else {
                assert_eq!(f, r.to_bits(), "{x:e} ({:#x})", x.to_bits());
            }
        }
    }

    #[test]
    fn fp8_to_f32_scaled_matches_reference_on_all_bytes() {
        // Every byte, several multipliers (powers of two incl. ones that make results
        // subnormal, and a non-power), several lengths (SIMD body and scalar tail).
        for fmt in [Fp8Format::E4M3, Fp8Format::E5M2] {
            let src: Vec<u8> = (0..=255u8)
                .chain(0..=255u8)
                .rev()
                .chain([7, 0x80, 0x7F])
                .collect();
            for a in [1.0f32, 2f32.powi(-20), 2f32.powi(-130), 3.0, 2f32.powi(100)] {
                for len in [src.len(), 13, 5] {
                    let mut dst = vec![0f32; len];
                    fp8_to_f32_scaled(fmt, &src[..len], a, &mut dst);
                    for (&b, &d) in src.iter().zip(&dst) {
                        let r = fmt.decode(b) * a;
                        assert!(same(r, d), "{fmt:?} {b:#04x} * {a:e}: ref {r} fast {d}");
                    }
                }
            }
        }
    }

    #[test]
    fn f32_to_f16_with_view_matches_half() {
        let mut s = 0x1234_5678_9ABC_DEF1u64;
        let mut xs: Vec<f32> = (0..100_000)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                f32::from_bits(s as u32)
            })
            .collect();
        xs.extend([0.0, -0.0, 65504.0, 65520.0, 1e-8, -3e-6, f32::INFINITY]);
        for (scale, len) in [(1.0f32, xs.len()), (2f32.powi(12), xs.len()), (0.25, 11)] {
            let (mut h, mut view) = (vec![0u16; len], vec![0f32; len]);
            f32_to_f16_with_view(&xs[..len], scale, 1.0 / scale, &mut h, &mut view);
            for i in 0..len {
                let r = f16::from_f32(xs[i] * scale);
                if r.is_nan() {
                    assert!(f16::from_bits(h[i]).is_nan() && view[i].is_nan());
                    continue;
                }
                assert_eq!(h[i], r.to_bits(), "{:e}", xs[i]);
                assert!(same(view[i], r.to_f32() / scale), "{:e}", xs[i]);
            }
        }
    }
}
