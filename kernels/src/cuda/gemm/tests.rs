//! Host-side checks of the cuBLASLt plan (no device): layouts per transpose case, the
//! TN rule, scale inversion, and, most directly, that cuBLASLt's column-major semantics
//! applied to the plan (`LtPlan::emulate`, in f64) give what the CPU backend computes.

use super::*;
use crate::{Cpu, GemmOps, GemmShape, MatRef};
use fp8lm_fp8::cast::decode_table;
use std::collections::HashSet;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// The bound of the CPU's f32 accumulation against the exact (f64) sum:
/// `k * 2^-24 * sum |a||b|` per output (kernels/src/gemm docs), doubled for the final
/// rounding of the f64 emulation to f32 and the scale multiply.
fn assert_close(got_f64: &[f64], cpu: &[f32], abs_sum: &[f64], k: usize, what: &str) {
    for i in 0..cpu.len() {
        let bound = 2.0 * (k as f64 + 2.0) * 2f64.powi(-24) * abs_sum[i] + 1e-30;
        assert!(
            (got_f64[i] - cpu[i] as f64).abs() <= bound,
            "{what}: element {i}: emulated {} vs cpu {} (bound {bound:e})",
            got_f64[i],
            cpu[i]
        );
    }
}

fn abs_sums(shape: GemmShape, a: &[f64], b: &[f64]) -> Vec<f64> {
    let (m, n, k) = (shape.m, shape.n, shape.k);
    let ga = |i: usize, l: usize| {
        if shape.trans_a {
            a[l * m + i]
        } else {
            a[i * k + l]
        }
    };
    let gb = |l: usize, j: usize| {
        if shape.trans_b {
            b[j * k + l]
        } else {
            b[l * n + j]
        }
    };
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|l| (ga(i, l) * gb(l, j)).abs()).sum();
        }
    }
    out
}

#[test]
fn f32_plans_reproduce_the_cpu_gemm_in_every_layout() {
    let mut rng = Rng(1);
    for (m, n, k) in [(5, 7, 3), (16, 32, 48), (1, 9, 4)] {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let mut shape = GemmShape::new(m, n, k);
            shape.trans_a = ta;
            shape.trans_b = tb;
            let a: Vec<f32> = (0..m * k).map(|_| rng.next()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.next()).collect();
            let mut cpu = vec![0f32; m * n];
            Cpu.gemm(shape, MatRef::F32(&a), MatRef::F32(&b), &mut cpu, false);
            let plan =
                LtPlan::new(shape, LtType::F32, LtType::F32, LtType::F32, false, false).unwrap();
            // The mapping: lt_a reads our B, lt_b our A; D is n x m, ld n.
            assert_eq!(
                (plan.lt_a.reads, plan.lt_b.reads),
                (OurOperand::B, OurOperand::A)
            );
            assert_eq!((plan.lt_a.transposed, plan.lt_b.transposed), (tb, ta));
            assert_eq!(
                (plan.d_rows, plan.d_cols, plan.d_ld),
                (n as u64, m as u64, n as i64)
            );
            let (a64, b64): (Vec<f64>, Vec<f64>) = (
                a.iter().map(|&x| x as f64).collect(),
                b.iter().map(|&x| x as f64).collect(),
            );
            let mut d = vec![0f64; m * n];
            plan.emulate(&a64, &b64, 1.0, 1.0, 1.0, &mut d);
            assert_close(
                &d,
                &cpu,
                &abs_sums(shape, &a64, &b64),
                k,
                &format!("f32 {m}x{n}x{k} ta={ta} tb={tb}"),
            );
            // Accumulate: beta = 1 adds the old D.
            let plan_acc =
                LtPlan::new(shape, LtType::F32, LtType::F32, LtType::F32, true, false).unwrap();
            assert_eq!(plan_acc.alpha_beta(), (1.0, 1.0));
            let mut d2 = d.clone();
            plan_acc.emulate(&a64, &b64, 1.0, 1.0, 1.0, &mut d2);
            for i in 0..d.len() {
                assert!((d2[i] - 2.0 * d[i]).abs() <= 1e-12 * d[i].abs().max(1.0));
            }
        }
    }
}

