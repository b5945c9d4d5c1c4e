//! The fused loop body on AVX-512 (F, BW, VL): 16 lanes per operation.
//!
//! The same operations as the AVX2 body (`fused.rs`) in the same order, so the same
//! bits: f16 converts with `vcvtph2ps`/`vcvtps2ph` on zmm, the E4M3 decode through F16C
//! (an E4M3 value is an f16 times 2^8), the E4M3 encode as the same integer bit trick
//! with mask registers instead of blends, and `vpmovdb` to narrow codes to bytes.

use super::fused::{next_chunk, prefetch_next, Consts, Streams};
use fp8lm_fp8::Fp8Format;
use std::arch::x86_64::*;

/// Sixteen f32 (already scaled) to E4M3 codes in i32 lanes: `Fp8Format::encode(x, true)`
/// (round to nearest even, saturate, NaN -> S.1111.111), as `lanes::Fp8Lane`.
///
/// With `NO_SAT`, values above the format's max (and infinities) give unspecified codes:
/// for callers that defer any chunk whose amax overflows, and redo chunks with a NaN.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn encode_e4m3<const NO_SAT: bool>(y: __m512) -> __m512i {
    const MBITS: i32 = 3;
    const BIAS: u32 = 7;
    let s = |x: u32| _mm512_set1_epi32(x as i32);
    let b = _mm512_castps_si512(y);
    let sign = _mm512_and_si512(_mm512_srli_epi32::<24>(b), s(0x80));
    let a = _mm512_and_si512(b, s(0x7FFF_FFFF));
    let odd = _mm512_and_si512(_mm512_srli_epi32::<{ 23 - MBITS as u32 }>(a), s(1));
    let rebias = BIAS.wrapping_sub(127) << 23;
    let bias = rebias.wrapping_add((1 << (23 - MBITS - 1)) - 1);
    let norm = _mm512_srli_epi32::<{ 23 - MBITS as u32 }>(_mm512_add_epi32(
        _mm512_add_epi32(a, s(bias)),
        odd,
    ));
    // Subnormals: the FPU rounds |x| onto the quantum grid when adding a magic number
    // whose ulp is the quantum.
    let qexp = 1i32 - BIAS as i32 - MBITS;
    let magic = ((127 + qexp + 23) as u32) << 23;
    let sub = _mm512_sub_epi32(
        _mm512_castps_si512(_mm512_add_ps(
            _mm512_castsi512_ps(a),
            _mm512_castsi512_ps(s(magic)),
        )),
        s(magic),
    );
    let min_normal = (127 + 1 - BIAS) << 23;
    let is_sub = _mm512_cmplt_epu32_mask(a, s(min_normal));
    let mut o = _mm512_mask_blend_epi32(is_sub, norm, sub);
    if !NO_SAT {
        let max_bits = Fp8Format::E4M3.max_bits() as u32;
        let sat =
            _mm512_cmpgt_epu32_mask(a, s(0x7F7F_FFFF)) | _mm512_cmpgt_epu32_mask(o, s(max_bits));
        o = _mm512_mask_mov_epi32(o, sat, s(max_bits));
    }
    let nan = _mm512_cmpgt_epu32_mask(a, s(0x7F80_0000));
    o = _mm512_mask_mov_epi32(o, nan, s(Fp8Format::E4M3.nan_bits() as u32));
    _mm512_or_si512(o, sign)
}

/// Sixteen FP8 codes to f32 (exact; NaN codes give NaN), times `a`, with the E4M3
/// re-bias (x 2^8) folded into `a` (see [`exact_for`]); `raw`: the sixteen codes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
unsafe fn decode_fp8(fmt: Fp8Format, raw: __m128i, a: __m512) -> __m512 {
    let w = _mm256_cvtepu8_epi16(raw);
    let h = match fmt {
        Fp8Format::E5M2 => _mm256_slli_epi16::<8>(w),
        Fp8Format::E4M3 => {
            let mag_mask = _mm256_set1_epi16(0x7F);
            let mag = _mm256_and_si256(w, mag_mask);
            let sign = _mm256_slli_epi16::<8>(_mm256_andnot_si256(mag_mask, w));
            // S.EEEE.MMM -> f16 S.0EEEE.MMM0000000 = value * 2^-8 (exact, subnormals
            // included); S.1111.111 is NaN.
            let h = _mm256_slli_epi16::<7>(mag);
            let nan = _mm256_cmpeq_epi16_mask(mag, mag_mask);
            let h = _mm256_mask_mov_epi16(h, nan, _mm256_set1_epi16(0x7E00));
            _mm256_or_si256(h, sign)
        }
    };
    _mm512_mul_ps(_mm512_cvtph_ps(h), a)
}

/// The multiplier that decodes FP8 format `fmt` in one multiply: `inv` (E5M2), or
/// `2^8 inv` (E4M3), where the AVX2 path multiplies by 2^8, then by `inv`. Both round
/// the same exact product once (x 2^8 of an f16 value is exact), so they agree
/// whenever `2^8 inv` is finite ([`exact_for`]).
fn dec_mul(fmt: Fp8Format, inv: f32) -> f32 {
    match fmt {
        Fp8Format::E5M2 => inv,
        Fp8Format::E4M3 => 256.0 * inv,
    }
}

/// Whether the folded decode multipliers of this chunk are exact (else the caller runs
/// the AVX2 body, which multiplies twice).
pub(super) fn exact_for(c: &Consts, gf: Fp8Format) -> bool {
    dec_mul(Fp8Format::E4M3, c.im).is_finite() && dec_mul(gf, c.ginv).is_finite()
}

