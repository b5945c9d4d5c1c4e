//! GEMM: `C[m,n] (+)= op(A)[m,k] @ op(B)[k,n]`, row-major, f32 accumulation.
//!
//! `op(A)` is A itself (stored `[m,k]`) or its transpose (A stored `[k,m]`); likewise
//! `op(B)` is B stored `[k,n]` or, transposed, stored `[n,k]`. The three GEMMs of a linear
//! layer `out = inp @ W^T` (W stored `[OC, C]` as in llm.c) are:
//! ```text
//!   forward  out[BT,OC]  = inp[BT,C] @ W^T        (trans_b)
//!   dinp     dinp[BT,C]  = dout[BT,OC] @ W[OC,C]   (plain)
//!   dW       dW[OC,C]    = dout^T @ inp[BT,C]      (trans_a)
//! ```
//!
//! Operands may be f32, bf16 or scaled FP8 in any mix (the FP8 recipe uses E4M3 x E4M3
//! forward, E5M2 x E4M3 for dinp and E5M2 x E4M3 transposed for dW). Accumulation is
//! always f32. The CPU implementation ([`Cpu`]) is in three parts:
//! - `pack`: operand blocks are copied into kernel panels, bf16/FP8 decoded to exact f32
//!   on the way (O(mk + kn) decode work, the FP8 values stay exact),
//! - `kernel`: an 8x32 f32 FMA micro-kernel (AVX-512F, AVX2+FMA, or portable),
//! - `driver`: cache blocking and rayon threading.
//!
//! GEMMs whose operands are both bf16 or FP8 run instead on the CPU's bf16 matrix units
//! when it has them ([`GemmPath`]: AMX tiles, else AVX512-BF16 dot products, else the
//! FMA kernel above): `pack_bf16` decodes to bf16 (exact for every FP8 value, and never a
//! bf16 denormal) into the pair ("VNNI") layout, `amx` / `dpbf16` are the micro-kernels
//! (bf16 products exact, f32 accumulation, same epilogue), `driver_bf16` the blocking.
//! Any GEMM with an f32 operand stays on f32 FMA (the reference numerics).
//!
//! The scales of FP8 operands are applied as one factor `1 / (scale_a * scale_b)` in the
//! epilogue, once per output element and K-block (256 or 512 steps): with the default
//! power-of-two scales that multiply is exact; with exact-ratio scales it adds one
//! rounding per K-block, inside the f32 accumulation bound the tests use.
//!
//! Numerics: the product of two decoded FP8 (or bf16) values is formed and accumulated
//! in f32 by FMA; per output the error is bounded by about `k * 2^-24 * sum |a||b|`
//! (tested against f64 in `tests.rs`). Results do not depend on the thread count (every
//! tile is computed the same way whichever thread gets it).
//!
//! Why our own kernel rather than the `gemm` or `matrixmultiply` crate: neither exposes
//! its packing, so decoding FP8 would need an extra f32 copy of both operands per call;
//! packing our own panels makes the decode free-riding on a copy f32 also needs, so the
//! FP8 GEMM runs as fast as the f32 one. Both crates are measured against ours in
//! [`crate::bench`].

mod amx;
pub mod blockscaled;
mod dpbf16;
mod driver;
mod driver_bf16;
mod kernel;
mod pack;
mod pack_bf16;
mod path;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_bf16;

pub use path::{path_calls, set_path_override, GemmPath, PathCalls, GEMM_ENV};

use crate::Cpu;
use crate::Fp8CastResult;
use fp8lm_fp8::cast::{decode_table, par_f32_to_fp8_counted};
use fp8lm_fp8::Fp8Format;
use half::bf16;
use rayon::prelude::*;
use std::sync::OnceLock;

/// Micro-kernel tile: rows of A per panel.
pub(crate) const MR: usize = 8;
/// Micro-kernel tile: columns of B per panel.
pub(crate) const NR: usize = 32;

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
    /// Short name of the element type, for reports (`f32`, `bf16`, `e4m3`, `e5m2`).
    pub fn dtype_name(&self) -> &'static str {
        match self {
            MatRef::F32(_) => "f32",
            MatRef::Bf16(_) => "bf16",
            MatRef::Fp8 { format, .. } => format.name(),
        }
    }
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
///
/// The output variants beyond [`GemmOps::gemm`] have default implementations (compute in
/// f32, then convert) so a new backend only has to provide `gemm`; [`Cpu`] overrides them.
pub trait GemmOps: Send + Sync {
    /// `C = op(A) @ op(B)`, or `C += ...` when `accumulate`. Panics on slice lengths that
    /// do not match the shape (a programming error, not an input error).
    fn gemm(&self, shape: GemmShape, a: MatRef<'_>, b: MatRef<'_>, c: &mut [f32], accumulate: bool);