fn random_codes(rng: &mut Rng, n: usize, fmt: Fp8Format) -> Vec<u8> {
    let dec = decode_table(fmt);
    (0..n)
        .map(|_| loop {
            let c = ((rng.next() + 1.0) * 127.9) as u8;
            // Finite codes of moderate magnitude, so products stay well inside f32.
            if dec[c as usize].is_finite() && dec[c as usize].abs() <= 64.0 {
                break c;
            }
        })
        .collect()
}

/// The forward FP8 GEMM (TN: `out = inp @ W^T`): cuBLASLt on the *stored* codes with the
/// plan's inverse, crossed-over scales equals the CPU backend's descaled FP8 GEMM.
#[test]
fn fp8_forward_plan_with_inverse_scales_reproduces_the_cpu() {
    let mut rng = Rng(7);
    let (m, n, k) = (32, 48, 64);
    let shape = GemmShape::new(m, n, k).trans_b();
    for (fa, fb) in [
        (Fp8Format::E4M3, Fp8Format::E4M3),
        (Fp8Format::E5M2, Fp8Format::E4M3),
        (Fp8Format::E4M3, Fp8Format::E5M2),
    ] {
        let a = random_codes(&mut rng, m * k, fa);
        let b = random_codes(&mut rng, n * k, fb);
        // Our convention: real = stored / scale. Non-power-of-two scales catch a missed
        // inversion or a swap of A's and B's scales.
        let (scale_a, scale_b) = (3.0f32, 0.3f32);
        let mut cpu = vec![0f32; m * n];
        Cpu.gemm(
            shape,
            MatRef::Fp8 {
                data: &a,
                format: fa,
                scale: scale_a,
            },
            MatRef::Fp8 {
                data: &b,
                format: fb,
                scale: scale_b,
            },
            &mut cpu,
            false,
        );
        let plan = LtPlan::new(
            shape,
            LtType::fp8(fa),
            LtType::fp8(fb),
            LtType::F32,
            false,
            false,
        )
        .unwrap();
        assert!(
            plan.lt_a.transposed && !plan.lt_b.transposed,
            "FP8 must be TN"
        );
        assert_eq!(plan.lt_a.ty, LtType::fp8(fb), "lt_a holds our B's type");
        let (sa, sb) = LtPlan::lt_scales(scale_a, scale_b);
        assert_eq!((sa, sb), (1.0 / scale_b, 1.0 / scale_a));
        let (da, db) = (decode_table(fa), decode_table(fb));
        let a64: Vec<f64> = a.iter().map(|&c| da[c as usize] as f64).collect();
        let b64: Vec<f64> = b.iter().map(|&c| db[c as usize] as f64).collect();
        let mut d = vec![0f64; m * n];
        plan.emulate(&a64, &b64, sa as f64, sb as f64, 1.0, &mut d);
        let real_a: Vec<f64> = a64.iter().map(|x| x / scale_a as f64).collect();
        let real_b: Vec<f64> = b64.iter().map(|x| x / scale_b as f64).collect();
        assert_close(
            &d,
            &cpu,
            &abs_sums(shape, &real_a, &real_b),
            k,
            &format!("fp8 {fa:?} x {fb:?}"),
        );
        // Passing our scales themselves (not their inverses) gives a wrong result, so the
        // check above can fail. (With per-tensor scales only the product sa*sb enters the
        // result, so the crossover of A's and B's scales is checked by the assert_eq on
        // `lt_scales` above, not by the numbers.)
        let mut wrong = vec![0f64; m * n];
        plan.emulate(&a64, &b64, scale_b as f64, scale_a as f64, 1.0, &mut wrong);
        assert!(wrong
            .iter()
            .zip(&d)
            .any(|(w, x)| (w - x).abs() > 1e-3 * x.abs().max(1e-3)));
    }
}