/// The loop over whole blocks of 16: returns the elements done and the amax bits of
/// (master, exp_avg, exp_avg_sq, update). With `backup` (the chunk may be deferred), the
/// old state of each block is stored there as it is loaded, and the E4M3 encode skips
/// saturation (see [`encode_e4m3`]).
pub(super) unsafe fn body(
    st: &mut Streams,
    c: &Consts,
    backup: Option<(&mut [u16], &mut [u8], &mut [u16])>,
) -> (usize, [u32; 4]) {
    // One instance per case, so the loop has no branch on them.
    match (backup, c.gsc == 1.0) {
        (Some(bk), true) => body_impl::<true, true>(st, c, bk),
        (Some(bk), false) => body_impl::<true, false>(st, c, bk),
        (None, true) => body_impl::<false, true>(st, c, (&mut [], &mut [], &mut [])),
        (None, false) => body_impl::<false, false>(st, c, (&mut [], &mut [], &mut [])),
    }
}

/// `GSC1`: grad_scale is 1, whose multiply (`x * 1.0 == x`) is skipped.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
unsafe fn body_impl<const BACKUP: bool, const GSC1: bool>(
    st: &mut Streams,
    c: &Consts,
    bk: (&mut [u16], &mut [u8], &mut [u16]),
) -> (usize, [u32; 4]) {
    let Streams { w, m, v, p, g, gf } = st;
    let n16 = p.len() / 16;
    if BACKUP {
        assert!(bk.0.len() >= 16 * n16 && bk.1.len() >= 16 * n16 && bk.2.len() >= 16 * n16);
    }
    let set = _mm512_set1_ps;
    let (b1, b2, omb1, omb2) = (set(c.b1), set(c.b2), set(c.omb1), set(c.omb2));
    let (ibc1, ibc2, eps, lr, wd) = (set(c.ibc1), set(c.ibc2), set(c.eps), set(c.lr), set(c.wd));
    let (gdec, gsc) = (set(dec_mul(*gf, c.ginv)), set(c.gsc));
    let (iw, mdec, iv) = (set(c.iw), set(dec_mul(Fp8Format::E4M3, c.im)), set(c.iv));
    let (sw, sm, sv) = (set(c.sw), set(c.sm), set(c.sv));
    let inv_sw = set(c.inv_sw);
    let abs = _mm512_set1_epi32(0x7FFF_FFFF);
    let (mut aw, mut am, mut av, mut ar) = (
        _mm512_setzero_si512(),
        _mm512_setzero_si512(),
        _mm512_setzero_si512(),
        _mm512_setzero_si512(),
    );
    let amax = |acc: __m512i, x: __m512| -> __m512i {
        _mm512_max_epu32(acc, _mm512_and_si512(_mm512_castps_si512(x), abs))
    };
    let nxt = next_chunk(w, m, v, p, g);
    for i in 0..n16 {
        let o = 16 * i;
        if i % 4 == 0 {
            prefetch_next(&nxt, o);
        }
        let g_raw = _mm_loadu_si128(g.as_ptr().add(o) as *const __m128i);
        let w_raw = _mm256_loadu_si256(w.as_ptr().add(o) as *const __m256i);
        let m_raw = _mm_loadu_si128(m.as_ptr().add(o) as *const __m128i);
        let v_raw = _mm256_loadu_si256(v.as_ptr().add(o) as *const __m256i);
        if BACKUP {
            _mm256_storeu_si256(bk.0.as_mut_ptr().add(o) as *mut __m256i, w_raw);
            _mm_storeu_si128(bk.1.as_mut_ptr().add(o) as *mut __m128i, m_raw);
            _mm256_storeu_si256(bk.2.as_mut_ptr().add(o) as *mut __m256i, v_raw);
        }
        let gx = decode_fp8(*gf, g_raw, gdec);
        let gx = if GSC1 { gx } else { _mm512_mul_ps(gx, gsc) };
        let wx = _mm512_mul_ps(_mm512_cvtph_ps(w_raw), iw);
        let mx = decode_fp8(Fp8Format::E4M3, m_raw, mdec);
        let vx = _mm512_mul_ps(_mm512_cvtph_ps(v_raw), iv);
        let mn = _mm512_add_ps(_mm512_mul_ps(b1, mx), _mm512_mul_ps(omb1, gx));
        let vn = _mm512_add_ps(
            _mm512_mul_ps(b2, vx),
            _mm512_mul_ps(_mm512_mul_ps(omb2, gx), gx),
        );
        let u = _mm512_div_ps(
            _mm512_mul_ps(mn, ibc1),
            _mm512_add_ps(_mm512_sqrt_ps(_mm512_mul_ps(vn, ibc2)), eps),
        );
        let wn = _mm512_sub_ps(
            wx,
            _mm512_mul_ps(lr, _mm512_add_ps(u, _mm512_mul_ps(wd, wx))),
        );
        aw = amax(aw, wn);
        am = amax(am, mn);
        av = amax(av, vn);
        ar = amax(ar, u);
        let wh = _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm512_mul_ps(wn, sw));
        _mm256_storeu_si256(w.as_mut_ptr().add(o) as *mut __m256i, wh);
        _mm512_storeu_ps(
            p.as_mut_ptr().add(o),
            _mm512_mul_ps(_mm512_cvtph_ps(wh), inv_sw),
        );
        let vh = _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm512_mul_ps(vn, sv));
        _mm256_storeu_si256(v.as_mut_ptr().add(o) as *mut __m256i, vh);
        let mc = encode_e4m3::<BACKUP>(_mm512_mul_ps(mn, sm));
        _mm_storeu_si128(
            m.as_mut_ptr().add(o) as *mut __m128i,
            _mm512_cvtepi32_epi8(mc),
        );
    }
    let r = _mm512_reduce_max_epu32;
    (16 * n16, [r(aw), r(am), r(av), r(ar)])
}
