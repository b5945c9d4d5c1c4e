//! The scalar type the layer ops are generic over: `f32` in training, `f64` in the
//! finite-difference tests (so the numerical gradient is accurate to ~1e-9 and a 1e-6
//! tolerance catches any real bug).

use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

pub trait Real:
    Copy
    + Send
    + Sync
    + Debug
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn tanh(self) -> Self;
    fn max(self, o: Self) -> Self;
}

macro_rules! impl_real {
    ($t:ty, $exp:path) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline]
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            #[inline]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline]
            fn exp(self) -> Self {
                $exp(self)
            }
            #[inline]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline]
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            #[inline]
            fn max(self, o: Self) -> Self {
                <$t>::max(self, o)
            }
        }
    };
}
impl_real!(f32, exp_f32);
impl_real!(f64, f64::exp);

/// `e^x` in f32 without a libm call, so loops over it vectorise (softmax over a 50257-word
/// vocabulary, attention, GELU's tanh). Cody-Waite reduction `x = n ln2 + r`, |r| <= ln2/2,
/// then Cephes' degree-6 polynomial: relative error below 3e-7 (a few ulp; tested against
/// f64). Overflows to +inf like `f32::exp`; below -87.33 it gives 0 where `f32::exp`
/// still gives subnormals (< 1.2e-38: nothing a softmax sum or tanh can see); NaN gives
/// NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer (nearest even) in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.33, 88.72);
    let shifted = xc * LOG2E + ROUND;
    let nf = shifted - ROUND;
    let n = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = (xc - nf * LN2_HI) - nf * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    // 2^n in two halves: n reaches 128 near the top, one past the largest exponent.
    let pow2 = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
    let y = (p * r * r + r + 1.0) * pow2(n >> 1) * pow2(n - (n >> 1));
    if x > 88.72 {
        f32::INFINITY
    } else if x < -87.33 {
        0.0
    } else {
        y // NaN stays NaN through the clamp and the arithmetic
    }
}

/// `max x[i]` (exact in any order, so taken over 16 lanes for speed; NaNs ignored as by
/// `max`). `x` must not be empty.
#[inline]
pub fn max_of<T: Real>(x: &[T]) -> T {
    const LANES: usize = 16;
    let mut m = [x[0]; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder().iter().fold(x[0], |a, &b| a.max(b));
    for c in chunks {
        for (m, &v) in m.iter_mut().zip(c) {
            *m = m.max(v);
        }
    }
    m.iter().fold(tail, |a, &b| a.max(b))
}

/// `x[i] = exp(x[i] - shift)` in place; returns their sum, over 16 lanes summed pairwise
/// (a fixed order: reproducible; one running sum would be a chain of dependent adds).
#[inline]
pub fn exp_shift_sum<T: Real>(x: &mut [T], shift: T) -> T {
    const LANES: usize = 16;
    let mut s = [T::ZERO; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (s, v) in s.iter_mut().zip(c.iter_mut()) {
            *v = (*v - shift).exp();
            *s += *v;
        }
    }
    let mut tail = T::ZERO;
    for v in chunks.into_remainder() {
        *v = (*v - shift).exp();
        tail += *v;
    }
    sum_pairwise(s) + tail
}

/// `sum a[i] * b[i]`, sixteen independent accumulators summed pairwise (the compiler
/// vectorises it without reassociating, four vectors deep so the adds pipeline; the
/// order is fixed, so results are reproducible).
#[inline]
pub fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    const LANES: usize = 16;
    let n = a.len().min(b.len());
    let (a, b) = (a[..n].chunks_exact(LANES), b[..n].chunks_exact(LANES));
    let tail: T = a
        .remainder()
        .iter()
        .zip(b.remainder())
        .fold(T::ZERO, |t, (&x, &y)| t + x * y);
    let mut s = [T::ZERO; LANES];
    for (x, y) in a.zip(b) {
        for ((s, &x), &y) in s.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    sum_pairwise(s) + tail
}

/// `s[0] + s[1] + ...` as a pairwise tree (a fixed order); `N` a power of two.
#[inline]
fn sum_pairwise<T: Real, const N: usize>(mut s: [T; N]) -> T {
    debug_assert!(N.is_power_of_two());
    let mut w = N;
    while w > 1 {
        w /= 2;
        for j in 0..w {
            let hi = s[j + w];
            s[j] += hi;
        }
    }
    s[0]
}

/// `y += a * x`.
#[inline]
pub fn axpy<T: Real>(y: &mut [T], a: T, x: &[T]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_is_within_3e7_of_f64_and_saturates() {
        let mut worst = 0f64;
        let mut x = -87.33f32;
        while x < 88.7 {
            let (got, want) = (exp_f32(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(worst < 3e-7, "max relative error {worst:e}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(89.0), f32::INFINITY);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(-88.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
        let top = exp_f32(88.72);
        assert!(top.is_finite() && ((top as f64) / (88.72f32 as f64).exp() - 1.0).abs() < 3e-7);
    }

    #[test]
    fn lane_reductions_match_their_definitions() {
        let x: Vec<f32> = (0..1003)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.1)
            .collect();
        assert_eq!(max_of(&x), x.iter().fold(f32::MIN, |a, &b| a.max(b)));
        let mut y = x.clone();
        let sum = exp_shift_sum(&mut y, 2.0);
        let want: f64 = x.iter().map(|&v| ((v - 2.0) as f64).exp()).sum();
        assert!((sum as f64 / want - 1.0).abs() < 1e-6, "{sum} vs {want}");
        for (a, b) in x.iter().zip(&y) {
            assert_eq!(*b, exp_f32(a - 2.0));
        }
        let a: Vec<f64> = (0..77).map(|i| i as f64 * 0.5).collect();
        let want: f64 = a.iter().map(|v| v * v).sum();
        assert_eq!(dot(&a, &a), want); // small integers and halves: exact in any order
    }
}
