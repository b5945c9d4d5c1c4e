//! AVX2 (+F16C for f16 input) bulk casts, 32 elements per iteration.
//!
//! Same algorithm as [`EncodeConsts::encode`], lane for lane: round the f32 bit pattern
//! with an integer add (normal range), let the FPU round `a + magic` (subnormal range),
//! then blend in the overflow / inf / NaN codes. Tails go through the portable loop, so
//! every output byte is bit-identical to the scalar cast. Callers check the CPU features
//! (see `super::simd_level`) before calling these `unsafe fn`s.

use super::portable;
use crate::format::EncodeConsts;
use half::{bf16, f16};
use std::arch::x86_64::*;

/// [`EncodeConsts`] broadcast into vector registers.
#[derive(Clone, Copy)]
struct V {
    shift: __m128i,
    round_bias: __m256i,
    one: __m256i,
    rebias: __m256i,
    min_normal: __m256i,
    magic: __m256,
    magic_bits: __m256i,
    max_code: __m256i,
    overflow_code: __m256i,
    inf_code: __m256i,
    nan_code: __m256i,
    inf_bits: __m256i,
    abs_mask: __m256i,
    sign_byte: __m256i,
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn broadcast(k: &EncodeConsts) -> V {
    let s = |x: u32| _mm256_set1_epi32(x as i32);
    V {
        shift: _mm_cvtsi32_si128(k.shift as i32),
        round_bias: s(k.round_bias),
        one: s(1),
        rebias: s(k.rebias),
        min_normal: s(k.min_normal_bits),
        magic: _mm256_set1_ps(k.magic),
        magic_bits: s(k.magic.to_bits()),
        max_code: s(k.max_code),
        overflow_code: s(k.overflow_code),
        inf_code: s(k.inf_code),
        nan_code: s(k.nan_code),
        inf_bits: s(0x7F80_0000),
        abs_mask: s(0x7FFF_FFFF),
        sign_byte: s(0x80),
    }
}

/// Eight f32 (already scaled) to eight codes, one per 32-bit lane.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn encode8(v: &V, y: __m256) -> __m256i {
    let b = _mm256_castps_si256(y);
    let sign = _mm256_and_si256(_mm256_srli_epi32::<24>(b), v.sign_byte);
    let ab = _mm256_and_si256(b, v.abs_mask);
    // Normal range: integer round-to-nearest-even of the bit pattern.
    let lsb = _mm256_and_si256(_mm256_srl_epi32(ab, v.shift), v.one);
    let r = _mm256_srl_epi32(
        _mm256_add_epi32(ab, _mm256_add_epi32(v.round_bias, lsb)),
        v.shift,
    );
    let code_n = _mm256_sub_epi32(r, v.rebias);
    // Subnormal range: the FPU rounds at the format's subnormal quantum.
    let code_s = _mm256_sub_epi32(
        _mm256_castps_si256(_mm256_add_ps(_mm256_castsi256_ps(ab), v.magic)),
        v.magic_bits,
    );
    // ab >= 0 as i32, so signed compares are exact here.
    let is_sub = _mm256_cmpgt_epi32(v.min_normal, ab);
    let mut code = _mm256_blendv_epi8(code_n, code_s, is_sub);
    // code_n can wrap negative only for inf/NaN lanes, which are overwritten below.
    let ov = _mm256_cmpgt_epi32(code, v.max_code);
    code = _mm256_blendv_epi8(code, v.overflow_code, ov);
    let is_inf = _mm256_cmpeq_epi32(ab, v.inf_bits);
    code = _mm256_blendv_epi8(code, v.inf_code, is_inf);
    let is_nan = _mm256_cmpgt_epi32(ab, v.inf_bits);
    code = _mm256_blendv_epi8(code, v.nan_code, is_nan);
    _mm256_or_si256(code, sign)
}

/// Four vectors of eight byte-valued i32 lanes to 32 bytes in order.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn pack32(c0: __m256i, c1: __m256i, c2: __m256i, c3: __m256i) -> __m256i {
    let p01 = _mm256_packs_epi32(c0, c1);
    let p23 = _mm256_packs_epi32(c2, c3);
    let p = _mm256_packus_epi16(p01, p23);
    // packs work per 128-bit lane; dword j of lane 0 holds c_j[0..4], of lane 1 c_j[4..8].
    _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn hmax_u32(acc: __m256i) -> u32 {
    let mut lanes = [0u32; 8];
    _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, acc);
    lanes.into_iter().max().unwrap_or(0)
}