/// The backward GEMMs are not TN; the plan names exactly the operands to transpose, and
/// after transposing them on the host the TN plan reproduces the CPU result.
/// (name, shape, A, A's format, B, B's format, the transposes the plan must ask for)
type BackwardCase<'a> = (
    &'a str,
    GemmShape,
    &'a [u8],
    Fp8Format,
    &'a [u8],
    Fp8Format,
    Vec<NeedsTranspose>,
);

#[test]
fn backward_gemms_ask_for_the_right_transposes() {
    let mut rng = Rng(11);
    let (bt, c, oc) = (32, 16, 48);
    let (fe5, fe4) = (Fp8Format::E5M2, Fp8Format::E4M3);
    let dout = random_codes(&mut rng, bt * oc, fe5); // [BT, OC]
    let w = random_codes(&mut rng, oc * c, fe4); // [OC, C]
    let inp = random_codes(&mut rng, bt * c, fe4); // [BT, C]
    let transpose = |x: &[u8], rows: usize, cols: usize| -> Vec<u8> {
        let mut t = vec![0u8; x.len()];
        for r in 0..rows {
            for cc in 0..cols {
                t[cc * rows + r] = x[r * cols + cc];
            }
        }
        t
    };
    let dinp = GemmShape::new(bt, c, oc); // dinp = dout @ W
    let dw = GemmShape::new(oc, c, bt).trans_a(); // dW = dout^T @ inp
    let cases: [BackwardCase; 2] = [
        (
            "dinp",
            dinp,
            &dout,
            fe5,
            &w,
            fe4,
            vec![NeedsTranspose {
                operand: OurOperand::B,
                rows: oc,
                cols: c,
            }],
        ),
        (
            "dW",
            dw,
            &dout,
            fe5,
            &inp,
            fe4,
            vec![
                NeedsTranspose {
                    operand: OurOperand::B,
                    rows: bt,
                    cols: c,
                },
                NeedsTranspose {
                    operand: OurOperand::A,
                    rows: bt,
                    cols: oc,
                },
            ],
        ),
    ];
    for (name, shape, a, fa, b, fb, want) in cases {
        match LtPlan::new(
            shape,
            LtType::fp8(fa),
            LtType::fp8(fb),
            LtType::F32,
            false,
            false,
        ) {
            Err(PlanError::NotTn(need)) => assert_eq!(need, want, "{name}"),
            other => panic!("{name}: expected NotTn, got {other:?}"),
        }
        let (mut a2, mut b2, mut s2) = (a.to_vec(), b.to_vec(), shape);
        for nt in &want {
            match nt.operand {
                OurOperand::A => {
                    a2 = transpose(&a2, nt.rows, nt.cols);
                    s2.trans_a = false;
                }
                OurOperand::B => {
                    b2 = transpose(&b2, nt.rows, nt.cols);
                    s2.trans_b = true;
                }
            }
        }
        let plan = LtPlan::new(
            s2,
            LtType::fp8(fa),
            LtType::fp8(fb),
            LtType::F32,
            false,
            false,
        )
        .expect("TN after the transposes");
        let mut cpu = vec![0f32; shape.m * shape.n];
        Cpu.gemm(
            shape,
            MatRef::Fp8 {
                data: a,
                format: fa,
                scale: 1.0,
            },
            MatRef::Fp8 {
                data: b,
                format: fb,
                scale: 1.0,
            },
            &mut cpu,
            false,
        );
        let (da, db) = (decode_table(fa), decode_table(fb));
        let a64: Vec<f64> = a2.iter().map(|&x| da[x as usize] as f64).collect();
        let b64: Vec<f64> = b2.iter().map(|&x| db[x as usize] as f64).collect();
        let mut d = vec![0f64; shape.m * shape.n];
        plan.emulate(&a64, &b64, 1.0, 1.0, 1.0, &mut d);
        assert_close(&d, &cpu, &abs_sums(s2, &a64, &b64), shape.k, name);
    }
}

