//! Exhaustive and seeded verification of the FP8 codecs against the independent
//! references in `common`: all 256 codes decode, every f16 and every bf16 bit pattern
//! and a seeded f32 set encode correctly under all three cast modes, through the scalar
//! API, the branch-free scalar encoder and the bulk casts on every backend.

mod common;

use common::{backends, f32_test_set, ref_decode, RefEncoder, Rng, FORMATS, MODES};
use fp8lm_fp8::cast::{self, Backend};
use fp8lm_fp8::{CastMode, Fp8Format, E4M3, E5M2};
use half::{bf16, f16};

fn same_value(a: f32, b: f64) -> bool {
    if b.is_nan() {
        a.is_nan() && a.is_sign_negative() == b.is_sign_negative()
    } else {
        a as f64 == b && a.is_sign_negative() == b.is_sign_negative()
    }
}

#[test]
fn all_256_codes_decode_per_spec() {
    for fmt in FORMATS {
        let table = cast::decode_table(fmt);
        for b in 0..=255u8 {
            let want = ref_decode(fmt, b);
            let got = fmt.decode(b);
            assert!(same_value(got, want), "{fmt:?} {b:#04x}: {got} vs {want}");
            assert!(
                same_value(table[b as usize], want),
                "table {fmt:?} {b:#04x}"
            );
        }
    }
    for b in 0..=255u8 {
        assert!(same_value(
            E4M3::from_bits(b).to_f32(),
            ref_decode(Fp8Format::E4M3, b)
        ));
        assert!(same_value(
            E5M2::from_bits(b).to_f32(),
            ref_decode(Fp8Format::E5M2, b)
        ));
        assert_eq!(E4M3::from_bits(b).to_bits(), b);
        assert_eq!(E5M2::from_bits(b).to_bits(), b);
    }
    // Spot values straight from the spec table.
    assert_eq!(ref_decode(Fp8Format::E4M3, 0x7E), 448.0);
    assert_eq!(ref_decode(Fp8Format::E5M2, 0x7B), 57344.0);
    assert_eq!(ref_decode(Fp8Format::E4M3, 0x01), 2f64.powi(-9));
    assert_eq!(ref_decode(Fp8Format::E5M2, 0x01), 2f64.powi(-16));
    assert_eq!(ref_decode(Fp8Format::E4M3, 0x07), 0.875 * 2f64.powi(-6));
    assert_eq!(ref_decode(Fp8Format::E5M2, 0x03), 0.75 * 2f64.powi(-14));
    // Decoding is exact, so every finite code round-trips through the encoder.
    for fmt in FORMATS {
        for b in 0..=255u8 {
            let v = fmt.decode(b);
            if v.is_finite() {
                for mode in MODES {
                    assert_eq!(fmt.encode_mode(v, mode), b, "{fmt:?} {b:#04x}");
                }
            }
        }
    }
}

/// Checks every encoding path on `xs` (already f32) against the reference.
fn check_scalar(xs: &[f32], what: &str) {
    for fmt in FORMATS {
        let r = RefEncoder::new(fmt);
        for mode in MODES {
            for &x in xs {
                let want = r.encode(x, mode);
                let got = fmt.encode_mode(x, mode);
                assert_eq!(
                    got,
                    want,
                    "{what} {fmt:?} {mode:?} x={x:e} ({:#010x})",
                    x.to_bits()
                );
                let fast = fmt.encode_fast(x, mode);
                assert_eq!(
                    fast,
                    want,
                    "fast {what} {fmt:?} {mode:?} x={x:e} ({:#010x})",
                    x.to_bits()
                );
            }
        }
        // The public type API: from_f32 is SatFinite, from_f32_nonsaturating is NonSat.
        for &x in xs {
            let (sat, non) = (
                r.encode(x, CastMode::SatFinite),
                r.encode(x, CastMode::NonSat),
            );
            match fmt {
                Fp8Format::E4M3 => {
                    assert_eq!(E4M3::from_f32(x).to_bits(), sat, "E4M3::from_f32({x:e})");
                    assert_eq!(E4M3::from_f32_nonsaturating(x).to_bits(), non);
                }
                Fp8Format::E5M2 => {
                    assert_eq!(E5M2::from_f32(x).to_bits(), sat, "E5M2::from_f32({x:e})");
                    assert_eq!(E5M2::from_f32_nonsaturating(x).to_bits(), non);
                }
            }
        }
    }
}