    /// As [`GemmOps::gemm`] with a bf16 output: the f32 result (plus the old value of `c`
    /// when `accumulate`, added in f32) is rounded to bf16 once, to nearest even.
    fn gemm_bf16_out(
        &self,
        shape: GemmShape,
        a: MatRef<'_>,
        b: MatRef<'_>,
        c: &mut [bf16],
        accumulate: bool,
    ) {
        check_out_len(&shape, c.len());
        let mut f = vec![0f32; c.len()];
        self.gemm(shape, a, b, &mut f, false);
        finish_bf16(&f, c, accumulate);
    }

    /// `out = fp8(op(A) @ op(B) * out_scale)` (saturating, round to nearest even, the
    /// casts of `fp8lm_fp8`), returning the amax of the f32 result before scaling (NaN
    /// if the result holds a NaN) — what a scaling recipe needs for the next scale — and
    /// the cast's saturation / underflow counts.
    fn gemm_fp8_out(
        &self,
        shape: GemmShape,
        a: MatRef<'_>,
        b: MatRef<'_>,
        out: &mut [u8],
        out_format: Fp8Format,
        out_scale: f32,
    ) -> Fp8CastResult {
        check_out_len(&shape, out.len());
        let mut f = vec![0f32; out.len()];
        self.gemm(shape, a, b, &mut f, false);
        finish_fp8(&f, out, out_format, out_scale)
    }
}

fn check_lens(s: &GemmShape, a: &MatRef<'_>, b: &MatRef<'_>, c_len: usize) {
    for (name, m) in [("A", a), ("B", b)] {
        if let MatRef::Fp8 { scale, format, .. } = m {
            assert!(
                scale.is_finite() && *scale > 0.0,
                "gemm: {name} ({}) has scale {scale}; scales must be finite and > 0",
                format.name()
            );
        }
    }
    check_len("A", a.len(), s.m, s.k);
    check_len("B", b.len(), s.k, s.n);
    check_out_len(s, c_len);
}

fn check_out_len(s: &GemmShape, c_len: usize) {
    check_len("C", c_len, s.m, s.n);
}

fn check_len(name: &str, len: usize, rows: usize, cols: usize) {
    let Some(need) = rows.checked_mul(cols) else {
        panic!("gemm: {name} shape {rows}x{cols} overflows usize");
    };
    assert_eq!(
        len, need,
        "gemm: {name} has {len} elements, shape {rows}x{cols} needs {need}"
    );
}

thread_local! {
    /// The f32 result before conversion to bf16/FP8, reused across calls: a fresh
    /// m x n buffer would page-fault its way through every GEMM.
    static SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut v = SCRATCH.take();
    if v.len() < len {
        v = vec![0.0; len];
    }
    let r = f(&mut v[..len]);
    SCRATCH.set(v);
    r
}

/// Elements per parallel chunk of the output conversions.
const FINISH_CHUNK: usize = 1 << 16;

fn finish_bf16(f: &[f32], c: &mut [bf16], accumulate: bool) {
    let conv = |(src, dst): (&[f32], &mut [bf16])| {
        for (d, &v) in dst.iter_mut().zip(src) {
            *d = bf16::from_f32(if accumulate { d.to_f32() + v } else { v });
        }
    };
    f.par_chunks(FINISH_CHUNK)
        .zip(c.par_chunks_mut(FINISH_CHUNK))
        .for_each(conv);
}

fn finish_fp8(f: &[f32], out: &mut [u8], fmt: Fp8Format, scale: f32) -> Fp8CastResult {
    let (amax, counts) = par_f32_to_fp8_counted(fmt, f, scale, out);
    Fp8CastResult { amax, counts }
}

/// Which micro-kernel / packer the CPU uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F kernel (packing with AVX2 + F16C).
    Avx512,
    /// AVX2 + FMA kernel (packing with AVX2 + F16C).
    Avx2,
    /// Portable loops.
    Scalar,
}

impl Isa {
    /// The kernel the CPU GEMM uses: the best this CPU supports, or the one named by the
    /// environment variable `FP8LM_GEMM_ISA` (`avx512`, `avx2`, `scalar`) if this CPU
    /// supports it (for measuring the slower paths). Decided once per process.
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Isa::best();
            match std::env::var("FP8LM_GEMM_ISA") {
                Err(_) => best,
                Ok(v) => match Isa::available_below(best)
                    .into_iter()
                    .find(|i| i.name() == v)
                {
                    Some(i) => i,
                    None => {
                        eprintln!(
                            "warning: FP8LM_GEMM_ISA={v:?} is not one of {:?} (supported \
                             here); using {}",
                            Isa::available_below(best)
                                .iter()
                                .map(|i| i.name())
                                .collect::<Vec<_>>(),
                            best.name()
                        );
                        best
                    }
                },
            }
        })
    }

    fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            let v3 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            if v3 && is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if v3 {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }

    fn available_below(best: Isa) -> Vec<Isa> {
        match best {
            Isa::Avx512 => vec![Isa::Avx512, Isa::Avx2, Isa::Scalar],
            Isa::Avx2 => vec![Isa::Avx2, Isa::Scalar],
            Isa::Scalar => vec![Isa::Scalar],
        }
    }

    /// Every kernel this CPU runs, fastest first (for tests).
    pub fn available() -> Vec<Isa> {
        Isa::available_below(Isa::best())
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Scalar => "scalar",
        }
    }
}

