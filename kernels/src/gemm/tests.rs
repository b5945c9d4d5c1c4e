//! GEMM against a naive f64 reference.
//!
//! Reference: `sum_p dec(a) * dec(b)` in f64 over the *decoded* operands (for FP8, the
//! exact FP8 values), times `1 / (scale_a * scale_b)` in f64. Quantisation error is thus
//! not part of the comparison; what is left is f32 accumulation. Tolerance, per element:
//!
//!   |c - ref| <= (k + 3) * u * (|alpha| * sum_p |a_p| |b_p| + |c_old|),   u = 2^-24
//!
//! the classical bound for a length-k recursive f32 summation (gamma_k ~ k u), plus one
//! rounding each for adding K-block partial sums, applying alpha and adding `c_old`.

use super::driver::{gemm_f32, grid, Grid};
use super::*;
use fp8lm_fp8::{E4M3, E5M2};

pub(super) const U: f64 = 1.0 / (1u64 << 24) as f64;

/// splitmix64: a tiny seeded generator (the test must not depend on other crates' RNGs).
pub(super) struct Rng(pub(super) u64);
impl Rng {
    pub(super) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub(super) fn sym(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Ty {
    F32,
    Bf16,
    E4M3,
    E5M2,
}
const TYS: [Ty; 4] = [Ty::F32, Ty::Bf16, Ty::E4M3, Ty::E5M2];

/// Owned operand storage plus its decoded f64 values.
pub(super) struct Mat {
    f: Vec<f32>,
    h: Vec<bf16>,
    q: Vec<u8>,
    ty: Ty,
    pub(super) scale: f32,
    /// Real values (decoded / scale) in f64.
    pub(super) real: Vec<f64>,
}

impl Mat {
    /// `len` values spread over several binades; FP8 ones quantised with `scale`.
    pub(super) fn random(rng: &mut Rng, len: usize, ty: Ty, scale: f32) -> Mat {
        let x: Vec<f32> = (0..len)
            .map(|_| rng.sym() * 2f32.powi((rng.next_u64() % 6) as i32 - 3))
            .collect();
        let mut m = Mat {
            f: vec![],
            h: vec![],
            q: vec![],
            ty,
            scale: 1.0,
            real: vec![],
        };
        match ty {
            Ty::F32 => {
                m.real = x.iter().map(|&v| v as f64).collect();
                m.f = x;
            }
            Ty::Bf16 => {
                m.h = x.iter().map(|&v| bf16::from_f32(v)).collect();
                m.real = m.h.iter().map(|v| v.to_f32() as f64).collect();
            }
            Ty::E4M3 | Ty::E5M2 => {
                m.scale = scale;
                m.q = x
                    .iter()
                    .map(|&v| match ty {
                        Ty::E4M3 => E4M3::from_f32(v * scale).to_bits(),
                        _ => E5M2::from_f32(v * scale).to_bits(),
                    })
                    .collect();
                let fmt = m.fmt();
                m.real =
                    m.q.iter()
                        .map(|&b| fmt.decode(b) as f64 / scale as f64)
                        .collect();
            }
        }
        m
    }
    fn fmt(&self) -> Fp8Format {
        if self.ty == Ty::E5M2 {
            Fp8Format::E5M2
        } else {
            Fp8Format::E4M3
        }
    }
    /// Overwrite FP8 code `i` (e.g. with a NaN code), keeping `real` in step.
    pub(super) fn set_code(&mut self, i: usize, code: u8) {
        self.q[i] = code;
        self.real[i] = self.fmt().decode(code) as f64 / self.scale as f64;
    }
    pub(super) fn as_ref(&self) -> MatRef<'_> {
        match self.ty {
            Ty::F32 => MatRef::F32(&self.f),
            Ty::Bf16 => MatRef::Bf16(&self.h),
            _ => MatRef::Fp8 {
                data: &self.q,
                format: self.fmt(),
                scale: self.scale,
            },
        }
    }
}

/// (reference value, tolerance without the c_old term) for every output element.
pub(super) fn reference(s: GemmShape, a: &Mat, b: &Mat) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(s.m * s.n);
    for i in 0..s.m {
        for j in 0..s.n {
            let (mut sum, mut abs) = (0f64, 0f64);
            for p in 0..s.k {
                let av = a.real[if s.trans_a { p * s.m + i } else { i * s.k + p }];
                let bv = b.real[if s.trans_b { j * s.k + p } else { p * s.n + j }];
                sum += av * bv;
                abs += (av * bv).abs();
            }
            out.push((sum, (s.k + 3) as f64 * U * abs));
        }
    }
    out
}

