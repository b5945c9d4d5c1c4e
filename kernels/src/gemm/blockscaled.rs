//! GEMM with block-scaled FP8 operands (`fp8.recipe = "block"`, DeepSeek-V3 style): each
//! operand may carry one scale per tile (1 x 128 for activations and output gradients,
//! 128 x 128 for weights; see `fp8lm_fp8::block`) instead of one per tensor.
//!
//! A separate entry point beside [`GemmOps::gemm`], which it leaves untouched: every
//! block-scaled operand is decoded tile by tile with its own scale (`real = code / scale`)
//! into an f32 panel, then the f32 GEMM runs on the panels. With the default
//! power-of-two scales the decode is exact, so the product is the same as applying each
//! k-block's `1 / (scale_a * scale_b)` to its partial sums, whatever tile shapes meet
//! (which is why every layout works, including dW, whose k runs along the tiles' rows);
//! exact-ratio scales add one rounding per element at decode. Cost: one f32 copy of each
//! block-scaled operand per call (the per-tensor FP8 path decodes inside its packing
//! instead).

use super::{GemmOps, GemmShape, MatRef};
use crate::Cpu;
use fp8lm_fp8::block::{dequantize_blocks, grid};
use fp8lm_fp8::Fp8Format;

/// A block-scaled FP8 matrix as stored: `[rows, cols]` row-major codes and the
/// row-major scale grid of its `block` tiles.
#[derive(Clone, Copy, Debug)]
pub struct BlockFp8<'a> {
    pub data: &'a [u8],
    pub format: Fp8Format,
    pub rows: usize,
    pub cols: usize,
    pub block: (usize, usize),
    pub scales: &'a [f32],
}

