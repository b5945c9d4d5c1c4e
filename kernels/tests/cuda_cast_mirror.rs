//! The CUDA FP8 casts, as ported line by line to Rust (`kernels::cuda::cast_mirror`, the
//! twin of `kernels/src/cuda/cu/fp8.cuh`), give exactly the CPU casts' bits.
//!
//! What this proves and what it does not: it proves the *algorithm* written in the CUDA
//! source (integer rounding, the subnormal shift, NaN/inf/overflow handling, NaN sign
//! taken from the input) is bit-identical to `fp8lm_fp8` on every f16 pattern and on the
//! seeded f32 set the fp8 crate's own tests use, in every cast mode and at several scales.
//! It does not prove that NVRTC compiles the CUDA text to the same bits: that needs a GPU
//! (`scripts/gpu-check.sh`, never run so far).

#[path = "../../fp8/tests/common/mod.rs"]
mod common;

use common::{f32_test_set, RefEncoder, FORMATS, MODES};
use fp8lm_fp8::cast::{self, Backend};
use fp8lm_fp8::Fp8Format;
use fp8lm_kernels::cuda::cast_mirror as mirror;
use half::f16;

/// The scales the fp8 crate's bulk tests use (1, powers of two, and inexact ratios).
const SCALES: [f32; 5] = [1.0, 1.0 / 128.0, 512.0, 0.3, 37.25];

