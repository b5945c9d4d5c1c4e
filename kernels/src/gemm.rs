//! GEMM: `C[m,n] (+)= op(A)[m,k] @ op(B)[k,n]`, row-major, f32 accumulation.
//!
//! `op(A)` is A itself (stored `[m,k]`) or its transpose (A stored `[k,m]`); likewise
//! `op(B)` is B stored `[k,n]` or, transposed, stored `[n,k]`. The three GEMMs of a linear
//! layer `out = inp @ W^T` (W stored `[OC, C]` as in llm.c) are:
//!   forward  out[BT,OC]  = inp[BT,C] @ W^T        (trans_b)
//!   dinp     dinp[BT,C]  = dout[BT,OC] @ W[OC,C]   (plain)
//!   dW       dW[OC,C]    = dout^T @ inp[BT,C]      (trans_a)

use crate::Cpu;
use fp8lm_fp8::cast::decode_table;
use fp8lm_fp8::Fp8Format;
use half::bf16;

/// One GEMM operand. FP8 operands carry their format and scale (`real = stored / scale`).
#[derive(Clone, Copy, Debug)]
pub enum MatRef<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    Fp8 {
        data: &'a [u8],
        format: Fp8Format,
        scale: f32,
    },
}

impl MatRef<'_> {
    pub fn len(&self) -> usize {
        match self {
            MatRef::F32(s) => s.len(),
            MatRef::Bf16(s) => s.len(),
            MatRef::Fp8 { data, .. } => data.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Element `i` as a real (descaled) f32.
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            MatRef::F32(s) => s[i],
            MatRef::Bf16(s) => s[i].to_f32(),
            MatRef::Fp8 {
                data,
                format,
                scale,
            } => decode_table(*format)[data[i] as usize] / scale,
        }
    }
}

/// Problem size and operand layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// A is stored `[k, m]` and used transposed.
    pub trans_a: bool,
    /// B is stored `[n, k]` and used transposed.
    pub trans_b: bool,
}

impl GemmShape {
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        GemmShape {
            m,
            n,
            k,
            trans_a: false,
            trans_b: false,
        }
    }
    pub fn trans_a(mut self) -> Self {
        self.trans_a = true;
        self
    }
    pub fn trans_b(mut self) -> Self {
        self.trans_b = true;
        self
    }
}

/// Matrix products with f32 accumulation.
pub trait GemmOps: Send + Sync {
    /// `C = op(A) @ op(B)`, or `C += ...` when `accumulate`. Panics on slice lengths that
    /// do not match the shape (a programming error, not an input error).
    fn gemm(&self, shape: GemmShape, a: MatRef<'_>, b: MatRef<'_>, c: &mut [f32], accumulate: bool);
}

impl GemmOps for Cpu {
    fn gemm(&self, s: GemmShape, a: MatRef<'_>, b: MatRef<'_>, c: &mut [f32], accumulate: bool) {
        assert_eq!(
            a.len(),
            s.m * s.k,
            "gemm: A has {} elements, shape needs {}",
            a.len(),
            s.m * s.k
        );
        assert_eq!(
            b.len(),
            s.k * s.n,
            "gemm: B has {} elements, shape needs {}",
            b.len(),
            s.k * s.n
        );
        assert_eq!(
            c.len(),
            s.m * s.n,
            "gemm: C has {} elements, shape needs {}",
            c.len(),
            s.m * s.n
        );
        // Placeholder reference loop; the blocked, threaded kernel replaces it.
        for i in 0..s.m {
            for j in 0..s.n {
                let mut acc = 0f32;
                for p in 0..s.k {
                    let ai = if s.trans_a { p * s.m + i } else { i * s.k + p };
                    let bi = if s.trans_b { j * s.k + p } else { p * s.n + j };
                    acc += a.get(ai) * b.get(bi);
                }
                let dst = &mut c[i * s.n + j];
                *dst = if accumulate { *dst + acc } else { acc };
            }
        }
    }
}
