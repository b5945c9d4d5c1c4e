//! The FP8 sum hop, fast: `acc[i] = fp8_add(incoming[i], own(acc[i]))` over a slice, with
//! FP8-LM's re-quantisation of the own operand and its two counts fused in.
//!
//! One hop of the ring reduce-scatter reads the partial sum that arrived (`incoming`) and
//! this rank's own bytes (`acc`), and writes the new partial sum over `acc`. FP8-LM adds
//! two full passes around that: the re-quantisation `g'' = lut[g']` of the own bytes and
//! the saturation count of the finished sum. Both are done here, inside the hop, so the
//! FP8-LM all-reduce reads and writes each byte no more often than the bare FP8 sum:
//! - `requant`: the own byte goes through a 256-entry table first (and non-zero codes the
//!   table flushes to zero are counted: the underflow report);
//! - `count_saturated`: outputs at +-fmt_max are counted (the overflow report).
//!
//! The incoming operand can go through a table too (`incoming_requant`): the ring's
//! first step then sends raw bytes and the receiver re-quantises them with the sender's
//! table, which saves the sender a pass over the chunk it sends first.
//!
//! ## Arithmetic (bit-identical to [`crate::buf::fp8_add`], tested on all 65536 pairs)
//! Kernels ([`Kernel`], the fastest one the CPU has is picked at run time), 64 bytes per
//! step on x86-64 with AVX-512 F/BW/VBMI: each FP8 code is widened to the f16 with the
//! same bits (E5M2 is the top byte of an f16; E4M3 `s.eeee.mmm` is the f16
//! `s.0eeee.mmm0000000`, i.e. its value times 2^-8). Then
//! - `avx512fp16` (Sapphire Rapids and later): `vaddph` adds the two f16 operands, the
//!   exact sum rounded once to f16 (nearest even; FP16 instructions never flush
//!   subnormals);
//! - `avx512`: `vcvtph2ps` decodes exactly, the sum is taken in f32 as in the
//!   definition, and `vcvtps2ph` rounds it to f16 (nearest even);
//! - `avx2` (AVX2 + F16C, 32 bytes per step): the same as `avx512`; the re-quantisation
//!   tables are looked up per byte, and a block holding a NaN code goes through the table;
//!
//! and the f16 bits are rounded to nearest even to the FP8 code on the integer,
//! saturating. Two roundings in a row can differ from one only when the first one is
//! inexact *and* lands on a midpoint of the second. The sum of two FP8 values is exact in
//! f16 unless the operands' exponents differ by more than the f16 significand can bridge
//! (8+ binades here); then the sum lies within a few f16 ulps of the larger operand,
//! which is itself an FP8 value, far from any FP8 midpoint. So the f16 step never changes
//! the final rounding (nor does the f32 step of the definition, for the same reason);
//! the exhaustive test checks it for every kernel.
//! NaN results are set explicitly (sign of the first NaN operand, incoming first; a NaN
//! from `inf + -inf` is positive), so they do not depend on which operand order the
//! compiler gives `vaddps`. Elsewhere: the 64 KiB sum table of [`crate::buf`]. Speed of
//! each kernel: `cargo run --release -p fp8lm-collectives --example hop_speed`.

use crate::buf::fp8_sum_table;
use fp8lm_fp8::Fp8Format;

/// FP8-LM's re-quantisation of one tensor's own bytes: `lut` maps each code to the code of
/// `fp8(ratio * value)`; `flush_hi` is the largest magnitude code (`code & 0x7F`) the
/// table sends to zero (0: none), so the underflow count is the own codes with magnitude
/// in `1..=flush_hi` (the table is monotone in magnitude).
#[derive(Clone, Copy, Debug)]
pub struct Requant<'a> {
    pub lut: &'a [u8; 256],
    pub flush_hi: u8,
}

/// What one call counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HopCounts {
    /// Own codes that `requant` flushed to zero (underflow).
    pub flushed: u64,
    /// Outputs at +-fmt_max (only when asked).
    pub saturated: u64,
    /// Incoming codes that `incoming_requant` flushed to zero (the sender's underflow).
    pub flushed_incoming: u64,
}

impl std::ops::AddAssign for HopCounts {
    fn add_assign(&mut self, o: HopCounts) {
        self.flushed += o.flushed;
        self.saturated += o.saturated;
        self.flushed_incoming += o.flushed_incoming;
    }
}

/// An implementation of the hop. All give the same bytes and counts (tested on every
/// kernel the machine has).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// One load per byte from the 64 KiB sum table (portable).
    Table,
    /// AVX2 + F16C, 32 bytes per step: `vcvtph2ps`, f32 add, `vcvtps2ph`; the tables of
    /// FP8-LM's re-quantisation are looked up per byte (AVX2 has no 256-entry lookup).
    Avx2,
    /// AVX-512 F/BW/VBMI: f16 -> f32 decode (`vcvtph2ps`), f32 add, `vcvtps2ph`.
    Avx512,
    /// AVX-512 FP16 on top: the two f16 operands are added as f16 (`vaddph`), 32 lanes
    /// per instruction, no conversions.
    Avx512Fp16,
}