fn same_amax(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

#[test]
fn every_f16_pattern_casts_like_the_cpu() {
    let bits: Vec<u16> = (0..=u16::MAX).collect();
    let halfs: Vec<f16> = bits.iter().map(|&b| f16::from_bits(b)).collect();
    let mut got = vec![0u8; bits.len()];
    let mut want = vec![0u8; bits.len()];
    for fmt in FORMATS {
        let r = RefEncoder::new(fmt);
        for mode in MODES {
            for scale in SCALES {
                let amax = mirror::cast_f16_to_fp8(fmt, mode, &bits, scale, &mut got);
                let want_amax = cast::f16_to_fp8_amax_with(
                    fmt,
                    mode,
                    Backend::Portable,
                    &halfs,
                    scale,
                    &mut want,
                );
                if let Some(i) = (0..bits.len()).find(|&i| got[i] != want[i]) {
                    panic!(
                        "{fmt:?} {mode:?} scale {scale}: f16 {:#06x} -> {:#04x}, CPU {:#04x}",
                        bits[i], got[i], want[i]
                    );
                }
                assert!(
                    same_amax(amax, want_amax),
                    "{fmt:?} amax {amax} vs {want_amax}"
                );
                if scale == 1.0 {
                    // And against the independent nearest-value reference directly.
                    for (i, h) in halfs.iter().enumerate() {
                        assert_eq!(
                            got[i],
                            r.encode(h.to_f32(), mode),
                            "{fmt:?} {mode:?} f16 {:#06x}",
                            bits[i]
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn seeded_f32_set_casts_like_the_cpu() {
    // The fp8 crate's seeded set: every rounding boundary of every binade of both formats
    // and its f32 neighbours, subnormals, the overflow midpoints, inf, NaN payloads, random
    // bits; both signs. Same size and seed as fp8/tests/exhaustive.rs in release builds.
    let xs = f32_test_set(400_000, 0x005E_EDF8);
    let mut got = vec![0u8; xs.len()];
    let mut want = vec![0u8; xs.len()];
    for fmt in FORMATS {
        let r = RefEncoder::new(fmt);
        for mode in MODES {
            for scale in SCALES {
                let amax = mirror::cast_f32_to_fp8(fmt, mode, &xs, scale, &mut got);
                let want_amax =
                    cast::f32_to_fp8_amax_with(fmt, mode, Backend::Portable, &xs, scale, &mut want);
                if let Some(i) = (0..xs.len()).find(|&i| got[i] != want[i]) {
                    let x = xs[i];
                    panic!("{fmt:?} {mode:?} scale {scale}: x={x:e} ({:#010x}) -> {:#04x}, CPU {:#04x}", x.to_bits(), got[i], want[i]);
                }
                assert!(
                    same_amax(amax, want_amax),
                    "{fmt:?} amax {amax} vs {want_amax}"
                );
                if scale == 1.0 {
                    for (i, &x) in xs.iter().enumerate() {
                        assert_eq!(
                            got[i],
                            r.encode(x, mode),
                            "{fmt:?} {mode:?} x={x:e} ({:#010x})",
                            x.to_bits()
                        );
                    }
                }
            }
        }
    }
    // The set must reach every path the kernel has: subnormal codes, saturation, NaN.
    let k = mirror::fp8_consts(0, 0);
    assert!(xs
        .iter()
        .any(|&x| x.abs() < 2f32.powi(-6) && mirror::fp8_from_f32_scaled(&k, x, 1.0) & 0x7F != 0));
    assert!(xs.iter().any(|&x| x.is_finite() && x.abs() > 464.0));
    assert!(xs.iter().any(|x| x.is_nan() && x.is_sign_negative()));
}

#[test]
fn f16_widening_and_rounding_match_half() {
    for b in 0..=u16::MAX {
        let h = f16::from_bits(b);
        let (got, want) = (mirror::f16_bits_to_f32(b), h.to_f32());
        assert!(
            got.to_bits() == want.to_bits(),
            "f16 {b:#06x}: {got:e} vs {want:e}"
        );
        // Round trip, and the rounding of every f16 value and its f32 neighbours.
        for x in [
            want,
            f32::from_bits(want.to_bits().wrapping_add(1)),
            f32::from_bits(want.to_bits().wrapping_sub(1)),
        ] {
            assert_eq!(
                mirror::f32_to_f16_bits(x),
                f16::from_f32(x).to_bits(),
                "x={x:e} ({:#010x})",
                x.to_bits()
            );
        }
    }
    for x in f32_test_set(100_000, 0xF16) {
        assert_eq!(
            mirror::f32_to_f16_bits(x),
            f16::from_f32(x).to_bits(),
            "x={x:e} ({:#010x})",
            x.to_bits()
        );
    }
    // Every f16 rounding midpoint (odd and even below): ties to even.
    for b in 0..0x7BFFu32 {
        let lo = f16::from_bits(b as u16).to_f32() as f64;
        let hi = f16::from_bits(b as u16 + 1).to_f32() as f64;
        let mid = ((lo + hi) / 2.0) as f32;
        assert_eq!(
            mirror::f32_to_f16_bits(mid),
            f16::from_f32(mid).to_bits(),
            "midpoint after {b:#06x}"
        );
    }
}

#[test]
fn decode_matches_the_cpu_on_all_codes() {
    for fmt in FORMATS {
        let table = cast::decode_table(fmt);
        for b in 0..=255u32 {
            let got = mirror::fp8_decode(mirror::fmt_code(fmt), b);
            let want = fmt.decode(b as u8);
            assert_eq!(got.to_bits(), want.to_bits(), "{fmt:?} {b:#04x}");
            assert!(same_amax(got, table[b as usize]));
        }
    }
}

/// Kernel `fp8_rescale` re-encodes like collectives' `requant_table`:
/// `code -> fmt.encode(decode(code) * ratio, true)`, NaN codes unchanged.
#[test]
fn rescale_matches_the_requant_table_definition() {
    for fmt in FORMATS {
        let dec = cast::decode_table(fmt);
        for ratio in [1.0f32, 0.5, 0.3, 3.7, 2f32.powi(-12), 2f32.powi(10)] {
            for code in 0..=255u8 {
                let want = if dec[code as usize].is_nan() {
                    code
                } else {
                    fmt.encode(dec[code as usize] * ratio, true)
                };
                assert_eq!(
                    mirror::fp8_rescale(fmt, code, ratio),
                    want,
                    "{fmt:?} code {code:#04x} ratio {ratio}"
                );
            }
        }
    }
    let _ = Fp8Format::E4M3;
}

/// A tripwire, not a proof: the CUDA text still contains the expressions the mirror
/// ports (an edit to one file without the other should trip it).
#[test]
fn cuda_source_still_has_the_mirrored_expressions() {
    let src = fp8lm_kernels::cuda::nvrtc::FP8_PRELUDE;
    for expr in [
        "if (s > 25) return 0u;",
        "q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u)",
        "const unsigned int r = (ab + k.round_bias + lsb) >> k.shift;",
        "const unsigned int code_s = e == 0u ? 0u : rne_shift(sig, k.sub_shift_base - (int)e);",
        "if ((xb & 0x7FFFFFFFu) > 0x7F800000u) return ((xb >> 24) & 0x80u) | k.nan_code;",
        "return fp8_encode_bits(k, __float_as_uint(__fmul_rn(x, scale)));",
        "k.sub_shift_base = 150 + emin - (int)m;",
        "if (ab >= 0x477FF000u) return (unsigned short)(sign | 0x7C00u);",
        "return (unsigned short)(sign | rne_shift(sig, 126 - (int)e));",
    ] {
        assert!(
            src.contains(expr),
            "fp8.cuh no longer contains `{expr}`: update cast_mirror.rs with it"
        );
    }
}

/// The bf16 cast kernel's algorithm against `half` (what the CPU backends use): every
/// upper half (sign, exponent, the 7 kept mantissa bits: NaN, infinities, subnormals, both
/// values of the kept LSB that ties round to) with the rounding-relevant lower halves
/// (exact, just below / at / above the tie, sticky only) — 524288 inputs.
#[test]
fn bf16_cast_rounds_like_half() {
    let lows = [
        0x0000u32, 0x0001, 0x4000, 0x7FFF, 0x8000, 0x8001, 0xC000, 0xFFFF,
    ];
    for hi in 0..=u16::MAX as u32 {
        for &lo in &lows {
            let bits = (hi << 16) | lo;
            let x = f32::from_bits(bits);
            let want = half::bf16::from_f32(x).to_bits();
            assert_eq!(mirror::f32_to_bf16_bits(x), want, "f32 bits {bits:#010x}");
        }
    }
}
