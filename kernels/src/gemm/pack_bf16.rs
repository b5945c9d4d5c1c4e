//! Packing for the bf16 matrix-unit paths (AMX `tdpbf16ps`, AVX512-BF16 `vdpbf16ps`):
//! copy a block of one operand into a kernel panel of bf16 bits (`u16`), decoding
//! bf16 / FP8 on the way.
//!
//! Why bf16 is exact here: every E4M3 and E5M2 value (normals, subnormals, zero, the
//! E5M2 infinities) has at most 3 significant bits and an exponent within
//! `[-16, 15]`, so it is a *normal* bf16 (8 significant bits, exponents down to -126) or
//! zero. The matrix units treat bf16 denormals as zero; decoded FP8 never is one (tested
//! over all 256 codes of both formats), so the products the units form are the exact
//! products of the FP8 values. As in [`super::pack`], no scale is applied here: the
//! operands' scales are applied once in the epilogue.
//!
//! Two panel layouts (operand seen as `[x, p]`: x = row of A / column of B, p = k):
//! - **pairs** `[kcp/2][W][2]`: for each pair of k steps, `W` (x) pairs `(p, p+1)`: the
//!   "VNNI" layout of an AMX B tile (16 pair-rows of 16 columns) and what `vdpbf16ps`
//!   multiplies (one 32-bit pair per lane). Used for B on both paths and for A on the
//!   AVX512-BF16 path.
//! - **rows** `[kcp/32][W][32]`: for each chunk of 32 k steps, `W` rows of 32 bf16 — an
//!   AMX A tile (16 rows of 64 bytes) is one contiguous KiB of it.
//!
//! `kcp` is `kc` rounded up to the kernel's K alignment; steps `kc .. kcp` and rows
//! `w .. W` are zero.
//!
//! Source layouts, as in [`super::pack`]: "k-contiguous" (A plain `[m,k]`, B transposed
//! `[n,k]`) and "x-contiguous" (A transposed `[k,m]`, B plain `[k,n]`). The SIMD packers
//! (AVX-512F/BW/VL, which every CPU with AMX or AVX512-BF16 has) decode 16 values at a
//! time; pairs from k-contiguous sources are 32-bit transposes (8x8 blocks), pairs from
//! x-contiguous sources an interleave of two rows, rows from x-contiguous sources an
//! interleave followed by a 32-bit transpose. Where the CPU has AVX512-VBMI, FP8 codes
//! are decoded by table (`vpermi2b` on the bytes of each magnitude's bf16, [`lut16`]),
//! and the 32-wide pairs panels (every B panel) of FP8 sources decode 64 codes at once
//! ([`decode64`]): x-contiguous as an interleave of two rows' bytes, k-contiguous as two
//! rows decoded together and turned into pair-rows by 16 x 16 word transposes.

use super::pack::{E4M3Byte, E5M2Byte, Operand};
use fp8lm_fp8::cast::decode_table;
use fp8lm_fp8::Fp8Format;
use half::bf16;

/// A source element that converts to bf16 exactly (bf16 itself, E4M3, E5M2).
pub(crate) trait BfSrc: Copy + Send + Sync {
    /// The bf16 bits of this value.
    fn bits1(self) -> u16;
    /// The bf16 bits of the elements `ptr[i]` for the lanes `i` set in `k` (a masked
    /// load: lanes not in `k` are not read and come out 0, the bits of +0.0).
    ///
    /// # Safety
    /// `ptr` valid for the reads in `k`; the CPU supports avx512f/bw/vl and f16c.
    #[cfg(target_arch = "x86_64")]
    unsafe fn bits16_mask(ptr: *const Self, k: u16) -> std::arch::x86_64::__m256i;
    /// [`BfSrc::bits16_mask`] by table look-up (`vpermi2b`, AVX512-VBMI): the same bits
    /// but for NaN payloads (a NaN stays a NaN), in about half the instructions. The
    /// default (bf16: nothing to decode) is `bits16_mask`.
    ///
    /// # Safety
    /// As `bits16_mask`, and the CPU supports avx512vbmi.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn bits16_lut(ptr: *const Self, k: u16) -> std::arch::x86_64::__m256i {
        Self::bits16_mask(ptr, k)
    }
    /// The byte tables of an FP8 format (for the 64-lane decoder, [`decode64`]); `None`
    /// for bf16.
    #[inline(always)]
    fn lut() -> Option<&'static ByteLut> {
        None
    }
    /// [`BfSrc::bits16_mask`] of all 16 lanes (the decoder tests use it).
    ///
    /// # Safety
    /// As `bits16_mask`, 16 reads.
    #[cfg(target_arch = "x86_64")]
    #[cfg_attr(not(test), allow(dead_code))]
    #[inline(always)]
    unsafe fn bits16(ptr: *const Self) -> std::arch::x86_64::__m256i {
        Self::bits16_mask(ptr, 0xFFFF)
    }
}

/// The mask of the first `n` of 16 lanes.
#[inline(always)]
fn lanes(n: usize) -> u16 {
    if n >= 16 {
        0xFFFF
    } else {
        ((1u32 << n) - 1) as u16
    }
}

