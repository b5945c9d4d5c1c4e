//! Micro-kernels: one `MR x NR` (8 x 32) tile of C from one A panel (`[kc][MR]`) and one
//! B panel (`[kc][NR]`), f32 multiply-add, f32 accumulators held in registers for the
//! whole K-block.
//!
//! Epilogue: `C = alpha * acc` or, with `beta_one`, `C = C + alpha * acc` (one FMA on the
//! SIMD paths). `alpha` carries the operands' combined scale `1 / (scale_a * scale_b)`,
//! applied once per output element per K-block.
//!
//! Three versions, chosen once at run time ([`Isa::detect`]):
//! - AVX-512F: 16 zmm accumulators (8 rows x 2 vectors), A values broadcast from memory.
//! - AVX2+FMA: 16 ymm registers are too few for an 8x32 tile, so the tile is done in
//!   three register-sized passes (6x16, 6x16, 2x32), each re-reading its part of the
//!   panels from L1.
//! - portable scalar loops (any CPU; correct, not fast).

use super::{Isa, MR, NR};

/// Compute one full tile. `a` has `kc * MR` values, `b` has `kc * NR`; `c` points at the
/// tile's top-left element of a row-major matrix with row stride `ldc`.
///
/// # Safety
/// `c` must be valid for an `MR x NR` tile at stride `ldc`, and `isa` must be supported
/// by this CPU (it is when it came from [`Isa::detect`]).
#[inline]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn tile(
    isa: Isa,
    kc: usize,
    a: &[f32],
    b: &[f32],
    c: *mut f32,
    ldc: usize,
    alpha: f32,
    beta_one: bool,
) {
    assert!(a.len() >= kc * MR && b.len() >= kc * NR);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => tile_avx512(kc, a.as_ptr(), b.as_ptr(), c, ldc, alpha, beta_one),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            // 16 ymm registers: rows 0..6 in two 6x16 passes (12 accumulators each),
            // rows 6..8 in one 2x32 pass (8 accumulators). Each pass has at least 8
            // independent FMA chains (4-cycle latency x 2 ports) and needs <= 15 registers.
            let (a, b) = (a.as_ptr(), b.as_ptr());
            sub_avx2::<6, 2>(kc, a, b, c, ldc, alpha, beta_one);
            sub_avx2::<6, 2>(kc, a, b.add(16), c.add(16), ldc, alpha, beta_one);
            sub_avx2::<2, 4>(kc, a.add(6), b, c.add(6 * ldc), ldc, alpha, beta_one);
        }
        _ => tile_scalar(kc, a, b, c, ldc, alpha, beta_one),
    }
}

unsafe fn tile_scalar(
    kc: usize,
    a: &[f32],
    b: &[f32],
    c: *mut f32,
    ldc: usize,
    alpha: f32,
    beta_one: bool,
) {
    let mut acc = [[0f32; NR]; MR];
    for (ap, bp) in a.chunks_exact(MR).zip(b.chunks_exact(NR)).take(kc) {
        for (row, &av) in acc.iter_mut().zip(ap) {
            for (x, &bv) in row.iter_mut().zip(bp) {
                *x += av * bv;
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        let cr = c.add(r * ldc);
        for (j, &x) in row.iter().enumerate() {
            let d = cr.add(j);
            *d = if beta_one { *d + alpha * x } else { alpha * x };
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512(
    kc: usize,
    mut a: *const f32,
    mut b: *const f32,
    c: *mut f32,
    ldc: usize,
    alpha: f32,
    beta_one: bool,
) {
    use std::arch::x86_64::*;
    let mut lo = [_mm512_setzero_ps(); MR];
    let mut hi = [_mm512_setzero_ps(); MR];
    for _ in 0..kc {
        let b0 = _mm512_loadu_ps(b);
        let b1 = _mm512_loadu_ps(b.add(16));
        for r in 0..MR {
            let av = _mm512_set1_ps(*a.add(r));
            lo[r] = _mm512_fmadd_ps(av, b0, lo[r]);
            hi[r] = _mm512_fmadd_ps(av, b1, hi[r]);
        }
        a = a.add(MR);
        b = b.add(NR);
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

/// An `R x 8V` sub-tile: rows `a[p*MR .. p*MR + R]`, columns `b[p*NR .. p*NR + 8V]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sub_avx2<const R: usize, const V: usize>(
    kc: usize,
    mut a: *const f32,
    mut b: *const f32,
    c: *mut f32,
    ldc: usize,
    alpha: f32,
    beta_one: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); V]; R];
    for _ in 0..kc {
        let mut bv = [_mm256_setzero_ps(); V];
        for (v, x) in bv.iter_mut().enumerate() {
            *x = _mm256_loadu_ps(b.add(8 * v));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let av = _mm256_broadcast_ss(&*a.add(r));
            for (x, &bx) in row.iter_mut().zip(&bv) {
                *x = _mm256_fmadd_ps(av, bx, *x);
            }
        }
        a = a.add(MR);
        b = b.add(NR);
    }
    let al = _mm256_set1_ps(alpha);
    for (r, row) in acc.iter().enumerate() {
        let cr = c.add(r * ldc);
        for (v, &x) in row.iter().enumerate() {
            let d = cr.add(8 * v);
            let y = if beta_one {
                _mm256_fmadd_ps(al, x, _mm256_loadu_ps(d))
            } else {
                _mm256_mul_ps(al, x)
            };
            _mm256_storeu_ps(d, y);
        }
    }
}
