//! The two OCP FP8 formats and their scalar casts.
//!
//! Every cast here is the reference the bulk (SIMD) casts in [`crate::cast`] are tested
//! against, bit for bit. Rounding is to nearest, ties to even, computed exactly: the input
//! is divided by the format's quantum at its binade (a power of two, so the division is
//! exact in f32) and rounded with `round_ties_even`.
//!
//! The bulk casts use a second, branch-free formulation ([`Fp8Format::encode_fast`]):
//! integer round-to-nearest-even of the f32 bit pattern in the normal range, and the
//! FPU's own rounding of `|x| + 2^(emin - m + 23)` in the subnormal range. Both are
//! checked against an independent nearest-value reference in `tests/exhaustive.rs`.

/// Static description of an FP8 format (exponent/mantissa split, bias, specials).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fp8Format {
    /// OCP E4M3 "FN": bias 7, max 448, no infinity, NaN is S.1111.111.
    E4M3,
    /// OCP E5M2: bias 15, max 57344, infinities S.11111.00, NaNs S.11111.{01,10,11}.
    E5M2,
}

impl Fp8Format {
    pub const fn mantissa_bits(self) -> u32 {
        match self {
            Fp8Format::E4M3 => 3,
            Fp8Format::E5M2 => 2,
        }
    }
    pub const fn exponent_bias(self) -> i32 {
        match self {
            Fp8Format::E4M3 => 7,
            Fp8Format::E5M2 => 15,
        }
    }
    /// Largest finite magnitude.
    pub const fn max(self) -> f32 {
        match self {
            Fp8Format::E4M3 => 448.0,
            Fp8Format::E5M2 => 57344.0,
        }
    }
    /// Smallest positive normal value, 2^(1 - bias).
    pub fn min_normal(self) -> f32 {
        2f32.powi(1 - self.exponent_bias())
    }
    /// Smallest positive subnormal value, 2^(1 - bias - mantissa_bits).
    pub fn min_subnormal(self) -> f32 {
        2f32.powi(1 - self.exponent_bias() - self.mantissa_bits() as i32)
    }
    /// Bit pattern of +max.
    pub const fn max_bits(self) -> u8 {
        match self {
            Fp8Format::E4M3 => 0x7E,
            Fp8Format::E5M2 => 0x7B,
        }
    }
    /// Canonical positive NaN pattern.
    pub const fn nan_bits(self) -> u8 {
        match self {
            Fp8Format::E4M3 => 0x7F,
            Fp8Format::E5M2 => 0x7E,
        }
    }
    /// Positive infinity, if the format has one.
    pub const fn inf_bits(self) -> Option<u8> {
        match self {
            Fp8Format::E4M3 => None,
            Fp8Format::E5M2 => Some(0x7C),
        }
    }
    pub const fn name(self) -> &'static str {
        match self {
            Fp8Format::E4M3 => "e4m3",
            Fp8Format::E5M2 => "e5m2",
        }
    }
    /// Decode a bit pattern to the exact f32 value (every FP8 value is exact in f32).
    pub const fn decode(self, bits: u8) -> f32 {
        let sign = ((bits as u32) >> 7) << 31;
        let m = self.mantissa_bits();
        let exp = ((bits as u32) >> m) & ((1 << (7 - m)) - 1);
        let mant = (bits as u32) & ((1 << m) - 1);
        let exp_all_ones = (1u32 << (7 - m)) - 1;
        match self {
            Fp8Format::E4M3 if exp == exp_all_ones && mant == 0b111 => {
                return f32::from_bits(sign | 0x7FC0_0000)
            }
            Fp8Format::E5M2 if exp == exp_all_ones => {
                return if mant == 0 {
                    f32::from_bits(sign | 0x7F80_0000)
                } else {
                    f32::from_bits(sign | 0x7FC0_0000)
                };
            }
            _ => {}
        }
        let bias = self.exponent_bias();
        if exp == 0 {
            if mant == 0 {
                return f32::from_bits(sign);
            }
            // Subnormal: mant * 2^(1 - bias - m). Normalise the mantissa into f32's.
            let lead = 31 - mant.leading_zeros(); // position of the leading one
            let e = 1 - bias - m as i32 + lead as i32;
            let frac = (mant ^ (1 << lead)) << (23 - lead);
            return f32::from_bits(sign | (((e + 127) as u32) << 23) | frac);
        }
        let e = exp as i32 - bias;
        f32::from_bits(sign | (((e + 127) as u32) << 23) | (mant << (23 - m)))
    }

    /// Encode under an explicit [`CastMode`] (the reference, built on [`Self::encode`]).
    pub fn encode_mode(self, x: f32, mode: CastMode) -> u8 {
        match mode {
            CastMode::SatAll => self.encode(x, true),
            CastMode::NonSat => self.encode(x, false),
            CastMode::SatFinite => {
                if x.is_infinite() && self.inf_bits().is_some() {
                    self.encode(x, false)
                } else {
                    self.encode(x, true)
                }
            }
        }
    }

    /// Same result as [`Self::encode_mode`], computed with integer rounding of the f32
    /// bit pattern instead of a division (the algorithm the bulk casts vectorise).
    #[inline]
    pub fn encode_fast(self, x: f32, mode: CastMode) -> u8 {
        EncodeConsts::new(self, mode).encode(x)
    }

    /// Encode with round-to-nearest-even. `saturate` chooses what finite overflow and
    /// infinities become: +-max (training casts) or the format's overflow value (NaN for
    /// E4M3, infinity for E5M2). NaN always maps to NaN, keeping the sign bit.
    #[inline]
    pub fn encode(self, x: f32, saturate: bool) -> u8 {
        let bits = x.to_bits();
        let sign = ((bits >> 24) & 0x80) as u8;
        if x.is_nan() {
            return sign | self.nan_bits();
        }
        let a = x.abs();
        let overflow = || -> u8 {
            if saturate {
                sign | self.max_bits()
            } else {
                sign | self.inf_bits().unwrap_or(self.nan_bits())
            }
        };
        if a.is_infinite() {
            return overflow();
        }
        if a == 0.0 {
            return sign;
        }
        let m = self.mantissa_bits() as i32;
        let emin = 1 - self.exponent_bias();
        // Unbiased exponent of `a`; f32 subnormals are far below every FP8 value.
        let e = (((a.to_bits() >> 23) & 0xFF) as i32 - 127).max(emin);
        let quantum = pow2(e - m);
        let q = (a / quantum).round_ties_even();
        let v = q * quantum;
        if v > self.max() {
            return overflow();
        }
        if v == 0.0 {
            return sign;
        }
        let vb = v.to_bits();
        let ve = ((vb >> 23) & 0xFF) as i32 - 127;
        if ve < emin {
            // Subnormal: v = q * 2^(emin - m), q < 2^m.
            return sign | q as u8;
        }
        let biased = (ve + self.exponent_bias()) as u8;
        let mant = ((vb >> (23 - m)) & ((1 << m) - 1)) as u8;
        sign | (biased << m) | mant
    }
}

