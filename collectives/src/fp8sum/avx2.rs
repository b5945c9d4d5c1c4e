//! The AVX2 + F16C kernel of the FP8 sum hop (fallback on CPUs without AVX-512); see
//! the parent module for the arithmetic and why it is bit-exact.

use super::{HopCounts, Requant};
use crate::buf::fp8_sum_table;
use fp8lm_fp8::Fp8Format;
use std::arch::x86_64::*;

// The 256-bit form takes only the 3-bit rounding field (bit 2 clear: use it, not MXCSR).
const RNE: i32 = _MM_FROUND_TO_NEAREST_INT;

/// 16 codes -> the 16 f16 bit patterns with their value (E4M3: times 2^-8).
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn widen<const E5M2: bool>(b: __m128i) -> __m256i {
    let w = _mm256_cvtepu8_epi16(b);
    if E5M2 {
        _mm256_slli_epi16::<8>(w)
    } else {
        let mag = _mm256_slli_epi16::<7>(_mm256_and_si256(w, _mm256_set1_epi16(0x7F)));
        let sign = _mm256_slli_epi16::<8>(_mm256_and_si256(w, _mm256_set1_epi16(0x80)));
        _mm256_or_si256(mag, sign)
    }
}

/// 16 + 16 f16 operands -> 16 FP8 codes in 16-bit lanes (finite or inf operands; a NaN
/// operand is handled by the caller).
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn add16<const E5M2: bool>(xh: __m256i, yh: __m256i) -> __m256i {
    let x0 = _mm256_cvtph_ps(_mm256_castsi256_si128(xh));
    let x1 = _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(xh));
    let y0 = _mm256_cvtph_ps(_mm256_castsi256_si128(yh));
    let y1 = _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(yh));
    let h0 = _mm256_cvtps_ph::<RNE>(_mm256_add_ps(x0, y0));
    let h1 = _mm256_cvtps_ph::<RNE>(_mm256_add_ps(x1, y1));
    let h = _mm256_set_m128i(h1, h0);
    let a = _mm256_and_si256(h, _mm256_set1_epi16(0x7FFF));
    let sign8 = _mm256_srli_epi16::<8>(_mm256_andnot_si256(_mm256_set1_epi16(0x7FFF), h));
    let r = if E5M2 {
        let lsb = _mm256_and_si256(_mm256_srli_epi16::<8>(a), _mm256_set1_epi16(1));
        let r = _mm256_add_epi16(_mm256_add_epi16(a, _mm256_set1_epi16(0x7F)), lsb);
        _mm256_min_epu16(_mm256_srli_epi16::<8>(r), _mm256_set1_epi16(0x7B))
    } else {
        let lsb = _mm256_and_si256(_mm256_srli_epi16::<7>(a), _mm256_set1_epi16(1));
        let r = _mm256_add_epi16(_mm256_add_epi16(a, _mm256_set1_epi16(0x3F)), lsb);
        _mm256_min_epu16(_mm256_srli_epi16::<7>(r), _mm256_set1_epi16(0x7E))
    };
    let r = _mm256_or_si256(r, sign8);
    if E5M2 {
        // inf + -inf: a NaN neither operand carried; positive by definition.
        let nan = _mm256_cmpgt_epi16(a, _mm256_set1_epi16(0x7C00));
        _mm256_blendv_epi8(r, _mm256_set1_epi16(0x7E), nan)
    } else {
        r
    }
}

#[target_feature(enable = "avx2,f16c")]
fn run<const E5M2: bool>(
    acc: &mut [u8],
    incoming: &[u8],
    rqs: [Option<Requant>; 2],
    count: bool,
) -> HopCounts {
    let fmt = if E5M2 {
        Fp8Format::E5M2
    } else {
        Fp8Format::E4M3
    };
    let t = fp8_sum_table(fmt);
    let maxb = fmt.max_bits() as i8;
    let ident: [u8; 256] = std::array::from_fn(|i| i as u8);
    let [own, inc] = rqs.map(|rq| rq.map_or((&ident, 0u8), |rq| (rq.lut, rq.flush_hi)));
    let lookup = rqs[0].is_some() || rqs[1].is_some();
    let nan = |v: __m256i| {
        let m = _mm256_and_si256(v, _mm256_set1_epi8(0x7F));
        if E5M2 {
            _mm256_cmpgt_epi8(m, _mm256_set1_epi8(0x7C))
        } else {
            _mm256_cmpeq_epi8(m, _mm256_set1_epi8(0x7F))
        }
    };
    let mut c = HopCounts::default();
    let n = acc.len() / 32 * 32;
    let mut i = 0;
    while i < n {
        let (a, b) = (&mut acc[i..i + 32], &incoming[i..i + 32]);
        let (mut xb, mut yb) = ([0u8; 32], [0u8; 32]);
        if lookup {
            for j in 0..32 {
                c.flushed += ((a[j] & 0x7F).wrapping_sub(1) < own.1) as u64;
                c.flushed_incoming += ((b[j] & 0x7F).wrapping_sub(1) < inc.1) as u64;
                yb[j] = own.0[a[j] as usize];
                xb[j] = inc.0[b[j] as usize];
            }
        } else {
            xb.copy_from_slice(b);
            yb.copy_from_slice(a);
        }
        // SAFETY: 32-byte arrays.
        let (x, y) = unsafe {
            (
                _mm256_loadu_si256(xb.as_ptr().cast()),
                _mm256_loadu_si256(yb.as_ptr().cast()),
            )
        };
        if _mm256_movemask_epi8(_mm256_or_si256(nan(x), nan(y))) != 0 {
            // A NaN operand (rare): this block through the table.
            for j in 0..32 {
                a[j] = t[((xb[j] as usize) << 8) | yb[j] as usize];
            }
        } else {
            let lo = add16::<E5M2>(
                widen::<E5M2>(_mm256_castsi256_si128(x)),
                widen::<E5M2>(_mm256_castsi256_si128(y)),
            );
            let hi = add16::<E5M2>(
                widen::<E5M2>(_mm256_extracti128_si256::<1>(x)),
                widen::<E5M2>(_mm256_extracti128_si256::<1>(y)),
            );
            // packus interleaves the 128-bit lanes; the permute restores the order.
            let r = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi16(lo, hi));
            // SAFETY: 32 bytes inside `acc`.
            unsafe { _mm256_storeu_si256(a.as_mut_ptr().cast(), r) };
        }
        if count {
            // SAFETY: 32 bytes inside `acc`.
            let r = unsafe { _mm256_loadu_si256(a.as_ptr().cast()) };
            let m = _mm256_and_si256(r, _mm256_set1_epi8(0x7F));
            let hit = _mm256_cmpeq_epi8(m, _mm256_set1_epi8(maxb));
            c.saturated += (_mm256_movemask_epi8(hit) as u32).count_ones() as u64;
        }
        i += 32;
    }
    c += super::sum_hop_table(fmt, &mut acc[n..], &incoming[n..], rqs[0], rqs[1], count);
    c
}

/// # Safety
/// The CPU must have AVX2 and F16C.
pub unsafe fn sum_hop(
    fmt: Fp8Format,
    acc: &mut [u8],
    incoming: &[u8],
    rqs: [Option<Requant>; 2],
    count: bool,
) -> HopCounts {
    // SAFETY: forwarded from the caller.
    unsafe {
        match fmt {
            Fp8Format::E5M2 => run::<true>(acc, incoming, rqs, count),
            Fp8Format::E4M3 => run::<false>(acc, incoming, rqs, count),
        }
    }
}
