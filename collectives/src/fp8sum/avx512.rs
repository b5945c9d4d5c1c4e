//! The AVX-512 kernels of the FP8 sum hop (F/BW/VBMI, and FP16 for `vaddph`); see the
//! parent module for the arithmetic and why it is bit-exact.

use super::{HopCounts, Kernel, Requant};
use fp8lm_fp8::Fp8Format;
use std::arch::x86_64::*;

const RNE: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

/// 64 codes -> (incoming + own) codes; NaN lanes are fixed up by the caller.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn add64<const E5M2: bool>(x: __m512i, y: __m512i) -> __m512i {
    let half = |v: __m512i, hi: bool| -> __m512i {
        let b = if hi {
            _mm512_extracti64x4_epi64::<1>(v)
        } else {
            _mm512_castsi512_si256(v)
        };
        let w = _mm512_cvtepu8_epi16(b);
        if E5M2 {
            _mm512_slli_epi16::<8>(w)
        } else {
            let mag = _mm512_slli_epi16::<7>(_mm512_and_si512(w, _mm512_set1_epi16(0x7F)));
            let sign = _mm512_slli_epi16::<8>(_mm512_and_si512(w, _mm512_set1_epi16(0x80)));
            _mm512_or_si512(mag, sign)
        }
    };
    let sum16 = |xh: __m512i, yh: __m512i| -> __m512i {
        let x0 = _mm512_cvtph_ps(_mm512_castsi512_si256(xh));
        let x1 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(xh));
        let y0 = _mm512_cvtph_ps(_mm512_castsi512_si256(yh));
        let y1 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(yh));
        let h0 = _mm512_cvtps_ph::<RNE>(_mm512_add_ps(x0, y0));
        let h1 = _mm512_cvtps_ph::<RNE>(_mm512_add_ps(x1, y1));
        let h = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(h0), h1);
        // f16 bits -> FP8 code, nearest even on the integer, saturating.
        let (shift_lsb, maxb) = if E5M2 { (8, 0x7B) } else { (7, 0x7E) };
        let a = _mm512_and_si512(h, _mm512_set1_epi16(0x7FFF));
        let sign8 = _mm512_srli_epi16::<8>(_mm512_and_si512(h, _mm512_set1_epi16(-0x8000)));
        let lsb = if E5M2 {
            _mm512_and_si512(_mm512_srli_epi16::<8>(a), _mm512_set1_epi16(1))
        } else {
            _mm512_and_si512(_mm512_srli_epi16::<7>(a), _mm512_set1_epi16(1))
        };
        let bias = _mm512_set1_epi16(((1 << (shift_lsb - 1)) - 1) as i16);
        let r = _mm512_add_epi16(_mm512_add_epi16(a, bias), lsb);
        let r = if E5M2 {
            _mm512_srli_epi16::<8>(r)
        } else {
            _mm512_srli_epi16::<7>(r)
        };
        let r = _mm512_min_epu16(r, _mm512_set1_epi16(maxb));
        let r = _mm512_or_si512(r, sign8);
        if E5M2 {
            // inf + -inf: a NaN neither operand carried; positive by definition.
            let nan = _mm512_cmpgt_epu16_mask(a, _mm512_set1_epi16(0x7C00));
            _mm512_mask_mov_epi16(r, nan, _mm512_set1_epi16(0x7E))
        } else {
            r
        }
    };
    let lo = sum16(half(x, false), half(y, false));
    let hi = sum16(half(x, true), half(y, true));
    _mm512_inserti64x4::<1>(
        _mm512_castsi256_si512(_mm512_cvtepi16_epi8(lo)),
        _mm512_cvtepi16_epi8(hi),
    )
}

