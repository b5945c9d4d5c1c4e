//! FP8 GEMM through cuBLASLt's lower layer (`cudarc::cublaslt::{result, sys}`; cudarc's
//! safe `Matmul` has one type for A, B and C and no scale pointers, so no FP8).
//!
//! Two halves:
//! - [`LtPlan`]: pure host logic, unit-tested without a device: how our row-major
//!   `C[m,n] = op(A)[m,k] @ op(B)[k,n]` maps to cuBLASLt's column-major call, which data
//!   types and scale pointers go where, and the cache key.
//! - [`LtGemm`]: the device side: one cuBLASLt handle, a workspace, and per-shape cached
//!   descriptors, layouts and algorithm (heuristic asked once per key).
//!
//! ## Mapping (why the operands swap)
//! A row-major `[m,n]` buffer is the column-major `[n,m]` matrix `C^T`, and
//! `C^T = op(B)^T op(A)^T`. So cuBLASLt's first operand ("A" in its docs, called `lt_a`
//! here) is **our B buffer** and its second (`lt_b`) is **our A buffer**; D is
//! column-major `n x m` with leading dimension `n`. FP8 in cuBLASLt requires the "TN"
//! layout: `lt_a` transposed, `lt_b` not. That is our `trans_b && !trans_a`: exactly the
//! forward GEMM `out[BT,OC] = inp[BT,C] @ W[OC,C]^T`. The two backward GEMMs
//! (`dinp = dout @ W`, `dW = dout^T @ inp`) are not TN: [`LtPlan::new`] names the
//! operands the caller must first transpose on the device (kernel `transpose_u8`), as
//! Transformer Engine does.
//!
//! ## Scales
//! Ours: `stored = real * scale`. cuBLASLt: `D = scale_d * (alpha * scale_a * scale_b *
//! op(A) op(B) + beta * scale_c * C)` on the *stored* values, so `scale_a`/`scale_b` must
//! be the **inverses** `1/scale` (computed on the device by kernel `invert_scales`, no
//! host sync), crossed over like the operands: `lt_a` gets 1/scale of our B. `scale_d` is
//! our output scale as is (an FP8 output is `real * scale`). The D amax pointer receives
//! max |result| before `scale_d` (cuBLASLt writes an f32).
//!
//! ## Accumulation
//! `CUBLAS_COMPUTE_32F`; fast accumulation (`CUBLASLT_MATMUL_DESC_FAST_ACCUM`, which on
//! Hopper lets the tensor cores keep partial sums at reduced precision) is off unless
//! [`LtKey::fast_accum`] asks for it.

use fp8lm_fp8::Fp8Format;

/// Element type of a cuBLASLt operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LtType {
    E4M3,
    E5M2,
    Bf16,
    F32,
}

impl LtType {
    pub fn fp8(f: Fp8Format) -> LtType {
        match f {
            Fp8Format::E4M3 => LtType::E4M3,
            Fp8Format::E5M2 => LtType::E5M2,
        }
    }
    pub fn is_fp8(self) -> bool {
        matches!(self, LtType::E4M3 | LtType::E5M2)
    }
    pub fn bytes(self) -> usize {
        match self {
            LtType::E4M3 | LtType::E5M2 => 1,
            LtType::Bf16 => 2,
            LtType::F32 => 4,
        }
    }
    /// The `cudaDataType` code (CUDA_R_8F_E4M3 = 28, CUDA_R_8F_E5M2 = 29, CUDA_R_16BF = 14,
    /// CUDA_R_32F = 0).
    pub fn cuda_code(self) -> u32 {
        match self {
            LtType::E4M3 => 28,
            LtType::E5M2 => 29,
            LtType::Bf16 => 14,
            LtType::F32 => 0,
        }
    }
}

/// Which of our buffers a cuBLASLt operand reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OurOperand {
    A,
    B,
}

/// One column-major cuBLASLt matrix layout: `rows x cols`, leading dimension `ld`, and
/// whether the matmul descriptor transposes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LtLayout {
    pub reads: OurOperand,
    pub ty: LtType,
    pub rows: u64,
    pub cols: u64,
    pub ld: i64,
    pub transposed: bool,
}