impl Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Table => "table",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512 => "avx512",
            Kernel::Avx512Fp16 => "avx512fp16",
        }
    }

    /// The kernels this CPU can run, slowest first.
    pub fn available() -> Vec<Kernel> {
        let mut v = vec![Kernel::Table];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("f16c") {
                v.push(Kernel::Avx2);
            }
            if has!("avx512f") && has!("avx512bw") && has!("avx512vbmi") {
                v.push(Kernel::Avx512);
                if has!("avx512fp16") {
                    v.push(Kernel::Avx512Fp16);
                }
            }
        }
        v
    }

    /// The fastest kernel this CPU can run (detected once).
    pub fn best() -> Kernel {
        static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| *Kernel::available().last().expect("table always works"))
    }
}

/// Which kernel [`sum_hop`] uses on this machine.
pub fn kernel_name() -> &'static str {
    Kernel::best().name()
}

/// `acc[i] = fp8_add(inc, own)` with `own = requant.lut[acc[i]]` (or `acc[i]`) and
/// `inc = incoming_requant.lut[incoming[i]]` (or `incoming[i]`), counting as described in
/// [`HopCounts`]; on the fastest kernel of this CPU. (Re-quantising the incoming operand
/// lets the ring's first step send raw bytes and leave the sender's table to the
/// receiver, saving the sender a pass.)
pub fn sum_hop(
    fmt: Fp8Format,
    acc: &mut [u8],
    incoming: &[u8],
    requant: Option<Requant>,
    incoming_requant: Option<Requant>,
    count_saturated: bool,
) -> HopCounts {
    sum_hop_with(
        Kernel::best(),
        fmt,
        acc,
        incoming,
        requant,
        incoming_requant,
        count_saturated,
    )
}

