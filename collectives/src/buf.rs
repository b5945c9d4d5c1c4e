//! Typed communication buffers and the per-hop reduction semantics of every element type.
//!
//! A reduction combines two operands at each hop of the algorithm and rounds the result
//! back to the buffer's own type right away, as NCCL does for its native low-precision
//! types:
//!
//! | type | sum | max / min |
//! |---|---|---|
//! | f32 | f32 add | exact, NaN wins |
//! | bf16, f16 | decode, add in f32, round to nearest even | exact, NaN wins |
//! | FP8 (E4M3/E5M2) | decode, add in f32, re-encode RNE, saturating | exact, NaN wins |
//!
//! "Saturating" means a finite sum beyond the format's max (and, for E5M2, an infinity)
//! becomes +-max; NaN stays NaN. This is the training-cast convention of `fp8lm-fp8` and
//! makes an FP8 sum's overflow visible as values stuck at +-max, which is exactly what
//! the FP8-LM automatic scaling counts. The definition is [`fp8_add`]; the hop runs as
//! the AVX-512 kernel of [`crate::fp8sum`] where the CPU has it, else as a 64 KiB table
//! `(a, b) -> fp8_add(a, b)` built once (one load per byte); both are bit-exact with
//! the definition on all 65536 pairs (tested).

use fp8lm_fp8::{cast::decode_table, Fp8Format};
use half::{bf16, f16};
use std::sync::OnceLock;

/// Element type of a buffer. FP8 buffers are bytes whose meaning is given by the format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    Bf16,
    F16,
    Fp8(Fp8Format),
}

impl Dtype {
    pub fn size_bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
            Dtype::Fp8(_) => 1,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
            Dtype::Fp8(f) => f.name(),
        }
    }
}

/// Reduction operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    Max,
    Min,
}

