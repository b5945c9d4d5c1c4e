//! Block-wise (fine-grained) scaling, DeepSeek-V3 style: one scale per tile instead of
//! one per tensor, so an outlier only coarsens the values of its own tile.
//!
//! A row-major `[rows, cols]` matrix is cut into `block_rows x block_cols` tiles:
//! `1 x 128` for activations and output gradients (a row's 128 consecutive elements),
//! `128 x 128` for weights ([`ACT_BLOCK`], [`WEIGHT_BLOCK`]). Each tile gets the current
//! scale of its own amax, `stored = cast(real * scale_tile)`, power of two by default
//! (exact multiply, exact decode) or the exact ratio `fmt_max / amax` as an option.
//! Ragged edges: the last tiles of a row or column are simply smaller (a 200-wide
//! matrix has tiles of 128 and 72 columns); the scale grid is
//! `[ceil(rows / block_rows), ceil(cols / block_cols)]`, row-major, as checkpoints store
//! it (`<name>.scale`). A tile of zeros (or with a non-finite amax) gets scale 1.

use crate::cast::{decode_table, f32_to_fp8_counted};
use crate::format::Fp8Format;
use crate::scaling::{scale_for_amax, ScaleRounding};
use rayon::prelude::*;

/// Tile of activations and output gradients (one row, 128 columns).
pub const ACT_BLOCK: (usize, usize) = (1, 128);
/// Tile of weights.
pub const WEIGHT_BLOCK: (usize, usize) = (128, 128);

/// Shape of the scale grid of a `[rows, cols]` matrix in `block` tiles.
pub fn grid(rows: usize, cols: usize, block: (usize, usize)) -> (usize, usize) {
    (rows.div_ceil(block.0.max(1)), cols.div_ceil(block.1.max(1)))
}

/// What one block-scaled cast did (over all tiles).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BlockCastStats {
    /// amax of the whole matrix (real units).
    pub amax: f32,
    /// Smallest and largest tile scale.
    pub scale_min: f32,
    pub scale_max: f32,
    /// Values that saturated / non-zero values that flushed to zero.
    pub overflow: u64,
    pub underflow: u64,
}

/// Cast `src` (`[rows, cols]`, row-major) to `fmt` with one scale per `block` tile into
/// `dst` (same length) and `scales` (the grid, row-major). `margin` binades of head-room
/// as for per-tensor scaling.
#[allow(clippy::too_many_arguments)]
pub fn quantize_blocks(
    fmt: Fp8Format,
    src: &[f32],
    rows: usize,
    cols: usize,
    block: (usize, usize),
    rounding: ScaleRounding,
    margin: i32,
    dst: &mut [u8],
    scales: &mut [f32],
) -> BlockCastStats {
    assert_eq!(
        src.len(),
        rows * cols,
        "quantize_blocks: src is not rows x cols"
    );
    assert_eq!(dst.len(), src.len(), "quantize_blocks: dst length");
    let (gr, gc) = grid(rows, cols, block);
    assert_eq!(scales.len(), gr * gc, "quantize_blocks: scale grid length");
    let (br, bc) = (block.0.max(1), block.1.max(1));
    // One band of block rows at a time, in parallel: each band owns its rows of dst and
    // its row of the scale grid.
    let per_band: Vec<BlockCastStats> = src
        .par_chunks(br * cols)
        .zip(dst.par_chunks_mut(br * cols))
        .zip(scales.par_chunks_mut(gc))
        .map(|((s, d), sc)| {
            let band_rows = s.len() / cols.max(1);
            let mut st = BlockCastStats {
                amax: 0.0,
                scale_min: f32::INFINITY,
                scale_max: 0.0,
                overflow: 0,
                underflow: 0,
            };
            for (j, scale) in sc.iter_mut().enumerate() {
                let c0 = j * bc;
                let c1 = (c0 + bc).min(cols);
                let mut amax = 0f32;
                let mut finite = true;
                for r in 0..band_rows {
                    for &x in &s[r * cols + c0..r * cols + c1] {
                        finite &= x.is_finite();
                        amax = amax.max(x.abs());
                    }
                }
                let sc_t = if finite {
                    scale_for_amax(fmt.max(), amax, margin, rounding).unwrap_or(1.0)
                } else {
                    1.0
                };
                *scale = sc_t;
                st.amax = if finite { st.amax.max(amax) } else { f32::NAN };
                st.scale_min = st.scale_min.min(sc_t);
                st.scale_max = st.scale_max.max(sc_t);
                for r in 0..band_rows {
                    let range = r * cols + c0..r * cols + c1;
                    let (_, counts) =
                        f32_to_fp8_counted(fmt, &s[range.clone()], sc_t, &mut d[range]);
                    st.overflow += counts.saturated;
                    st.underflow += counts.flushed;
                }
            }
            st
        })
        .collect();
    per_band
        .into_iter()
        .reduce(|a, b| BlockCastStats {
            amax: if a.amax.is_nan() || b.amax.is_nan() {
                f32::NAN
            } else {
                a.amax.max(b.amax)
            },
            scale_min: a.scale_min.min(b.scale_min),
            scale_max: a.scale_max.max(b.scale_max),
            overflow: a.overflow + b.overflow,
            underflow: a.underflow + b.underflow,
        })
        .unwrap_or_default()
}

