//! The blocked, threaded CPU GEMM: `C (+)= alpha * op(A) @ op(B)` into an f32 C.
//!
//! Blocking (Goto/BLIS style, for a core with 48 KiB L1 and 2 MiB L2):
//! - K is cut into blocks of at most `kc_max_for(isa)` steps (512 for AVX-512, 256
//!   otherwise), balanced: k = 768 -> 2 x 384.
//! - A is packed into `[k-block][m/MR][kc][MR]` panels, in parallel, shared by all
//!   threads, for as many K-blocks at once as fit [`A_PACK_FLOATS`] (all of them for the
//!   model's shapes), so a GEMM is typically two parallel phases: pack A, then compute.
//! - The output is split into work items: column strips (several per thread, so rayon
//!   can rebalance when another process takes a core; at most [`STRIP`] columns), and
//!   row ranges only when there are too few strips to feed every thread. Each item packs
//!   its own B strip per K-block (`kc * width * 4` bytes, L2-sized) and, for each B panel,
//!   runs the kernel against every A panel of its rows (A panel reused from L1, B panel
//!   from L1/L2).
//!
//! Threading is rayon (the global pool); products under [`SERIAL_FLOPS`] run on the
//! calling thread, where fork/join would cost more than the work.

use super::kernel::tile;
use super::pack::{pack_panel, E4M3Byte, E5M2Byte, Operand};
use super::{GemmShape, Isa, MatRef, MR, NR};
use fp8lm_fp8::Fp8Format;
use rayon::prelude::*;
use std::cell::Cell;

/// Largest K-block for a kernel. Measured (single thread, GFLOP per CPU-second, shared
/// machine): the AVX-512 kernel gains ~5-8% from 256 to 512 (fewer epilogue passes over
/// C; the 64 KiB B panel streams from L2 fast enough at 16 B/cycle); the AVX2 kernel,
/// half as fast, prefers 256.
pub(crate) fn kc_max_for(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => 512,
        _ => 256,
    }
}
/// Widest column strip of one work item.
pub(crate) const STRIP: usize = 768;
/// Rows (in MR panels) of A run against each B panel before moving to the next: 192
/// rows x 512 steps x 4 B = 384 KiB of packed A, resident in L2 with the B strip.
const MC_PANELS: usize = 24;
/// Column strips per thread (for load balancing), and the narrowest strip in panels.
const STRIPS_PER_THREAD: usize = 4;
const MIN_STRIP_PANELS: usize = 4;
/// Packed A is built for as many K-blocks at once as fit in this many floats (16 MiB),
/// so that a whole typical GEMM needs one parallel pack phase and one compute phase.
pub(crate) const A_PACK_FLOATS: usize = 1 << 22;
/// Below this many flops (2mnk, ~60 us on one core) a GEMM runs single-threaded: two
/// rayon joins cost several microseconds, more when other processes hold the cores.
const SERIAL_FLOPS: usize = 1 << 23;

thread_local! {
    /// Per-thread packing buffers, reused across calls (large fresh allocations would
    /// page-fault on every GEMM). Taken out while in use, so a nested call on the same
    /// thread simply allocates its own.
    static A_BUF: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    static B_BUF: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// A 64-byte aligned window of `len` floats inside `v` (grown as needed).
fn aligned(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len + 16 {
        *v = vec![0.0; len + 16];
    }
    let off = v.as_ptr().align_offset(64).min(16);
    &mut v[off..off + len]
}

/// (Clone/Copy by hand: a derive would require `T: Copy`.)
pub(crate) struct SendPtr<T = f32>(pub(crate) *mut T);
// SAFETY: work items write disjoint tiles of C; the pointer outlives the parallel loop.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}
impl<T> SendPtr<T> {
    /// Via a method, so closures capture the wrapper, not the bare pointer field.
    pub(crate) fn get(&self) -> *mut T {
        self.0
    }
}

/// How the output is divided among threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Grid {
    pub threads: usize,
    /// Row ranges (in MR panels) and column strips (in NR panels).
    pub row_parts: usize,
    pub col_parts: usize,
}

pub(crate) fn grid(m: usize, n: usize, k: usize, pool_threads: usize) -> Grid {
    grid_mr(m, n, k, MR, pool_threads)
}