/// What a cast does with values outside the format's finite range (NaN always stays NaN).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum CastMode {
    /// The training cast, `E4M3::from_f32` / `E5M2::from_f32`: finite overflow saturates
    /// to +-max; +-inf stays +-inf where the format has infinities (E5M2) and saturates
    /// where it has none (E4M3).
    #[default]
    SatFinite,
    /// Everything that is not NaN saturates, infinities included (`encode(x, true)`;
    /// what MS-AMP's and the `float8` crate's E5M2 casts do).
    SatAll,
    /// `from_f32_nonsaturating`: overflow and +-inf become the format's overflow value
    /// (NaN for E4M3, +-inf for E5M2), so callers can detect it.
    NonSat,
}

/// Constants of the branch-free encoder shared by the portable bulk loop and the SIMD
/// kernels (see [`Fp8Format::encode_fast`]). All codes are unsigned magnitudes (sign 0).
#[derive(Clone, Copy, Debug)]
pub(crate) struct EncodeConsts {
    /// `23 - mantissa_bits`: f32 mantissa bits dropped by the normal-range rounding.
    pub shift: u32,
    /// `2^(shift-1) - 1`: added with the kept LSB, gives round-to-nearest-even.
    pub round_bias: u32,
    /// `(127 - bias) << mantissa_bits`: rebias from f32's exponent to the format's.
    pub rebias: u32,
    /// f32 bits of the smallest normal of the format; below it the subnormal path runs.
    pub min_normal_bits: u32,
    /// `2^(emin - m + 23)`: adding it to a subnormal-range magnitude makes the FPU round
    /// at the format's subnormal quantum (its ulp is exactly that quantum).
    pub magic: f32,
    pub max_code: u32,
    pub overflow_code: u32,
    pub inf_code: u32,
    pub nan_code: u32,
}

impl EncodeConsts {
    pub(crate) const fn new(fmt: Fp8Format, mode: CastMode) -> Self {
        let m = fmt.mantissa_bits();
        let bias = fmt.exponent_bias();
        let emin = 1 - bias;
        let shift = 23 - m;
        let overflow_value = match fmt.inf_bits() {
            Some(inf) => inf,
            None => fmt.nan_bits(),
        };
        let (overflow_code, inf_code) = match mode {
            CastMode::SatFinite => (fmt.max_bits(), overflow_value),
            CastMode::SatAll => (fmt.max_bits(), fmt.max_bits()),
            CastMode::NonSat => (overflow_value, overflow_value),
        };
        // E4M3 has no infinity: under SatFinite an infinite input saturates like any
        // other overflow.
        let inf_code = match (fmt.inf_bits(), mode) {
            (None, CastMode::SatFinite) => fmt.max_bits(),
            _ => inf_code,
        };
        EncodeConsts {
            shift,
            round_bias: (1 << (shift - 1)) - 1,
            rebias: ((127 - bias) as u32) << m,
            min_normal_bits: ((emin + 127) as u32) << 23,
            magic: f32::from_bits(((emin - m as i32 + 23 + 127) as u32) << 23),
            max_code: fmt.max_bits() as u32,
            overflow_code: overflow_code as u32,
            inf_code: inf_code as u32,
            nan_code: fmt.nan_bits() as u32,
        }
    }