impl BfSrc for bf16 {
    #[inline(always)]
    fn bits1(self) -> u16 {
        self.to_bits()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn bits16_mask(ptr: *const Self, k: u16) -> std::arch::x86_64::__m256i {
        std::arch::x86_64::_mm256_maskz_loadu_epi16(k, ptr as *const i16)
    }
}

/// The bf16 bits of a decoded FP8 value: the top half of its exact f32 (exact: FP8 has
/// at most 3 mantissa bits).
#[inline(always)]
fn fp8_bits(fmt: Fp8Format, b: u8) -> u16 {
    (decode_table(fmt)[b as usize].to_bits() >> 16) as u16
}

/// The bf16 bits of the FP8 magnitude `m` (a code with its sign bit cleared), from the
/// formats' definitions (E4M3: bias 7, no infinities, 0x7F NaN; E5M2: bias 15, IEEE
/// specials); tested against the fp8 crate's decode over all codes.
const fn mag_bf16(fmt_e4m3: bool, m: u8) -> u16 {
    let (mbits, bias) = if fmt_e4m3 { (3u32, 7u32) } else { (2, 15) };
    let (e, f) = ((m as u32) >> mbits, (m as u32) & ((1 << mbits) - 1));
    let nan = if fmt_e4m3 {
        m == 0x7F
    } else {
        e == 31 && f != 0
    };
    if nan {
        return 0x7FC0;
    }
    if !fmt_e4m3 && e == 31 {
        return 0x7F80; // E5M2 infinity
    }
    if e == 0 {
        if f == 0 {
            return 0;
        }
        // subnormal f * 2^(1 - bias - mbits): normalise (f < 2^mbits, nonzero)
        let mut lead = mbits - 1;
        while f >> lead == 0 {
            lead -= 1;
        }
        let exp = 127 + 1 + lead - bias - mbits;
        let mant = (f & ((1 << lead) - 1)) << (7 - lead);
        return ((exp << 7) | mant) as u16;
    }
    (((e + 127 - bias) << 7) | (f << (7 - mbits))) as u16
}

/// Byte tables of [`mag_bf16`] for `vpermi2b`: the low and the high byte of the bf16 bits
/// of each of the 128 magnitudes (two 64-byte registers each).
#[repr(C, align(64))]
pub(crate) struct ByteLut {
    lo: [u8; 128],
    hi: [u8; 128],
}

impl ByteLut {
    const fn build(fmt_e4m3: bool) -> ByteLut {
        let mut t = ByteLut {
            lo: [0; 128],
            hi: [0; 128],
        };
        let mut m = 0;
        while m < 128 {
            let b = mag_bf16(fmt_e4m3, m as u8);
            t.lo[m] = b as u8;
            t.hi[m] = (b >> 8) as u8;
            m += 1;
        }
        t
    }
}

static E4M3_LUT: ByteLut = ByteLut::build(true);
static E5M2_LUT: ByteLut = ByteLut::build(false);

/// 16 FP8 codes (lanes in `k`; the others read as code 0, +0.0) to bf16 bits by table:
/// [`decode64`] of the 16 codes, its first 16 values.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn lut16(t: &ByteLut, ptr: *const u8, k: u16) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let x = _mm512_castsi128_si512(_mm_maskz_loadu_epi8(k, ptr as *const i8));
    _mm512_castsi512_si256(decode64(t, x).0)
}

/// `vpermt2b` index that interleaves the low 32 bytes of two registers `a`, `b`:
/// `a[0], b[0], a[1], b[1], ...` (byte 2i from `a[i]`, 2i+1 from `b[i]`, i.e. index
/// 64 + i); the same index with 32 added picks their high halves.
#[cfg(target_arch = "x86_64")]
const fn interleave_index(high: bool) -> [u8; 64] {
    let mut t = [0u8; 64];
    let mut i = 0;
    while i < 32 {
        let src = if high { 32 + i } else { i } as u8;
        t[2 * i] = src;
        t[2 * i + 1] = 64 + src;
        i += 1;
    }
    t
}

#[cfg(target_arch = "x86_64")]
#[repr(C, align(64))]
struct Index64([u8; 64]);
#[cfg(target_arch = "x86_64")]
static INTERLEAVE_LO: Index64 = Index64(interleave_index(false));
#[cfg(target_arch = "x86_64")]
static INTERLEAVE_HI: Index64 = Index64(interleave_index(true));

