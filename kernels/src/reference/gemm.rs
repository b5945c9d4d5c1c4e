//! The reference GEMM: scalar decode, then `C[i,j] = sum_k A[i,k] B[k,j]` in f32, k in
//! order. See the module docs of [`super`].

use super::Reference;
use crate::{Fp8CastResult, GemmOps, GemmShape, MatRef};
use fp8lm_fp8::cast::cast_counts;
use fp8lm_fp8::{CastMode, Fp8Format};
use half::bf16;

/// Element `i` of an operand as a real f32: the scalar decode, divided by the scale
/// (exact for the power-of-two scales the recipes use, barring f32 underflow).
fn real(m: &MatRef<'_>, i: usize) -> f32 {
    match m {
        MatRef::F32(s) => s[i],
        MatRef::Bf16(s) => s[i].to_f32(),
        MatRef::Fp8 {
            data,
            format,
            scale,
        } => format.decode(data[i]) / scale,
    }
}

/// `op(M)` as a row-major `[rows, cols]` f32 matrix; `trans`: M is stored `[cols, rows]`.
fn decoded(m: &MatRef<'_>, rows: usize, cols: usize, trans: bool) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            out.push(real(m, if trans { c * rows + r } else { r * cols + c }));
        }
    }
    out
}

fn check(s: &GemmShape, a: &MatRef<'_>, b: &MatRef<'_>, c_len: usize) {
    for (name, m) in [("A", a), ("B", b)] {
        if let MatRef::Fp8 { scale, format, .. } = m {
            assert!(
                scale.is_finite() && *scale > 0.0,
                "gemm: {name} ({}) has scale {scale}; scales must be finite and > 0",
                format.name()
            );
        }
    }
    assert_eq!(
        a.len(),
        s.m * s.k,
        "gemm: A has {} elements, shape needs {}x{}",
        a.len(),
        s.m,
        s.k
    );
    assert_eq!(
        b.len(),
        s.k * s.n,
        "gemm: B has {} elements, shape needs {}x{}",
        b.len(),
        s.k,
        s.n
    );
    assert_eq!(
        c_len,
        s.m * s.n,
        "gemm: C has {c_len} elements, shape needs {}x{}",
        s.m,
        s.n
    );
}

/// The f32 product, `[m, n]`.
fn product(s: GemmShape, a: MatRef<'_>, b: MatRef<'_>) -> Vec<f32> {
    let a = decoded(&a, s.m, s.k, s.trans_a); // [m, k]
    let bt = decoded(&b, s.n, s.k, !s.trans_b); // op(B)^T: [n, k]
    let mut c = vec![0f32; s.m * s.n];
    for i in 0..s.m {
        let ar = &a[i * s.k..(i + 1) * s.k];
        for j in 0..s.n {
            let br = &bt[j * s.k..(j + 1) * s.k];
            let mut acc = 0f32;
            for p in 0..s.k {
                acc += ar[p] * br[p];
            }
            c[i * s.n + j] = acc;
        }
    }
    c
}

impl GemmOps for Reference {
    fn gemm(&self, s: GemmShape, a: MatRef<'_>, b: MatRef<'_>, c: &mut [f32], accumulate: bool) {
        check(&s, &a, &b, c.len());
        let p = product(s, a, b);
        for (c, p) in c.iter_mut().zip(p) {
            *c = if accumulate { *c + p } else { p };
        }
    }

    fn gemm_bf16_out(
        &self,
        s: GemmShape,
        a: MatRef<'_>,
        b: MatRef<'_>,
        c: &mut [bf16],
        accumulate: bool,
    ) {
        check(&s, &a, &b, c.len());
        let p = product(s, a, b);
        for (c, p) in c.iter_mut().zip(p) {
            *c = bf16::from_f32(if accumulate { c.to_f32() + p } else { p });
        }
    }

    fn gemm_fp8_out(
        &self,
        s: GemmShape,
        a: MatRef<'_>,
        b: MatRef<'_>,
        out: &mut [u8],
        out_format: Fp8Format,
        out_scale: f32,
    ) -> Fp8CastResult {
        check(&s, &a, &b, out.len());
        let p = product(s, a, b);
        let mut amax = 0f32;
        for (o, &x) in out.iter_mut().zip(&p) {
            *o = out_format.encode_mode(x * out_scale, CastMode::SatFinite);
            amax = if x.is_nan() || amax.is_nan() {
                f32::NAN
            } else {
                amax.max(x.abs())
            };
        }
        let counts = cast_counts(out_format, &p, out_scale, out, true);
        Fp8CastResult { amax, counts }
    }
}
