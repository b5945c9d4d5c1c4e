//! [`Backend`] for [`Cpu`]: the casts and reductions of a training step, rayon-parallel
//! over fixed chunks with fixed-order combines (results do not depend on the thread
//! count). The GEMM and layer ops are in `gemm/` and `layers/`.

use super::{Backend, Fp8CastResult};
use crate::Cpu;
use fp8lm_fp8::cast;
use fp8lm_fp8::Fp8Format;
use fp8lm_optim::update::{
    AdamWGrad, ChunkMut, ChunkOut, Fp8AdamChunk, HostUpdate, StepConsts, UpdateOps,
};
use half::{bf16, f16};
use rayon::prelude::*;

/// Elements per rayon task for casts and amax.
const CAST_CHUNK: usize = 16384;

/// The optimizer updates: the fused SIMD host kernels of `fp8lm-optim`
/// ([`HostUpdate`]), which the optimizers also run when given no backend.
impl UpdateOps for Cpu {
    fn update_name(&self) -> &'static str {
        "cpu"
    }
    fn adamw_chunk(
        &self,
        p: &mut [f32],
        m: &mut [f32],
        v: &mut [f32],
        g: AdamWGrad<'_>,
        k: &StepConsts,
        grad_scale: f32,
    ) {
        HostUpdate.adamw_chunk(p, m, v, g, k, grad_scale)
    }
    fn fp8_adam_chunk(&self, c: Fp8AdamChunk<'_, '_>) -> ChunkOut {
        HostUpdate.fp8_adam_chunk(c)
    }
    fn rescale_state(&self, c: &mut ChunkMut<'_>, factor: f32) {
        HostUpdate.rescale_state(c, factor)
    }
    fn decode_state(&self, c: &ChunkMut<'_>, inv_scale: f32, dst: &mut [f32]) {
        HostUpdate.decode_state(c, inv_scale, dst)
    }
    fn cast_weights_fp8(
        &self,
        format: Fp8Format,
        view: &[f32],
        scale: f32,
        dst: &mut [u8],
    ) -> (f32, cast::CastCounts) {
        HostUpdate.cast_weights_fp8(format, view, scale, dst)
    }
}

impl Backend for Cpu {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn amax_f32(&self, src: &[f32]) -> f32 {
        if src.len() <= CAST_CHUNK {
            return cast::amax_f32(src);
        }
        let parts: Vec<f32> = src.par_chunks(CAST_CHUNK).map(cast::amax_f32).collect();
        parts.iter().fold(0f32, |m, &x| {
            if x.is_nan() || m.is_nan() {
                f32::NAN
            } else {
                m.max(x)
            }
        })
    }

    /// The fp8 crate's bulk cast, in parallel; counts from the same pass on AVX-512.
    fn cast_fp8(
        &self,
        format: Fp8Format,
        src: &[f32],
        scale: f32,
        dst: &mut [u8],
    ) -> Fp8CastResult {
        let (amax, counts) = cast::par_f32_to_fp8_counted(format, src, scale, dst);
        Fp8CastResult { amax, counts }
    }

    fn cast_bf16(&self, src: &[f32], dst: &mut [bf16]) {
        assert_eq!(src.len(), dst.len(), "cast_bf16: lengths differ");
        dst.par_chunks_mut(CAST_CHUNK)
            .zip(src.par_chunks(CAST_CHUNK))
            .for_each(|(d, s)| cast::f32_to_bf16(s, d));
    }

    fn add_decoded_fp8(&self, dst: &mut [f32], src: &[u8], format: Fp8Format, scale: f32) {
        assert_eq!(src.len(), dst.len(), "add_decoded_fp8: lengths differ");
        let table = cast::decode_table(format);
        let inv = 1.0 / scale;
        dst.par_chunks_mut(CAST_CHUNK)
            .zip(src.par_chunks(CAST_CHUNK))
            .for_each(|(d, q)| {
                for (x, &b) in d.iter_mut().zip(q) {
                    *x += table[b as usize] * inv;
                }
            });
    }

    /// The same values and additions as `encoder_forward` on the f32 view (`f16 / scale`
    /// is exact for a power-of-two scale).
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
        let inv = 1.0 / scale;
        out.par_chunks_mut(c).enumerate().for_each(|(r, o)| {
            let tok = tokens[r] as usize;
            cast::f16_to_f32_amax(&wte[tok * c..(tok + 1) * c], inv, o);
            if let Some(wpe) = wpe {
                let pos = r % t;
                for (o, &p) in o.iter_mut().zip(&wpe[pos * c..(pos + 1) * c]) {
                    *o += p;
                }
            }
        });
    }

    fn sum_squares_f32(&self, src: &[f32]) -> f64 {
        src.par_chunks(16384)
            .map(sum_squares_f64)
            .collect::<Vec<_>>()
            .iter()
            .sum::<f64>()
    }

    /// Exact and fast: histogram the codes, then sum count * value^2.
    fn sum_squares_fp8(&self, src: &[u8], format: Fp8Format) -> f64 {
        let hist = src
            .par_chunks(1 << 16)
            .map(|c| {
                // Four interleaved sub-histograms: gradient codes cluster, and one
                // histogram would chain each increment on the previous one through
                // memory (store-to-load latency, ~5 cycles a byte).
                let mut h4 = [[0u32; 256]; 4];
                let quads = c.chunks_exact(4);
                let rest = quads.remainder();
                for q in quads {
                    h4[0][q[0] as usize] += 1;
                    h4[1][q[1] as usize] += 1;
                    h4[2][q[2] as usize] += 1;
                    h4[3][q[3] as usize] += 1;
                }
                rest.iter().for_each(|&b| h4[0][b as usize] += 1);
                let mut h = [0u64; 256];
                for (i, x) in h.iter_mut().enumerate() {
                    *x = h4.iter().map(|s| s[i] as u64).sum();
                }
                h
            })
            .reduce(
                || [0u64; 256],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                    a
                },
            );
        let table = cast::decode_table(format);
        // (empty bins skipped: the NaN codes' values would poison the sum)
        hist.iter()
            .zip(table)
            .filter(|(&n, _)| n > 0)
            .map(|(&n, &v)| n as f64 * (v as f64).powi(2))
            .sum()
    }
}

/// `sum x^2` in f64 over 16 interleaved partial sums (fixed order, so deterministic): a
/// single running f64 sum is one dependent add per element (~4 cycles each, ~80 ms a
/// step at 124M parameters); independent lanes vectorise and pipeline.
fn sum_squares_f64(c: &[f32]) -> f64 {
    const LANES: usize = 16;
    let mut acc = [0f64; LANES];
    let blocks = c.chunks_exact(LANES);
    let rest = blocks.remainder();
    for (i, b) in blocks.enumerate() {
        // One read stream per thread leaves DRAM idle without a software prefetch
        // (as in the fp8 crate's casts).
        #[cfg(target_arch = "x86_64")]
        // SAFETY: prefetching is a hint; it never faults, whatever the address.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(c.as_ptr().wrapping_add(i * LANES + 1024) as *const i8);
        }
        for (a, &x) in acc.iter_mut().zip(b) {
            *a += (x as f64) * (x as f64);
        }
    }
    let tail: f64 = rest.iter().map(|&x| (x as f64) * (x as f64)).sum();
    acc.iter().sum::<f64>() + tail
}
