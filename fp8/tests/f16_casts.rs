//! The FP16 side (master weights, second moments): `half`'s f32 -> f16 conversion is
//! checked against a nearest-value reference, then the bulk f32 <-> f16 casts are
//! checked bit for bit against `half` on every backend.

mod common;

use common::{backends, f32_test_set};
use fp8lm_fp8::cast;
use half::f16;

/// Nearest finite f16 (ties to even significand), IEEE overflow to inf: values at or
/// past the midpoint between 65504 and the virtual next value 65536 (even) go to inf.
struct RefF16 {
    vals: Vec<f64>, // index = bit pattern, 0..0x7C00, ascending
}
impl RefF16 {
    fn new() -> Self {
        RefF16 {
            vals: (0..0x7C00u16).map(|b| f16::from_bits(b).to_f64()).collect(),
        }
    }
    fn encode(&self, x: f32) -> Option<u16> {
        if x.is_nan() {
            return None;
        }
        let sign = if x.is_sign_negative() { 0x8000 } else { 0 };
        let a = (x as f64).abs();
        if a >= 65520.0 {
            return Some(sign | 0x7C00);
        }
        let hi = self.vals.partition_point(|&v| v <= a);
        if hi == self.vals.len() {
            return Some(sign | (hi as u16 - 1));
        }
        let (lo, hi_v) = (self.vals[hi - 1], self.vals[hi]);
        let pick = if a - lo < hi_v - a {
            hi - 1
        } else if hi_v - a < a - lo {
            hi
        } else if (hi - 1) % 2 == 0 {
            hi - 1
        } else {
            hi
        };
        Some(sign | pick as u16)
    }
}

#[test]
fn half_f32_to_f16_rounds_correctly() {
    let r = RefF16::new();
    let mut xs = f32_test_set(200_000, 0xF16);
    // f16 rounding boundaries: midpoints of consecutive f16 values and neighbours.
    for b in 0..0x7C00u32 {
        let mid = (f16::from_bits(b as u16).to_f64() + f16::from_bits(b as u16 + 1).to_f64()) / 2.0;
        let m = mid as f32;
        xs.extend([
            m,
            f32::from_bits(m.to_bits() + 1),
            f32::from_bits(m.to_bits().max(1) - 1),
        ]);
        xs.extend([-m]);
    }
    for &x in &xs {
        let got = f16::from_f32(x);
        match r.encode(x) {
            Some(want) => assert_eq!(got.to_bits(), want, "x={x:e} ({:#010x})", x.to_bits()),
            None => assert!(got.is_nan() && got.is_sign_negative() == x.is_sign_negative()),
        }
    }
}

#[test]
fn bulk_f16_casts_match_half_bit_for_bit() {
    let mut xs = f32_test_set(100_000, 0xF17);
    xs.extend((0..=u16::MAX).map(|b| f16::from_bits(b).to_f32()));
    for scale in [1.0f32, 2f32.powi(10), 0.37] {
        let want: Vec<u16> = xs
            .iter()
            .map(|&x| f16::from_f32(x * scale).to_bits())
            .collect();
        for backend in backends() {
            for off in [0usize, 3] {
                let src = &xs[off..];
                let mut dst = vec![f16::ZERO; src.len()];
                let amax = cast::f32_to_f16_amax_with(backend, src, scale, &mut dst);
                for (i, d) in dst.iter().enumerate() {
                    assert_eq!(d.to_bits(), want[off + i], "{backend:?} x={:e}", src[i]);
                }
                assert!(amax.is_nan()); // the set holds NaNs
                                        // And back: f16 -> f32 is exact, times inv_scale.
                let mut back = vec![0f32; src.len()];
                cast::f16_to_f32_amax_with(backend, &dst, 0.5, &mut back);
                for (b, d) in back.iter().zip(&dst) {
                    let w = d.to_f32() * 0.5;
                    assert!(b.to_bits() == w.to_bits() || (b.is_nan() && w.is_nan()));
                }
            }
        }
    }
}
