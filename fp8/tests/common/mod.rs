//! Independent references for the FP8 tests, written differently from the crate's
//! encoder on purpose: decoding straight from the OCP field definitions in f64, and
//! encoding by picking the nearest of the 256 decoded values (ties to the even
//! mantissa) instead of rounding bit patterns.
#![allow(dead_code)]

use fp8lm_fp8::cast::Backend;
use fp8lm_fp8::{CastMode, Fp8Format};

/// Value of a code from the OCP spec's field definitions, in f64.
pub fn ref_decode(fmt: Fp8Format, b: u8) -> f64 {
    let (ebits, mbits, bias) = match fmt {
        Fp8Format::E4M3 => (4u32, 3u32, 7i32),
        Fp8Format::E5M2 => (5, 2, 15),
    };
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((b as u32) >> mbits) & ((1 << ebits) - 1);
    let f = (b as u32) & ((1 << mbits) - 1);
    let e_all = (1 << ebits) - 1;
    match fmt {
        Fp8Format::E4M3 if e == e_all && f == 7 => return f64::NAN.copysign(sign),
        Fp8Format::E5M2 if e == e_all => {
            return if f == 0 {
                sign * f64::INFINITY
            } else {
                f64::NAN.copysign(sign)
            }
        }
        _ => {}
    }
    let frac = f as f64 / (1u32 << mbits) as f64;
    if e == 0 {
        sign * frac * 2f64.powi(1 - bias)
    } else {
        sign * (1.0 + frac) * 2f64.powi(e as i32 - bias)
    }
}

/// Nearest-value encoder over the table of finite non-negative values.
pub struct RefEncoder {
    fmt: Fp8Format,
    /// (value, code) for every finite non-negative code, ascending, plus a final
    /// virtual entry (`None`) for the next value above max in an unbounded exponent
    /// range: landing there means overflow.
    vals: Vec<(f64, Option<u8>)>,
    /// Is that virtual value's mantissa even? (E4M3: 480 = 1.111b x 2^8, odd;
    /// E5M2: 65536 = 1.00b x 2^16, even.)
    overflow_even: bool,
}

impl RefEncoder {
    pub fn new(fmt: Fp8Format) -> Self {
        let mut vals: Vec<(f64, Option<u8>)> = (0u8..0x80)
            .map(|b| (ref_decode(fmt, b), Some(b)))
            .filter(|(v, _)| v.is_finite())
            .collect();
        vals.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
        let (next_above_max, overflow_even) = match fmt {
            Fp8Format::E4M3 => (480.0, false),
            Fp8Format::E5M2 => (65536.0, true),
        };
        vals.push((next_above_max, None));
        RefEncoder {
            fmt,
            vals,
            overflow_even,
        }
    }

    fn even(&self, entry: (f64, Option<u8>)) -> bool {
        match entry.1 {
            Some(code) => code & 1 == 0,
            None => self.overflow_even,
        }
    }

    pub fn encode(&self, x: f32, mode: CastMode) -> u8 {
        let sign: u8 = if x.is_sign_negative() { 0x80 } else { 0 };
        let fmt = self.fmt;
        if x.is_nan() {
            return sign | fmt.nan_bits();
        }
        let overflow = |is_inf: bool| -> u8 {
            let code = match (mode, fmt.inf_bits()) {
                (CastMode::SatAll, _) => fmt.max_bits(),
                (CastMode::SatFinite, Some(inf)) if is_inf => inf,
                (CastMode::SatFinite, _) => fmt.max_bits(),
                (CastMode::NonSat, Some(inf)) => inf,
                (CastMode::NonSat, None) => fmt.nan_bits(),
            };
            sign | code
        };
        if x.is_infinite() {
            return overflow(true);
        }
        let a = (x as f64).abs();
        let last = *self.vals.last().unwrap();
        if a >= last.0 {
            return overflow(false);
        }
        // First entry strictly greater than a; its predecessor is <= a.
        let hi = self.vals.partition_point(|&(v, _)| v <= a);
        let lo_e = self.vals[hi - 1];
        let hi_e = self.vals[hi];
        let (dlo, dhi) = (a - lo_e.0, hi_e.0 - a);
        let pick = if dlo < dhi {
            lo_e
        } else if dhi < dlo {
            hi_e
        } else if self.even(lo_e) {
            lo_e
        } else {
            hi_e
        };
        match pick.1 {
            Some(code) => sign | code,
            None => overflow(false),
        }
    }

