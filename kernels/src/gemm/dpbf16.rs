//! AVX512-BF16 micro-kernel (`vdpbf16ps`), for CPUs with BF16 dot products but no AMX:
//! an 8 x 32 f32 tile of C, 16 zmm accumulators (8 rows x 2 vectors of 16 columns).
//!
//! Per k pair: two B loads (32 columns of `(p, p+1)` bf16 pairs, the `pairs` layout of
//! [`super::pack_bf16`] with 32 columns), and for each of the 8 rows one broadcast of its
//! `(p, p+1)` pair (A in the `pairs` layout with 8 rows) and two `vdpbf16ps`, each 16
//! lanes x 2 products: twice the multiply-adds of an f32 FMA per instruction.
//!
//! Numerics: as AMX, bf16 products exact, f32 accumulation (round to nearest even,
//! denormals flushed). Epilogue as the f32 kernel: `C = alpha * acc (+ C)`.

/// Rows of C per tile.
pub(crate) const MR: usize = 8;

/// One full 8 x 32 tile; `kcp` even. `a`: `kcp * 8` values, `b`: `kcp * 32`.
///
/// # Safety
/// `c` valid for an 8 x 32 tile at stride `ldc`; the CPU has avx512f + avx512bf16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
pub(crate) unsafe fn tile_dp(
    kcp: usize,
    a: *const u16,
    b: *const u16,
    c: *mut f32,
    ldc: usize,
    alpha: f32,
    beta_one: bool,
) {
    use std::arch::x86_64::*;
    let (mut a, mut b) = (a as *const i32, b as *const i32);
    let mut lo = [_mm512_setzero_ps(); MR];
    let mut hi = [_mm512_setzero_ps(); MR];
    for _ in 0..kcp / 2 {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(16) as *const _));
        for r in 0..MR {
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(r)));
            lo[r] = _mm512_dpbf16_ps(lo[r], av, b0);
            hi[r] = _mm512_dpbf16_ps(hi[r], av, b1);
        }
        a = a.add(MR);
        b = b.add(32);
    }
    let al = _mm512_set1_ps(alpha);
    for r in 0..MR {
        let cr = c.add(r * ldc);
        if beta_one {
            _mm512_storeu_ps(cr, _mm512_fmadd_ps(al, lo[r], _mm512_loadu_ps(cr)));
            _mm512_storeu_ps(
                cr.add(16),
                _mm512_fmadd_ps(al, hi[r], _mm512_loadu_ps(cr.add(16))),
            );
        } else {
            _mm512_storeu_ps(cr, _mm512_mul_ps(al, lo[r]));
            _mm512_storeu_ps(cr.add(16), _mm512_mul_ps(al, hi[r]));
        }
    }
}

/// Whether this CPU runs [`tile_dp`] (and the bf16 packers).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512bf16") && super::pack_bf16::simd_ok()
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}