/// [`grid`] for a kernel whose tiles have `mr` rows (the bf16 paths' kernels).
pub(crate) fn grid_mr(m: usize, n: usize, k: usize, mr: usize, pool_threads: usize) -> Grid {
    let flops = 2usize.saturating_mul(m).saturating_mul(n).saturating_mul(k);
    let t = if flops < SERIAL_FLOPS {
        1
    } else {
        pool_threads.max(1)
    };
    let (mp, np) = (m.div_ceil(mr), n.div_ceil(NR));
    // Several strips per thread so rayon can rebalance when a core is busy elsewhere,
    // but none narrower than MIN_STRIP_PANELS (the per-strip overheads stay small).
    let cols = if t == 1 {
        n.div_ceil(STRIP)
    } else {
        n.div_ceil(STRIP).max(STRIPS_PER_THREAD * t)
    };
    let cols = cols.min((np / MIN_STRIP_PANELS).max(1));
    let rows = if cols >= t {
        1
    } else {
        t.div_ceil(cols).min(mp).max(1)
    };
    Grid {
        threads: t,
        row_parts: rows,
        col_parts: cols,
    }
}

/// Which operand a panel comes from decides its geometry.
#[derive(Clone, Copy)]
enum Side {
    A,
    B,
}

/// Pack panel `x0 .. x0 + w` x `p0 .. p0 + kc` of operand `mat` (A or B of shape `s`).
#[allow(clippy::too_many_arguments)]
fn pack<const W: usize>(
    isa: Isa,
    side: Side,
    s: &GemmShape,
    mat: &MatRef<'_>,
    x0: usize,
    w: usize,
    p0: usize,
    kc: usize,
    dst: &mut [f32],
) {
    let (ld, k_contig) = match side {
        Side::A if s.trans_a => (s.m, false),
        Side::A => (s.k, true),
        Side::B if s.trans_b => (s.k, true),
        Side::B => (s.n, false),
    };
    match *mat {
        MatRef::F32(d) => pack_panel::<f32, W>(
            isa,
            Operand {
                data: d,
                ld,
                k_contig,
            },
            x0,
            w,
            p0,
            kc,
            dst,
        ),
        MatRef::Bf16(d) => pack_panel::<_, W>(
            isa,
            Operand {
                data: d,
                ld,
                k_contig,
            },
            x0,
            w,
            p0,
            kc,
            dst,
        ),
        MatRef::Fp8 { data, format, .. } => {
            // SAFETY: E4M3Byte / E5M2Byte are repr(transparent) over u8.
            match format {
                Fp8Format::E4M3 => {
                    let d = unsafe { &*(data as *const [u8] as *const [E4M3Byte]) };
                    pack_panel::<_, W>(
                        isa,
                        Operand {
                            data: d,
                            ld,
                            k_contig,
                        },
                        x0,
                        w,
                        p0,
                        kc,
                        dst,
                    )
                }
                Fp8Format::E5M2 => {
                    let d = unsafe { &*(data as *const [u8] as *const [E5M2Byte]) };
                    pack_panel::<_, W>(
                        isa,
                        Operand {
                            data: d,
                            ld,
                            k_contig,
                        },
                        x0,
                        w,
                        p0,
                        kc,
                        dst,
                    )
                }
            }
        }
    }
}

