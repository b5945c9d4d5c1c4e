//! Property tests (seeded) of the scaling recipes and scaled tensors: scales are exact
//! and tight, the current recipe never overflows, quantize -> dequantize stays within
//! half an ulp of the format at the scaled magnitude; delayed-recipe bookkeeping.

mod common;

use common::{Rng, FORMATS};
use fp8lm_fp8::cast::{self, Backend};
use fp8lm_fp8::{
    scale_for_amax, CastMode, Fp8Format, ScaleRounding, ScaleState, ScaledF16, ScaledFp8,
    ScalingRecipe,
};

const ROUNDINGS: [ScaleRounding; 2] = [ScaleRounding::PowerOfTwo, ScaleRounding::Exact];

fn random_positive_finite(rng: &mut Rng) -> f32 {
    loop {
        let x = f32::from_bits(rng.next_u32() & 0x7FFF_FFFF);
        if x.is_finite() && x > 0.0 {
            return x;
        }
    }
}

#[test]
fn scales_are_exact_tight_and_in_range() {
    let mut rng = Rng(1);
    let n = if cfg!(debug_assertions) {
        100_000
    } else {
        1_000_000
    };
    let mut amaxes: Vec<f32> = (0..n).map(|_| random_positive_finite(&mut rng)).collect();
    amaxes.extend([
        f32::MIN_POSITIVE,
        f32::from_bits(1),
        f32::MAX,
        448.0,
        57344.0,
        1.0,
    ]);
    amaxes.extend([448.0f32, 57344.0, 65504.0].map(|m| f32::from_bits(m.to_bits() + 1)));
    amaxes.extend([448.0f32, 57344.0, 65504.0].map(|m| f32::from_bits(m.to_bits() - 1)));
    for fmt_max in [448.0f32, 57344.0, 65504.0] {
        for margin in [0, 1, 3] {
            let target = fmt_max as f64 * 2f64.powi(-margin);
            for &a in &amaxes {
                let p2 = scale_for_amax(fmt_max, a, margin, ScaleRounding::PowerOfTwo).unwrap();
                assert_eq!(p2.to_bits() & 0x007F_FFFF, 0, "not a power of two: {p2}");
                assert!(p2.is_normal());
                let clamped = p2 == 2f32.powi(127) || p2 == 2f32.powi(-126);
                // f64 products of these are exact.
                assert!(
                    a as f64 * p2 as f64 <= target,
                    "overflow: amax {a:e} scale {p2:e}"
                );
                if !clamped {
                    assert!(
                        2.0 * a as f64 * p2 as f64 > target,
                        "not tight: {a:e} {p2:e}"
                    );
                }
                let ex = scale_for_amax(fmt_max, a, margin, ScaleRounding::Exact).unwrap();
                assert!(ex.is_normal());
                let ex_up = f32::from_bits(ex.to_bits() + 1);
                if ex < f32::MAX && ex > f32::MIN_POSITIVE {
                    assert!(
                        a as f64 * ex as f64 <= target,
                        "exact overflow: {a:e} {ex:e}"
                    );
                    assert!(
                        a as f64 * ex_up as f64 > target,
                        "exact not tight: {a:e} {ex:e}"
                    );
                    assert!(ex >= p2);
                }
            }
        }
    }
    for bad in [0.0, -0.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        for r in ROUNDINGS {
            assert_eq!(scale_for_amax(448.0, bad, 0, r), None);
        }
    }
}

/// A tensor of n values with magnitudes around 10^decade and a few outliers.
fn tensor(rng: &mut Rng, n: usize, decade: i32) -> Vec<f32> {
    let base = 10f64.powi(decade);
    (0..n)
        .map(|i| {
            let outlier = if i % 97 == 0 { 50.0 } else { 1.0 };
            (rng.normal() * base * outlier) as f32
        })
        .collect()
}

/// Half an ulp of `fmt` at magnitude |y| (subnormal quantum below min normal).
fn half_ulp(fmt: Fp8Format, y: f32) -> f64 {
    let emin = 1 - fmt.exponent_bias();
    let e = if y == 0.0 {
        emin
    } else {
        ((y.abs() as f64).log2().floor() as i32).max(emin)
    };
    0.5 * 2f64.powi(e - fmt.mantissa_bits() as i32)
}