/// One encode loop per input type; `$load` turns a pointer to 8 inputs into an `__m256`.
macro_rules! encode_loop {
    ($name:ident, $t:ty, $features:literal, $portable:path, |$p:ident| $load:expr) => {
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $name(
            k: &EncodeConsts,
            src: &[$t],
            scale: f32,
            dst: &mut [u8],
        ) -> u32 {
            debug_assert_eq!(src.len(), dst.len());
            let v = broadcast(k);
            let vs = _mm256_set1_ps(scale);
            let mut acc = _mm256_setzero_si256();
            let blocks = src.len() / 32;
            for i in 0..blocks {
                let base = src.as_ptr().add(i * 32);
                // See the AVX-512 loop: the hardware prefetcher alone leaves DRAM idle.
                _mm_prefetch::<_MM_HINT_T0>(src.as_ptr().wrapping_add(i * 32 + 1024) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(src.as_ptr().wrapping_add(i * 32 + 1040) as *const i8);
                let mut c = [_mm256_setzero_si256(); 4];
                for (j, cj) in c.iter_mut().enumerate() {
                    let $p = base.add(8 * j);
                    let x: __m256 = $load;
                    acc =
                        _mm256_max_epu32(acc, _mm256_and_si256(_mm256_castps_si256(x), v.abs_mask));
                    *cj = encode8(&v, _mm256_mul_ps(x, vs));
                }
                let out = pack32(c[0], c[1], c[2], c[3]);
                _mm256_storeu_si256(dst.as_mut_ptr().add(i * 32) as *mut __m256i, out);
            }
            let done = blocks * 32;
            let tail = $portable(k, &src[done..], scale, &mut dst[done..]);
            hmax_u32(acc).max(tail)
        }
    };
}

encode_loop!(f32_to_fp8, f32, "avx2", portable::f32_to_fp8, |p| {
    _mm256_loadu_ps(p)
});
encode_loop!(bf16_to_fp8, bf16, "avx2", portable::bf16_to_fp8, |p| {
    // bf16 is the top half of an f32: widen and shift, exact.
    let h = _mm_loadu_si128(p as *const __m128i);
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
});
encode_loop!(f16_to_fp8, f16, "avx2,f16c", portable::f16_to_fp8, |p| {
    // F16C's widening is exact (every f16 is an f32), subnormals included.
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
});

/// FP8 to f32 through the 256-entry table (one gather per 8 codes).
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn fp8_to_f32(
    table: &[f32; 256],
    src: &[u8],
    inv_scale: f32,
    dst: &mut [f32],
) -> u32 {
    debug_assert_eq!(src.len(), dst.len());
    let abs_mask = _mm256_set1_epi32(0x7FFF_FFFF);
    let vs = _mm256_set1_ps(inv_scale);
    let mut acc = _mm256_setzero_si256();
    let blocks = src.len() / 32;
    for i in 0..blocks {
        let codes = _mm256_loadu_si256(src.as_ptr().add(i * 32) as *const __m256i);
        let lo = _mm256_castsi256_si128(codes);
        let hi = _mm256_extracti128_si256::<1>(codes);
        let parts = [lo, _mm_srli_si128::<8>(lo), hi, _mm_srli_si128::<8>(hi)];
        for (j, part) in parts.into_iter().enumerate() {
            let idx = _mm256_cvtepu8_epi32(part);
            let x = _mm256_i32gather_ps::<4>(table.as_ptr(), idx);
            acc = _mm256_max_epu32(acc, _mm256_and_si256(_mm256_castps_si256(x), abs_mask));
            _mm256_storeu_ps(dst.as_mut_ptr().add(i * 32 + 8 * j), _mm256_mul_ps(x, vs));
        }
    }
    let done = blocks * 32;
    let tail = portable::fp8_to_f32(table, &src[done..], inv_scale, &mut dst[done..]);
    hmax_u32(acc).max(tail)
}

/// `max |x|` as bits (NaN sorts above inf), 32 per iteration.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn amax_f32(src: &[f32]) -> u32 {
    let abs_mask = _mm256_set1_epi32(0x7FFF_FFFF);
    let mut acc = [_mm256_setzero_si256(); 4];
    let blocks = src.len() / 32;
    for i in 0..blocks {
        let base = src.as_ptr().add(i * 32);
        for (j, a) in acc.iter_mut().enumerate() {
            let x = _mm256_castps_si256(_mm256_loadu_ps(base.add(8 * j)));
            *a = _mm256_max_epu32(*a, _mm256_and_si256(x, abs_mask));
        }
    }
    let acc = _mm256_max_epu32(
        _mm256_max_epu32(acc[0], acc[1]),
        _mm256_max_epu32(acc[2], acc[3]),
    );
    hmax_u32(acc).max(portable::amax_f32(&src[blocks * 32..]))
}

/// f32 -> f16 with F16C's round-to-nearest-even conversion (overflow -> inf, as IEEE).
#[target_feature(enable = "avx2,f16c")]
pub(crate) unsafe fn f32_to_f16(src: &[f32], scale: f32, dst: &mut [f16]) -> u32 {
    debug_assert_eq!(src.len(), dst.len());
    let abs_mask = _mm256_set1_epi32(0x7FFF_FFFF);
    let vs = _mm256_set1_ps(scale);
    let mut acc = _mm256_setzero_si256();
    let blocks = src.len() / 8;
    for i in 0..blocks {
        let x = _mm256_loadu_ps(src.as_ptr().add(i * 8));
        acc = _mm256_max_epu32(acc, _mm256_and_si256(_mm256_castps_si256(x), abs_mask));
        let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_mul_ps(x, vs));
        _mm_storeu_si128(dst.as_mut_ptr().add(i * 8) as *mut __m128i, h);
    }
    let done = blocks * 8;
    let tail = portable::f32_to_f16(&src[done..], scale, &mut dst[done..]);
    hmax_u32(acc).max(tail)
}

/// f16 -> f32 (exact widening) times `inv_scale`.
#[target_feature(enable = "avx2,f16c")]
pub(crate) unsafe fn f16_to_f32(src: &[f16], inv_scale: f32, dst: &mut [f32]) -> u32 {
    debug_assert_eq!(src.len(), dst.len());
    let abs_mask = _mm256_set1_epi32(0x7FFF_FFFF);
    let vs = _mm256_set1_ps(inv_scale);
    let mut acc = _mm256_setzero_si256();
    let blocks = src.len() / 8;
    for i in 0..blocks {
        let x = _mm256_cvtph_ps(_mm_loadu_si128(src.as_ptr().add(i * 8) as *const __m128i));
        acc = _mm256_max_epu32(acc, _mm256_and_si256(_mm256_castps_si256(x), abs_mask));
        _mm256_storeu_ps(dst.as_mut_ptr().add(i * 8), _mm256_mul_ps(x, vs));
    }
    let done = blocks * 8;
    let tail = portable::f16_to_f32(&src[done..], inv_scale, &mut dst[done..]);
    hmax_u32(acc).max(tail)
}