/// One operand of [`gemm_block_scaled`]: any [`MatRef`], or a block-scaled matrix.
#[derive(Clone, Copy, Debug)]
pub enum BlockOperand<'a> {
    Mat(MatRef<'a>),
    Blocks(BlockFp8<'a>),
}

impl BlockOperand<'_> {
    pub fn len(&self) -> usize {
        match self {
            BlockOperand::Mat(m) => m.len(),
            BlockOperand::Blocks(b) => b.data.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Decode `b` to f32 (checked against the stored shape `rows x cols` the GEMM expects).
fn decode(b: &BlockFp8<'_>, rows: usize, cols: usize, what: &str) -> Vec<f32> {
    assert!(
        b.rows == rows && b.cols == cols && b.data.len() == rows * cols,
        "gemm_block_scaled: {what} is {}x{} ({} codes), the shape needs {rows}x{cols}",
        b.rows,
        b.cols,
        b.data.len()
    );
    let (gr, gc) = grid(rows, cols, b.block);
    assert_eq!(
        b.scales.len(),
        gr * gc,
        "gemm_block_scaled: {what} has {} scales for a {gr}x{gc} grid",
        b.scales.len()
    );
    let mut out = vec![0f32; rows * cols];
    dequantize_blocks(b.format, b.data, rows, cols, b.block, b.scales, &mut out);
    out
}

/// `C = op(A) @ op(B)` (or `+=` with `accumulate`) with f32 accumulation, as
/// [`GemmOps::gemm`], where either operand may be block-scaled (on [`Cpu`]).
pub fn gemm_block_scaled(
    shape: GemmShape,
    a: BlockOperand<'_>,
    b: BlockOperand<'_>,
    c: &mut [f32],
    accumulate: bool,
) {
    gemm_block_scaled_on(&Cpu, shape, a, b, c, accumulate)
}

/// [`gemm_block_scaled`] whose f32 GEMM runs on `be` (the default of
/// `Backend::gemm_blocks`).
pub fn gemm_block_scaled_on<G: GemmOps + ?Sized>(
    be: &G,
    shape: GemmShape,
    a: BlockOperand<'_>,
    b: BlockOperand<'_>,
    c: &mut [f32],
    accumulate: bool,
) {
    let (ar, ac) = if shape.trans_a {
        (shape.k, shape.m)
    } else {
        (shape.m, shape.k)
    };
    let (br, bc) = if shape.trans_b {
        (shape.n, shape.k)
    } else {
        (shape.k, shape.n)
    };
    let a32;
    let a = match a {
        BlockOperand::Mat(m) => m,
        BlockOperand::Blocks(x) => {
            a32 = decode(&x, ar, ac, "A");
            MatRef::F32(&a32)
        }
    };
    let b32;
    let b = match b {
        BlockOperand::Mat(m) => m,
        BlockOperand::Blocks(x) => {
            b32 = decode(&x, br, bc, "B");
            MatRef::F32(&b32)
        }
    };
    be.gemm(shape, a, b, c, accumulate);
}

#[cfg(test)]
mod tests {
    use super::*;
    use fp8lm_fp8::block::{quantize_blocks, ACT_BLOCK, WEIGHT_BLOCK};
    use fp8lm_fp8::ScaleRounding;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = (s >> 11) as f64 / (1u64 << 53) as f64;
                // Magnitudes spread over 2^-8 .. 2^8 by region: tiles need their own scale.
                let mag = 2f64.powi(((i / 97) % 17) as i32 - 8);
                ((2.0 * u - 1.0) * mag) as f32
            })
            .collect()
    }

    struct Q {
        codes: Vec<u8>,
        scales: Vec<f32>,
        rows: usize,
        cols: usize,
        block: (usize, usize),
        fmt: Fp8Format,
    }

    fn q(
        x: &[f32],
        rows: usize,
        cols: usize,
        block: (usize, usize),
        fmt: Fp8Format,
        r: ScaleRounding,
    ) -> Q {
        let (gr, gc) = grid(rows, cols, block);
        let mut codes = vec![0u8; x.len()];
        let mut scales = vec![0f32; gr * gc];
        quantize_blocks(fmt, x, rows, cols, block, r, 0, &mut codes, &mut scales);
        Q {
            codes,
            scales,
            rows,
            cols,
            block,
            fmt,
        }
    }

    impl Q {
        fn op(&self) -> BlockOperand<'_> {
            BlockOperand::Blocks(BlockFp8 {
                data: &self.codes,
                format: self.fmt,
                rows: self.rows,
                cols: self.cols,
                block: self.block,
                scales: &self.scales,
            })
        }
        /// The real values in f64, decoded element by element from the scalar format.
        fn real(&self) -> Vec<f64> {
            let (_, gc) = grid(self.rows, self.cols, self.block);
            (0..self.codes.len())
                .map(|i| {
                    let t = (i / self.cols / self.block.0) * gc + (i % self.cols) / self.block.1;
                    self.fmt.decode(self.codes[i]) as f64 / self.scales[t] as f64
                })
                .collect()
        }
    }

    /// Every layout (plain, trans_a, trans_b, both) with ragged dims, E4M3 x E4M3 and
    /// E5M2 x E4M3, power-of-two and exact-ratio scales, against an f64 product of the
    /// decoded operands. Bound per output: f32 accumulation `k * 2^-24 * sum |a||b|`,
    /// plus for exact-ratio scales the decode's rounding of each operand (2^-24 relative
    /// each, so `2 * 2^-24 * sum |a||b|`).
    #[test]
    fn every_layout_matches_an_f64_reference() {
        let (m, n, k) = (37, 45, 300);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            for (fa, fb) in [
                (Fp8Format::E4M3, Fp8Format::E4M3),
                (Fp8Format::E5M2, Fp8Format::E4M3),
            ] {
                for rounding in [ScaleRounding::PowerOfTwo, ScaleRounding::Exact] {
                    let mut shape = GemmShape::new(m, n, k);
                    shape.trans_a = ta;
                    shape.trans_b = tb;
                    let (ar, ac) = if ta { (k, m) } else { (m, k) };
                    let (br, bc) = if tb { (n, k) } else { (k, n) };
                    let qa = q(&values(ar * ac, 1), ar, ac, ACT_BLOCK, fa, rounding);
                    let qb = q(&values(br * bc, 2), br, bc, WEIGHT_BLOCK, fb, rounding);
                    let (ra, rb) = (qa.real(), qb.real());
                    let at = |i: usize, p: usize| if ta { ra[p * m + i] } else { ra[i * k + p] };
                    let bt = |p: usize, j: usize| if tb { rb[j * k + p] } else { rb[p * n + j] };
                    let mut c = vec![0f32; m * n];
                    gemm_block_scaled(shape, qa.op(), qb.op(), &mut c, false);
                    let eps = 2f64.powi(-24);
                    let extra = if rounding == ScaleRounding::Exact {
                        2.0
                    } else {
                        0.0
                    };
                    for i in 0..m {
                        for j in 0..n {
                            let (mut r, mut mag) = (0f64, 0f64);
                            for p in 0..k {
                                r += at(i, p) * bt(p, j);
                                mag += (at(i, p) * bt(p, j)).abs();
                            }
                            let bound = (k as f64 + extra) * eps * mag + 1e-30;
                            let e = (c[i * n + j] as f64 - r).abs();
                            assert!(
                                e <= bound,
                                "ta {ta} tb {tb} {fa:?}x{fb:?} {rounding:?} ({i},{j}): {} vs {r}, err {e:.3e} > {bound:.3e}",
                                c[i * n + j]
                            );
                        }
                    }
                    // Mixed: a block-scaled A with a plain f32 B gives the same as decoding
                    // B first (accumulate adds onto C).
                    let b32: Vec<f32> = rb.iter().map(|&x| x as f32).collect();
                    let mut c2 = c.clone();
                    gemm_block_scaled(
                        shape,
                        qa.op(),
                        BlockOperand::Mat(MatRef::F32(&b32)),
                        &mut c2,
                        true,
                    );
                    for (x, y) in c2.iter().zip(&c) {
                        assert!(
                            (x - 2.0 * y).abs() <= 1e-5 * y.abs().max(1e-20),
                            "{x} vs 2 x {y}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "scales for a")]
    fn a_scale_grid_of_the_wrong_shape_is_refused() {
        let codes = vec![0u8; 4 * 200];
        let bad = BlockOperand::Blocks(BlockFp8 {
            data: &codes,
            format: Fp8Format::E4M3,
            rows: 4,
            cols: 200,
            block: ACT_BLOCK,
            scales: &[1.0; 4], // needs 4 x 2
        });
        let b = vec![0f32; 200 * 3];
        let mut c = vec![0f32; 12];
        gemm_block_scaled(
            GemmShape::new(4, 3, 200),
            bad,
            BlockOperand::Mat(MatRef::F32(&b)),
            &mut c,
            false,
        );
    }
}
