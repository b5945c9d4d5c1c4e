//! Packing: copy a block of one operand into the micro-kernel's panel layout, decoding
//! bf16 / FP8 to f32 on the way.
//!
//! This is where the FP8 decode is fused: every operand element is decoded once per
//! K-block it belongs to (O(mk + kn) work), never inside the O(mnk) inner loop. Decoded
//! values are the exact FP8 values (no scale applied: every FP8 value is exact in f32, so
//! the panels hold exact numbers and the operands' scales are applied once, in the
//! epilogue, as `1 / (scale_a * scale_b)`).
//!
//! A panel of width `W` (the micro-kernel's MR for A, NR for B) covers `W` rows of A
//! (or columns of B) and `kc` steps of k, laid out `[kc][W]`: step `p` holds the `W`
//! values the kernel needs at once. Rows past the matrix edge are zero.
//!
//! Operands are seen as `[x, p]` matrices (x = row of A / column of B, p = k index).
//! Two source layouts: "k-contiguous" (A plain `[m,k]`, B transposed `[n,k]`), which
//! needs a transpose while packing (done in 8x8 register blocks), and "x-contiguous"
//! (A transposed `[k,m]`, B plain `[k,n]`), a straight row copy.

use super::Isa;
use fp8lm_fp8::cast::decode_table;
use fp8lm_fp8::Fp8Format;
use half::bf16;

/// A source element type and how to decode it to f32 (exactly).
pub(crate) trait Src: Copy + Send + Sync {
    fn decode1(self) -> f32;
    /// Decode 8 consecutive elements at `ptr` (AVX2 + F16C).
    ///
    /// # Safety
    /// `ptr` must be valid for 8 reads and the CPU must support avx2, fma and f16c.
    #[cfg(target_arch = "x86_64")]
    unsafe fn decode8(ptr: *const Self) -> std::arch::x86_64::__m256;
}

impl Src for f32 {
    #[inline(always)]
    fn decode1(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn decode8(ptr: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(ptr)
    }
}

impl Src for bf16 {
    #[inline(always)]
    fn decode1(self) -> f32 {
        self.to_f32()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn decode8(ptr: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // bf16 is the top half of an f32: widen and shift, exact for every pattern.
        let h = _mm_loadu_si128(ptr as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    }
}

/// An E4M3 byte (OCP "FN": no infinity, S.1111.111 is NaN).
#[derive(Clone, Copy)]
#[repr(transparent)]
pub(crate) struct E4M3Byte(pub u8);
/// An E5M2 byte (the top byte of an IEEE f16).
#[derive(Clone, Copy)]
#[repr(transparent)]
pub(crate) struct E5M2Byte(pub u8);

impl Src for E4M3Byte {
    #[inline(always)]
    fn decode1(self) -> f32 {
        decode_table(Fp8Format::E4M3)[self.0 as usize]
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn decode8(ptr: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // Place the 7 magnitude bits so the 3 mantissa bits line up with f32's, read that
        // as an f32 with exponent field e8 (a denormal when e8 = 0), and multiply by
        // 2^(127 - 7): normals and subnormals come out exact (needs no FTZ/DAZ, which
        // Rust never sets). 0x7F (NaN) becomes all-ones, still NaN after the sign OR.
        let x = _mm256_cvtepu8_epi32(_mm_loadl_epi64(ptr as *const __m128i));
        let mag = _mm256_and_si256(x, _mm256_set1_epi32(0x7F));
        let sign = _mm256_slli_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x80)), 24);
        let two_120 = _mm256_set1_ps(f32::from_bits((120 + 127) << 23));
        let v = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(mag, 20)), two_120);
        let nan = _mm256_cmpeq_epi32(mag, _mm256_set1_epi32(0x7F));
        _mm256_or_ps(v, _mm256_castsi256_ps(_mm256_or_si256(nan, sign)))
    }
}

impl Src for E5M2Byte {
    #[inline(always)]
    fn decode1(self) -> f32 {
        decode_table(Fp8Format::E5M2)[self.0 as usize]
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn decode8(ptr: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // E5M2 is f16 with the low mantissa byte dropped: shift into place, let F16C
        // widen (exact for normals, subnormals, infinities and NaNs).
        let x = _mm_cvtepu8_epi16(_mm_loadl_epi64(ptr as *const __m128i));
        _mm256_cvtph_ps(_mm_slli_epi16(x, 8))
    }
}

/// One operand seen as an `[x, p]` matrix over a slice of `S`.
#[derive(Clone, Copy)]
pub(crate) struct Operand<'a, S> {
    pub data: &'a [S],
    /// Distance between consecutive x (k-contiguous) or consecutive p (x-contiguous).
    pub ld: usize,
    pub k_contig: bool,
}