#[test]
fn current_recipe_never_overflows_and_error_is_half_ulp() {
    let mut rng = Rng(2);
    let mut nonsat = vec![0u8; 4099];
    for fmt in FORMATS {
        for rounding in ROUNDINGS {
            for margin in [0, 2] {
                for decade in [-30, -12, -4, -1, 0, 2, 5, 12, 30] {
                    let x = tensor(&mut rng, 4099, decade);
                    let mut st = ScaleState::new(fmt, ScalingRecipe::Current)
                        .with_margin(margin)
                        .with_rounding(rounding);
                    let (t, amax) = ScaledFp8::quantize(&x, &[4099], &mut st);
                    assert_eq!(amax, x.iter().fold(0f32, |m, v| m.max(v.abs())));
                    // Non-saturating cast with the same scale: no NaN/inf code anywhere.
                    cast::f32_to_fp8_amax_with(
                        fmt,
                        CastMode::NonSat,
                        Backend::detect(),
                        &x,
                        t.scale,
                        &mut nonsat,
                    );
                    assert!(
                        nonsat.iter().all(|&b| fmt.decode(b).is_finite()),
                        "{fmt:?} {rounding:?} margin {margin} 1e{decade}: overflow"
                    );
                    assert_eq!(nonsat, t.data, "the saturating cast never had to saturate");
                    let deq = t.dequantize();
                    for (&xi, &di) in x.iter().zip(&deq) {
                        let y = xi * t.scale;
                        let mut bound = half_ulp(fmt, y) / t.scale as f64;
                        if rounding == ScaleRounding::Exact {
                            // The scale multiply and 1/scale each round once in f32.
                            bound += 2.0 * (xi.abs() as f64) * 2f64.powi(-24);
                        }
                        let err = (di as f64 - xi as f64).abs();
                        assert!(
                            err <= bound,
                            "{fmt:?} {rounding:?} x={xi:e} deq={di:e} err={err:e} > {bound:e}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn power_of_two_scaling_dequantizes_to_exact_fp8_values() {
    let mut rng = Rng(3);
    let x = tensor(&mut rng, 1000, -3);
    let (t, _) = ScaledFp8::quantize_current(&x, &[10, 100], Fp8Format::E4M3, 0);
    for (&b, &d) in t.data.iter().zip(&t.dequantize()) {
        // decode(b) / scale with a power-of-two scale is exact: multiply back, compare.
        assert_eq!(d * t.scale, Fp8Format::E4M3.decode(b));
    }
}

#[test]
fn current_recipe_keeps_scale_on_zero_and_nonfinite_amax() {
    let mut st = ScaleState::new(Fp8Format::E4M3, ScalingRecipe::Current);
    let mut dst = vec![0u8; 4];
    let q = st.quantize(&[1.0, -3.5, 0.25, 2.0], &mut dst);
    assert_eq!(q.scale, 128.0); // 448 / 3.5 = 128 exactly: amax lands on max
    assert_eq!(st.scale, q.scale);
    let kept = st.scale;
    st.quantize(&[0.0; 4], &mut dst);
    assert_eq!(
        (st.scale, st.zero_amax_count, st.nonfinite_amax_count),
        (kept, 1, 0)
    );
    assert_eq!(dst, vec![0; 4]);
    st.quantize(&[1.0, f32::NAN, 0.0, 0.0], &mut dst);
    assert_eq!(
        (st.scale, st.zero_amax_count, st.nonfinite_amax_count),
        (kept, 1, 1)
    );
    assert!(st.last_amax.is_nan());
    st.quantize(&[1.0, f32::INFINITY, 0.0, 0.0], &mut dst);
    assert_eq!((st.scale, st.nonfinite_amax_count), (kept, 2));
}

#[test]
fn delayed_recipe_follows_the_window_max() {
    let mut st = ScaleState::new(Fp8Format::E5M2, ScalingRecipe::Delayed { history_len: 3 });
    let p2 = |a: f32| scale_for_amax(57344.0, a, 0, ScaleRounding::PowerOfTwo).unwrap();
    // The delayed recipe ignores the tensor amax passed here.
    assert_eq!(st.scale_for_cast(1e6), 1.0);
    for (amax, window_max) in [
        (1.0f32, 1.0f32),
        (100.0, 100.0),
        (2.0, 100.0),
        (3.0, 100.0),
        (4.0, 4.0),
    ] {
        st.record_amax(amax);
        assert_eq!(st.scale, p2(window_max), "after {amax}");
        assert!(st.amax_history.len() <= 3);
    }
    st.record_amax(0.0); // window [3, 4, 0]: max 4, scale unchanged but the zero counted
    assert_eq!((st.scale, st.zero_amax_count), (p2(4.0), 1));
    st.record_amax(f32::NAN); // not put in the history
    assert_eq!(
        (st.amax_history.clone(), st.nonfinite_amax_count),
        (vec![3.0, 4.0, 0.0], 1)
    );
    st.record_amax(0.0);
    st.record_amax(0.0); // window all zero: scale kept
    assert_eq!((st.scale, st.zero_amax_count), (p2(4.0), 3));
    assert_eq!(st.window_amax(), 0.0);
}

#[test]
fn delayed_quantize_reports_the_scale_it_used() {
    let mut rng = Rng(4);
    let mut st =
        ScaleState::new(Fp8Format::E4M3, ScalingRecipe::Delayed { history_len: 4 }).with_margin(1);
    let x0 = tensor(&mut rng, 512, 0);
    // Empty history: bootstraps from the tensor itself instead of scale 1.
    let (t0, a0) = ScaledFp8::quantize(&x0, &[512], &mut st);
    let want0 = scale_for_amax(448.0, a0, 1, ScaleRounding::PowerOfTwo).unwrap();
    assert_eq!(t0.scale, want0);
    // Next tensor is 1000x larger: the delayed scale is stale and saturates, and the
    // tensor reports the stale scale it was actually cast with.
    let x1: Vec<f32> = x0.iter().map(|v| v * 1000.0).collect();
    let (t1, a1) = ScaledFp8::quantize(&x1, &[512], &mut st);
    assert_eq!(t1.scale, want0);
    assert!(
        t1.data.iter().any(|&b| b & 0x7F == 0x7E),
        "expected saturation"
    );
    // ...and the state has moved on to the window max for the next step.
    assert_eq!(
        st.scale,
        scale_for_amax(448.0, a1, 1, ScaleRounding::PowerOfTwo).unwrap()
    );
    let deq = t0.dequantize();
    for (&x, &d) in x0.iter().zip(&deq) {
        assert!((x - d).abs() as f64 <= half_ulp(Fp8Format::E4M3, x * t0.scale) / t0.scale as f64);
    }
}

#[test]
fn scaled_f16_round_trip_within_half_ulp() {
    let mut rng = Rng(5);
    for decade in [-9, -3, 0, 4, 9] {
        let x = tensor(&mut rng, 3001, decade);
        let (t, amax) = ScaledF16::quantize_current(&x, &[3001], 0);
        assert_eq!(amax, x.iter().fold(0f32, |m, v| m.max(v.abs())));
        assert!(amax * t.scale <= ScaledF16::FMT_MAX);
        for (&xi, &di) in x.iter().zip(&t.dequantize()) {
            let y = (xi * t.scale).abs() as f64;
            let e = if y == 0.0 {
                -14
            } else {
                (y.log2().floor() as i32).max(-14)
            };
            let bound = 0.5 * 2f64.powi(e - 10) / t.scale as f64;
            assert!(((di - xi).abs() as f64) <= bound, "x={xi:e} deq={di:e}");
        }
    }
}

#[test]
#[should_panic(expected = "shape [3, 4] holds 12 elements but the input has 11")]
fn shape_mismatch_names_the_problem() {
    ScaledFp8::quantize_current(&[0.0; 11], &[3, 4], Fp8Format::E4M3, 0);
}

#[test]
fn from_parts_rejects_bad_parts_with_named_errors() {
    use fp8lm_fp8::ScaledError;
    let ok = ScaledFp8::from_parts(vec![0x38; 6], &[2, 3], Fp8Format::E4M3, 4.0).unwrap();
    assert_eq!(ok.dequantize(), vec![0.25; 6]);
    let e = ScaledFp8::from_parts(vec![0; 5], &[2, 3], Fp8Format::E4M3, 1.0).unwrap_err();
    assert_eq!(
        e.to_string(),
        "shape [2, 3] holds 6 elements but the data has 5"
    );
    for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let e = ScaledF16::from_parts(vec![half::f16::ZERO; 6], &[6], bad).unwrap_err();
        assert!(matches!(e, ScaledError::Scale(_)), "{bad}");
        assert!(e.to_string().contains("not a positive finite"));
    }
}