/// `c_old` (when accumulating) is rounded into once per K-block, and once more by alpha.
pub(super) fn check(
    label: &str,
    k: usize,
    got: &[f32],
    want: &[(f64, f64)],
    c_old: Option<&[f32]>,
) {
    let old_roundings = (k.div_ceil(256) + 2) as f64; // 256 = the smallest K-block
    for (idx, (&g, &(r, tol))) in got.iter().zip(want).enumerate() {
        let old = c_old.map_or(0.0, |c| c[idx] as f64);
        let tol = tol + old_roundings * U * old.abs() + f64::MIN_POSITIVE;
        let err = (g as f64 - (r + old)).abs();
        assert!(
            err <= tol,
            "{label}: element {idx}: got {g}, want {} (err {err:e} > tol {tol:e})",
            r + old
        );
    }
}

pub(super) fn shape(m: usize, n: usize, k: usize, ta: bool, tb: bool) -> GemmShape {
    GemmShape {
        m,
        n,
        k,
        trans_a: ta,
        trans_b: tb,
    }
}

pub(super) const LAYOUTS: [(bool, bool); 4] =
    [(false, false), (false, true), (true, false), (true, true)];

/// Every kernel, every layout, every operand type pair, on small odd shapes.
#[test]
fn all_types_layouts_small_shapes() {
    let mut rng = Rng(1);
    let shapes = [
        (1, 1, 1),
        (7, 7, 7),
        (9, 33, 13),
        (1, 1, 300),
        (1, 65, 37),
        (70, 1, 37),
        (17, 40, 0),
    ];
    for isa in Isa::available() {
        for &(m, n, k) in &shapes {
            for (ta, tb) in LAYOUTS {
                for ta_ty in TYS {
                    for tb_ty in TYS {
                        let s = shape(m, n, k, ta, tb);
                        let a = Mat::random(&mut rng, m * k, ta_ty, 16.0);
                        let b = Mat::random(&mut rng, k * n, tb_ty, 1024.0);
                        let want = reference(s, &a, &b);
                        let mut c = vec![f32::NAN; m * n];
                        Cpu.gemm_with_isa(isa, s, a.as_ref(), b.as_ref(), &mut c, false);
                        let label = format!("{isa:?} {s:?} {ta_ty:?} x {tb_ty:?}");
                        check(&label, k, &c, &want, None);
                    }
                }
            }
        }
    }
}

/// Larger odd shapes crossing K-blocks (k > 256, uneven), tile edges in m and n, and the
/// FP8 pairs of the recipe, with non-power-of-two scales so the epilogue scale rounds.
#[test]
fn recipe_pairs_larger_shapes() {
    let mut rng = Rng(2);
    let shapes = [(129, 129, 129), (33, 97, 515), (8, 32, 257)];
    let pairs = [
        (Ty::E4M3, Ty::E4M3),
        (Ty::E5M2, Ty::E4M3),
        (Ty::E4M3, Ty::E5M2),
        (Ty::F32, Ty::F32),
        (Ty::Bf16, Ty::Bf16),
    ];
    for isa in Isa::available() {
        for &(m, n, k) in &shapes {
            for (ta, tb) in LAYOUTS {
                for (ta_ty, tb_ty) in pairs {
                    let s = shape(m, n, k, ta, tb);
                    let a = Mat::random(&mut rng, m * k, ta_ty, 3.0);
                    let b = Mat::random(&mut rng, k * n, tb_ty, 600.0);
                    let want = reference(s, &a, &b);
                    let mut c = vec![0f32; m * n];
                    Cpu.gemm_with_isa(isa, s, a.as_ref(), b.as_ref(), &mut c, false);
                    check(
                        &format!("{isa:?} {s:?} {ta_ty:?} x {tb_ty:?}"),
                        k,
                        &c,
                        &want,
                        None,
                    );
                    // accumulate: C += on top of what is there.
                    let c_old: Vec<f32> = (0..m * n).map(|_| rng.sym() * 10.0).collect();
                    let mut c2 = c_old.clone();
                    Cpu.gemm_with_isa(isa, s, a.as_ref(), b.as_ref(), &mut c2, true);
                    check(
                        &format!("{isa:?} {s:?} {ta_ty:?} x {tb_ty:?} accumulate"),
                        k,
                        &c2,
                        &want,
                        Some(&c_old),
                    );
                }
            }
        }
    }
}