/// `dst[i] = decode(src[i]) / scale_of_its_tile`: the real values (exact for
/// power-of-two scales; one rounding for exact-ratio ones).
pub fn dequantize_blocks(
    fmt: Fp8Format,
    src: &[u8],
    rows: usize,
    cols: usize,
    block: (usize, usize),
    scales: &[f32],
    dst: &mut [f32],
) {
    assert_eq!(
        src.len(),
        rows * cols,
        "dequantize_blocks: src is not rows x cols"
    );
    assert_eq!(dst.len(), src.len(), "dequantize_blocks: dst length");
    let (gr, gc) = grid(rows, cols, block);
    assert_eq!(
        scales.len(),
        gr * gc,
        "dequantize_blocks: scale grid length"
    );
    let table = decode_table(fmt);
    let bc = block.1.max(1);
    let br = block.0.max(1);
    dst.par_chunks_mut(cols.max(1))
        .zip(src.par_chunks(cols.max(1)))
        .enumerate()
        .for_each(|(r, (d, s))| {
            let sc = &scales[(r / br) * gc..][..gc];
            for (j, (dd, ss)) in d.chunks_mut(bc).zip(s.chunks(bc)).enumerate() {
                let scale = sc[j];
                for (o, &b) in dd.iter_mut().zip(ss) {
                    *o = table[b as usize] / scale;
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(rows: usize, cols: usize) -> Vec<f32> {
        // Tiles with very different magnitudes: per-tensor scaling would flush the small.
        (0..rows * cols)
            .map(|i| {
                let (r, c) = (i / cols, i % cols);
                let mag = 2f32.powi(((r / 3 + c / 50) % 20) as i32 - 10);
                mag * (((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            })
            .collect()
    }

    #[test]
    fn ragged_tiles_match_the_scalar_reference_cast() {
        for fmt in [Fp8Format::E4M3, Fp8Format::E5M2] {
            for (rows, cols, block) in [
                (3, 200, ACT_BLOCK),
                (130, 129, WEIGHT_BLOCK),
                (1, 1, WEIGHT_BLOCK),
                (5, 128, (2, 64)),
            ] {
                for rounding in [ScaleRounding::PowerOfTwo, ScaleRounding::Exact] {
                    let x = data(rows, cols);
                    let (gr, gc) = grid(rows, cols, block);
                    let mut q = vec![0u8; x.len()];
                    let mut s = vec![0f32; gr * gc];
                    let st =
                        quantize_blocks(fmt, &x, rows, cols, block, rounding, 0, &mut q, &mut s);
                    let mut smin = f32::INFINITY;
                    let mut smax = 0f32;
                    let tile = |i: usize| (i / cols / block.0) * gc + (i % cols) / block.1;
                    // Each tile's amax, recomputed from its elements.
                    let mut tile_amax = vec![0f32; gr * gc];
                    for (i, &xi) in x.iter().enumerate() {
                        tile_amax[tile(i)] = tile_amax[tile(i)].max(xi.abs());
                    }
                    for (i, (&xi, &qi)) in x.iter().zip(&q).enumerate() {
                        let t = tile(i);
                        let amax = tile_amax[t];
                        let want_s = scale_for_amax(fmt.max(), amax, 0, rounding).unwrap_or(1.0);
                        assert_eq!(s[t], want_s, "{fmt:?} {rows}x{cols} tile {t}");
                        assert_eq!(qi, fmt.encode(xi * want_s, true), "{fmt:?} element {i}");
                        smin = smin.min(want_s);
                        smax = smax.max(want_s);
                    }
                    assert_eq!((st.scale_min, st.scale_max), (smin, smax));
                    // Current per-tile scaling never saturates.
                    assert_eq!(st.overflow, 0);
                    let mut back = vec![0f32; x.len()];
                    dequantize_blocks(fmt, &q, rows, cols, block, &s, &mut back);
                    for (i, (&b, &qi)) in back.iter().zip(&q).enumerate() {
                        let t = (i / cols / block.0) * gc + (i % cols) / block.1;
                        assert_eq!(b, fmt.decode(qi) / s[t]);
                    }
                }
            }
        }
    }

    #[test]
    fn tiles_keep_small_values_that_one_tensor_scale_flushes() {
        let (rows, cols) = (4, 256);
        let mut x = vec![1e-4f32; rows * cols];
        x[0] = 400.0; // one outlier in the first tile
        let mut q = vec![0u8; x.len()];
        let (gr, gc) = grid(rows, cols, ACT_BLOCK);
        let mut s = vec![0f32; gr * gc];
        let st = quantize_blocks(
            Fp8Format::E4M3,
            &x,
            rows,
            cols,
            ACT_BLOCK,
            ScaleRounding::PowerOfTwo,
            0,
            &mut q,
            &mut s,
        );
        // Per tensor (scale 1 for amax 400): 1e-4 is below E4M3's smallest subnormal.
        assert_eq!(Fp8Format::E4M3.encode(1e-4, true) & 0x7F, 0);
        // Per tile: only the outlier's tile flushes its small values (127 of them).
        assert_eq!(st.underflow, 127);
        assert!(st.scale_max / st.scale_min >= 2f32.powi(20));
        // A zero tile gets scale 1.
        let mut s1 = vec![0f32; 1];
        let st = quantize_blocks(
            Fp8Format::E4M3,
            &[0.0; 8],
            1,
            8,
            ACT_BLOCK,
            ScaleRounding::PowerOfTwo,
            0,
            &mut [0u8; 8],
            &mut s1,
        );
        assert_eq!((s1[0], st.amax), (1.0, 0.0));
    }
}
