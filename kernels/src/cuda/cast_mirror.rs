//! The CUDA casts of `cu/fp8.cuh`, ported to Rust line by line.
//!
//! Why this exists: the GPU casts must give the same bits as the CPU casts of
//! `fp8lm_fp8`, and no GPU is available where the tests run. This port of the *same
//! integer algorithm* is tested on the CPU against the fp8 crate's reference (all 65536 f16
//! patterns and the seeded f32 set, every mode, several scales: `tests/cuda_cast_mirror.rs`).
//! That proves the algorithm; only a run on a GPU (`scripts/gpu-check.sh`) proves that
//! NVRTC compiles it to the same bits. Keep the two files in step, function by function.

use fp8lm_fp8::{CastMode, Fp8Format};

/// `struct Fp8Consts` of fp8.cuh.
#[derive(Clone, Copy, Debug)]
pub struct Fp8Consts {
    pub shift: u32,
    pub round_bias: u32,
    pub rebias: u32,
    pub min_normal_bits: u32,
    pub sub_shift_base: i32,
    pub max_code: u32,
    pub overflow_code: u32,
    pub inf_code: u32,
    pub nan_code: u32,
}

/// `FP8_E4M3` / `FP8_E5M2` of fp8.cuh (the `fmt` kernel argument).
pub fn fmt_code(fmt: Fp8Format) -> i32 {
    match fmt {
        Fp8Format::E4M3 => 0,
        Fp8Format::E5M2 => 1,
    }
}

/// `MODE_*` of fp8.cuh (the `mode` kernel argument).
pub fn mode_code(mode: CastMode) -> i32 {
    match mode {
        CastMode::SatFinite => 0,
        CastMode::SatAll => 1,
        CastMode::NonSat => 2,
    }
}

/// `fp8_consts(fmt, mode)`.
pub fn fp8_consts(fmt: i32, mode: i32) -> Fp8Consts {
    let m: u32 = if fmt == 0 { 3 } else { 2 };
    let bias: i32 = if fmt == 0 { 7 } else { 15 };
    let emin = 1 - bias;
    let max_bits: u32 = if fmt == 0 { 0x7E } else { 0x7B };
    let nan_bits: u32 = if fmt == 0 { 0x7F } else { 0x7E };
    let has_inf = fmt == 1;
    let overflow_value = if has_inf { 0x7C } else { nan_bits };
    let shift = 23 - m;
    let (overflow_code, inf_code) = if mode == 0 {
        (max_bits, if has_inf { overflow_value } else { max_bits })
    } else if mode == 1 {
        (max_bits, max_bits)
    } else {
        (overflow_value, overflow_value)
    };
    Fp8Consts {
        shift,
        round_bias: (1u32 << (shift - 1)) - 1,
        rebias: ((127 - bias) as u32) << m,
        min_normal_bits: ((emin + 127) as u32) << 23,
        sub_shift_base: 150 + emin - m as i32,
        max_code: max_bits,
        overflow_code,
        inf_code,
        nan_code: nan_bits,
    }
}

/// `rne_shift(sig, s)`, s >= 1.
pub fn rne_shift(sig: u32, s: i32) -> u32 {
    if s > 25 {
        return 0;
    }
    let q = sig >> s;
    let rem = sig & ((1u32 << s) - 1);
    let half = 1u32 << (s - 1);
    q + u32::from(rem > half || (rem == half && (q & 1) != 0))
}

/// `fp8_encode_bits(k, b)`.
pub fn fp8_encode_bits(k: &Fp8Consts, b: u32) -> u32 {
    let sign = (b >> 24) & 0x80;
    let ab = b & 0x7FFF_FFFF;
    let lsb = (ab >> k.shift) & 1;
    let r = ab.wrapping_add(k.round_bias).wrapping_add(lsb) >> k.shift;
    let code_n = r.wrapping_sub(k.rebias);
    let e = ab >> 23;
    let sig = (ab & 0x7F_FFFF) | 0x80_0000;
    let code_s = if e == 0 {
        0
    } else {
        rne_shift(sig, k.sub_shift_base - e as i32)
    };
    let mut code = if ab < k.min_normal_bits {
        code_s
    } else {
        code_n
    };
    if code > k.max_code {
        code = k.overflow_code;
    }
    if ab == 0x7F80_0000 {
        code = k.inf_code;
    }
    if ab > 0x7F80_0000 {
        code = k.nan_code;
    }
    code | sign
}

/// `fp8_from_f32_scaled(k, x, scale)` (`__fmul_rn` is the IEEE f32 multiply).
pub fn fp8_from_f32_scaled(k: &Fp8Consts, x: f32, scale: f32) -> u32 {
    let xb = x.to_bits();
    if (xb & 0x7FFF_FFFF) > 0x7F80_0000 {
        return ((xb >> 24) & 0x80) | k.nan_code;
    }
    fp8_encode_bits(k, (x * scale).to_bits())
}

/// `f16_bits_to_f32(h)`.
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let sign = (h as u32 & 0x8000) << 16;
    let exp = (h as u32 >> 10) & 0x1F;
    let mut man = h as u32 & 0x3FF;
    let out = if exp == 0x1F {
        sign | 0x7F80_0000 | (man << 13) | if man != 0 { 0x40_0000 } else { 0 }
    } else if exp == 0 {
        if man == 0 {
            sign
        } else {
            let mut e: i32 = -14;
            while man & 0x400 == 0 {
                man <<= 1;
                e -= 1;
            }
            sign | (((e + 127) as u32) << 23) | ((man & 0x3FF) << 13)
        }
    } else {
        sign | ((exp + 112) << 23) | (man << 13)
    };
    f32::from_bits(out)
}