impl Cpu {
    /// [`GemmOps::gemm`] with an explicit kernel choice (`isa` must be one of
    /// [`Isa::available`], or this panics) — for tests and benchmarks.
    pub fn gemm_with_isa(
        &self,
        isa: Isa,
        shape: GemmShape,
        a: MatRef<'_>,
        b: MatRef<'_>,
        c: &mut [f32],
        accumulate: bool,
    ) {
        assert!(
            Isa::available().contains(&isa),
            "gemm: kernel {isa:?} is not supported by this CPU"
        );
        check_lens(&shape, &a, &b, c.len());
        driver::gemm_f32(
            isa,
            shape,
            a,
            b,
            c,
            accumulate,
            rayon::current_num_threads(),
        );
    }
}

/// Both operands exact in bf16 (bf16 or FP8): the matrix-unit paths may run it.
fn is_lowp(a: &MatRef<'_>, b: &MatRef<'_>) -> bool {
    !matches!(a, MatRef::F32(_)) && !matches!(b, MatRef::F32(_))
}

/// Run on `path` (available, checked by the caller); shapes checked.
fn run_path(
    path: GemmPath,
    s: GemmShape,
    a: MatRef<'_>,
    b: MatRef<'_>,
    c: &mut [f32],
    accumulate: bool,
) {
    let threads = rayon::current_num_threads();
    let unit = match path {
        _ if !is_lowp(&a, &b) => None,
        GemmPath::Amx => Some(driver_bf16::Unit::Amx),
        GemmPath::Avx512Bf16 => Some(driver_bf16::Unit::Dp),
        GemmPath::Fma => None,
    };
    match unit {
        Some(u) => driver_bf16::gemm_lowp(u, s, a, b, c, accumulate, threads),
        None => driver::gemm_f32(Isa::detect(), s, a, b, c, accumulate, threads),
    }
}

/// The process's path for this GEMM, counted.
fn auto_path(a: &MatRef<'_>, b: &MatRef<'_>) -> GemmPath {
    if is_lowp(a, b) {
        let p = path::current();
        path::count(path::Counted::Lowp(p));
        p
    } else {
        path::count(path::Counted::F32);
        GemmPath::Fma
    }
}

impl Cpu {
    /// [`GemmOps::gemm`] on an explicit path (panics if it is not available here) —
    /// for tests and benchmarks. GEMMs with an f32 operand run on FMA whatever the path.
    /// Not counted in [`path_calls`].
    pub fn gemm_with_path(
        &self,
        path: GemmPath,
        s: GemmShape,
        a: MatRef<'_>,
        b: MatRef<'_>,
        c: &mut [f32],
        accumulate: bool,
    ) {
        if let Err(why) = path.check() {
            panic!("gemm: path {} is not available: {why}", path.name());
        }
        check_lens(&s, &a, &b, c.len());
        run_path(path, s, a, b, c, accumulate);
    }
}

impl GemmOps for Cpu {
    fn gemm(&self, s: GemmShape, a: MatRef<'_>, b: MatRef<'_>, c: &mut [f32], accumulate: bool) {
        check_lens(&s, &a, &b, c.len());
        run_path(auto_path(&a, &b), s, a, b, c, accumulate);
    }

    fn gemm_bf16_out(
        &self,
        s: GemmShape,
        a: MatRef<'_>,
        b: MatRef<'_>,
        c: &mut [bf16],
        accumulate: bool,
    ) {
        check_lens(&s, &a, &b, c.len());
        let path = auto_path(&a, &b);
        with_scratch(c.len(), |f| {
            run_path(path, s, a, b, f, false);
            finish_bf16(f, c, accumulate);
        })
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
        check_lens(&s, &a, &b, out.len());
        let path = auto_path(&a, &b);
        let unit = match path {
            GemmPath::Amx => Some(driver_bf16::Unit::Amx),
            GemmPath::Avx512Bf16 => Some(driver_bf16::Unit::Dp),
            GemmPath::Fma => None,
        };
        match unit {
            // Matrix units, one K-block: the cast is fused into the tile store (the f32
            // result never reaches memory); the same bits as the two passes below.
            Some(u) if is_lowp(&a, &b) && driver_bf16::fuses_fp8_out(&s) => {
                let threads = rayon::current_num_threads();
                let (amax, counts) =
                    driver_bf16::gemm_lowp_fp8_out(u, s, a, b, out, out_format, out_scale, threads);
                Fp8CastResult { amax, counts }
            }
            _ => with_scratch(out.len(), |f| {
                run_path(path, s, a, b, f, false);
                finish_fp8(f, out, out_format, out_scale)
            }),
        }
    }
}