#[test]
fn fp8_constraints_are_errors_that_say_why() {
    let tn = GemmShape::new(32, 32, 32).trans_b();
    let e = LtPlan::new(tn, LtType::E5M2, LtType::E5M2, LtType::F32, false, false).unwrap_err();
    assert_eq!(e, PlanError::BothE5m2);
    let e = LtPlan::new(
        GemmShape::new(32, 32, 40).trans_b(),
        LtType::E4M3,
        LtType::E4M3,
        LtType::F32,
        false,
        false,
    )
    .unwrap_err();
    assert_eq!(
        e,
        PlanError::Unaligned {
            m: 32,
            n: 32,
            k: 40
        }
    );
    assert!(e.to_string().contains("multiples of 16"), "{e}");
    let e = LtPlan::new(tn, LtType::E4M3, LtType::E4M3, LtType::E4M3, true, false).unwrap_err();
    assert_eq!(e, PlanError::Fp8Accumulate);
    let e = LtPlan::new(tn, LtType::E4M3, LtType::F32, LtType::F32, false, false).unwrap_err();
    assert_eq!(e, PlanError::MixedTypes);
    assert_eq!(
        LtPlan::new(
            GemmShape::new(0, 32, 32).trans_b(),
            LtType::E4M3,
            LtType::E4M3,
            LtType::F32,
            false,
            false
        )
        .unwrap_err(),
        PlanError::Empty
    );
    // FP8 output: C is bf16 (cuBLASLt's FP8 table); f32 output: C is f32.
    assert_eq!(
        LtPlan::new(tn, LtType::E4M3, LtType::E4M3, LtType::E4M3, false, false)
            .unwrap()
            .c,
        LtType::Bf16
    );
    assert_eq!(
        LtPlan::new(tn, LtType::E4M3, LtType::E4M3, LtType::F32, false, false)
            .unwrap()
            .c,
        LtType::F32
    );
    // The CUDA type codes are cudaDataType's.
    assert_eq!(
        (
            LtType::E4M3.cuda_code(),
            LtType::E5M2.cuda_code(),
            LtType::Bf16.cuda_code(),
            LtType::F32.cuda_code()
        ),
        (28, 29, 14, 0)
    );
    assert_eq!(
        LtType::E4M3.cuda_code(),
        cudarc::cublaslt::sys::cudaDataType::CUDA_R_8F_E4M3 as u32
    );
    assert_eq!(
        LtType::E5M2.cuda_code(),
        cudarc::cublaslt::sys::cudaDataType::CUDA_R_8F_E5M2 as u32
    );
}

#[test]
fn cache_keys_separate_what_the_descriptors_depend_on() {
    let tn = |m, n, k| GemmShape::new(m, n, k).trans_b();
    let key = |s, a, b, d, acc, fast| LtPlan::new(s, a, b, d, acc, fast).unwrap().key;
    use LtType::*;
    let keys = [
        key(tn(32, 32, 32), E4M3, E4M3, F32, false, false),
        key(tn(32, 32, 48), E4M3, E4M3, F32, false, false),
        key(tn(32, 48, 32), E4M3, E4M3, F32, false, false),
        key(tn(48, 32, 32), E4M3, E4M3, F32, false, false),
        key(tn(32, 32, 32), E5M2, E4M3, F32, false, false),
        key(tn(32, 32, 32), E4M3, E4M3, Bf16, false, false),
        key(tn(32, 32, 32), E4M3, E4M3, F32, true, false),
        key(tn(32, 32, 32), E4M3, E4M3, F32, false, true),
    ];
    let set: HashSet<LtKey> = keys.iter().copied().collect();
    assert_eq!(
        set.len(),
        keys.len(),
        "every difference must give a different key"
    );
    // The same GEMM planned twice has the same key (so the cache hits).
    assert_eq!(keys[0], key(tn(32, 32, 32), E4M3, E4M3, F32, false, false));
    // Fast accumulation is off unless asked for.
    assert!(!keys[0].fast_accum);
}