    /// Finite non-negative values of the format, ascending (no virtual entry).
    pub fn finite_values(&self) -> Vec<f64> {
        self.vals[..self.vals.len() - 1]
            .iter()
            .map(|v| v.0)
            .collect()
    }

    /// The virtual next value above max.
    pub fn next_above_max(&self) -> f64 {
        self.vals.last().unwrap().0
    }
}

pub const MODES: [CastMode; 3] = [CastMode::SatFinite, CastMode::SatAll, CastMode::NonSat];
pub const FORMATS: [Fp8Format; 2] = [Fp8Format::E4M3, Fp8Format::E5M2];

/// SplitMix64: a tiny seeded generator, enough for test inputs.
pub struct Rng(pub u64);
impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.unit().max(1e-300);
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

fn next_up(x: f32) -> f32 {
    f32::from_bits(x.to_bits() + 1)
}
fn next_down(x: f32) -> f32 {
    f32::from_bits(x.to_bits() - 1)
}

/// The seeded f32 test set: specials, every FP8 value of both formats and every
/// rounding boundary (midpoints, incl. the overflow midpoints 464 and 61440) with their
/// f32 neighbours, both signs, also shifted by powers of two so every binade's
/// boundaries of each format appear; then `n_random` uniform bit patterns and
/// `n_random` values with exponents in the FP8 range.
pub fn f32_test_set(n_random: usize, seed: u64) -> Vec<f32> {
    let mut v: Vec<f32> = vec![
        0.0,
        f32::INFINITY,
        f32::NAN,
        f32::from_bits(0x7F80_0001), // signalling NaN
        f32::from_bits(0x7FFF_FFFF),
        f32::from_bits(0x7FC0_1234),
        f32::MAX,
        f32::MIN_POSITIVE,
        f32::from_bits(1),
        f32::from_bits(0x007F_FFFF),
        f32::EPSILON,
        1.0,
    ];
    let mut anchors: Vec<f64> = Vec::new();
    for fmt in FORMATS {
        let r = RefEncoder::new(fmt);
        let mut vals = r.finite_values();
        vals.push(r.next_above_max());
        // Beyond: the midpoint above the virtual value, and far overflow.
        vals.push(r.next_above_max() * 1.0625);
        for w in vals.windows(2) {
            anchors.push(w[0]);
            anchors.push((w[0] + w[1]) / 2.0);
            anchors.push(w[0] * 0.75 + w[1] * 0.25);
        }
        anchors.push(*vals.last().unwrap());
    }
    for &a in &anchors {
        for k in [-24i32, -12, -3, -1, 0, 1, 3, 12, 24] {
            let x = (a * 2f64.powi(k)) as f32;
            if x == 0.0 || !x.is_finite() {
                continue;
            }
            v.extend([x, next_up(x), next_down(x), next_up(next_up(x))]);
        }
    }
    let mut rng = Rng(seed);
    for _ in 0..n_random {
        v.push(f32::from_bits(rng.next_u32()));
    }
    for _ in 0..n_random {
        let e = (rng.next_u32() % 50) as i32 - 30;
        let m = rng.next_u32() & 0x007F_FFFF;
        v.push(f32::from_bits((((e + 127) as u32) << 23) | m));
    }
    let negated: Vec<f32> = v.iter().map(|x| -x).collect();
    v.extend(negated);
    v
}

/// The backends every bulk test runs. On x86-64 AVX2 must be there (this project's
/// machines have it): a test that silently covered only the portable path would lie.
pub fn backends() -> Vec<Backend> {
    if cfg!(target_arch = "x86_64") {
        assert!(
            Backend::Avx2.is_available(),
            "AVX2+F16C not detected on this x86-64 CPU: the SIMD casts would go untested"
        );
        let mut v = vec![Backend::Portable, Backend::Avx2];
        if Backend::Avx512.is_available() {
            v.push(Backend::Avx512);
        } else {
            // This project's CI machines have AVX-512; say so loudly if one does not.
            eprintln!("NOTE: no AVX-512 F/BW/VL on this CPU: the AVX-512 encodes are not checked");
        }
        v
    } else {
        vec![Backend::Portable]
    }
}