/// 64 codes -> (incoming + own) codes through `vaddph`: `(codes, lanes to fix)`. The
/// lanes to fix are those where a NaN is involved; everywhere else the codes are final.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512fp16")]
fn add64_f16<const E5M2: bool>(x: __m512i, y: __m512i) -> (__m512i, __mmask64) {
    let z = _mm512_setzero_si512();
    // Byte b -> 16-bit lane b << 8 (in-lane interleave; `packus` below undoes it).
    let widen = |v: __m512i, hi: bool| -> __m512h {
        let w = if hi {
            _mm512_unpackhi_epi8(z, v)
        } else {
            _mm512_unpacklo_epi8(z, v)
        };
        if E5M2 {
            _mm512_castsi512_ph(w)
        } else {
            // s.eeee.mmm.00000000 -> s.0eeee.mmm.0000000: the value times 2^-8.
            let w = _mm512_and_si512(_mm512_srai_epi16::<1>(w), _mm512_set1_epi16(!0x4000));
            _mm512_castsi512_ph(w)
        }
    };
    // f16 bits -> FP8 code in the low byte, nearest even on the integer.
    let round = |h: __m512h| -> __m512i {
        let h = _mm512_castph_si512(h);
        if E5M2 {
            // The sign rides along in bit 15 -> bit 7 (no carry reaches it from a
            // finite magnitude); saturation is done on the bytes.
            let lsb = _mm512_and_si512(_mm512_srli_epi16::<8>(h), _mm512_set1_epi16(1));
            let r = _mm512_add_epi16(_mm512_add_epi16(h, _mm512_set1_epi16(0x7F)), lsb);
            _mm512_srli_epi16::<8>(r)
        } else {
            let a = _mm512_and_si512(h, _mm512_set1_epi16(0x7FFF));
            let lsb = _mm512_and_si512(_mm512_srli_epi16::<7>(a), _mm512_set1_epi16(1));
            let r = _mm512_add_epi16(_mm512_add_epi16(a, _mm512_set1_epi16(0x3F)), lsb);
            let m = _mm512_min_epu16(_mm512_srli_epi16::<7>(r), _mm512_set1_epi16(0x7E));
            let sign = _mm512_srli_epi16::<8>(_mm512_andnot_si512(_mm512_set1_epi16(0x7FFF), h));
            _mm512_or_si512(m, sign)
        }
    };
    let lo = round(_mm512_add_ph(widen(x, false), widen(y, false)));
    let hi = round(_mm512_add_ph(widen(x, true), widen(y, true)));
    let c = _mm512_packus_epi16(lo, hi);
    if E5M2 {
        // Magnitudes 0x7D.. are NaN (from a NaN operand or inf + -inf), 0x7C is an
        // overflow to infinity: saturate it to max.
        let mag = _mm512_and_si512(c, _mm512_set1_epi8(0x7F));
        let nan = _mm512_cmpgt_epu8_mask(mag, _mm512_set1_epi8(0x7C));
        let r = _mm512_or_si512(
            _mm512_min_epu8(mag, _mm512_set1_epi8(0x7B)),
            _mm512_and_si512(c, _mm512_set1_epi8(-0x80)),
        );
        (r, nan)
    } else {
        // E4M3 NaN codes decode to ordinary f16 values above: find them on the bytes.
        (c, nan_mask::<false>(x) | nan_mask::<false>(y))
    }
}

/// [`add64`] in the same `(codes, lanes to fix)` form.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn add64_f32<const E5M2: bool>(x: __m512i, y: __m512i) -> (__m512i, __mmask64) {
    (
        add64::<E5M2>(x, y),
        nan_mask::<E5M2>(x) | nan_mask::<E5M2>(y),
    )
}

/// Lanes holding a NaN code.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn nan_mask<const E5M2: bool>(v: __m512i) -> __mmask64 {
    let m = _mm512_and_si512(v, _mm512_set1_epi8(0x7F));
    if E5M2 {
        _mm512_cmpgt_epu8_mask(m, _mm512_set1_epi8(0x7C))
    } else {
        _mm512_cmpeq_epi8_mask(m, _mm512_set1_epi8(0x7F))
    }
}

/// The NaN rule of `fp8_add` on the `fix` lanes (rare: taken only when some lane of
/// the 64 has a NaN): the first NaN operand's sign, incoming first, else positive.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn fix_nan<const E5M2: bool>(x: __m512i, y: __m512i, r: __m512i, fix: __mmask64) -> __m512i {
    let nanb = _mm512_set1_epi8(if E5M2 { 0x7E } else { 0x7F });
    let sign_nan = |v: __m512i| _mm512_or_si512(_mm512_and_si512(v, _mm512_set1_epi8(-0x80)), nanb);
    let r = _mm512_mask_mov_epi8(r, fix, nanb);
    let r = _mm512_mask_mov_epi8(r, fix & nan_mask::<E5M2>(y), sign_nan(y));
    _mm512_mask_mov_epi8(r, fix & nan_mask::<E5M2>(x), sign_nan(x))
}