/// Bulk casts of `src` (as `T`, widened by `widen`) with `scale` must equal the scalar
/// cast of `widen(x) * scale`, on every backend and mode; amax must match too. With
/// scale 1 the expected bytes come from the independent reference; for other scales
/// from the scalar `encode_mode` (itself checked against the reference by
/// `check_scalar`), which keeps this fast enough for CI.
fn check_bulk<T: Copy>(
    src: &[T],
    widen: impl Fn(T) -> f32,
    bulk: impl Fn(Fp8Format, CastMode, Backend, &[T], f32, &mut [u8]) -> f32,
    what: &str,
) {
    let wide: Vec<f32> = src.iter().map(|&x| widen(x)).collect();
    let want_amax = if wide.iter().any(|x| x.is_nan()) {
        f32::NAN
    } else {
        wide.iter().fold(0f32, |m, x| m.max(x.abs()))
    };
    let mut dst = vec![0u8; src.len()];
    for scale in [1.0f32, 2f32.powi(-7), 2f32.powi(9), 0.3, 37.25] {
        for fmt in FORMATS {
            let r = RefEncoder::new(fmt);
            for mode in MODES {
                let want: Vec<u8> = if scale == 1.0 {
                    wide.iter().map(|&x| r.encode(x, mode)).collect()
                } else {
                    wide.iter()
                        .map(|&x| fmt.encode_mode(x * scale, mode))
                        .collect()
                };
                for backend in backends() {
                    // Offsets make the SIMD kernels see every alignment and tail length.
                    for off in [0usize, 1, 31] {
                        let n = src.len() - off;
                        dst.fill(0xAA);
                        let amax = bulk(fmt, mode, backend, &src[off..], scale, &mut dst[..n]);
                        if let Some(i) = (0..n).find(|&i| dst[i] != want[off + i]) {
                            let x = wide[off + i];
                            panic!(
                                "{what} {fmt:?} {mode:?} {backend:?} scale={scale} off={off}: \
                                 x={x:e} ({:#010x}) got {:#04x} want {:#04x}",
                                x.to_bits(),
                                dst[i],
                                want[off + i]
                            );
                        }
                        if off == 0 {
                            assert!(
                                amax.to_bits() == want_amax.to_bits()
                                    || (amax.is_nan() && want_amax.is_nan()),
                                "{what} amax {amax} vs {want_amax}"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn every_f16_encodes_correctly() {
    let src: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
    let wide: Vec<f32> = src.iter().map(|x| x.to_f32()).collect();
    check_scalar(&wide, "f16");
    check_bulk(&src, |x| x.to_f32(), cast::f16_to_fp8_amax_with, "f16->fp8");
    // The same patterns through the f32 entry point.
    check_bulk(&wide, |x| x, cast::f32_to_fp8_amax_with, "f16-as-f32->fp8");
}

#[test]
fn every_bf16_encodes_correctly() {
    let src: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
    let wide: Vec<f32> = src.iter().map(|x| x.to_f32()).collect();
    check_scalar(&wide, "bf16");
    check_bulk(
        &src,
        |x| x.to_f32(),
        cast::bf16_to_fp8_amax_with,
        "bf16->fp8",
    );
}

#[test]
fn seeded_f32_set_encodes_correctly() {
    // ~60k boundary/special values and neighbours plus 2 x n_random random ones, both signs.
    let n_random = if cfg!(debug_assertions) {
        100_000
    } else {
        400_000
    };
    let xs = f32_test_set(n_random, 0x005E_EDF8);
    check_scalar(&xs, "f32");
    check_bulk(&xs, |x| x, cast::f32_to_fp8_amax_with, "f32->fp8");
}

#[test]
fn bulk_amax_semantics() {
    let mut dst = vec![0u8; 100];
    for backend in backends() {
        let mut src: Vec<f32> = (0..100).map(|i| i as f32 - 60.0).collect();
        let amax = cast::f32_to_fp8_amax_with(
            Fp8Format::E4M3,
            CastMode::SatFinite,
            backend,
            &src,
            1.0,
            &mut dst,
        );
        assert_eq!(amax, 60.0);
        src[77] = f32::NEG_INFINITY;
        let amax = cast::f32_to_fp8_amax_with(
            Fp8Format::E4M3,
            CastMode::SatFinite,
            backend,
            &src,
            1.0,
            &mut dst,
        );
        assert_eq!(amax, f32::INFINITY);
        src[3] = -f32::NAN;
        let amax = cast::f32_to_fp8_amax_with(
            Fp8Format::E4M3,
            CastMode::SatFinite,
            backend,
            &src,
            1.0,
            &mut dst,
        );
        assert!(amax.is_nan());
        let amax = cast::f32_to_fp8_amax_with(
            Fp8Format::E4M3,
            CastMode::SatFinite,
            backend,
            &[],
            1.0,
            &mut [],
        );
        assert_eq!(amax, 0.0);
    }
    let mut v: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
    let want = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert_eq!(cast::amax_f32(&v), want);
    v[999] = f32::NAN;
    assert!(cast::amax_f32(&v).is_nan());
}

#[test]
fn bulk_decode_matches_table_on_every_backend() {
    let mut rng = Rng(7);
    let codes: Vec<u8> = (0..256u32)
        .map(|b| b as u8)
        .chain((0..10_000).map(|_| rng.next_u32() as u8))
        .collect();
    for fmt in FORMATS {
        let table = cast::decode_table(fmt);
        // Without NaN codes: amax is the largest finite (or inf) magnitude.
        let finite: Vec<u8> = codes
            .iter()
            .copied()
            .filter(|&b| !table[b as usize].is_nan())
            .collect();
        for inv_scale in [1.0f32, 0.125, 3.0] {
            for backend in backends() {
                for (src, has_nan) in [(&codes, true), (&finite, false)] {
                    for off in [0usize, 5] {
                        let src = &src[off..];
                        let mut dst = vec![0f32; src.len()];
                        let amax =
                            cast::fp8_to_f32_amax_with(fmt, backend, src, inv_scale, &mut dst);
                        for (i, &b) in src.iter().enumerate() {
                            let want = table[b as usize] * inv_scale;
                            assert!(
                                dst[i].to_bits() == want.to_bits()
                                    || (dst[i].is_nan() && want.is_nan()),
                                "{fmt:?} {backend:?} code {b:#04x}"
                            );
                        }
                        let want_amax = src
                            .iter()
                            .fold(0f32, |m, &b| m.max(table[b as usize].abs()));
                        if has_nan {
                            assert!(amax.is_nan());
                        } else {
                            assert_eq!(amax, want_amax);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn parallel_casts_match_single_threaded() {
    let mut rng = Rng(11);
    let n = cast::PAR_CHUNK * 3 + 12345;
    let src: Vec<f32> = (0..n).map(|_| (rng.normal() * 100.0) as f32).collect();
    let (mut a, mut b) = (vec![0u8; n], vec![0u8; n]);
    for fmt in FORMATS {
        let amax_a = cast::f32_to_fp8_amax(fmt, &src, 0.5, &mut a);
        let amax_b = cast::par_f32_to_fp8_amax(fmt, &src, 0.5, &mut b);
        assert_eq!(a, b);
        assert_eq!(amax_a, amax_b);
        let s16: Vec<f16> = src.iter().map(|&x| f16::from_f32(x)).collect();
        let sb16: Vec<bf16> = src.iter().map(|&x| bf16::from_f32(x)).collect();
        assert_eq!(
            cast::f16_to_fp8_amax(fmt, &s16, 2.0, &mut a),
            cast::par_f16_to_fp8_amax(fmt, &s16, 2.0, &mut b)
        );
        assert_eq!(a, b);
        assert_eq!(
            cast::bf16_to_fp8_amax(fmt, &sb16, 2.0, &mut a),
            cast::par_bf16_to_fp8_amax(fmt, &sb16, 2.0, &mut b)
        );
        assert_eq!(a, b);
        let (mut fa, mut fb) = (vec![0f32; n], vec![0f32; n]);
        let am1 = cast::fp8_to_f32_amax(fmt, &a, 0.5, &mut fa);
        let am2 = cast::par_fp8_to_f32_amax(fmt, &a, 0.5, &mut fb);
        assert_eq!(am1, am2);
        assert!(fa.iter().zip(&fb).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}

/// The counted cast gives the plain cast's bytes and amax, and counts that match their
/// definition element by element, on every backend, at every tail length.
#[test]
fn counted_cast_counts_saturated_and_flushed() {
    let mut xs = f32_test_set(50_000, 0xC0_0172);
    xs.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        1e-30,
        -1e-30,
    ]);
    for fmt in FORMATS {
        let max = fmt.max();
        for scale in [1.0f32, 2f32.powi(-9), 2f32.powi(12), 0.3] {
            let want_sat = xs.iter().filter(|x| (**x * scale).abs() > max).count() as u64;
            let mut want_bytes = vec![0u8; xs.len()];
            let want_amax = cast::f32_to_fp8_amax_with(
                fmt,
                CastMode::SatFinite,
                Backend::Portable,
                &xs,
                scale,
                &mut want_bytes,
            );
            let want_flush = xs
                .iter()
                .zip(&want_bytes)
                .filter(|(x, b)| **x != 0.0 && *b & 0x7F == 0)
                .count() as u64;
            assert!(
                want_sat > 0 || scale < 1.0,
                "test set must saturate at scale {scale}"
            );
            assert!(want_flush > 0, "test set must flush at scale {scale}");
            for backend in backends() {
                for off in [0usize, 1, 15, 17] {
                    let src = &xs[off..];
                    let mut dst = vec![0u8; src.len()];
                    let (amax, c) =
                        cast::f32_to_fp8_counted_with(fmt, backend, src, scale, &mut dst);
                    assert_eq!(
                        dst,
                        want_bytes[off..],
                        "{fmt:?} {backend:?} scale {scale} off {off}"
                    );
                    if off == 0 {
                        assert!(amax.is_nan() && want_amax.is_nan());
                        assert_eq!(c.saturated, want_sat, "{fmt:?} {backend:?} scale {scale}");
                        assert_eq!(c.flushed, want_flush, "{fmt:?} {backend:?} scale {scale}");
                    }
                }
            }
            let mut dst = vec![0u8; xs.len()];
            let (_, c) = cast::par_f32_to_fp8_counted(fmt, &xs, scale, &mut dst);
            assert_eq!((c.saturated, c.flushed), (want_sat, want_flush));
            assert_eq!(dst, want_bytes);
        }
    }
}