/// K = 0: the product is empty, so C = 0, or C unchanged when accumulating.
#[test]
fn k_zero() {
    let s = shape(3, 5, 0, false, true);
    let mut c = vec![7f32; 15];
    Cpu.gemm(s, MatRef::F32(&[]), MatRef::F32(&[]), &mut c, true);
    assert!(c.iter().all(|&x| x == 7.0));
    Cpu.gemm(s, MatRef::F32(&[]), MatRef::F32(&[]), &mut c, false);
    assert!(c.iter().all(|&x| x == 0.0));
    // empty outputs: nothing to do, nothing to touch
    let mut none: [f32; 0] = [];
    Cpu.gemm(
        shape(0, 5, 4, true, false),
        MatRef::F32(&[]),
        MatRef::F32(&[1.0; 20]),
        &mut none,
        false,
    );
    Cpu.gemm(
        shape(4, 0, 4, false, true),
        MatRef::F32(&[1.0; 16]),
        MatRef::F32(&[]),
        &mut none,
        false,
    );
    let mut q = vec![9u8; 15];
    let amax = Cpu.gemm_fp8_out(
        s,
        MatRef::F32(&[]),
        MatRef::F32(&[]),
        &mut q,
        Fp8Format::E4M3,
        1.0,
    );
    assert_eq!(
        (amax.amax, amax.counts, q),
        (0.0, Default::default(), vec![0u8; 15])
    );
}

/// The thread grid: strips per thread multiple, row splits when n is narrow; and the
/// result does not depend on the thread count (each tile is computed the same way).
#[test]
fn grid_and_thread_independence() {
    assert_eq!(grid(4, 4, 4, 8).threads, 1, "tiny products stay serial");
    // 24 column panels: 6 strips of 4 (several per thread, none under 4 panels)
    assert_eq!(
        grid(256, 768, 768, 2),
        Grid {
            threads: 2,
            row_parts: 1,
            col_parts: 6
        }
    );
    assert_eq!(
        grid(256, 3072, 768, 2),
        Grid {
            threads: 2,
            row_parts: 1,
            col_parts: 8
        }
    );
    // one column panel: split the rows instead
    assert_eq!(
        grid(600, 20, 400, 3),
        Grid {
            threads: 3,
            row_parts: 3,
            col_parts: 1
        }
    );
    assert_eq!(
        grid(72, 330, 200, 3),
        Grid {
            threads: 3,
            row_parts: 2,
            col_parts: 2
        }
    );
    let mut rng = Rng(3);
    for (m, n, k) in [(600, 20, 400), (72, 330, 200)] {
        let s = shape(m, n, k, false, true);
        let a = Mat::random(&mut rng, m * k, Ty::E4M3, 8.0);
        let b = Mat::random(&mut rng, k * n, Ty::E5M2, 8.0);
        let want = reference(s, &a, &b);
        for isa in Isa::available() {
            let mut c1 = vec![0f32; m * n];
            gemm_f32(isa, s, a.as_ref(), b.as_ref(), &mut c1, false, 1);
            check(&format!("{isa:?} {s:?} serial"), k, &c1, &want, None);
            for t in [2, 3, 5] {
                assert!(grid(m, n, k, t).threads == t, "{s:?} must run threaded");
                let mut ct = vec![0f32; m * n];
                gemm_f32(isa, s, a.as_ref(), b.as_ref(), &mut ct, false, t);
                assert_eq!(c1, ct, "{isa:?} {s:?}: {t} threads differ from 1");
            }
        }
    }
}

/// NaN operands propagate to exactly the outputs that use them (no padding leaks).
#[test]
fn nan_propagates_to_its_row_only() {
    let (m, n, k) = (10, 35, 20);
    let mut a = vec![E4M3::from_f32(1.0).to_bits(); m * k];
    a[3 * k + 5] = 0x7F; // E4M3 NaN in row 3
    let b = vec![E5M2::from_f32(0.5).to_bits(); k * n];
    let mut c = vec![0f32; m * n];
    for isa in Isa::available() {
        Cpu.gemm_with_isa(
            isa,
            shape(m, n, k, false, false),
            MatRef::Fp8 {
                data: &a,
                format: Fp8Format::E4M3,
                scale: 1.0,
            },
            MatRef::Fp8 {
                data: &b,
                format: Fp8Format::E5M2,
                scale: 1.0,
            },
            &mut c,
            false,
        );
        for i in 0..m {
            for j in 0..n {
                let v = c[i * n + j];
                assert_eq!(v.is_nan(), i == 3, "{isa:?} ({i},{j}) = {v}");
                if i != 3 {
                    assert_eq!(v, 10.0);
                }
            }
        }
    }
}

