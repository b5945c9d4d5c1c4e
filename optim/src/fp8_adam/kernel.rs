//! The fused per-chunk AdamW update over decoded state (see the parent module's docs).

use super::state::{ChunkMut, GradChunk};
use super::CHUNK;
use fp8lm_fp8::Fp8Format;
use std::cell::RefCell;

pub(crate) use crate::update::{ChunkOut, StepConsts};

/// The fused per-chunk update: decode, AdamW in f32, amax, encode (unless `limits` says
/// the provisional scales would overflow, then nothing is written).
///
/// Multiversioned: the same code compiled for AVX2 when the CPU has it (the portable
/// build targets SSE2; the integer bit tricks of the casts gain most from 8 lanes).
/// Both versions are the same Rust expressions without FMA contraction, so their
/// results are bit-identical.
#[allow(clippy::too_many_arguments)]
pub(crate) fn update_chunk(
    w: &mut ChunkMut,
    m: &mut ChunkMut,
    v: &mut ChunkMut,
    p: &mut [f32],
    g: GradChunk,
    k: &StepConsts,
    old_scale: [f32; 3],
    scale: [f32; 3],
    limits: Option<[f32; 3]>,
) -> ChunkOut {
    // Scratch rows live per thread: a fresh zeroed stack array per chunk cost a memset
    // of 32 KiB per 2048 elements.
    thread_local! {
        static SCRATCH: RefCell<Vec<f32>> = RefCell::new(vec![0.0; 4 * CHUNK]);
    }
    #[cfg(target_arch = "x86_64")]
    if let (
        ChunkMut::F16(wh),
        ChunkMut::Fp8(m8, Fp8Format::E4M3),
        ChunkMut::F16(vh),
        GradChunk::Fp8(g8, gf, gi, gs),
    ) = (&mut *w, &mut *m, &mut *v, g)
    {
        if let Some(isa) = super::fused::Isa::detect() {
            // SAFETY: `detect` checked that the CPU supports `isa`.
            return unsafe {
                super::fused::update_chunk(
                    isa,
                    wh,
                    m8,
                    vh,
                    p,
                    (g8, gf, gi, gs),
                    k,
                    old_scale,
                    scale,
                    limits,
                )
            };
        }
    }
    SCRATCH.with(|cell| {
        let mut buf = cell.borrow_mut();
        let scratch = &mut buf[..];
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe {
                update_chunk_avx2(w, m, v, p, g, k, old_scale, scale, limits, scratch)
            };
        }
        update_chunk_impl(w, m, v, p, g, k, old_scale, scale, limits, scratch)
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn update_chunk_avx2(
    w: &mut ChunkMut,
    m: &mut ChunkMut,
    v: &mut ChunkMut,
    p: &mut [f32],
    g: GradChunk,
    k: &StepConsts,
    old_scale: [f32; 3],
    scale: [f32; 3],
    limits: Option<[f32; 3]>,
    scratch: &mut [f32],
) -> ChunkOut {
    update_chunk_impl(w, m, v, p, g, k, old_scale, scale, limits, scratch)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn update_chunk_impl(
    w: &mut ChunkMut,
    m: &mut ChunkMut,
    v: &mut ChunkMut,
    p: &mut [f32],
    g: GradChunk,
    k: &StepConsts,
    old_scale: [f32; 3],
    scale: [f32; 3],
    limits: Option<[f32; 3]>,
    scratch: &mut [f32],
) -> ChunkOut {
    let n = p.len();
    // Scratch rows: g, w, m, v (each CHUNK f32).
    let (gb, rest) = scratch.split_at_mut(CHUNK);
    let (wb, rest) = rest.split_at_mut(CHUNK);
    let (mb, vb) = rest.split_at_mut(CHUNK);
    let (gb, wb, mb, vb) = (&mut gb[..n], &mut wb[..n], &mut mb[..n], &mut vb[..n]);
    g.decode(gb);
    w.decode(1.0 / old_scale[0], wb);
    m.decode(1.0 / old_scale[1], mb);
    v.decode(1.0 / old_scale[2], vb);
    // amax as the integer max of |x|'s bits: same order as the floats for non-negative
    // values, NaN above infinity (so it flags NaN too), and it vectorises as pmaxud.
    let (mut aw, mut am, mut av, mut ar) = (0u32, 0u32, 0u32, 0u32);
    // While computing, prefetch the memory just past this chunk (the next chunk, which
    // this thread most likely takes next): the decodes and encodes touch each stream in
    // short bursts of a few KiB, too short for the hardware prefetcher to ramp up.
    let next = Prefetch::after(w, m, v, p, &g);
    for b in (0..n).step_by(64) {
        next.block(b);
        for i in b..n.min(b + 64) {
            let g = gb[i];
            let m = k.b1 * mb[i] + k.one_minus_b1 * g;
            let v = k.b2 * vb[i] + k.one_minus_b2 * g * g;
            let u = (m * k.inv_bc1) / ((v * k.inv_bc2).sqrt() + k.eps);
            let w = wb[i] - k.lr * (u + k.wd * wb[i]);
            mb[i] = m;
            vb[i] = v;
            wb[i] = w;
            aw = aw.max(w.to_bits() & 0x7FFF_FFFF);
            am = am.max(m.to_bits() & 0x7FFF_FFFF);
            av = av.max(v.to_bits() & 0x7FFF_FFFF);
            ar = ar.max(u.to_bits() & 0x7FFF_FFFF);
        }
    }
    let nan = aw.max(am).max(av) > 0x7F80_0000;
    let ar = f32::from_bits(ar);
    let amax = [f32::from_bits(aw), f32::from_bits(am), f32::from_bits(av)];
    if let Some(lim) = limits {
        if (0..3).any(|s| amax[s] * scale[s] > lim[s]) {
            return ChunkOut {
                amax,
                saw_nan: nan,
                ratio: ar,
                deferred: true,
            };
        }
    }
    // Compute weights are the f32 view of what the master now stores.
    w.encode_with_view(wb, scale[0], p);
    m.encode(mb, scale[1]);
    v.encode(vb, scale[2]);
    ChunkOut {
        amax,
        saw_nan: nan,
        ratio: ar,
        deferred: false,
    }
}

/// Pointers just past a chunk's slices, for prefetching the next chunk while computing.
struct Prefetch {
    /// (start address, bytes per element) of g, w, m, v, p.
    streams: [(*const u8, usize); 5],
}

impl Prefetch {
    fn after(w: &ChunkMut, m: &ChunkMut, v: &ChunkMut, p: &[f32], g: &GradChunk) -> Prefetch {
        let end = |c: &ChunkMut| -> (*const u8, usize) {
            match c {
                ChunkMut::F32(s) => (s.as_ptr_range().end as *const u8, 4),
                ChunkMut::F16(s) => (s.as_ptr_range().end as *const u8, 2),
                ChunkMut::Fp8(s, _) => (s.as_ptr_range().end, 1),
            }
        };
        let ge = match g {
            GradChunk::F32(s, _) => (s.as_ptr_range().end as *const u8, 4),
            GradChunk::Fp8(s, ..) => (s.as_ptr_range().end, 1),
        };
        Prefetch {
            streams: [
                ge,
                end(w),
                end(m),
                end(v),
                (p.as_ptr_range().end as *const u8, 4),
            ],
        }
    }

    /// Prefetch the next chunk's elements [i, i + 64) of every stream.
    #[inline(always)]
    fn block(&self, i: usize) {
        #[cfg(target_arch = "x86_64")]
        for &(base, size) in &self.streams {
            let start = base.wrapping_add(i * size);
            let mut off = 0;
            while off < 64 * size {
                // SAFETY: prefetch is a hint; it never faults, whatever the address.
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                        start.wrapping_add(off) as *const i8,
                    )
                };
                off += 64;
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (self, i);
    }
}