/// Cache key of a planned GEMM: everything the descriptors and the algorithm depend on
/// (pointers and scale values are set per call and are not part of it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LtKey {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: LtType,
    pub b: LtType,
    pub d: LtType,
    /// `C += ...` (beta = 1, C = D); else beta = 0.
    pub accumulate: bool,
    pub fast_accum: bool,
}

/// An operand the caller must materialise transposed before an FP8 cuBLASLt call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NeedsTranspose {
    pub operand: OurOperand,
    /// The stored shape `[rows, cols]` now, and after the transpose it is `[cols, rows]`.
    pub rows: usize,
    pub cols: usize,
}

/// A GEMM planned for cuBLASLt (host logic only).
#[derive(Clone, Debug, PartialEq)]
pub struct LtPlan {
    pub key: LtKey,
    pub lt_a: LtLayout,
    pub lt_b: LtLayout,
    /// D (and C): column-major `n x m`, ld `n` (= our row-major `[m, n]`).
    pub d_rows: u64,
    pub d_cols: u64,
    pub d_ld: i64,
    /// The C type: f32 for an f32 D, bf16 for bf16 and FP8 D (cuBLASLt's FP8 table).
    pub c: LtType,
}

/// Why a GEMM cannot go to cuBLASLt as asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlanError {
    /// FP8 needs TN: these operands must be transposed first (see the module docs).
    NotTn(Vec<NeedsTranspose>),
    /// FP8 cuBLASLt needs every dimension a multiple of 16 (16-byte aligned leading
    /// dimensions of the 1-byte operands).
    Unaligned {
        m: usize,
        n: usize,
        k: usize,
    },
    /// E5M2 x E5M2 is not a cuBLASLt FP8 combination (E4M3 x E5M2 and E5M2 x E4M3 are).
    BothE5m2,
    /// FP8 and non-FP8 operands mixed.
    MixedTypes,
    /// An FP8 output cannot accumulate into the old value.
    Fp8Accumulate,
    Empty,
}

impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlanError::NotTn(v) => write!(
                f,
                "cuBLASLt FP8 needs the TN layout (our trans_b and not trans_a); transpose first: {v:?}"
            ),
            PlanError::Unaligned { m, n, k } => write!(
                f,
                "cuBLASLt FP8 needs m, n, k multiples of 16, got m={m} n={n} k={k}"
            ),
            PlanError::BothE5m2 => write!(f, "cuBLASLt has no E5M2 x E5M2 GEMM"),
            PlanError::MixedTypes => write!(f, "FP8 and non-FP8 GEMM operands mixed"),
            PlanError::Fp8Accumulate => write!(f, "an FP8 GEMM output cannot accumulate"),
            PlanError::Empty => write!(f, "empty GEMM (a dimension is 0)"),
        }
    }
}
impl std::error::Error for PlanError {}

