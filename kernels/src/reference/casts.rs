//! The reference casts and reductions: scalar loops over the fp8 crate's reference
//! encode / decode, one element at a time, in index order.

use super::{single, Reference};
use crate::backend::{Backend, Fp8CastResult};
use fp8lm_fp8::block::BlockCastStats;
use fp8lm_fp8::cast::CastCounts;
use fp8lm_fp8::merge_amax;
use fp8lm_fp8::{CastMode, Fp8Format, ScaleRounding};
use half::{bf16, f16};

impl Backend for Reference {
    fn name(&self) -> &'static str {
        "reference"
    }

    fn amax_f32(&self, src: &[f32]) -> f32 {
        src.iter().fold(0f32, |m, &x| merge_amax(m, x.abs()))
    }

    fn cast_fp8(
        &self,
        format: Fp8Format,
        src: &[f32],
        scale: f32,
        dst: &mut [u8],
    ) -> Fp8CastResult {
        assert_eq!(src.len(), dst.len(), "cast_fp8: src and dst lengths differ");
        let max = format.max();
        let mut r = Fp8CastResult {
            amax: 0.0,
            counts: CastCounts::default(),
        };
        for (d, &x) in dst.iter_mut().zip(src) {
            let y = x * scale;
            *d = format.encode_mode(y, CastMode::SatFinite);
            r.amax = merge_amax(r.amax, x.abs());
            // inf saturates (and counts), NaN does not
            r.counts.saturated += (y.abs() > max) as u64;
            r.counts.flushed += (x != 0.0 && *d & 0x7F == 0) as u64;
        }
        r
    }

    fn cast_fp8_blocks(
        &self,
        format: Fp8Format,
        src: &[f32],
        rows: usize,
        cols: usize,
        tile: (usize, usize),
        rounding: ScaleRounding,
        margin: i32,
        dst: &mut [u8],
        scales: &mut [f32],
    ) -> BlockCastStats {
        single(|| {
            fp8lm_fp8::block::quantize_blocks(
                format, src, rows, cols, tile, rounding, margin, dst, scales,
            )
        })
    }

    fn cast_bf16(&self, src: &[f32], dst: &mut [bf16]) {
        assert_eq!(src.len(), dst.len(), "cast_bf16: lengths differ");
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = bf16::from_f32(x);
        }
    }

    fn add_decoded_fp8(&self, dst: &mut [f32], src: &[u8], format: Fp8Format, scale: f32) {
        assert_eq!(src.len(), dst.len(), "add_decoded_fp8: lengths differ");
        for (d, &b) in dst.iter_mut().zip(src) {
            *d += format.decode(b) / scale;
        }
    }

    fn encoder_forward_f16(
        &self,
        out: &mut [f32],
        tokens: &[u32],
        wte: &[f16],
        scale: f32,
        wpe: Option<&[f32]>,
        t: usize,
        c: usize,
    ) {
        assert_eq!(out.len(), tokens.len() * c);
        for (r, o) in out.chunks_mut(c).enumerate() {
            let tok = tokens[r] as usize;
            for (i, o) in o.iter_mut().enumerate() {
                *o = wte[tok * c + i].to_f32() / scale;
                if let Some(wpe) = wpe {
                    *o += wpe[(r % t) * c + i];
                }
            }
        }
    }

    fn sum_squares_f32(&self, src: &[f32]) -> f64 {
        src.iter().map(|&x| (x as f64) * (x as f64)).sum()
    }

    fn sum_squares_fp8(&self, src: &[u8], format: Fp8Format) -> f64 {
        src.iter().map(|&b| (format.decode(b) as f64).powi(2)).sum()
    }

    fn gemm_blocks(
        &self,
        shape: crate::GemmShape,
        a: crate::gemm::blockscaled::BlockOperand<'_>,
        b: crate::gemm::blockscaled::BlockOperand<'_>,
        c: &mut [f32],
        accumulate: bool,
    ) {
        single(|| crate::gemm::blockscaled::gemm_block_scaled_on(self, shape, a, b, c, accumulate))
    }
}