/// The hop loop around a 64-byte adder: re-quantise the own bytes, count, add, fix
/// NaN lanes, count, store; the tail goes to the table kernel.
macro_rules! hop_loop {
    ($e5m2:expr, $add:expr, $acc:ident, $incoming:ident, $rqs:ident, $count:ident) => {{
        let maxb: i8 = if $e5m2 { 0x7B } else { 0x7E };
        let mut c = HopCounts::default();
        let ident: [u8; 256] = std::array::from_fn(|i| i as u8);
        // Tables and flush limits of the own (0) and incoming (1) operand.
        let tables = $rqs.map(|rq| {
            let (lut, flush_hi) = match rq {
                Some(rq) => (rq.lut, rq.flush_hi),
                None => (&ident, 0),
            };
            let p = lut.as_ptr();
            // SAFETY: 4 x 64 bytes inside `lut`.
            let t = unsafe {
                [
                    _mm512_loadu_si512(p.cast()),
                    _mm512_loadu_si512(p.add(64).cast()),
                    _mm512_loadu_si512(p.add(128).cast()),
                    _mm512_loadu_si512(p.add(192).cast()),
                ]
            };
            (rq.is_some(), t, flush_hi)
        });
        let lookup = |v: __m512i, t: &[__m512i; 4]| {
            let lo = _mm512_permutex2var_epi8(t[0], v, t[1]);
            let hi = _mm512_permutex2var_epi8(t[2], v, t[3]);
            _mm512_mask_blend_epi8(_mm512_movepi8_mask(v), lo, hi)
        };
        let flushed = |v: __m512i, flush_hi: u8| {
            let m = _mm512_sub_epi8(
                _mm512_and_si512(v, _mm512_set1_epi8(0x7F)),
                _mm512_set1_epi8(1),
            );
            let k = _mm512_cmplt_epu8_mask(m, _mm512_set1_epi8(flush_hi as i8));
            k.count_ones() as u64
        };
        let [(own_lut, own_t, own_fh), (inc_lut, inc_t, inc_fh)] = tables;
        let n = $acc.len() / 64 * 64;
        let (ap, bp) = ($acc.as_mut_ptr(), $incoming.as_ptr());
        let mut i = 0;
        while i < n {
            // SAFETY: i + 64 <= n <= len of both slices.
            let (raw_y, raw_x) = unsafe {
                (
                    _mm512_loadu_si512(ap.add(i).cast()),
                    _mm512_loadu_si512(bp.add(i).cast()),
                )
            };
            let y = if own_lut {
                lookup(raw_y, &own_t)
            } else {
                raw_y
            };
            let x = if inc_lut {
                lookup(raw_x, &inc_t)
            } else {
                raw_x
            };
            if own_fh != 0 {
                c.flushed += flushed(raw_y, own_fh);
            }
            if inc_fh != 0 {
                c.flushed_incoming += flushed(raw_x, inc_fh);
            }
            let (mut r, fix) = $add(x, y);
            if fix != 0 {
                r = fix_nan::<{ $e5m2 }>(x, y, r, fix);
            }
            if $count {
                let m = _mm512_and_si512(r, _mm512_set1_epi8(0x7F));
                c.saturated +=
                    _mm512_cmpeq_epi8_mask(m, _mm512_set1_epi8(maxb)).count_ones() as u64;
            }
            // SAFETY: as for the loads.
            unsafe { _mm512_storeu_si512(ap.add(i).cast(), r) };
            i += 64;
        }
        let fmt = if $e5m2 {
            Fp8Format::E5M2
        } else {
            Fp8Format::E4M3
        };
        let [own, inc] = $rqs;
        c += super::sum_hop_table(fmt, &mut $acc[n..], &$incoming[n..], own, inc, $count);
        c
    }};
}

#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
fn run_f32<const E5M2: bool>(
    acc: &mut [u8],
    incoming: &[u8],
    rqs: [Option<Requant>; 2],
    count: bool,
) -> HopCounts {
    hop_loop!(E5M2, add64_f32::<E5M2>, acc, incoming, rqs, count)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512fp16")]
fn run_f16<const E5M2: bool>(
    acc: &mut [u8],
    incoming: &[u8],
    rqs: [Option<Requant>; 2],
    count: bool,
) -> HopCounts {
    hop_loop!(E5M2, add64_f16::<E5M2>, acc, incoming, rqs, count)
}

/// # Safety
/// The CPU must have AVX-512 F, BW and VBMI, and FP16 for [`Kernel::Avx512Fp16`].
/// `rqs`: re-quantisation of the own and of the incoming operand.
pub unsafe fn sum_hop(
    kernel: Kernel,
    fmt: Fp8Format,
    acc: &mut [u8],
    incoming: &[u8],
    rqs: [Option<Requant>; 2],
    count: bool,
) -> HopCounts {
    // SAFETY: forwarded from the caller.
    unsafe {
        match (kernel, fmt) {
            (Kernel::Avx512Fp16, Fp8Format::E5M2) => run_f16::<true>(acc, incoming, rqs, count),
            (Kernel::Avx512Fp16, Fp8Format::E4M3) => run_f16::<false>(acc, incoming, rqs, count),
            (_, Fp8Format::E5M2) => run_f32::<true>(acc, incoming, rqs, count),
            (_, Fp8Format::E4M3) => run_f32::<false>(acc, incoming, rqs, count),
        }
    }
}