/// bf16 output is our f32 result rounded once (accumulating in f32 first); FP8 output is
/// the fp8 crate's cast of our f32 result, its amax the f32 result's; and both stay
/// within half an output ulp (plus the accumulation bound) of the f64 reference.
#[test]
fn bf16_and_fp8_outputs() {
    let mut rng = Rng(4);
    for (m, n, k) in [(7, 33, 19), (65, 130, 300)] {
        let s = shape(m, n, k, false, true);
        let a = Mat::random(&mut rng, m * k, Ty::E4M3, 32.0);
        let b = Mat::random(&mut rng, k * n, Ty::E4M3, 64.0);
        let want = reference(s, &a, &b);
        let mut c = vec![0f32; m * n];
        Cpu.gemm(s, a.as_ref(), b.as_ref(), &mut c, false);

        let old: Vec<bf16> = (0..m * n).map(|_| bf16::from_f32(rng.sym())).collect();
        let mut h = old.clone();
        Cpu.gemm_bf16_out(s, a.as_ref(), b.as_ref(), &mut h, true);
        for i in 0..m * n {
            assert_eq!(
                h[i],
                bf16::from_f32(old[i].to_f32() + c[i]),
                "bf16 accumulate at {i}"
            );
            let r = want[i].0 + old[i].to_f32() as f64;
            // half a bf16 ulp (2^-8 relative) plus the f32 bound
            let tol = r.abs() * 2f64.powi(-8) + want[i].1 + 4.0 * U * old[i].to_f32().abs() as f64;
            assert!(
                (h[i].to_f32() as f64 - r).abs() <= tol,
                "bf16 vs f64 at {i}"
            );
        }
        Cpu.gemm_bf16_out(s, a.as_ref(), b.as_ref(), &mut h, false);
        for i in 0..m * n {
            assert_eq!(h[i], bf16::from_f32(c[i]));
        }

        for fmt in [Fp8Format::E4M3, Fp8Format::E5M2] {
            let amax_ref = want.iter().map(|w| w.0.abs()).fold(0.0, f64::max);
            // A scale that makes the largest output saturate: exercises the clamp.
            let out_scale = (fmt.max() as f64 / amax_ref * 1.5) as f32;
            let mut q = vec![0u8; m * n];
            let got = Cpu.gemm_fp8_out(s, a.as_ref(), b.as_ref(), &mut q, fmt, out_scale);
            let mut q_want = vec![0u8; m * n];
            let (amax_want, counts_want) =
                fp8lm_fp8::cast::f32_to_fp8_counted(fmt, &c, out_scale, &mut q_want);
            assert_eq!(q, q_want, "{fmt:?} output bytes");
            assert_eq!(got.amax, amax_want, "{fmt:?} amax");
            assert_eq!(got.counts, counts_want, "{fmt:?} counts");
            assert!(
                counts_want.saturated > 0,
                "the scale was chosen to saturate"
            );
            let amax = got.amax;
            let i_max = (0..m * n)
                .max_by(|&x, &y| want[x].0.abs().total_cmp(&want[y].0.abs()))
                .unwrap();
            assert!(
                (amax as f64 - amax_ref).abs() <= want[i_max].1,
                "{fmt:?} amax vs f64"
            );
            let half_ulp_rel = 2f64.powi(-(fmt.mantissa_bits() as i32) - 1);
            for i in 0..m * n {
                let x = want[i].0 * out_scale as f64;
                let clamped = x.clamp(-(fmt.max() as f64), fmt.max() as f64);
                let got = fmt.decode(q[i]) as f64;
                // half an ulp at the value's binade, or half the smallest subnormal
                let tol = (clamped.abs() * half_ulp_rel).max(fmt.min_subnormal() as f64 / 2.0)
                    + want[i].1 * out_scale as f64
                    + clamped.abs() * 4.0 * U;
                assert!(
                    (got - clamped).abs() <= tol,
                    "{fmt:?} out {i}: {got} vs {clamped}"
                );
            }
        }
    }
}

/// Slice lengths that do not match the shape are refused with a message naming them.
#[test]
#[should_panic(expected = "gemm: B has 5 elements, shape 2x3 needs 6")]
fn wrong_length_panics_with_message() {
    let mut c = vec![0f32; 3];
    Cpu.gemm(
        shape(1, 3, 2, false, false),
        MatRef::F32(&[0.0; 2]),
        MatRef::F32(&[0.0; 5]),
        &mut c,
        false,
    );
}

