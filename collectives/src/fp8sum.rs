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
//! compiler gives `vaddps`. Elsewhere: the 64 KiB sum table of [`crate::buf`].

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
mod avx512 {
    use super::{HopCounts, Kernel, Requant};
    use fp8lm_fp8::Fp8Format;
    use std::arch::x86_64::*;

    const RNE: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

    /// 64 codes -> (incoming + own) codes; NaN lanes are fixed up by the caller.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn add64<const E5M2: bool>(x: __m512i, y: __m512i) -> __m512i {
        let half = |v: __m512i, hi: bool| -> __m512i {
            let b = if hi {
                _mm512_extracti64x4_epi64::<1>(v)
            } else {
                _mm512_castsi512_si256(v)
            };
            let w = _mm512_cvtepu8_epi16(b);
            if E5M2 {
                _mm512_slli_epi16::<8>(w)
            } else {
                let mag = _mm512_slli_epi16::<7>(_mm512_and_si512(w, _mm512_set1_epi16(0x7F)));
                let sign = _mm512_slli_epi16::<8>(_mm512_and_si512(w, _mm512_set1_epi16(0x80)));
                _mm512_or_si512(mag, sign)
            }
        };
        let sum16 = |xh: __m512i, yh: __m512i| -> __m512i {
            let x0 = _mm512_cvtph_ps(_mm512_castsi512_si256(xh));
            let x1 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(xh));
            let y0 = _mm512_cvtph_ps(_mm512_castsi512_si256(yh));
            let y1 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(yh));
            let h0 = _mm512_cvtps_ph::<RNE>(_mm512_add_ps(x0, y0));
            let h1 = _mm512_cvtps_ph::<RNE>(_mm512_add_ps(x1, y1));
            let h = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(h0), h1);
            // f16 bits -> FP8 code, nearest even on the integer, saturating.
            let (shift_lsb, maxb) = if E5M2 { (8, 0x7B) } else { (7, 0x7E) };
            let a = _mm512_and_si512(h, _mm512_set1_epi16(0x7FFF));
            let sign8 = _mm512_srli_epi16::<8>(_mm512_and_si512(h, _mm512_set1_epi16(-0x8000)));
            let lsb = if E5M2 {
                _mm512_and_si512(_mm512_srli_epi16::<8>(a), _mm512_set1_epi16(1))
            } else {
                _mm512_and_si512(_mm512_srli_epi16::<7>(a), _mm512_set1_epi16(1))
            };
            let bias = _mm512_set1_epi16(((1 << (shift_lsb - 1)) - 1) as i16);
            let r = _mm512_add_epi16(_mm512_add_epi16(a, bias), lsb);
            let r = if E5M2 {
                _mm512_srli_epi16::<8>(r)
            } else {
                _mm512_srli_epi16::<7>(r)
            };
            let r = _mm512_min_epu16(r, _mm512_set1_epi16(maxb));
            let r = _mm512_or_si512(r, sign8);
            if E5M2 {
                // inf + -inf: a NaN neither operand carried; positive by definition.
                let nan = _mm512_cmpgt_epu16_mask(a, _mm512_set1_epi16(0x7C00));
                _mm512_mask_mov_epi16(r, nan, _mm512_set1_epi16(0x7E))
            } else {
                r
            }
        };
        let lo = sum16(half(x, false), half(y, false));
        let hi = sum16(half(x, true), half(y, true));
        _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(_mm512_cvtepi16_epi8(lo)),
            _mm512_cvtepi16_epi8(hi),
        )
    }

    /// 64 codes -> (incoming + own) codes through `vaddph`: `(codes, lanes to fix)`. The
    /// lanes to fix are those where a NaN is involved; everywhere else the codes are final.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512fp16")]
    fn add64_f16<const E5M2: bool>(x: __m512i, y: __m512i) -> (__m512i, __mmask64) {
        let z = _mm512_setzero_si512();
        // Byte b -> 16-bit lane b << 8 (in-lane interleave; `packus` below undoes it).
        let widen = |v: __m512i, hi: bool| -> __m512h {
            let w = if hi {
                _mm512_unpackhi_epi8(z, v)
            } else {
                _mm512_unpacklo_epi8(z, v)
            };
            if E5M2 {
                _mm512_castsi512_ph(w)
            } else {
                // s.eeee.mmm.00000000 -> s.0eeee.mmm.0000000: the value times 2^-8.
                let w = _mm512_and_si512(_mm512_srai_epi16::<1>(w), _mm512_set1_epi16(!0x4000));
                _mm512_castsi512_ph(w)
            }
        };
        // f16 bits -> FP8 code in the low byte, nearest even on the integer.
        let round = |h: __m512h| -> __m512i {
            let h = _mm512_castph_si512(h);
            if E5M2 {
                // The sign rides along in bit 15 -> bit 7 (no carry reaches it from a
                // finite magnitude); saturation is done on the bytes.
                let lsb = _mm512_and_si512(_mm512_srli_epi16::<8>(h), _mm512_set1_epi16(1));
                let r = _mm512_add_epi16(_mm512_add_epi16(h, _mm512_set1_epi16(0x7F)), lsb);
                _mm512_srli_epi16::<8>(r)
            } else {
                let a = _mm512_and_si512(h, _mm512_set1_epi16(0x7FFF));
                let lsb = _mm512_and_si512(_mm512_srli_epi16::<7>(a), _mm512_set1_epi16(1));
                let r = _mm512_add_epi16(_mm512_add_epi16(a, _mm512_set1_epi16(0x3F)), lsb);
                let m = _mm512_min_epu16(_mm512_srli_epi16::<7>(r), _mm512_set1_epi16(0x7E));
                let sign =
                    _mm512_srli_epi16::<8>(_mm512_andnot_si512(_mm512_set1_epi16(0x7FFF), h));
                _mm512_or_si512(m, sign)
            }
        };
        let lo = round(_mm512_add_ph(widen(x, false), widen(y, false)));
        let hi = round(_mm512_add_ph(widen(x, true), widen(y, true)));
        let c = _mm512_packus_epi16(lo, hi);
        if E5M2 {
            // Magnitudes 0x7D.. are NaN (from a NaN operand or inf + -inf), 0x7C is an
            // overflow to infinity: saturate it to max.
            let mag = _mm512_and_si512(c, _mm512_set1_epi8(0x7F));
            let nan = _mm512_cmpgt_epu8_mask(mag, _mm512_set1_epi8(0x7C));
            let r = _mm512_or_si512(
                _mm512_min_epu8(mag, _mm512_set1_epi8(0x7B)),
                _mm512_and_si512(c, _mm512_set1_epi8(-0x80)),
            );
            (r, nan)
        } else {
            // E4M3 NaN codes decode to ordinary f16 values above: find them on the bytes.
            (c, nan_mask::<false>(x) | nan_mask::<false>(y))
        }
    }

    /// [`add64`] in the same `(codes, lanes to fix)` form.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn add64_f32<const E5M2: bool>(x: __m512i, y: __m512i) -> (__m512i, __mmask64) {
        (
            add64::<E5M2>(x, y),
            nan_mask::<E5M2>(x) | nan_mask::<E5M2>(y),
        )
    }

    /// Lanes holding a NaN code.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn nan_mask<const E5M2: bool>(v: __m512i) -> __mmask64 {
        let m = _mm512_and_si512(v, _mm512_set1_epi8(0x7F));
        if E5M2 {
            _mm512_cmpgt_epu8_mask(m, _mm512_set1_epi8(0x7C))
        } else {
            _mm512_cmpeq_epi8_mask(m, _mm512_set1_epi8(0x7F))
        }
    }

    /// The NaN rule of `fp8_add` on the `fix` lanes (rare: taken only when some lane of
    /// the 64 has a NaN): the first NaN operand's sign, incoming first, else positive.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn fix_nan<const E5M2: bool>(x: __m512i, y: __m512i, r: __m512i, fix: __mmask64) -> __m512i {
        let nanb = _mm512_set1_epi8(if E5M2 { 0x7E } else { 0x7F });
        let sign_nan =
            |v: __m512i| _mm512_or_si512(_mm512_and_si512(v, _mm512_set1_epi8(-0x80)), nanb);
        let r = _mm512_mask_mov_epi8(r, fix, nanb);
        let r = _mm512_mask_mov_epi8(r, fix & nan_mask::<E5M2>(y), sign_nan(y));
        _mm512_mask_mov_epi8(r, fix & nan_mask::<E5M2>(x), sign_nan(x))
    }

    /// The hop loop around a 64-byte adder: re-quantise the own bytes, count, add, fix
    /// NaN lanes, count, store; the tail goes to the table kernel.
    macro_rules! hop_loop {
        ($e5m2:expr, $add:expr, $acc:ident, $incoming:ident, $rqs:ident, $count:ident) => {{
            let maxb: i8 = if $e5m2 { 0x7B } else { 0x7E };
            let mut c = HopCounts::default();
            let ident: [u8; 256] = std::array::from_fn(|i| i as u8);
            // Tables and flush limits of the own (0) and incoming (1) operand.
            let tables = $rqs.map(|rq| {
                let (lut, flush_hi) = match rq {
                    Some(rq) => (rq.lut, rq.flush_hi),
                    None => (&ident, 0),
                };
                let p = lut.as_ptr();
                // SAFETY: 4 x 64 bytes inside `lut`.
                let t = unsafe {
                    [
                        _mm512_loadu_si512(p.cast()),
                        _mm512_loadu_si512(p.add(64).cast()),
                        _mm512_loadu_si512(p.add(128).cast()),
                        _mm512_loadu_si512(p.add(192).cast()),
                    ]
                };
                (rq.is_some(), t, flush_hi)
            });
            let lookup = |v: __m512i, t: &[__m512i; 4]| {
                let lo = _mm512_permutex2var_epi8(t[0], v, t[1]);
                let hi = _mm512_permutex2var_epi8(t[2], v, t[3]);
                _mm512_mask_blend_epi8(_mm512_movepi8_mask(v), lo, hi)
            };
            let flushed = |v: __m512i, flush_hi: u8| {
                let m = _mm512_sub_epi8(
                    _mm512_and_si512(v, _mm512_set1_epi8(0x7F)),
                    _mm512_set1_epi8(1),
                );
                let k = _mm512_cmplt_epu8_mask(m, _mm512_set1_epi8(flush_hi as i8));
                k.count_ones() as u64
            };
            let [(own_lut, own_t, own_fh), (inc_lut, inc_t, inc_fh)] = tables;
            let n = $acc.len() / 64 * 64;
            let (ap, bp) = ($acc.as_mut_ptr(), $incoming.as_ptr());
            let mut i = 0;
            while i < n {
                // SAFETY: i + 64 <= n <= len of both slices.
                let (raw_y, raw_x) = unsafe {
                    (
                        _mm512_loadu_si512(ap.add(i).cast()),
                        _mm512_loadu_si512(bp.add(i).cast()),
                    )
                };
                let y = if own_lut {
                    lookup(raw_y, &own_t)
                } else {
                    raw_y
                };
                let x = if inc_lut {
                    lookup(raw_x, &inc_t)
                } else {
                    raw_x
                };
                if own_fh != 0 {
                    c.flushed += flushed(raw_y, own_fh);
                }
                if inc_fh != 0 {
                    c.flushed_incoming += flushed(raw_x, inc_fh);
                }
                let (mut r, fix) = $add(x, y);
                if fix != 0 {
                    r = fix_nan::<{ $e5m2 }>(x, y, r, fix);
                }
                if $count {
                    let m = _mm512_and_si512(r, _mm512_set1_epi8(0x7F));
                    c.saturated +=
                        _mm512_cmpeq_epi8_mask(m, _mm512_set1_epi8(maxb)).count_ones() as u64;
                }
                // SAFETY: as for the loads.
                unsafe { _mm512_storeu_si512(ap.add(i).cast(), r) };
                i += 64;
            }
            let fmt = if $e5m2 {
                Fp8Format::E5M2
            } else {
                Fp8Format::E4M3
            };
            let [own, inc] = $rqs;
            c += super::sum_hop_table(fmt, &mut $acc[n..], &$incoming[n..], own, inc, $count);
            c
        }};
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    fn run_f32<const E5M2: bool>(
        acc: &mut [u8],
        incoming: &[u8],
        rqs: [Option<Requant>; 2],
        count: bool,
    ) -> HopCounts {
        hop_loop!(E5M2, add64_f32::<E5M2>, acc, incoming, rqs, count)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512fp16")]
    fn run_f16<const E5M2: bool>(
        acc: &mut [u8],
        incoming: &[u8],
        rqs: [Option<Requant>; 2],
        count: bool,
    ) -> HopCounts {
        hop_loop!(E5M2, add64_f16::<E5M2>, acc, incoming, rqs, count)
    }

    /// # Safety
    /// The CPU must have AVX-512 F, BW and VBMI, and FP16 for [`Kernel::Avx512Fp16`].
    /// `rqs`: re-quantisation of the own and of the incoming operand.
    pub unsafe fn sum_hop(
        kernel: Kernel,
        fmt: Fp8Format,
        acc: &mut [u8],
        incoming: &[u8],
        rqs: [Option<Requant>; 2],
        count: bool,
    ) -> HopCounts {
        // SAFETY: forwarded from the caller.
        unsafe {
            match (kernel, fmt) {
                (Kernel::Avx512Fp16, Fp8Format::E5M2) => run_f16::<true>(acc, incoming, rqs, count),
                (Kernel::Avx512Fp16, Fp8Format::E4M3) => {
                    run_f16::<false>(acc, incoming, rqs, count)
                }
                (_, Fp8Format::E5M2) => run_f32::<true>(acc, incoming, rqs, count),
                (_, Fp8Format::E4M3) => run_f32::<false>(acc, incoming, rqs, count),
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{HopCounts, Requant};
    use crate::buf::fp8_sum_table;
    use fp8lm_fp8::Fp8Format;
    use std::arch::x86_64::*;

    // The 256-bit form takes only the 3-bit rounding field (bit 2 clear: use it, not MXCSR).
    const RNE: i32 = _MM_FROUND_TO_NEAREST_INT;

    /// 16 codes -> the 16 f16 bit patterns with their value (E4M3: times 2^-8).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn widen<const E5M2: bool>(b: __m128i) -> __m256i {
        let w = _mm256_cvtepu8_epi16(b);
        if E5M2 {
            _mm256_slli_epi16::<8>(w)
        } else {
            let mag = _mm256_slli_epi16::<7>(_mm256_and_si256(w, _mm256_set1_epi16(0x7F)));
            let sign = _mm256_slli_epi16::<8>(_mm256_and_si256(w, _mm256_set1_epi16(0x80)));
            _mm256_or_si256(mag, sign)
        }
    }

    /// 16 + 16 f16 operands -> 16 FP8 codes in 16-bit lanes (finite or inf operands; a NaN
    /// operand is handled by the caller).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn add16<const E5M2: bool>(xh: __m256i, yh: __m256i) -> __m256i {
        let x0 = _mm256_cvtph_ps(_mm256_castsi256_si128(xh));
        let x1 = _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(xh));
        let y0 = _mm256_cvtph_ps(_mm256_castsi256_si128(yh));
        let y1 = _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(yh));
        let h0 = _mm256_cvtps_ph::<RNE>(_mm256_add_ps(x0, y0));
        let h1 = _mm256_cvtps_ph::<RNE>(_mm256_add_ps(x1, y1));
        let h = _mm256_set_m128i(h1, h0);
        let a = _mm256_and_si256(h, _mm256_set1_epi16(0x7FFF));
        let sign8 = _mm256_srli_epi16::<8>(_mm256_andnot_si256(_mm256_set1_epi16(0x7FFF), h));
        let r = if E5M2 {
            let lsb = _mm256_and_si256(_mm256_srli_epi16::<8>(a), _mm256_set1_epi16(1));
            let r = _mm256_add_epi16(_mm256_add_epi16(a, _mm256_set1_epi16(0x7F)), lsb);
            _mm256_min_epu16(_mm256_srli_epi16::<8>(r), _mm256_set1_epi16(0x7B))
        } else {
            let lsb = _mm256_and_si256(_mm256_srli_epi16::<7>(a), _mm256_set1_epi16(1));
            let r = _mm256_add_epi16(_mm256_add_epi16(a, _mm256_set1_epi16(0x3F)), lsb);
            _mm256_min_epu16(_mm256_srli_epi16::<7>(r), _mm256_set1_epi16(0x7E))
        };
        let r = _mm256_or_si256(r, sign8);
        if E5M2 {
            // inf + -inf: a NaN neither operand carried; positive by definition.
            let nan = _mm256_cmpgt_epi16(a, _mm256_set1_epi16(0x7C00));
            _mm256_blendv_epi8(r, _mm256_set1_epi16(0x7E), nan)
        } else {
            r
        }
    }

    #[target_feature(enable = "avx2,f16c")]
    fn run<const E5M2: bool>(
        acc: &mut [u8],
        incoming: &[u8],
        rqs: [Option<Requant>; 2],
        count: bool,
    ) -> HopCounts {
        let fmt = if E5M2 {
            Fp8Format::E5M2
        } else {
            Fp8Format::E4M3
        };
        let t = fp8_sum_table(fmt);
        let maxb = fmt.max_bits() as i8;
        let ident: [u8; 256] = std::array::from_fn(|i| i as u8);
        let [own, inc] = rqs.map(|rq| rq.map_or((&ident, 0u8), |rq| (rq.lut, rq.flush_hi)));
        let lookup = rqs[0].is_some() || rqs[1].is_some();
        let nan = |v: __m256i| {
            let m = _mm256_and_si256(v, _mm256_set1_epi8(0x7F));
            if E5M2 {
                _mm256_cmpgt_epi8(m, _mm256_set1_epi8(0x7C))
            } else {
                _mm256_cmpeq_epi8(m, _mm256_set1_epi8(0x7F))
            }
        };
        let mut c = HopCounts::default();
        let n = acc.len() / 32 * 32;
        let mut i = 0;
        while i < n {
            let (a, b) = (&mut acc[i..i + 32], &incoming[i..i + 32]);
            let (mut xb, mut yb) = ([0u8; 32], [0u8; 32]);
            if lookup {
                for j in 0..32 {
                    c.flushed += ((a[j] & 0x7F).wrapping_sub(1) < own.1) as u64;
                    c.flushed_incoming += ((b[j] & 0x7F).wrapping_sub(1) < inc.1) as u64;
                    yb[j] = own.0[a[j] as usize];
                    xb[j] = inc.0[b[j] as usize];
                }
            } else {
                xb.copy_from_slice(b);
                yb.copy_from_slice(a);
            }
            // SAFETY: 32-byte arrays.
            let (x, y) = unsafe {
                (
                    _mm256_loadu_si256(xb.as_ptr().cast()),
                    _mm256_loadu_si256(yb.as_ptr().cast()),
                )
            };
            if _mm256_movemask_epi8(_mm256_or_si256(nan(x), nan(y))) != 0 {
                // A NaN operand (rare): this block through the table.
                for j in 0..32 {
                    a[j] = t[((xb[j] as usize) << 8) | yb[j] as usize];
                }
            } else {
                let lo = add16::<E5M2>(
                    widen::<E5M2>(_mm256_castsi256_si128(x)),
                    widen::<E5M2>(_mm256_castsi256_si128(y)),
                );
                let hi = add16::<E5M2>(
                    widen::<E5M2>(_mm256_extracti128_si256::<1>(x)),
                    widen::<E5M2>(_mm256_extracti128_si256::<1>(y)),
                );
                // packus interleaves the 128-bit lanes; the permute restores the order.
                let r = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi16(lo, hi));
                // SAFETY: 32 bytes inside `acc`.
                unsafe { _mm256_storeu_si256(a.as_mut_ptr().cast(), r) };
            }
            if count {
                // SAFETY: 32 bytes inside `acc`.
                let r = unsafe { _mm256_loadu_si256(a.as_ptr().cast()) };
                let m = _mm256_and_si256(r, _mm256_set1_epi8(0x7F));
                let hit = _mm256_cmpeq_epi8(m, _mm256_set1_epi8(maxb));
                c.saturated += (_mm256_movemask_epi8(hit) as u32).count_ones() as u64;
            }
            i += 32;
        }
        c += super::sum_hop_table(fmt, &mut acc[n..], &incoming[n..], rqs[0], rqs[1], count);
        c
    }

    /// # Safety
    /// The CPU must have AVX2 and F16C.
    pub unsafe fn sum_hop(
        fmt: Fp8Format,
        acc: &mut [u8],
        incoming: &[u8],
        rqs: [Option<Requant>; 2],
        count: bool,
    ) -> HopCounts {
        // SAFETY: forwarded from the caller.
        unsafe {
            match fmt {
                Fp8Format::E5M2 => run::<true>(acc, incoming, rqs, count),
                Fp8Format::E4M3 => run::<false>(acc, incoming, rqs, count),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buf::fp8_add;

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
                let dec = fp8lm_fp8::cast::decode_table(fmt);
                for ratio in [0.5f32, 0.125, 2f32.powi(-9), 1.0] {
                    let lut: [u8; 256] = std::array::from_fn(|v| {
                        if dec[v].is_nan() {
                            v as u8
                        } else {
                            fmt.encode(dec[v] * ratio, true)
                        }
                    });
                    let flush_hi = (1..=0x7Fu8)
                        .take_while(|&v| lut[v as usize] & 0x7F == 0)
                        .count() as u8;
                    let rq = Requant {
                        lut: &lut,
                        flush_hi,
                    };
                    // The incoming operand through a different table (ratio / 4).
                    let lut2: [u8; 256] = std::array::from_fn(|v| {
                        if dec[v].is_nan() {
                            v as u8
                        } else {
                            fmt.encode(dec[v] * ratio * 0.25, true)
                        }
                    });
                    let flush_hi2 = (1..=0x7Fu8)
                        .take_while(|&v| lut2[v as usize] & 0x7F == 0)
                        .count() as u8;
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