/// A mutable, typed buffer handed to a collective (object-safe alternative to generics).
#[derive(Debug)]
pub enum BufMut<'a> {
    F32(&'a mut [f32]),
    Bf16(&'a mut [bf16]),
    F16(&'a mut [f16]),
    /// FP8 values as raw bytes, interpreted in the given format.
    Fp8(&'a mut [u8], Fp8Format),
}

impl BufMut<'_> {
    pub fn dtype(&self) -> Dtype {
        match self {
            BufMut::F32(_) => Dtype::F32,
            BufMut::Bf16(_) => Dtype::Bf16,
            BufMut::F16(_) => Dtype::F16,
            BufMut::Fp8(_, f) => Dtype::Fp8(*f),
        }
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            BufMut::F32(b) => b.len(),
            BufMut::Bf16(b) => b.len(),
            BufMut::F16(b) => b.len(),
            BufMut::Fp8(b, _) => b.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The buffer's bytes (native endianness; every rank of a job runs on the same kind
    /// of host, so no byte swapping is done).
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            BufMut::F32(b) => elem_bytes_mut(b),
            BufMut::Bf16(b) => elem_bytes_mut(b),
            BufMut::F16(b) => elem_bytes_mut(b),
            BufMut::Fp8(b, _) => b,
        }
    }
}

/// Plain-old-data element types whose bytes may be sent as they are.
///
/// # Safety
/// Implementors must have no padding and accept every bit pattern.
pub unsafe trait Pod: Copy + Default + Send + 'static {}
unsafe impl Pod for f32 {}
unsafe impl Pod for bf16 {}
unsafe impl Pod for f16 {}
unsafe impl Pod for u8 {}
unsafe impl Pod for u64 {}

pub fn elem_bytes<T: Pod>(s: &[T]) -> &[u8] {
    // SAFETY: T is Pod (no padding), u8 has alignment 1, the length covers the same memory.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), std::mem::size_of_val(s)) }
}

pub fn elem_bytes_mut<T: Pod>(s: &mut [T]) -> &mut [u8] {
    // SAFETY: as above; every bit pattern is a valid T, so writes through the bytes are fine.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast(), std::mem::size_of_val(s)) }
}

#[inline]
fn nan_max(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else if b > a {
        b
    } else {
        a
    }
}

#[inline]
fn nan_min(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else if b < a {
        b
    } else {
        a
    }
}

/// `acc[i] = op(incoming[i], acc[i])` for f32.
pub fn combine_f32(op: ReduceOp, acc: &mut [f32], incoming: &[f32]) {
    debug_assert_eq!(acc.len(), incoming.len());
    match op {
        ReduceOp::Sum => acc.iter_mut().zip(incoming).for_each(|(a, &b)| *a += b),
        ReduceOp::Max => acc
            .iter_mut()
            .zip(incoming)
            .for_each(|(a, &b)| *a = nan_max(b, *a)),
        ReduceOp::Min => acc
            .iter_mut()
            .zip(incoming)
            .for_each(|(a, &b)| *a = nan_min(b, *a)),
    }
}

fn combine_half<T: Pod>(
    op: ReduceOp,
    acc: &mut [T],
    incoming: &[T],
    to: impl Fn(T) -> f32,
    from: impl Fn(f32) -> T,
) {
    debug_assert_eq!(acc.len(), incoming.len());
    let f: fn(f32, f32) -> f32 = match op {
        ReduceOp::Sum => |b, a| b + a,
        ReduceOp::Max => nan_max,
        ReduceOp::Min => nan_min,
    };
    for (a, &b) in acc.iter_mut().zip(incoming) {
        *a = from(f(to(b), to(*a)));
    }
}

/// f32 -> bf16 bits, round to nearest even; NaN stays (quiet) NaN. Bit-identical to
/// `half::bf16::from_f32` (tested), but branch-free so the sum loop vectorises.
#[inline]
fn bf16_bits_rne(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    let nan = ((b >> 16) as u16) | 0x0040;
    if x.is_nan() {
        nan
    } else {
        rounded
    }
}

/// How many bytes have `lo <= (b & 0x7F) <= hi` (an FP8 magnitude range: codes without
/// the sign bit are ordered by magnitude). Written for the vectoriser: 64 u8 lane
/// counters, flushed to u64 before they can wrap.
pub fn count_magnitude_in(data: &[u8], lo: u8, hi: u8) -> u64 {
    if lo > hi {
        return 0;
    }
    let width = hi - lo;
    let hit = |b: u8| ((b & 0x7F).wrapping_sub(lo) <= width) as u8;
    let mut total = 0u64;
    let mut blocks = data.chunks_exact(64 * 255);
    for block in &mut blocks {
        let mut lanes = [0u8; 64];
        for c in block.chunks_exact(64) {
            for (l, &b) in lanes.iter_mut().zip(c) {
                *l += hit(b);
            }
        }
        total += lanes.iter().map(|&l| l as u64).sum::<u64>();
    }
    total
        + blocks
            .remainder()
            .iter()
            .map(|&b| hit(b) as u64)
            .sum::<u64>()
}

/// bf16: decode, combine in f32, round to nearest even.
pub fn combine_bf16(op: ReduceOp, acc: &mut [bf16], incoming: &[bf16]) {
    if op == ReduceOp::Sum {
        for (a, &b) in acc.iter_mut().zip(incoming) {
            *a = bf16::from_bits(bf16_bits_rne(b.to_f32() + a.to_f32()));
        }
        return;
    }
    combine_half(op, acc, incoming, bf16::to_f32, bf16::from_f32)
}

/// f16: decode, combine in f32, round to nearest even (overflow becomes infinity, as in
/// IEEE f16 arithmetic).
pub fn combine_f16(op: ReduceOp, acc: &mut [f16], incoming: &[f16]) {
    combine_half(op, acc, incoming, f16::to_f32, f16::from_f32)
}

/// The 64 KiB FP8 sum table: `t[(a << 8) | b] = encode_sat(decode(a) + decode(b))`.
pub fn fp8_sum_table(fmt: Fp8Format) -> &'static [u8; 65536] {
    static E4M3: OnceLock<Box<[u8; 65536]>> = OnceLock::new();
    static E5M2: OnceLock<Box<[u8; 65536]>> = OnceLock::new();
    let cell = match fmt {
        Fp8Format::E4M3 => &E4M3,
        Fp8Format::E5M2 => &E5M2,
    };
    cell.get_or_init(|| {
        let dec = decode_table(fmt);
        let mut t = Box::new([0u8; 65536]);
        for a in 0..256usize {
            for b in 0..256usize {
                t[(a << 8) | b] = add_decoded(fmt, a as u8, b as u8, dec[a], dec[b]);
            }
        }
        t
    })
}

/// One FP8 hop, scalar form (the definition the table and the SIMD kernel of
/// [`crate::fp8sum`] are checked against): `a` is the incoming partial sum, `b` the own
/// value. A NaN result is the format's NaN code with the sign of the first NaN operand
/// (`a` before `b`); the NaN of `inf + -inf` (E5M2) is positive. Fixing this here keeps
/// it independent of which operand order the compiler picks for the f32 add.
#[inline]
pub fn fp8_add(fmt: Fp8Format, a: u8, b: u8) -> u8 {
    add_decoded(fmt, a, b, fmt.decode(a), fmt.decode(b))
}

#[inline]
fn add_decoded(fmt: Fp8Format, a: u8, b: u8, x: f32, y: f32) -> u8 {
    if x.is_nan() {
        return (a & 0x80) | fmt.nan_bits();
    }
    if y.is_nan() {
        return (b & 0x80) | fmt.nan_bits();
    }
    let s = x + y;
    if s.is_nan() {
        return fmt.nan_bits();
    }
    fmt.encode(s, true)
}