impl<S: Src> Operand<'_, S> {
    #[inline(always)]
    fn idx(&self, x: usize, p: usize) -> usize {
        if self.k_contig {
            x * self.ld + p
        } else {
            p * self.ld + x
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Source elements decoded by this thread's packing (tests check the O(mk + kn) claim).
    pub(crate) static DECODED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Pack rows `x0 .. x0 + w` (`w <= W`) and steps `p0 .. p0 + kc` into `dst[kc * W]`,
/// layout `[p][x]`, zero-padding rows `w .. W`.
pub(crate) fn pack_panel<S: Src, const W: usize>(
    isa: Isa,
    op: Operand<'_, S>,
    x0: usize,
    w: usize,
    p0: usize,
    kc: usize,
    dst: &mut [f32],
) {
    assert!(w <= W && dst.len() >= kc * W);
    #[cfg(test)]
    DECODED.set(DECODED.get() + w * kc);
    if kc > 0 {
        // Bounds of the whole source rectangle, checked once so the SIMD loads below
        // may use raw pointers.
        if w > 0 {
            assert!(op.idx(x0 + w - 1, p0 + kc - 1) < op.data.len());
        }
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx2 => {
            // SAFETY: `Isa::Avx2`/`Avx512` are only chosen when avx2+fma+f16c are
            // detected; the source rectangle was bounds-checked above.
            unsafe { pack_panel_avx2::<S, W>(op, x0, w, p0, kc, dst) }
        }
        _ => pack_panel_scalar::<S, W>(op, x0, w, p0, kc, dst),
    }
}

fn pack_panel_scalar<S: Src, const W: usize>(
    op: Operand<'_, S>,
    x0: usize,
    w: usize,
    p0: usize,
    kc: usize,
    dst: &mut [f32],
) {
    for p in 0..kc {
        let row = &mut dst[p * W..(p + 1) * W];
        for (x, d) in row.iter_mut().enumerate() {
            *d = if x < w {
                op.data[op.idx(x0 + x, p0 + p)].decode1()
            } else {
                0.0
            };
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pack_panel_avx2<S: Src, const W: usize>(
    op: Operand<'_, S>,
    x0: usize,
    w: usize,
    p0: usize,
    kc: usize,
    dst: &mut [f32],
) {
    use std::arch::x86_64::*;
    let src = op.data.as_ptr();
    let out = dst.as_mut_ptr();
    if !op.k_contig {
        // Straight copy of W contiguous values per step.
        for p in 0..kc {
            let s = src.add((p0 + p) * op.ld + x0);
            let d = out.add(p * W);
            let mut x = 0;
            while x + 8 <= w {
                _mm256_storeu_ps(d.add(x), S::decode8(s.add(x)));
                x += 8;
            }
            while x < w {
                *d.add(x) = (*s.add(x)).decode1();
                x += 1;
            }
            while x < W {
                *d.add(x) = 0.0;
                x += 1;
            }
        }
        return;
    }
    // Transposing copy, 8 rows x 8 steps at a time.
    for g in (0..W).step_by(8) {
        let rows = w.saturating_sub(g).min(8);
        let row_ptr = |q: usize| src.add((x0 + g + q) * op.ld + p0);
        let mut p = 0;
        while p + 8 <= kc {
            let mut r = [_mm256_setzero_ps(); 8];
            for (q, rq) in r.iter_mut().enumerate().take(rows) {
                *rq = S::decode8(row_ptr(q).add(p));
            }
            transpose8(&mut r);
            for (q, rq) in r.iter().enumerate() {
                _mm256_storeu_ps(out.add((p + q) * W + g), *rq);
            }
            p += 8;
        }
        for pp in p..kc {
            for q in 0..8 {
                *out.add(pp * W + g + q) = if q < rows {
                    (*row_ptr(q).add(pp)).decode1()
                } else {
                    0.0
                };
            }
        }
    }
}

/// In-register 8x8 f32 transpose (rows `r[i]` become columns).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn transpose8(r: &mut [std::arch::x86_64::__m256; 8]) {
    use std::arch::x86_64::*;
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    r[0] = _mm256_permute2f128_ps::<0x20>(u0, u4);
    r[1] = _mm256_permute2f128_ps::<0x20>(u1, u5);
    r[2] = _mm256_permute2f128_ps::<0x20>(u2, u6);
    r[3] = _mm256_permute2f128_ps::<0x20>(u3, u7);
    r[4] = _mm256_permute2f128_ps::<0x31>(u0, u4);
    r[5] = _mm256_permute2f128_ps::<0x31>(u1, u5);
    r[6] = _mm256_permute2f128_ps::<0x31>(u2, u6);
    r[7] = _mm256_permute2f128_ps::<0x31>(u3, u7);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SIMD decoders agree bit for bit with the fp8 crate's decode table on all 256
    /// codes of both formats (NaN compared as NaN), and bf16 on a sweep of patterns.
    #[test]
    fn simd_decode_matches_table() {
        if !Isa::available().contains(&Isa::Avx2) {
            eprintln!("no avx2: SIMD decode not testable here, scalar path only");
            return;
        }
        let codes: Vec<u8> = (0..=255).collect();
        for fmt in [Fp8Format::E4M3, Fp8Format::E5M2] {
            let table = decode_table(fmt);
            for chunk in codes.chunks(8) {
                let mut got = [0f32; 8];
                // SAFETY: avx2 detected; chunk has 8 elements.
                unsafe {
                    let v = match fmt {
                        Fp8Format::E4M3 => E4M3Byte::decode8(chunk.as_ptr() as *const E4M3Byte),
                        Fp8Format::E5M2 => E5M2Byte::decode8(chunk.as_ptr() as *const E5M2Byte),
                    };
                    std::arch::x86_64::_mm256_storeu_ps(got.as_mut_ptr(), v);
                }
                for (i, &b) in chunk.iter().enumerate() {
                    let want = table[b as usize];
                    assert!(
                        got[i].to_bits() == want.to_bits() || (got[i].is_nan() && want.is_nan()),
                        "{fmt:?} code {b:#04x}: simd {} table {}",
                        got[i],
                        want
                    );
                }
            }
        }
        let pats: Vec<bf16> = (0..=u16::MAX).step_by(7).map(bf16::from_bits).collect();
        for chunk in pats.chunks_exact(8) {
            let mut got = [0f32; 8];
            // SAFETY: as above.
            unsafe {
                std::arch::x86_64::_mm256_storeu_ps(
                    got.as_mut_ptr(),
                    bf16::decode8(chunk.as_ptr()),
                );
            }
            for (g, w) in got.iter().zip(chunk) {
                // half quiets signalling NaNs, the shift keeps them: both are NaN.
                let w = w.to_f32();
                assert!(
                    g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                    "{g} {w}"
                );
            }
        }
    }

    /// Both packers produce the same panel for both layouts, edges and padding included.
    #[test]
    fn packers_agree() {
        let (rows, cols) = (37, 53); // [x, p] stored either way
        let data: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.5 - 100.0).collect();
        for k_contig in [false, true] {
            let ld = if k_contig { cols } else { rows };
            let op = Operand {
                data: &data,
                ld,
                k_contig,
            };
            for (x0, w, p0, kc) in [
                (0, 32, 0, 53),
                (32, 5, 3, 17),
                (8, 29, 40, 13),
                (0, 0, 0, 9),
            ] {
                let mut want = vec![f32::NAN; kc * 32];
                let mut got = vec![f32::NAN; kc * 32];
                pack_panel_scalar::<f32, 32>(op, x0, w, p0, kc, &mut want);
                for isa in Isa::available() {
                    pack_panel::<f32, 32>(isa, op, x0, w, p0, kc, &mut got);
                    assert_eq!(
                        want, got,
                        "{isa:?} k_contig {k_contig} x0 {x0} w {w} p0 {p0} kc {kc}"
                    );
                }
                for p in 0..kc {
                    for x in 0..32 {
                        let v = if x < w {
                            let (xx, pp) = (x0 + x, p0 + p);
                            data[if k_contig { xx * ld + pp } else { pp * ld + xx }]
                        } else {
                            0.0
                        };
                        assert_eq!(want[p * 32 + x], v);
                    }
                }
            }
        }
    }
}