/// A backend that only provides `gemm` gets the output variants from the trait's
/// defaults; they must agree with the Cpu overrides bit for bit.
#[test]
fn default_output_variants_match_cpu() {
    struct OnlyGemm;
    impl GemmOps for OnlyGemm {
        fn gemm(&self, s: GemmShape, a: MatRef<'_>, b: MatRef<'_>, c: &mut [f32], acc: bool) {
            Cpu.gemm(s, a, b, c, acc)
        }
    }
    let mut rng = Rng(5);
    let s = shape(20, 70, 30, true, false);
    let a = Mat::random(&mut rng, 20 * 30, Ty::E5M2, 4.0);
    let b = Mat::random(&mut rng, 30 * 70, Ty::E4M3, 4.0);
    let old: Vec<bf16> = (0..20 * 70).map(|_| bf16::from_f32(rng.sym())).collect();
    let (mut h1, mut h2) = (old.clone(), old.clone());
    Cpu.gemm_bf16_out(s, a.as_ref(), b.as_ref(), &mut h1, true);
    OnlyGemm.gemm_bf16_out(s, a.as_ref(), b.as_ref(), &mut h2, true);
    assert_eq!(h1, h2);
    let (mut q1, mut q2) = (vec![0u8; 20 * 70], vec![0u8; 20 * 70]);
    let m1 = Cpu.gemm_fp8_out(s, a.as_ref(), b.as_ref(), &mut q1, Fp8Format::E4M3, 16.0);
    let m2 = OnlyGemm.gemm_fp8_out(s, a.as_ref(), b.as_ref(), &mut q2, Fp8Format::E4M3, 16.0);
    assert_eq!((q1, m1), (q2, m2));
}

/// An FP8 operand with a zero (or non-finite) scale is refused by name.
#[test]
#[should_panic(expected = "gemm: B (e5m2) has scale 0")]
fn zero_scale_panics_with_message() {
    let mut c = vec![0f32; 1];
    let b = MatRef::Fp8 {
        data: &[0u8],
        format: Fp8Format::E5M2,
        scale: 0.0,
    };
    Cpu.gemm(
        shape(1, 1, 1, false, false),
        MatRef::F32(&[1.0]),
        b,
        &mut c,
        false,
    );
}

/// A tall A with a long K needs more than one pack-A phase (packed A is capped at
/// `A_PACK_FLOATS`); results must still match the reference, accumulation included.
#[test]
fn several_pack_phases() {
    let mut rng = Rng(6);
    let (m, n, k) = (2048, 3, 2100);
    for ta in [false, true] {
        let s = shape(m, n, k, ta, false);
        let a = Mat::random(&mut rng, m * k, Ty::E4M3, 64.0);
        let b = Mat::random(&mut rng, k * n, Ty::E5M2, 1024.0);
        let want = reference(s, &a, &b);
        let isa = Isa::detect();
        let a_block = m.div_ceil(MR) * super::driver::kc_max_for(isa) * MR;
        assert!(
            k.div_ceil(super::driver::kc_max_for(isa)) * a_block > super::driver::A_PACK_FLOATS
        );
        let c_old: Vec<f32> = (0..m * n).map(|_| rng.sym()).collect();
        let mut c = c_old.clone();
        Cpu.gemm_with_isa(isa, s, a.as_ref(), b.as_ref(), &mut c, true);
        check(&format!("{s:?}"), k, &c, &want, Some(&c_old));
    }
}

/// The decode is fused into packing: a GEMM decodes each operand element exactly once
/// (O(mk + kn)), however many output tiles use it, when one thread does all the work.
#[test]
fn each_operand_element_decoded_once() {
    let mut rng = Rng(7);
    for (m, n, k, ta, tb) in [(100, 300, 700, false, true), (64, 40, 1100, true, false)] {
        let s = shape(m, n, k, ta, tb);
        let a = Mat::random(&mut rng, m * k, Ty::E4M3, 8.0);
        let b = Mat::random(&mut rng, k * n, Ty::E5M2, 8.0);
        let mut c = vec![0f32; m * n];
        for isa in Isa::available() {
            super::pack::DECODED.set(0);
            gemm_f32(isa, s, a.as_ref(), b.as_ref(), &mut c, false, 1);
            assert_eq!(super::pack::DECODED.get(), m * k + k * n, "{isa:?} {s:?}");
        }
    }
}