/// 64 FP8 codes (bytes of `x`) to 64 bf16 bit patterns by table, in order: codes 0..32
/// in the first register, 32..64 in the second. `vpermi2b` looks up both bytes of each
/// magnitude's bf16 (it reads the index's low 7 bits, so the sign bit needs no masking),
/// the code's sign bit becomes the bf16's (bit 7 of the high byte), and `vpermt2b`
/// interleaves low and high bytes into u16.
///
/// # Safety
/// The CPU supports avx512f/bw/vbmi.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn decode64(
    t: &ByteLut,
    x: std::arch::x86_64::__m512i,
) -> (std::arch::x86_64::__m512i, std::arch::x86_64::__m512i) {
    use std::arch::x86_64::*;
    // (loads written out, not in a closure: closures do not inherit target features)
    let (lo_p, hi_p) = (
        t.lo.as_ptr() as *const __m512i,
        t.hi.as_ptr() as *const __m512i,
    );
    let lo = _mm512_permutex2var_epi8(
        _mm512_load_si512(lo_p as *const _),
        x,
        _mm512_load_si512(lo_p.add(1) as *const _),
    );
    let hi = _mm512_permutex2var_epi8(
        _mm512_load_si512(hi_p as *const _),
        x,
        _mm512_load_si512(hi_p.add(1) as *const _),
    );
    // hi | (x & 0x80): imm 0xF8 = A | (B & C)
    let hi = _mm512_ternarylogic_epi32::<0xF8>(hi, x, _mm512_set1_epi8(0x80u8 as i8));
    let il = _mm512_load_si512(INTERLEAVE_LO.0.as_ptr() as *const _);
    let ih = _mm512_load_si512(INTERLEAVE_HI.0.as_ptr() as *const _);
    (
        _mm512_permutex2var_epi8(lo, il, hi),
        _mm512_permutex2var_epi8(lo, ih, hi),
    )
}

impl BfSrc for E4M3Byte {
    #[inline(always)]
    fn bits1(self) -> u16 {
        fp8_bits(Fp8Format::E4M3, self.0)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn bits16_lut(ptr: *const Self, k: u16) -> std::arch::x86_64::__m256i {
        lut16(&E4M3_LUT, ptr as *const u8, k)
    }
    #[inline(always)]
    fn lut() -> Option<&'static ByteLut> {
        Some(&E4M3_LUT)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn bits16_mask(ptr: *const Self, k: u16) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        // As the f32 decoder of `pack`: the 7 magnitude bits placed so the mantissa lines
        // up with f32's, read as f32 and multiplied by 2^120 (exact for subnormals too;
        // no DAZ in Rust), NaN (magnitude 0x7F) forced to all-ones; then the top half.
        let x = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, ptr as *const i8));
        let mag = _mm512_and_si512(x, _mm512_set1_epi32(0x7F));
        let sign = _mm512_slli_epi32::<24>(_mm512_and_si512(x, _mm512_set1_epi32(0x80)));
        let two_120 = _mm512_set1_ps(f32::from_bits((120 + 127) << 23));
        let v = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32::<20>(mag)), two_120);
        let v = _mm512_or_si512(_mm512_castps_si512(v), sign);
        let nan = _mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(0x7F));
        let v = _mm512_mask_mov_epi32(v, nan, _mm512_set1_epi32(-1));
        _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(v))
    }
}

impl BfSrc for E5M2Byte {
    #[inline(always)]
    fn bits1(self) -> u16 {
        fp8_bits(Fp8Format::E5M2, self.0)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn bits16_lut(ptr: *const Self, k: u16) -> std::arch::x86_64::__m256i {
        lut16(&E5M2_LUT, ptr as *const u8, k)
    }
    #[inline(always)]
    fn lut() -> Option<&'static ByteLut> {
        Some(&E5M2_LUT)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn bits16_mask(ptr: *const Self, k: u16) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        // E5M2 is the top byte of an f16: widen through f32 (exact), keep the top half.
        let x = _mm_maskz_loadu_epi8(k, ptr as *const i8);
        let h = _mm256_slli_epi16::<8>(_mm256_cvtepu8_epi16(x));
        let f = _mm512_cvtph_ps(h);
        _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(_mm512_castps_si512(f)))
    }
}

#[cfg(test)]
thread_local! {
    /// Source elements decoded by this thread's bf16 packing (tests check O(mk + kn)).
    pub(crate) static DECODED_BF16: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Whether the SIMD packers may run (checked once; both matrix-unit paths imply it).
pub(crate) fn simd_ok() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("f16c")
                && is_x86_feature_detected!("avx2")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the table decoder ([`BfSrc::bits16_lut`]) may run: AVX512-VBMI (every CPU
/// with AMX has it; some with AVX512-BF16 do not).
#[cfg(target_arch = "x86_64")]
fn vbmi_ok() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| simd_ok() && is_x86_feature_detected!("avx512vbmi"))
}

fn check_rect<S>(op: &Operand<'_, S>, x0: usize, w: usize, p0: usize, kc: usize) {
    if w > 0 && kc > 0 {
        let (x, p) = (x0 + w - 1, p0 + kc - 1);
        let i = if op.k_contig {
            x * op.ld + p
        } else {
            p * op.ld + x
        };
        assert!(
            i < op.data.len(),
            "pack_bf16: source rectangle out of bounds"
        );
    }
}

#[inline(always)]
fn at<S: BfSrc>(op: &Operand<'_, S>, x: usize, p: usize) -> u16 {
    op.data[if op.k_contig {
        x * op.ld + p
    } else {
        p * op.ld + x
    }]
    .bits1()
}