impl LtPlan {
    /// Plan `C[m,n] (+)= op(A) @ op(B)` (our row-major conventions, as
    /// [`crate::GemmShape`]) with A of type `a`, B of type `b`, output `d`.
    pub fn new(
        shape: crate::GemmShape,
        a: LtType,
        b: LtType,
        d: LtType,
        accumulate: bool,
        fast_accum: bool,
    ) -> Result<LtPlan, PlanError> {
        let (m, n, k) = (shape.m, shape.n, shape.k);
        if m == 0 || n == 0 || k == 0 {
            return Err(PlanError::Empty);
        }
        let fp8 = a.is_fp8();
        if fp8 != b.is_fp8() {
            return Err(PlanError::MixedTypes);
        }
        if fp8 {
            if a == LtType::E5M2 && b == LtType::E5M2 {
                return Err(PlanError::BothE5m2);
            }
            let mut need = Vec::new();
            if !shape.trans_b {
                // B stored [k, n]; TN wants it stored [n, k].
                need.push(NeedsTranspose {
                    operand: OurOperand::B,
                    rows: k,
                    cols: n,
                });
            }
            if shape.trans_a {
                // A stored [k, m]; TN wants it stored [m, k].
                need.push(NeedsTranspose {
                    operand: OurOperand::A,
                    rows: k,
                    cols: m,
                });
            }
            if !need.is_empty() {
                return Err(PlanError::NotTn(need));
            }
            if m % 16 != 0 || n % 16 != 0 || k % 16 != 0 {
                return Err(PlanError::Unaligned { m, n, k });
            }
            if d.is_fp8() && accumulate {
                return Err(PlanError::Fp8Accumulate);
            }
        }
        // lt_a = our B: we need op(B)^T (n x k). B stored [k,n] row-major is the
        // column-major [n,k] matrix itself (ld n, no transpose); B stored [n,k] is the
        // column-major [k,n] (ld k), transposed.
        let lt_a = if shape.trans_b {
            LtLayout {
                reads: OurOperand::B,
                ty: b,
                rows: k as u64,
                cols: n as u64,
                ld: k as i64,
                transposed: true,
            }
        } else {
            LtLayout {
                reads: OurOperand::B,
                ty: b,
                rows: n as u64,
                cols: k as u64,
                ld: n as i64,
                transposed: false,
            }
        };
        // lt_b = our A: we need op(A)^T (k x m). A stored [m,k] is column-major [k,m]
        // (ld k, no transpose); A stored [k,m] is column-major [m,k] (ld m), transposed.
        let lt_b = if shape.trans_a {
            LtLayout {
                reads: OurOperand::A,
                ty: a,
                rows: m as u64,
                cols: k as u64,
                ld: m as i64,
                transposed: true,
            }
        } else {
            LtLayout {
                reads: OurOperand::A,
                ty: a,
                rows: k as u64,
                cols: m as u64,
                ld: k as i64,
                transposed: false,
            }
        };
        let c = if d == LtType::F32 {
            LtType::F32
        } else {
            LtType::Bf16
        };
        Ok(LtPlan {
            key: LtKey {
                m,
                n,
                k,
                a,
                b,
                d,
                accumulate,
                fast_accum,
            },
            lt_a,
            lt_b,
            d_rows: n as u64,
            d_cols: m as u64,
            d_ld: n as i64,
            c,
        })
    }

    /// The values for cuBLASLt's (A, B) scale pointers from our operand scales
    /// (`stored = real * scale`): the inverses, crossed over like the operands.
    pub fn lt_scales(scale_our_a: f32, scale_our_b: f32) -> (f32, f32) {
        (1.0 / scale_our_b, 1.0 / scale_our_a)
    }

    /// alpha, beta.
    pub fn alpha_beta(&self) -> (f32, f32) {
        (1.0, if self.key.accumulate { 1.0 } else { 0.0 })
    }

    /// What cuBLASLt computes for this plan, evaluated on the host from the *stored*
    /// buffers with its column-major semantics (`D = scale_d * (alpha * sa * sb * op(lt_a)
    /// op(lt_b) + beta * C)`), in f64. Used by the tests to check the mapping against the
    /// CPU backend; `c` is our row-major `[m,n]` output (C = D).
    #[allow(clippy::too_many_arguments)]
    pub fn emulate(
        &self,
        a_vals: &[f64],
        b_vals: &[f64],
        sa: f64,
        sb: f64,
        scale_d: f64,
        c: &mut [f64],
    ) {
        let get = |l: &LtLayout, buf: &[f64], i: usize, j: usize| -> f64 {
            // Element (i, j) of op(l): the stored column-major matrix is rows x cols.
            let (r, col) = if l.transposed { (j, i) } else { (i, j) };
            buf[col * l.ld as usize + r]
        };
        let buf_of = |l: &LtLayout| match l.reads {
            OurOperand::A => a_vals,
            OurOperand::B => b_vals,
        };
        let (alpha, beta) = self.alpha_beta();
        let kk = self.key.k;
        for j in 0..self.d_cols as usize {
            for i in 0..self.d_rows as usize {
                let mut s = 0.0;
                for l in 0..kk {
                    s += get(&self.lt_a, buf_of(&self.lt_a), i, l)
                        * get(&self.lt_b, buf_of(&self.lt_b), l, j);
                }
                let idx = j * self.d_ld as usize + i;
                c[idx] = scale_d * (alpha as f64 * sa * sb * s + beta as f64 * c[idx]);
            }
        }
    }
}

#[cfg(test)]
mod tests;

pub use device::{LtArgs, LtGemm};
mod device;