/// `c = alpha * op(A) @ op(B)`, or `c += ...` when `accumulate`, where
/// `alpha = 1 / (scale_a * scale_b)` (1 for f32/bf16 operands). Shapes already checked.
pub(crate) fn gemm_f32(
    isa: Isa,
    s: GemmShape,
    a: MatRef<'_>,
    b: MatRef<'_>,
    c: &mut [f32],
    accumulate: bool,
    pool_threads: usize,
) {
    let (m, n, k) = (s.m, s.n, s.k);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    let alpha = combined_scale(&a, &b);
    let g = grid(m, n, k, pool_threads);
    let k_blocks = k.div_ceil(kc_max_for(isa));
    let kc_max = k.div_ceil(k_blocks);
    let (mp, np) = (m.div_ceil(MR), n.div_ceil(NR));
    let rows_per = mp.div_ceil(g.row_parts);
    let cols_per = np.div_ceil(g.col_parts);
    let items = g.row_parts * g.col_parts;

    let a_block = mp * kc_max * MR; // floats of packed A per K-block
    let blocks_per_phase = (A_PACK_FLOATS / a_block).clamp(1, k_blocks);

    let mut a_vec = A_BUF.take();
    let a_pack = aligned(&mut a_vec, blocks_per_phase * a_block);
    let c_ptr = SendPtr(c.as_mut_ptr());

    // One phase = pack A for a run of K-blocks (parallel), then every work item runs
    // those K-blocks over its part of C (parallel). Two joins per phase.
    for phase0 in (0..k_blocks).step_by(blocks_per_phase) {
        let phase = phase0..(phase0 + blocks_per_phase).min(k_blocks);
        let kc_of = |bi: usize| kc_max.min(k - bi * kc_max);
        let pack_a = |(pi, dst): (usize, &mut [f32])| {
            let (bi, ip) = (phase0 + pi / mp, pi % mp);
            let (x0, kc) = (ip * MR, kc_of(bi));
            pack::<MR>(
                isa,
                Side::A,
                &s,
                &a,
                x0,
                MR.min(m - x0),
                bi * kc_max,
                kc,
                &mut dst[..kc * MR],
            );
        };
        let a_panels = &mut a_pack[..phase.len() * a_block];
        if g.threads > 1 {
            a_panels
                .par_chunks_mut(kc_max * MR)
                .enumerate()
                .for_each(pack_a);
        } else {
            a_panels
                .chunks_mut(kc_max * MR)
                .enumerate()
                .for_each(pack_a);
        }
        let a_panels = &*a_panels;

        let item = |it: usize| {
            let (ri, ci) = (it / g.col_parts, it % g.col_parts);
            let (ip0, ip1) = (ri * rows_per, ((ri + 1) * rows_per).min(mp));
            let (jp0, jp1) = (ci * cols_per, ((ci + 1) * cols_per).min(np));
            if ip0 >= ip1 || jp0 >= jp1 {
                return;
            }
            let mut b_vec = B_BUF.take();
            let b_pack = aligned(&mut b_vec, (jp1 - jp0) * kc_max * NR);
            for bi in phase.clone() {
                let (p0, kc) = (bi * kc_max, kc_of(bi));
                let beta_one = accumulate || bi > 0;
                let (a_len, b_len) = (kc * MR, kc * NR);
                let a_blk = &a_panels[(bi - phase0) * a_block..];
                for (jp, dst) in (jp0..jp1).zip(b_pack.chunks_mut(b_len)) {
                    let x0 = jp * NR;
                    pack::<NR>(isa, Side::B, &s, &b, x0, NR.min(n - x0), p0, kc, dst);
                }
                // Rows in chunks of MC_PANELS so the A rows in use stay in L2 while
                // every B panel of the strip passes over them.
                for ic in (ip0..ip1).step_by(MC_PANELS) {
                    let ic1 = (ic + MC_PANELS).min(ip1);
                    for (jp, b_panel) in (jp0..jp1).zip(b_pack.chunks(b_len)) {
                        let cols = NR.min(n - jp * NR);
                        for ip in ic..ic1 {
                            let rows = MR.min(m - ip * MR);
                            let a_panel = &a_blk[ip * kc_max * MR..][..a_len];
                            // SAFETY: the tile [ip*MR.., jp*NR..] lies inside C (full tiles)
                            // and belongs to this work item alone; `isa` came from detection.
                            unsafe {
                                let dst = c_ptr.get().add(ip * MR * n + jp * NR);
                                if rows == MR && cols == NR {
                                    tile(isa, kc, a_panel, b_panel, dst, n, alpha, beta_one);
                                } else {
                                    edge_tile(
                                        isa, kc, a_panel, b_panel, dst, n, rows, cols, alpha,
                                        beta_one,
                                    );
                                }
                            }
                        }
                    }
                }
            }
            B_BUF.set(b_vec);
        };
        if g.threads > 1 && items > 1 {
            (0..items).into_par_iter().for_each(item);
        } else {
            (0..items).for_each(item);
        }
    }
    A_BUF.set(a_vec);
}

/// A tile cut by the matrix edge: compute the full tile into a local buffer, then copy
/// the `rows x cols` part that exists.
///
/// # Safety
/// `dst` must be valid for a `rows x cols` tile at stride `ldc`; `isa` supported.
#[allow(clippy::too_many_arguments)]
unsafe fn edge_tile(
    isa: Isa,
    kc: usize,
    a_panel: &[f32],
    b_panel: &[f32],
    dst: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    alpha: f32,
    beta_one: bool,
) {
    let mut t = [0f32; MR * NR];
    tile(isa, kc, a_panel, b_panel, t.as_mut_ptr(), NR, 1.0, false);
    for r in 0..rows {
        for j in 0..cols {
            let d = dst.add(r * ldc + j);
            let v = alpha * t[r * NR + j];
            *d = if beta_one { *d + v } else { v };
        }
    }
}

/// `1 / (scale_a * scale_b)`, rounded once (computed in f64).
pub(crate) fn combined_scale(a: &MatRef<'_>, b: &MatRef<'_>) -> f32 {
    let s = |m: &MatRef<'_>| match m {
        MatRef::Fp8 { scale, .. } => *scale as f64,
        _ => 1.0,
    };
    (1.0 / (s(a) * s(b))) as f32
}