/// Pack rows `x0 .. x0 + w` (`w <= W`, `W` a multiple of 8) and steps `p0 .. p0 + kc`
/// into the **pairs** layout `dst[kcp/2][W][2]` (`kcp` even, `>= kc`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn pack_pairs<S: BfSrc, const W: usize>(
    simd: bool,
    op: Operand<'_, S>,
    x0: usize,
    w: usize,
    p0: usize,
    kc: usize,
    kcp: usize,
    dst: &mut [u16],
) {
    assert!(
        w <= W && W.is_multiple_of(8) && kcp.is_multiple_of(2) && kcp >= kc && dst.len() >= kcp * W
    );
    check_rect(&op, x0, w, p0, kc);
    #[cfg(test)]
    DECODED_BF16.set(DECODED_BF16.get() + w * kc);
    #[cfg(target_arch = "x86_64")]
    if simd && simd_ok() {
        // SAFETY: features detected; the source rectangle was bounds-checked.
        unsafe {
            if vbmi_ok() {
                pack_pairs_vbmi::<S, W>(op, x0, w, p0, kc, kcp, dst)
            } else {
                pack_pairs_simd::<S, W>(op, x0, w, p0, kc, kcp, dst)
            }
        };
        return;
    }
    let _ = simd;
    for j in 0..kcp / 2 {
        for x in 0..W {
            for h in 0..2 {
                let p = 2 * j + h;
                dst[(j * W + x) * 2 + h] = if x < w && p < kc {
                    at(&op, x0 + x, p0 + p)
                } else {
                    0
                };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
unsafe fn pack_pairs_simd<S: BfSrc, const W: usize>(
    op: Operand<'_, S>,
    x0: usize,
    w: usize,
    p0: usize,
    kc: usize,
    kcp: usize,
    dst: &mut [u16],
) {
    pack_pairs_body::<S, W, false>(op, x0, w, p0, kc, kcp, dst)
}

/// [`pack_pairs_simd`] decoding by table ([`BfSrc::bits16_lut`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx2,f16c")]
unsafe fn pack_pairs_vbmi<S: BfSrc, const W: usize>(
    op: Operand<'_, S>,
    x0: usize,
    w: usize,
    p0: usize,
    kc: usize,
    kcp: usize,
    dst: &mut [u16],
) {
    pack_pairs_body::<S, W, true>(op, x0, w, p0, kc, kcp, dst)
}

/// The decode of 16 lanes the packers use: by table (`LUT`) or by arithmetic.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn decode16<S: BfSrc, const LUT: bool>(ptr: *const S, k: u16) -> std::arch::x86_64::__m256i {
    if LUT {
        S::bits16_lut(ptr, k)
    } else {
        S::bits16_mask(ptr, k)
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn pack_pairs_body<S: BfSrc, const W: usize, const LUT: bool>(
    op: Operand<'_, S>,
    x0: usize,
    w: usize,
    p0: usize,
    kc: usize,
    kcp: usize,
    dst: &mut [u16],
) {
    use std::arch::x86_64::*;
    let src = op.data.as_ptr();
    let out = dst.as_mut_ptr();
    if !op.k_contig && LUT && W == 32 {
        if let Some(t) = S::lut() {
            // FP8 rows p and p+1 (contiguous in x): interleave their 32 bytes into 64
            // (code pairs), then decode all 64 at once: one pair-row of the panel.
            // Edges through masked loads (nothing read there, codes 0 = +0.0).
            let xmask: u64 = if w >= 32 {
                u32::MAX as u64
            } else {
                (1u64 << w) - 1
            };
            let il = _mm512_load_si512(INTERLEAVE_LO.0.as_ptr() as *const _);
            debug_assert_eq!(std::mem::size_of::<S>(), 1, "FP8 sources are bytes");
            let src8 = src as *const i8;
            // (a macro, not a closure: see row! below)
            macro_rules! row8 {
                ($p:expr) => {
                    if $p < kc && w > 0 {
                        _mm512_maskz_loadu_epi8(xmask, src8.add((p0 + $p) * op.ld + x0))
                    } else {
                        _mm512_setzero_si512()
                    }
                };
            }
            for j in 0..kcp / 2 {
                let (r0, r1) = (row8!(2 * j), row8!(2 * j + 1));
                let (d0, d1) = decode64(t, _mm512_permutex2var_epi8(r0, il, r1));
                let d = out.add(j * W * 2) as *mut __m512i;
                _mm512_storeu_si512(d, d0);
                _mm512_storeu_si512(d.add(1), d1);
            }
            return;
        }
    }
    if !op.k_contig {
        // Rows p and p+1 are contiguous in x: interleave them 16 x at a time; the edge
        // (x >= w, p >= kc) through masked loads, which read nothing there and give 0.
        // (a macro, not a closure: closures do not inherit the caller's target features,
        // and the table decoder must inline into this function's VBMI instance)
        macro_rules! row {
            ($p:expr, $x:expr, $n:expr) => {
                if $p < kc && $x < w {
                    decode16::<S, LUT>(src.add((p0 + $p) * op.ld + x0 + $x), lanes($n))
                } else {
                    _mm256_setzero_si256()
                }
            };
        }
        for j in 0..kcp / 2 {
            let d = out.add(j * W * 2);
            for x in (0..W).step_by(16) {
                let n = w.saturating_sub(x);
                let (a, b) = (row!(2 * j, x, n), row!(2 * j + 1, x, n));
                let lo = _mm256_unpacklo_epi16(a, b);
                let hi = _mm256_unpackhi_epi16(a, b);
                _mm256_storeu_si256(
                    d.add(x * 2) as *mut __m256i,
                    _mm256_permute2x128_si256::<0x20>(lo, hi),
                );
                // W is a multiple of 8: the second 8 pairs exist unless W ends here.
                if x + 16 <= W {
                    _mm256_storeu_si256(
                        d.add(x * 2 + 16) as *mut __m256i,
                        _mm256_permute2x128_si256::<0x31>(lo, hi),
                    );
                }
            }
        }
        return;
    }
    if LUT && W == 32 {
        if let Some(t) = S::lut() {
            pack_pairs_kcontig_fp8_32(t, src as *const u8, op.ld, x0, w, p0, kc, kcp, out);
            return;
        }
    }
    // k-contiguous: each x holds its pairs contiguously; transpose 8 x by 8 pairs.
    for g in (0..W).step_by(8) {
        let rows = w.saturating_sub(g).min(8);
        let row_ptr = |q: usize| src.add((x0 + g + q) * op.ld + p0);
        let mut p = 0;
        while p < kc {
            // The last block through masked loads (steps past kc read as 0), and only the
            // pair rows that exist (kcp may end inside it).
            let k = lanes(kc - p);
            let mut r = [_mm256_setzero_ps(); 8];
            for (q, rq) in r.iter_mut().enumerate().take(rows) {
                *rq = _mm256_castsi256_ps(decode16::<S, LUT>(row_ptr(q).add(p), k));
            }
            transpose8(&mut r);
            for (q, rq) in r.iter().enumerate().take((kcp - p) / 2) {
                _mm256_storeu_ps(out.add(((p / 2 + q) * W + g) * 2) as *mut f32, *rq);
            }
            p += 16;
        }
        for pp in p..kcp {
            for q in 0..8 {
                *out.add(((pp / 2) * W + g + q) * 2 + pp % 2) = if q < rows && pp < kc {
                    (*row_ptr(q).add(pp)).bits1()
                } else {
                    0
                };
            }
        }
    }
}

/// The pairs layout of a 32-wide FP8 panel from a k-contiguous source (B of the forward
/// GEMM: the weight `[N, K]`), 32 k steps at a time: two rows' 32 codes are decoded at
/// once ([`decode64`]), which leaves each row's 16 pairs as 32-bit words, and two 16 x 16
/// transposes of those words turn rows into pair-rows. Rows `w..32` and steps past `kc`
/// (masked loads) are zero; pair-rows up to `kcp / 2` are written.
///
/// # Safety
/// `src` valid for the rectangle (rows `x0..x0+w` at stride `ld`, steps `p0..p0+kc`);
/// `out` for `kcp * 32` values; the CPU supports avx512f/bw/vbmi.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pack_pairs_kcontig_fp8_32(
    t: &ByteLut,
    src: *const u8,
    ld: usize,
    x0: usize,
    w: usize,
    p0: usize,
    kc: usize,
    kcp: usize,
    out: *mut u16,
) {
    use std::arch::x86_64::*;
    let lanes32 = |n: usize| -> u64 {
        if n >= 32 {
            u32::MAX as u64
        } else {
            (1u64 << n) - 1
        }
    };
    let mut p = 0;
    while p < kcp {
        let k = lanes32(kc.saturating_sub(p));
        // rows[r]: row r's 16 pairs (32 bf16) as 16 words
        let mut rows = [_mm512_setzero_si512(); 32];
        // (a macro, not a closure: the loads must inline into the VBMI instance)
        macro_rules! load {
            ($q:expr) => {
                if $q < w && k != 0 {
                    _mm512_maskz_loadu_epi8(k, src.add((x0 + $q) * ld + p0 + p) as *const i8)
                } else {
                    _mm512_setzero_si512()
                }
            };
        }
        for r in (0..32).step_by(2) {
            let (a, b) = (load!(r), load!(r + 1));
            // row r's codes in bytes 0..32, row r+1's in 32..64
            let both = _mm512_inserti64x4::<1>(a, _mm512_castsi512_si256(b));
            let (d0, d1) = decode64(t, both);
            rows[r] = d0;
            rows[r + 1] = d1;
        }
        // Two 16 x 16 word transposes: pair-row j holds word j of every row.
        let (lo, hi) = rows.split_at_mut(16);
        transpose16x16_epi32(lo.try_into().unwrap());
        transpose16x16_epi32(hi.try_into().unwrap());
        for j in 0..16.min((kcp - p) / 2) {
            let d = out.add((p / 2 + j) * 64) as *mut __m512i;
            _mm512_storeu_si512(d, rows[j]);
            _mm512_storeu_si512(d.add(1), rows[16 + j]);
        }
        p += 32;
    }
}

/// In-register transpose of a 16 x 16 matrix of 32-bit words (`r[i]` = row i).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn transpose16x16_epi32(r: &mut [std::arch::x86_64::__m512i; 16]) {
    use std::arch::x86_64::*;
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for i in 0..4 {
        let (a, b, c, d) = (t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]);
        r[4 * i] = _mm512_unpacklo_epi64(a, c);
        r[4 * i + 1] = _mm512_unpackhi_epi64(a, c);
        r[4 * i + 2] = _mm512_unpacklo_epi64(b, d);
        r[4 * i + 3] = _mm512_unpackhi_epi64(b, d);
    }
    // now, within each 128-bit lane L of r[4i+q]: words (row 4i..4i+4, column 4L+q)
    for i in 0..2 {
        for q in 0..4 {
            let (a, b) = (r[8 * i + q], r[8 * i + 4 + q]);
            t[8 * i + q] = _mm512_shuffle_i32x4::<0x88>(a, b);
            t[8 * i + 4 + q] = _mm512_shuffle_i32x4::<0xDD>(a, b);
        }
    }
    for q in 0..8 {
        let (a, b) = (t[q], t[8 + q]);
        r[q] = _mm512_shuffle_i32x4::<0x88>(a, b);
        r[8 + q] = _mm512_shuffle_i32x4::<0xDD>(a, b);
    }
}

/// Pack rows `x0 .. x0 + w` (`w <= W`, `W` a multiple of 16) and steps `p0 .. p0 + kc`
/// into the **rows** layout `dst[kcp/32][W][32]` (`kcp` a multiple of 32, `>= kc`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn pack_rows<S: BfSrc, const W: usize>(
    simd: bool,
    op: Operand<'_, S>,
    x0: usize,
    w: usize,
    p0: usize,
    kc: usize,
    kcp: usize,
    dst: &mut [u16],
) {
    assert!(
        w <= W
            && W.is_multiple_of(16)
            && kcp.is_multiple_of(32)
            && kcp >= kc
            && dst.len() >= kcp * W
    );
    check_rect(&op, x0, w, p0, kc);
    #[cfg(target_arch = "x86_64")]
    if simd && simd_ok() {
        if op.k_contig {
            #[cfg(test)]
            DECODED_BF16.set(DECODED_BF16.get() + w * kc);
            // SAFETY: features detected; the source rectangle was bounds-checked.
            unsafe {
                if vbmi_ok() {
                    pack_rows_kcontig_vbmi::<S, W>(op, x0, w, p0, kc, kcp, dst)
                } else {
                    pack_rows_kcontig_simd::<S, W>(op, x0, w, p0, kc, kcp, dst)
                }
            };
        } else {
            // Interleave into pairs (one 32-step chunk at a time), then transpose the
            // chunk's [16 pairs][W] 32-bit words into [W][16 pairs].
            let mut tmp = [0u16; 32 * 64];
            assert!(W <= 64);
            for c in 0..kcp / 32 {
                let kcc = kc.saturating_sub(32 * c).min(32);
                pack_pairs::<S, W>(true, op, x0, w, p0 + 32 * c, kcc, 32, &mut tmp);
                // SAFETY: as above; tmp holds 32 * W values, dst chunk c as many.
                unsafe {
                    transpose_pairs_to_rows::<W>(tmp.as_ptr(), dst.as_mut_ptr().add(c * 32 * W))
                };
            }
        }
        return;
    }
    let _ = simd;
    #[cfg(test)]
    DECODED_BF16.set(DECODED_BF16.get() + w * kc);
    for c in 0..kcp / 32 {
        for x in 0..W {
            for q in 0..32 {
                let p = 32 * c + q;
                dst[(c * W + x) * 32 + q] = if x < w && p < kc {
                    at(&op, x0 + x, p0 + p)
                } else {
                    0
                };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
unsafe fn pack_rows_kcontig_simd<S: BfSrc, const W: usize>(
    op: Operand<'_, S>,
    x0: usize,
    w: usize,
    p0: usize,
    kc: usize,
    kcp: usize,
    dst: &mut [u16],
) {
    pack_rows_kcontig_body::<S, W, false>(op, x0, w, p0, kc, kcp, dst)
}

/// [`pack_rows_kcontig_simd`] decoding by table ([`BfSrc::bits16_lut`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx2,f16c")]
unsafe fn pack_rows_kcontig_vbmi<S: BfSrc, const W: usize>(
    op: Operand<'_, S>,
    x0: usize,
    w: usize,
    p0: usize,
    kc: usize,
    kcp: usize,
    dst: &mut [u16],
) {
    pack_rows_kcontig_body::<S, W, true>(op, x0, w, p0, kc, kcp, dst)
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn pack_rows_kcontig_body<S: BfSrc, const W: usize, const LUT: bool>(
    op: Operand<'_, S>,
    x0: usize,
    w: usize,
    p0: usize,
    kc: usize,
    kcp: usize,
    dst: &mut [u16],
) {
    use std::arch::x86_64::*;
    let src = op.data.as_ptr();
    let out = dst.as_mut_ptr();
    for x in 0..W {
        // wrapping: rows x >= w are never read (their pointer may lie past the slice)
        let row = src.wrapping_add((x0 + x) * op.ld + p0);
        for c in 0..kcp / 32 {
            let d = out.add((c * W + x) * 32);
            for half in 0..2 {
                let p = 32 * c + 16 * half;
                let dh = d.add(16 * half);
                let v = if x < w && p < kc {
                    decode16::<S, LUT>(row.add(p), lanes(kc - p))
                } else {
                    _mm256_setzero_si256()
                };
                _mm256_storeu_si256(dh as *mut __m256i, v);
            }
        }
    }
}

/// `src[16][W]` 32-bit words (pairs layout of one 32-step chunk) to `dst[W][16]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transpose_pairs_to_rows<const W: usize>(src: *const u16, dst: *mut u16) {
    use std::arch::x86_64::*;
    let (s, d) = (src as *const f32, dst as *mut f32);
    for jb in 0..2 {
        for xb in 0..W / 8 {
            let mut r = [_mm256_setzero_ps(); 8];
            for (q, rq) in r.iter_mut().enumerate() {
                *rq = _mm256_loadu_ps(s.add((jb * 8 + q) * W + xb * 8));
            }
            transpose8(&mut r);
            for (q, rq) in r.iter().enumerate() {
                _mm256_storeu_ps(d.add((xb * 8 + q) * 16 + jb * 8), *rq);
            }
        }
    }
}

/// In-register 8x8 transpose of 32-bit words (rows `r[i]` become columns).
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

    /// All 256 codes of both FP8 formats decode, through bf16, to exactly the fp8
    /// crate's value, and every nonzero finite one is a *normal* bf16 (exponent field
    /// neither 0 nor all-ones): the matrix units' denormals-are-zero never bites.
    /// Checked on the scalar and (where the CPU has it) the SIMD decoder.
    #[test]
    fn fp8_codes_are_exact_normal_bf16() {
        let codes: Vec<u8> = (0..=255).collect();
        for fmt in [Fp8Format::E4M3, Fp8Format::E5M2] {
            let table = decode_table(fmt);
            let mut simd = vec![None; 256];
            #[cfg(target_arch = "x86_64")]
            if simd_ok() {
                for (ci, chunk) in codes.chunks(16).enumerate() {
                    let mut got = [0u16; 16];
                    // SAFETY: features detected; 16 codes.
                    unsafe {
                        let v = match fmt {
                            Fp8Format::E4M3 => E4M3Byte::bits16(chunk.as_ptr() as *const _),
                            Fp8Format::E5M2 => E5M2Byte::bits16(chunk.as_ptr() as *const _),
                        };
                        std::arch::x86_64::_mm256_storeu_si256(got.as_mut_ptr() as *mut _, v);
                    }
                    for (i, g) in got.into_iter().enumerate() {
                        simd[ci * 16 + i] = Some(g);
                    }
                }
            } else {
                eprintln!("no avx512bw: only the scalar bf16 decoder is checked here");
            }
            let mut subnormal_fp8 = 0;
            for &c in &codes {
                let want = table[c as usize];
                let scalar = match fmt {
                    Fp8Format::E4M3 => E4M3Byte(c).bits1(),
                    Fp8Format::E5M2 => E5M2Byte(c).bits1(),
                };
                for (what, bits) in [("scalar", Some(scalar)), ("simd", simd[c as usize])] {
                    let Some(bits) = bits else { continue };
                    let got = bf16::from_bits(bits).to_f32();
                    assert!(
                        got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                        "{fmt:?} code {c:#04x} ({what}): bf16 {got} != {want}"
                    );
                    let exp = (bits >> 7) & 0xFF;
                    if want.is_finite() && want != 0.0 {
                        assert!(
                            exp != 0 && exp != 0xFF,
                            "{fmt:?} code {c:#04x} ({what}): {want} is not a normal bf16"
                        );
                    }
                    if want == 0.0 {
                        assert_eq!(bits & 0x7FFF, 0, "{fmt:?} zero code {c:#04x} ({what})");
                    }
                }
                if want != 0.0 && want.abs() < fmt.min_normal() {
                    subnormal_fp8 += 1;
                }
            }
            // E4M3 and E5M2 each have 2 x (2^m - 1) subnormal codes: 14 and 6.
            let want_sub = 2 * ((1 << fmt.mantissa_bits()) - 1);
            assert_eq!(subnormal_fp8, want_sub, "{fmt:?} subnormal codes covered");
        }
    }

    /// The table decoder (AVX512-VBMI) gives every code of both formats the bits of the
    /// scalar decoder (NaN payloads aside: a NaN stays a NaN), through masked lanes too
    /// (lanes outside the mask are +0.0).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn table_decoder_matches_scalar_on_every_code() {
        if !vbmi_ok() {
            eprintln!("no avx512vbmi: the table decoder is not run here");
            return;
        }
        let codes: Vec<u8> = (0..=255).collect();
        for fmt in [Fp8Format::E4M3, Fp8Format::E5M2] {
            for (ci, chunk) in codes.chunks(16).enumerate() {
                for k in [0xFFFFu16, 0x00FF, 0x8001] {
                    let mut got = [0u16; 16];
                    // SAFETY: vbmi detected; 16 codes readable.
                    unsafe {
                        let v = match fmt {
                            Fp8Format::E4M3 => E4M3Byte::bits16_lut(chunk.as_ptr() as *const _, k),
                            Fp8Format::E5M2 => E5M2Byte::bits16_lut(chunk.as_ptr() as *const _, k),
                        };
                        std::arch::x86_64::_mm256_storeu_si256(got.as_mut_ptr() as *mut _, v);
                    }
                    for (i, &g) in got.iter().enumerate() {
                        let c = (ci * 16 + i) as u8;
                        if k >> i & 1 == 0 {
                            assert_eq!(g, 0, "{fmt:?} masked lane {i} of code {c:#04x}");
                            continue;
                        }
                        let want = fp8_bits(fmt, c);
                        let (gf, wf) = (bf16::from_bits(g), bf16::from_bits(want));
                        assert!(
                            g == want || (gf.is_nan() && wf.is_nan()),
                            "{fmt:?} code {c:#04x}: table {g:#06x}, scalar {want:#06x}"
                        );
                    }
                }
            }
        }
    }

    fn data(rows: usize, cols: usize) -> Vec<bf16> {
        (0..rows * cols)
            .map(|i| bf16::from_f32(i as f32 * 0.25 - 300.0))
            .collect()
    }

    /// SIMD and scalar packers agree on both layouts and both source orders, with edges
    /// in x and in k (odd kc, padding to kcp), and the panels hold the right elements.
    #[test]
    fn packers_agree_and_place_elements() {
        if !simd_ok() {
            eprintln!("no avx512bw: SIMD bf16 packers not testable here");
        }
        let (rows, cols) = (37, 75); // [x, p] stored either way
        let d = data(rows, cols);
        for k_contig in [false, true] {
            let ld = if k_contig { cols } else { rows };
            let op = Operand {
                data: &d,
                ld,
                k_contig,
            };
            let val = |x: usize, p: usize| d[if k_contig { x * ld + p } else { p * ld + x }];
            for (x0, w, p0, kc) in [
                (0, 32, 0, 75),
                (32, 5, 3, 17),
                (8, 29, 40, 35),
                (0, 0, 0, 9),
                (3, 8, 1, 1),
                (29, 8, 58, 17),
            ] {
                let kcp2 = kc + kc % 2;
                // the 8-wide panels (AVX512-BF16 A), edges in x and k, padding past kc
                let w8 = w.min(8);
                let mut want8 = vec![7u16; (kcp2 + 2) * 8];
                let mut got8 = vec![9u16; (kcp2 + 2) * 8];
                pack_pairs::<bf16, 8>(false, op, x0, w8, p0, kc, kcp2 + 2, &mut want8);
                pack_pairs::<bf16, 8>(true, op, x0, w8, p0, kc, kcp2 + 2, &mut got8);
                assert_eq!(
                    want8, got8,
                    "pairs8 k_contig {k_contig} {x0} {w8} {p0} {kc}"
                );
                let mut want = vec![7u16; kcp2 * 32];
                let mut got = vec![9u16; kcp2 * 32];
                pack_pairs::<bf16, 32>(false, op, x0, w, p0, kc, kcp2, &mut want);
                pack_pairs::<bf16, 32>(true, op, x0, w, p0, kc, kcp2, &mut got);
                assert_eq!(want, got, "pairs k_contig {k_contig} {x0} {w} {p0} {kc}");
                for p in 0..kcp2 {
                    for x in 0..32 {
                        let v = if x < w && p < kc {
                            val(x0 + x, p0 + p).to_bits()
                        } else {
                            0
                        };
                        assert_eq!(want[((p / 2) * 32 + x) * 2 + p % 2], v);
                    }
                }
                let kcp32 = kc.div_ceil(32).max(1) * 32;
                let mut want = vec![7u16; kcp32 * 32];
                let mut got = vec![9u16; kcp32 * 32];
                pack_rows::<bf16, 32>(false, op, x0, w, p0, kc, kcp32, &mut want);
                pack_rows::<bf16, 32>(true, op, x0, w, p0, kc, kcp32, &mut got);
                assert_eq!(want, got, "rows k_contig {k_contig} {x0} {w} {p0} {kc}");
                for p in 0..kcp32 {
                    for x in 0..32 {
                        let v = if x < w && p < kc {
                            val(x0 + x, p0 + p).to_bits()
                        } else {
                            0
                        };
                        assert_eq!(want[((p / 32) * 32 + x) * 32 + p % 32], v);
                    }
                }
            }
        }
    }
}
