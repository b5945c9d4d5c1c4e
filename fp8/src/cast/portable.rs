//! Portable bulk casts: the branch-free scalar encoder in a plain loop. These define the
//! bulk semantics on every target and run where AVX2 is missing (and on slice tails).

use crate::format::EncodeConsts;
use half::{bf16, f16};

/// Fold `|x|`'s bits into an amax kept as bits: non-negative f32 bit patterns order like
/// their values, and every NaN's magnitude bits sort above +inf, so one integer max
/// gives "max over the non-NaN values, or NaN if there was one".
#[inline(always)]
pub(crate) fn fold_amax_bits(acc: u32, x: f32) -> u32 {
    acc.max(x.to_bits() & 0x7FFF_FFFF)
}

/// The amax a bit accumulator stands for (any NaN bit pattern reads as NaN).
#[inline]
pub(crate) fn amax_from_bits(acc: u32) -> f32 {
    if acc > 0x7F80_0000 {
        f32::NAN
    } else {
        f32::from_bits(acc)
    }
}

pub(crate) fn f32_to_fp8(k: &EncodeConsts, src: &[f32], scale: f32, dst: &mut [u8]) -> u32 {
    let mut acc = 0u32;
    for (d, &x) in dst.iter_mut().zip(src) {
        acc = fold_amax_bits(acc, x);
        *d = k.encode(x * scale);
    }
    acc
}

pub(crate) fn bf16_to_fp8(k: &EncodeConsts, src: &[bf16], scale: f32, dst: &mut [u8]) -> u32 {
    let mut acc = 0u32;
    for (d, &x) in dst.iter_mut().zip(src) {
        let x = x.to_f32();
        acc = fold_amax_bits(acc, x);
        *d = k.encode(x * scale);
    }
    acc
}

pub(crate) fn f16_to_fp8(k: &EncodeConsts, src: &[f16], scale: f32, dst: &mut [u8]) -> u32 {
    let mut acc = 0u32;
    for (d, &x) in dst.iter_mut().zip(src) {
        let x = x.to_f32();
        acc = fold_amax_bits(acc, x);
        *d = k.encode(x * scale);
    }
    acc
}

pub(crate) fn fp8_to_f32(table: &[f32; 256], src: &[u8], inv_scale: f32, dst: &mut [f32]) -> u32 {
    let mut acc = 0u32;
    for (d, &b) in dst.iter_mut().zip(src) {
        let v = table[b as usize];
        acc = fold_amax_bits(acc, v);
        *d = v * inv_scale;
    }
    acc
}

pub(crate) fn amax_f32(src: &[f32]) -> u32 {
    src.iter().fold(0u32, |acc, &x| fold_amax_bits(acc, x))
}

pub(crate) fn f32_to_f16(src: &[f32], scale: f32, dst: &mut [f16]) -> u32 {
    let mut acc = 0u32;
    for (d, &x) in dst.iter_mut().zip(src) {
        acc = fold_amax_bits(acc, x);
        *d = f16::from_f32(x * scale);
    }
    acc
}

pub(crate) fn f16_to_f32(src: &[f16], inv_scale: f32, dst: &mut [f32]) -> u32 {
    let mut acc = 0u32;
    for (d, &x) in dst.iter_mut().zip(src) {
        let v = x.to_f32();
        acc = fold_amax_bits(acc, v);
        *d = v * inv_scale;
    }
    acc
}