/// `f32_to_f16_bits(x)`.
pub fn f32_to_f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = (b >> 16) & 0x8000;
    let ab = b & 0x7FFF_FFFF;
    if ab > 0x7F80_0000 {
        return (sign | 0x7E00 | ((ab >> 13) & 0x3FF)) as u16;
    }
    if ab >= 0x477F_F000 {
        return (sign | 0x7C00) as u16;
    }
    let e = ab >> 23;
    if e >= 113 {
        let lsb = (ab >> 13) & 1;
        let r = (ab + 0xFFF + lsb) >> 13;
        return (sign | (r - (112 << 10))) as u16;
    }
    if e == 0 {
        return sign as u16;
    }
    let sig = (ab & 0x7F_FFFF) | 0x80_0000;
    (sign | rne_shift(sig, 126 - e as i32)) as u16
}

/// `fp8_decode(fmt, bits)`.
pub fn fp8_decode(fmt: i32, bits: u32) -> f32 {
    let m: u32 = if fmt == 0 { 3 } else { 2 };
    let bias: i32 = if fmt == 0 { 7 } else { 15 };
    let sign = (bits >> 7) << 31;
    let exp = (bits >> m) & ((1 << (7 - m)) - 1);
    let mant = bits & ((1 << m) - 1);
    let exp_all = (1 << (7 - m)) - 1;
    if fmt == 0 && exp == exp_all && mant == 7 {
        return f32::from_bits(sign | 0x7FC0_0000);
    }
    if fmt == 1 && exp == exp_all {
        return f32::from_bits(sign | if mant == 0 { 0x7F80_0000 } else { 0x7FC0_0000 });
    }
    if exp == 0 {
        if mant == 0 {
            return f32::from_bits(sign);
        }
        let lead = 31 - mant.leading_zeros() as i32; // __clz
        let e = 1 - bias - m as i32 + lead;
        let frac = (mant ^ (1 << lead)) << (23 - lead);
        return f32::from_bits(sign | (((e + 127) as u32) << 23) | frac);
    }
    let e = exp as i32 - bias;
    f32::from_bits(sign | (((e + 127) as u32) << 23) | (mant << (23 - m)))
}

/// `abs_bits(x)`, the amax accumulator's element.
/// `cast_f32_to_bf16` of `cu/cast.cu`: f32 -> bf16 bits, round to nearest even, NaN kept
/// quiet (the CPU backends use `half::bf16::from_f32`; `tests/cuda_cast_mirror.rs`).
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let x = x.to_bits();
    let r = if (x & 0x7FFF_FFFF) > 0x7F80_0000 {
        (x >> 16) | 0x0040
    } else if (x & 0x8000) != 0 && (x & 0x17FFF) != 0 {
        (x >> 16) + 1
    } else {
        x >> 16
    };
    r as u16
}

pub fn abs_bits(x: f32) -> u32 {
    x.to_bits() & 0x7FFF_FFFF
}

/// The amax a u32 accumulator stands for (what the host reads back).
pub fn amax_from_bits(acc: u32) -> f32 {
    if acc > 0x7F80_0000 {
        f32::NAN
    } else {
        f32::from_bits(acc)
    }
}

/// Kernel `cast_f32_to_fp8` over a slice, single-threaded; returns the amax.
pub fn cast_f32_to_fp8(
    fmt: Fp8Format,
    mode: CastMode,
    src: &[f32],
    scale: f32,
    dst: &mut [u8],
) -> f32 {
    let k = fp8_consts(fmt_code(fmt), mode_code(mode));
    let mut acc = 0u32;
    for (d, &x) in dst.iter_mut().zip(src) {
        acc = acc.max(abs_bits(x));
        *d = fp8_from_f32_scaled(&k, x, scale) as u8;
    }
    amax_from_bits(acc)
}

/// Kernel `cast_f16_to_fp8` over f16 bit patterns; returns the amax.
pub fn cast_f16_to_fp8(
    fmt: Fp8Format,
    mode: CastMode,
    src: &[u16],
    scale: f32,
    dst: &mut [u8],
) -> f32 {
    let k = fp8_consts(fmt_code(fmt), mode_code(mode));
    let mut acc = 0u32;
    for (d, &h) in dst.iter_mut().zip(src) {
        let x = f16_bits_to_f32(h);
        acc = acc.max(abs_bits(x));
        *d = fp8_from_f32_scaled(&k, x, scale) as u8;
    }
    amax_from_bits(acc)
}

/// Kernel `fp8_rescale` on one code (collectives' `requant_table` entry).
pub fn fp8_rescale(fmt: Fp8Format, code: u8, ratio: f32) -> u8 {
    let k = fp8_consts(fmt_code(fmt), mode_code(CastMode::SatAll));
    let v = fp8_decode(fmt_code(fmt), code as u32);
    if abs_bits(v) <= 0x7F80_0000 {
        fp8_encode_bits(&k, (v * ratio).to_bits()) as u8
    } else {
        code
    }
}