/// [`sum_hop`] on a given kernel. Panics if the CPU lacks it (see [`Kernel::available`]).
pub fn sum_hop_with(
    kernel: Kernel,
    fmt: Fp8Format,
    acc: &mut [u8],
    incoming: &[u8],
    requant: Option<Requant>,
    incoming_requant: Option<Requant>,
    count_saturated: bool,
) -> HopCounts {
    assert_eq!(
        acc.len(),
        incoming.len(),
        "fp8 sum hop: operand lengths differ"
    );
    // Kernel::best() is available by construction; anything else is checked once here.
    if kernel != Kernel::Table && kernel != Kernel::best() {
        assert!(
            Kernel::available().contains(&kernel),
            "fp8 sum kernel {} is not supported by this CPU",
            kernel.name()
        );
    }
    match kernel {
        Kernel::Table => sum_hop_table(
            fmt,
            acc,
            incoming,
            requant,
            incoming_requant,
            count_saturated,
        ),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU features were checked just above.
        Kernel::Avx2 => unsafe {
            avx2::sum_hop(
                fmt,
                acc,
                incoming,
                [requant, incoming_requant],
                count_saturated,
            )
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU features were checked just above.
        Kernel::Avx512 | Kernel::Avx512Fp16 => unsafe {
            avx512::sum_hop(
                kernel,
                fmt,
                acc,
                incoming,
                [requant, incoming_requant],
                count_saturated,
            )
        },
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("not available off x86-64"),
    }
}

/// The portable form of [`sum_hop`]: one load from the 64 KiB sum table per byte.
pub fn sum_hop_table(
    fmt: Fp8Format,
    acc: &mut [u8],
    incoming: &[u8],
    requant: Option<Requant>,
    incoming_requant: Option<Requant>,
    count_saturated: bool,
) -> HopCounts {
    assert_eq!(
        acc.len(),
        incoming.len(),
        "fp8 sum hop: operand lengths differ"
    );
    let t = fp8_sum_table(fmt);
    let maxb = fmt.max_bits();
    let ident: [u8; 256] = std::array::from_fn(|i| i as u8);
    let id = Requant {
        lut: &ident,
        flush_hi: 0,
    };
    let (own, inc) = (requant.unwrap_or(id), incoming_requant.unwrap_or(id));
    let mut c = HopCounts::default();
    for (a, &b) in acc.iter_mut().zip(incoming) {
        c.flushed += ((*a & 0x7F).wrapping_sub(1) < own.flush_hi) as u64;
        c.flushed_incoming += ((b & 0x7F).wrapping_sub(1) < inc.flush_hi) as u64;
        let (x, y) = (inc.lut[b as usize], own.lut[*a as usize]);
        *a = t[(((x as usize) << 8) | y as usize) & 0xFFFF];
    }
    if count_saturated {
        c.saturated = crate::buf::count_magnitude_in(acc, maxb, maxb);
    }
    c
}

/// Re-quantise `data` in place through `rq` and return the flushed count (the first send
/// of the ring, which has no incoming operand).
pub fn requant_in_place(data: &mut [u8], rq: Requant) -> u64 {
    let flushed = if rq.flush_hi == 0 {
        0
    } else {
        crate::buf::count_magnitude_in(data, 1, rq.flush_hi)
    };
    crate::lut::apply_lut(data, rq.lut);
    flushed
}

#[cfg(target_arch = "x86_64")]
mod avx512;

#[cfg(target_arch = "x86_64")]
mod avx2;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buf::fp8_add;
    use crate::lut::requant_table;

    fn xorshift(s: &mut u64) -> u64 {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s
    }

    /// Every (incoming, own) pair, in an order that puts each pair in a different SIMD
    /// lane position, plus a tail shorter than one vector.
    fn all_pairs() -> (Vec<u8>, Vec<u8>) {
        let mut inc = Vec::with_capacity(65536 + 37);
        let mut own = Vec::with_capacity(65536 + 37);
        for a in 0..256u32 {
            for b in 0..256u32 {
                inc.push(a as u8);
                own.push((b + a) as u8);
            }
        }
        for k in 0..37u8 {
            inc.push(k.wrapping_mul(97));
            own.push(k.wrapping_mul(31) ^ 0x7D);
        }
        (inc, own)
    }

    #[test]
    fn every_kernel_equals_scalar_definition_on_all_pairs() {
        eprintln!(
            "fp8 sum kernels: {:?}, best {}",
            Kernel::available(),
            kernel_name()
        );
        for kernel in Kernel::available() {
            for fmt in [Fp8Format::E4M3, Fp8Format::E5M2] {
                let (inc, own) = all_pairs();
                let mut got = own.clone();
                let c = sum_hop_with(kernel, fmt, &mut got, &inc, None, None, true);
                let want: Vec<u8> = inc
                    .iter()
                    .zip(&own)
                    .map(|(&a, &b)| fp8_add(fmt, a, b))
                    .collect();
                for i in 0..want.len() {
                    assert_eq!(
                        got[i],
                        want[i],
                        "{kernel:?} {fmt:?} {:#04x} + {:#04x} ({} + {}): got {:#04x} want {:#04x}",
                        inc[i],
                        own[i],
                        fmt.decode(inc[i]),
                        fmt.decode(own[i]),
                        got[i],
                        want[i],
                    );
                }
                let sat = want.iter().filter(|&&w| w & 0x7F == fmt.max_bits()).count() as u64;
                assert!(sat > 1000);
                assert_eq!(
                    c,
                    HopCounts {
                        saturated: sat,
                        ..Default::default()
                    }
                );
            }
        }
    }

    #[test]
    fn fused_requant_and_counts_equal_separate_passes() {
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        for kernel in Kernel::available() {
            for fmt in [Fp8Format::E4M3, Fp8Format::E5M2] {
                for ratio in [0.5f32, 0.125, 2f32.powi(-9), 1.0] {
                    let (lut, flush_hi) = requant_table(fmt, ratio);
                    let rq = Requant {
                        lut: &lut,
                        flush_hi,
                    };
                    // The incoming operand through a different table (ratio / 4).
                    let (lut2, flush_hi2) = requant_table(fmt, ratio * 0.25);
                    let rq2 = Requant {
                        lut: &lut2,
                        flush_hi: flush_hi2,
                    };
                    for len in [0usize, 1, 63, 64, 65, 200_003] {
                        let inc: Vec<u8> = (0..len).map(|_| xorshift(&mut s) as u8).collect();
                        let own: Vec<u8> = (0..len).map(|_| xorshift(&mut s) as u8).collect();
                        let flushed_by = |lut: &[u8; 256], v: &[u8]| {
                            v.iter()
                                .filter(|&&b| b & 0x7F != 0 && lut[b as usize] & 0x7F == 0)
                                .count() as u64
                        };
                        let flushed = flushed_by(&lut, &own);
                        let mut sep = own.clone();
                        crate::lut::apply_lut_scalar(&mut sep, &lut);
                        let mut sep_inc = inc.clone();
                        crate::lut::apply_lut_scalar(&mut sep_inc, &lut2);
                        for inc_rq in [None, Some(rq2)] {
                            let mut fused = own.clone();
                            let c =
                                sum_hop_with(kernel, fmt, &mut fused, &inc, Some(rq), inc_rq, true);
                            let x = if inc_rq.is_some() { &sep_inc } else { &inc };
                            let want: Vec<u8> = x
                                .iter()
                                .zip(&sep)
                                .map(|(&a, &b)| fp8_add(fmt, a, b))
                                .collect();
                            assert_eq!(fused, want, "{kernel:?} {fmt:?} ratio {ratio} len {len}");
                            let sat =
                                want.iter().filter(|&&w| w & 0x7F == fmt.max_bits()).count() as u64;
                            let flushed_incoming = if inc_rq.is_some() {
                                flushed_by(&lut2, &inc)
                            } else {
                                0
                            };
                            let want_c = HopCounts {
                                flushed,
                                saturated: sat,
                                flushed_incoming,
                            };
                            assert_eq!(c, want_c, "{kernel:?}");
                        }
                        let mut first = own.clone();
                        assert_eq!(requant_in_place(&mut first, rq), flushed);
                        assert_eq!(first, sep);
                    }
                }
            }
        }
    }
}