    /// Branch-free RNE encode of one f32 (the scalar twin of the SIMD kernels).
    #[inline(always)]
    pub(crate) fn encode(&self, y: f32) -> u8 {
        let b = y.to_bits();
        let sign = (b >> 24) & 0x80;
        let ab = b & 0x7FFF_FFFF;
        // Normal range: round the f32 bit pattern itself to `m` mantissa bits (a carry
        // into the exponent field is the correct next binade).
        let lsb = (ab >> self.shift) & 1;
        let r = ab.wrapping_add(self.round_bias + lsb) >> self.shift;
        let code_n = r.wrapping_sub(self.rebias);
        // Subnormal range: let the FPU round (a + magic) at the subnormal quantum.
        let code_s = (f32::from_bits(ab) + self.magic)
            .to_bits()
            .wrapping_sub(self.magic.to_bits());
        let mut code = if ab < self.min_normal_bits {
            code_s
        } else {
            code_n
        };
        if code > self.max_code {
            code = self.overflow_code;
        }
        if ab == 0x7F80_0000 {
            code = self.inf_code;
        }
        if ab > 0x7F80_0000 {
            code = self.nan_code;
        }
        (code | sign) as u8
    }
}

/// 2^e for e within f32's normal range, built from bits (exact, no libm).
#[inline]
pub(crate) fn pow2(e: i32) -> f32 {
    debug_assert!((-126..=127).contains(&e));
    f32::from_bits(((e + 127) as u32) << 23)
}

macro_rules! fp8_type {
    ($name:ident, $fmt:expr, $doc:literal) => {
        #[doc = $doc]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(u8);

        impl $name {
            pub const FORMAT: Fp8Format = $fmt;
            pub const MAX: f32 = $fmt.max();
            /// Round to nearest even; finite overflow and infinities saturate to +-max
            /// (E4M3) / finite overflow saturates, infinities stay infinite (E5M2); NaN stays NaN.
            #[inline]
            pub fn from_f32(x: f32) -> Self {
                Self($fmt.encode_mode(x, CastMode::SatFinite))
            }
            /// Round to nearest even without saturation: overflow becomes NaN (E4M3) or
            /// infinity (E5M2), so callers can detect it.
            #[inline]
            pub fn from_f32_nonsaturating(x: f32) -> Self {
                Self($fmt.encode(x, false))
            }
            #[inline]
            pub const fn to_f32(self) -> f32 {
                $fmt.decode(self.0)
            }
            #[inline]
            pub const fn from_bits(bits: u8) -> Self {
                Self(bits)
            }
            #[inline]
            pub const fn to_bits(self) -> u8 {
                self.0
            }
            pub fn is_nan(self) -> bool {
                self.to_f32().is_nan()
            }
        }
    };
}

fp8_type!(
    E4M3,
    Fp8Format::E4M3,
    "OCP FP8 E4M3 (FN variant): 1 sign, 4 exponent, 3 mantissa bits."
);
fp8_type!(
    E5M2,
    Fp8Format::E5M2,
    "OCP FP8 E5M2: 1 sign, 5 exponent, 2 mantissa bits."
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        assert_eq!(E4M3::from_f32(448.0).to_bits(), 0x7E);
        assert_eq!(E4M3::from_f32(1e9).to_bits(), 0x7E);
        assert_eq!(E4M3::from_f32(f32::INFINITY).to_bits(), 0x7E);
        assert_eq!(E4M3::from_f32_nonsaturating(480.0).to_bits(), 0x7F);
        assert_eq!(E4M3::from_f32(464.0).to_f32(), 448.0); // tie to even stays at max
        assert_eq!(E4M3::from_bits(0x01).to_f32(), 2f32.powi(-9));
        assert_eq!(E5M2::from_bits(0x01).to_f32(), 2f32.powi(-16));
        assert_eq!(E5M2::from_f32(f32::NEG_INFINITY).to_bits(), 0xFC);
        assert_eq!(E5M2::from_f32(1e9).to_bits(), 0x7B);
        assert_eq!(E5M2::from_f32_nonsaturating(61440.0).to_bits(), 0x7C); // tie rounds up to inf
        assert_eq!(E5M2::from_f32(-0.0).to_bits(), 0x80);
        assert!(E4M3::from_f32(f32::NAN).is_nan());
        assert_eq!(E4M3::from_f32(2f32.powi(-10)).to_bits(), 0x00); // tie to even -> 0
        assert_eq!(E4M3::from_f32(2f32.powi(-10) * 1.01).to_bits(), 0x01);
        for b in 0..=255u8 {
            for fmt in [Fp8Format::E4M3, Fp8Format::E5M2] {
                let v = fmt.decode(b);
                if !v.is_nan() && !(v.is_infinite()) {
                    assert_eq!(fmt.encode(v, true), b, "{fmt:?} {b:#04x} {v}");
                }
            }
        }
    }
}
