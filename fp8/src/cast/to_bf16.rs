//! f32 -> bf16 in bulk: round to nearest, ties to even, the bits of
//! `half::bf16::from_f32` for every input (a NaN keeps its sign and high payload and is
//! made quiet; finite values past bf16's range round to infinity; f32 subnormals round
//! like any other value, no flush). `half` converts a slice one element at a time; the
//! bf16 precision casts every linear's input, weight and output gradient each step, so
//! on x86-64 with AVX-512 F+BW this runs 16 lanes at a time with the same integer
//! rounding: `(bits + 0x7FFF + lsb) >> 16`, where `lsb` is bit 16 (the kept part's last
//! bit). The hardware instruction (`vcvtneps2bf16`) is not used: it treats subnormal
//! inputs as zero, which `half` does not (seen on a Xeon with AVX512-BF16: f32 bits
//! 0x00400000 convert to 0x0000, `half` gives 0x0040).

use half::bf16;
use half::slice::HalfFloatSliceExt;

/// `dst[i] = bf16::from_f32(src[i])` for every `i`, bit for bit. Single-threaded.
pub fn f32_to_bf16(src: &[f32], dst: &mut [bf16]) {
    assert_eq!(src.len(), dst.len(), "f32_to_bf16: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
        let n16 = src.len() / 16 * 16;
        // SAFETY: features detected; both slices hold n16 elements.
        unsafe { simd(&src[..n16], &mut dst[..n16]) };
        dst[n16..].convert_from_f32_slice(&src[n16..]);
        return;
    }
    dst.convert_from_f32_slice(src);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn simd(src: &[f32], dst: &mut [bf16]) {
    use std::arch::x86_64::*;
    let (one, round) = (_mm512_set1_epi32(1), _mm512_set1_epi32(0x7FFF));
    let (abs, inf, quiet) = (
        _mm512_set1_epi32(0x7FFF_FFFF),
        _mm512_set1_epi32(0x7F80_0000),
        _mm512_set1_epi32(0x0040),
    );
    for i in (0..src.len()).step_by(16) {
        let x = _mm512_loadu_si512(src.as_ptr().add(i) as *const _);
        let hi = _mm512_srli_epi32::<16>(x);
        let lsb = _mm512_and_si512(hi, one);
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(_mm512_add_epi32(x, round), lsb));
        let nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(x, abs), inf);
        let r = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(hi, quiet));
        _mm256_storeu_si256(
            dst.as_mut_ptr().add(i) as *mut __m256i,
            _mm512_cvtepi32_epi16(r),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bit for bit `half`'s conversion on the edge cases (ties both ways, the carry into
    /// the exponent, overflow to infinity, infinities, NaNs with payloads, subnormals,
    /// signed zeros) and on a sweep of bit patterns, at every length (the SIMD body and
    /// the scalar tail).
    #[test]
    fn matches_half_bit_for_bit() {
        let mut bits: Vec<u32> = vec![
            0x0000_0000,
            0x8000_0000,
            0x3F80_8000,
            0x3F81_8000,
            0x3F80_8001,
            0x3F80_7FFF,
            0x3FFF_FFFF,
            0x7F7F_FFFF,
            0xFF7F_FFFF,
            0x7F7F_8000,
            0x7F80_0000,
            0xFF80_0000,
            0x7F80_0001,
            0xFF80_0001,
            0x7FC0_0000,
            0x7FBF_FFFF,
            0xFFFF_FFFF,
            0x0000_0001,
            0x0000_8000,
            0x0001_8000,
            0x807F_FFFF,
            0x007F_FFFF,
            0x0080_0000,
        ];
        let mut x = 0x9E37_79B9u32;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            bits.push(x);
            bits.push(x & 0xFFFF_8000 | 0x8000); // exact ties
        }
        let src: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        for len in [src.len(), 17, 16, 15, 1, 0] {
            let mut got = vec![bf16::ZERO; len];
            f32_to_bf16(&src[..len], &mut got);
            for (i, (&s, g)) in src[..len].iter().zip(&got).enumerate() {
                let want = bf16::from_f32(s);
                assert_eq!(
                    g.to_bits(),
                    want.to_bits(),
                    "element {i}: f32 bits {:#010x}",
                    s.to_bits()
                );
            }
        }
    }
}
