//! Byte-to-byte table lookup over a slice, the inner loop of FP8 re-quantisation
//! (`g'' = fp8(ratio * g')` for one tensor is a 256-entry table).
//!
//! On x86-64 with AVX-512 VBMI (checked at run time) 64 bytes go through two `vpermi2b`
//! (each a 128-entry lookup) and a blend on the index's top bit; elsewhere a scalar loop.
//! Both give identical bytes (tested).

/// The re-quantisation table `code -> fp8(ratio * decode(code))` of one format (round
/// to nearest even, saturating; NaN codes keep their exact bits), and `flush_hi`: the
/// table is monotone in magnitude, so the non-zero codes it flushes to zero are exactly
/// the magnitudes `1..=flush_hi` (0: none).
pub fn requant_table(fmt: fp8lm_fp8::Fp8Format, ratio: f32) -> ([u8; 256], u8) {
    let dec = fp8lm_fp8::cast::decode_table(fmt);
    let lut: [u8; 256] = std::array::from_fn(|v| {
        if dec[v].is_nan() {
            v as u8
        } else {
            fmt.encode(dec[v] * ratio, true)
        }
    });
    let flush_hi = (1..=0x7Fu8)
        .take_while(|&v| lut[v as usize] & 0x7F == 0)
        .count() as u8;
    (lut, flush_hi)
}

/// `data[i] = lut[data[i]]` for every byte.
pub fn apply_lut(data: &mut [u8], lut: &[u8; 256]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vbmi")
    {
        // SAFETY: the CPU features were detected just above.
        unsafe { apply_lut_vbmi(data, lut) };
        return;
    }
    apply_lut_scalar(data, lut);
}

/// The portable definition.
pub fn apply_lut_scalar(data: &mut [u8], lut: &[u8; 256]) {
    for v in data.iter_mut() {
        *v = lut[*v as usize];
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
unsafe fn apply_lut_vbmi(data: &mut [u8], lut: &[u8; 256]) {
    use std::arch::x86_64::*;
    let p = lut.as_ptr();
    // SAFETY (all loads/stores): in bounds of `lut` (4 x 64 bytes) and of each 64-byte chunk.
    let t0 = unsafe { _mm512_loadu_si512(p.cast()) };
    let t1 = unsafe { _mm512_loadu_si512(p.add(64).cast()) };
    let t2 = unsafe { _mm512_loadu_si512(p.add(128).cast()) };
    let t3 = unsafe { _mm512_loadu_si512(p.add(192).cast()) };
    let mut chunks = data.chunks_exact_mut(64);
    for c in &mut chunks {
        let idx = unsafe { _mm512_loadu_si512(c.as_ptr().cast()) };
        // Index bits 0..6 select within t0||t1 (low half) or t2||t3 (high half).
        let lo = _mm512_permutex2var_epi8(t0, idx, t1);
        let hi = _mm512_permutex2var_epi8(t2, idx, t3);
        let high_half = _mm512_movepi8_mask(idx);
        let r = _mm512_mask_blend_epi8(high_half, lo, hi);
        unsafe { _mm512_storeu_si512(c.as_mut_ptr().cast(), r) };
    }
    apply_lut_scalar(chunks.into_remainder(), lut);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_lookup_equals_scalar_lookup() {
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for _ in 0..20 {
            let mut lut = [0u8; 256];
            lut.iter_mut().for_each(|l| *l = next() as u8);
            for len in [0usize, 1, 63, 64, 65, 1000, 4099] {
                let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                let mut a = data.clone();
                let mut b = data.clone();
                apply_lut(&mut a, &lut);
                apply_lut_scalar(&mut b, &lut);
                assert_eq!(a, b);
                assert!(data.iter().zip(&a).all(|(&d, &r)| r == lut[d as usize]));
            }
        }
        // Every byte value through an identity-plus-one table.
        let lut: [u8; 256] = std::array::from_fn(|i| (i as u8).wrapping_add(1));
        let mut all: Vec<u8> = (0..=255u8).collect();
        apply_lut(&mut all, &lut);
        assert!(all
            .iter()
            .enumerate()
            .all(|(i, &v)| v == (i as u8).wrapping_add(1)));
    }
}