/// `acc[i] = op(incoming[i], acc[i])` on FP8 bytes.
pub fn combine_fp8(fmt: Fp8Format, op: ReduceOp, acc: &mut [u8], incoming: &[u8]) {
    debug_assert_eq!(acc.len(), incoming.len());
    match op {
        ReduceOp::Sum => {
            crate::fp8sum::sum_hop(fmt, acc, incoming, None, None, false);
        }
        ReduceOp::Max | ReduceOp::Min => {
            let dec = decode_table(fmt);
            let f = if op == ReduceOp::Max {
                nan_max
            } else {
                nan_min
            };
            for (a, &b) in acc.iter_mut().zip(incoming) {
                let (x, y) = (dec[b as usize], dec[*a as usize]);
                let r = f(x, y);
                // Keep the exact operand bits (preserves -0 and the NaN pattern).
                *a = if r.is_nan() {
                    if x.is_nan() {
                        b
                    } else {
                        *a
                    }
                } else if r.to_bits() == x.to_bits() {
                    b
                } else {
                    *a
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_sum_table_matches_scalar_definition_everywhere() {
        for fmt in [Fp8Format::E4M3, Fp8Format::E5M2] {
            let t = fp8_sum_table(fmt);
            for a in 0..=255u8 {
                for b in 0..=255u8 {
                    let want = fp8_add(fmt, a, b);
                    let got = t[((a as usize) << 8) | b as usize];
                    assert_eq!(got, want);
                    // And the definition is the f32 sum, rounded once.
                    let s = fmt.decode(a) + fmt.decode(b);
                    let w = fmt.decode(want);
                    assert!(
                        (s.is_nan() && w.is_nan())
                            || w.to_bits() == fmt.decode(fmt.encode(s, true)).to_bits()
                    );
                }
            }
        }
    }

    #[test]
    fn fp8_sum_saturates_and_rounds_to_nearest_even() {
        let f = Fp8Format::E4M3;
        let e = |x: f32| f.encode(x, true);
        assert_eq!(f.decode(fp8_add(f, e(448.0), e(448.0))), 448.0);
        assert_eq!(f.decode(fp8_add(f, e(-448.0), e(-64.0))), -448.0);
        // 1 + 1/16 is a tie between 1 and 1.125 in E4M3: even mantissa wins -> 1.
        assert_eq!(f.decode(fp8_add(f, e(1.0), e(0.0625))), 1.0);
        // 1.125 + 1/16 is a tie between 1.125 and 1.25: even -> 1.25.
        assert_eq!(f.decode(fp8_add(f, e(1.125), e(0.0625))), 1.25);
        let g = Fp8Format::E5M2;
        let inf = g.inf_bits().unwrap();
        assert_eq!(g.decode(fp8_add(g, inf, g.encode(1.0, true))), 57344.0);
        assert!(g.decode(fp8_add(g, g.nan_bits(), 0)).is_nan());
    }

    #[test]
    fn fast_bf16_rounding_matches_half_and_counting_is_exact() {
        let mut s = 0x1234_5678_9ABC_DEF1u64;
        let specials = [
            0.0f32,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MAX,
            1.0,
        ];
        for i in 0..2_000_000u64 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let x = if i < specials.len() as u64 {
                specials[i as usize]
            } else {
                f32::from_bits(s as u32)
            };
            let want = bf16::from_f32(x);
            let got = bf16::from_bits(bf16_bits_rne(x));
            assert!(
                want.to_bits() == got.to_bits() || (want.is_nan() && got.is_nan()),
                "{x:e} ({:#x}): {:#x} vs {:#x}",
                x.to_bits(),
                want.to_bits(),
                got.to_bits()
            );
        }
        let d: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 256) as u8).collect();
        for (lo, hi) in [(0x7B, 0x7B), (1, 5), (0, 0), (0, 0x7F), (9, 3)] {
            let want = d
                .iter()
                .filter(|&&q| (lo..=hi).contains(&(q & 0x7F)))
                .count() as u64;
            assert_eq!(count_magnitude_in(&d, lo, hi), want, "{lo} {hi}");
        }
    }

    #[test]
    fn max_min_propagate_nan_and_are_exact() {
        let mut a = vec![1.0f32, f32::NAN, -3.0];
        combine_f32(ReduceOp::Max, &mut a, &[2.0, 0.0, -4.0]);
        assert_eq!(a[0], 2.0);
        assert!(a[1].is_nan());
        assert_eq!(a[2], -3.0);
        let f = Fp8Format::E5M2;
        let mut b = vec![f.encode(1.0, true), f.encode(-2.0, true)];
        combine_fp8(
            f,
            ReduceOp::Min,
            &mut b,
            &[f.encode(0.5, true), f.nan_bits()],
        );
        assert_eq!(f.decode(b[0]), 0.5);
        assert!(f.decode(b[1]).is_nan());
        let mut h = vec![bf16::from_f32(1.0)];
        combine_bf16(ReduceOp::Sum, &mut h, &[bf16::from_f32(1.0 / 512.0)]);
        // bf16 spacing at 1 is 2^-7: adding 2^-9 (a quarter ulp) rounds back to 1 at the hop.
        assert_eq!(h[0].to_f32(), 1.0);
    }
}
