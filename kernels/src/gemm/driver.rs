//! The blocked, threaded CPU GEMM: `C (+)= alpha * op(A) @ op(B)` into an f32 C.
//!
//! Blocking (Goto/BLIS style, sizes for a core with 48 KiB L1 and 2 MiB L2):
//! - K is cut into blocks of at most [`KC`] steps (balanced: 768 -> 3 x 256).
//! - Per K-block, all of A is packed once into `[m/MR][kc][MR]` panels (in parallel,
//!   shared by all threads; `m * kc * 4` bytes, 1 MiB at m = 1024 -> L2).
//! - The output is split into a grid of work items: column strips of at most
//!   [`STRIP`] columns (B strip packed by the thread that owns it, `kc * 768 * 4` =
//!   768 KiB -> L2), and row ranges only when there are too few strips to feed every
//!   thread. The strip count is a multiple of the thread count so threads finish together.
//! - Inside an item: for each B panel (32 KiB, stays in L1), run the kernel against
//!   every A panel of the item's rows.
//!
//! Threading is rayon (the global pool); products under [`SERIAL_FLOPS`] run on the
//! calling thread, where fork/join would cost more than the work.

use super::kernel::tile;
use super::pack::{pack_panel, E4M3Byte, E5M2Byte, Operand};
use super::{GemmShape, Isa, MatRef, MR, NR};
use fp8lm_fp8::Fp8Format;
use rayon::prelude::*;
use std::cell::Cell;

/// Largest K-block.
pub(crate) const KC: usize = 256;
/// Widest column strip of one work item.
const STRIP: usize = 768;
/// Below this many flops (2mnk) a GEMM runs single-threaded.
const SERIAL_FLOPS: usize = 1 << 21;

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

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: work items write disjoint tiles of C; the pointer outlives the parallel loop.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// How the output is divided among threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Grid {
    pub threads: usize,
    /// Row ranges (in MR panels) and column strips (in NR panels).
    pub row_parts: usize,
    pub col_parts: usize,
}

pub(crate) fn grid(m: usize, n: usize, k: usize, pool_threads: usize) -> Grid {
    let flops = 2usize.saturating_mul(m).saturating_mul(n).saturating_mul(k);
    let t = if flops < SERIAL_FLOPS {
        1
    } else {
        pool_threads.max(1)
    };
    let (mp, np) = (m.div_ceil(MR), n.div_ceil(NR));
    let cols = n.div_ceil(STRIP).next_multiple_of(t).min(np).max(1);
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
    let k_blocks = k.div_ceil(KC);
    let kc_max = k.div_ceil(k_blocks);
    let (mp, np) = (m.div_ceil(MR), n.div_ceil(NR));
    let rows_per = mp.div_ceil(g.row_parts);
    let cols_per = np.div_ceil(g.col_parts);
    let items = g.row_parts * g.col_parts;

    let mut a_vec = A_BUF.take();
    let a_pack = aligned(&mut a_vec, mp * kc_max * MR);
    let c_ptr = SendPtr(c.as_mut_ptr());

    let mut p0 = 0;
    while p0 < k {
        let kc = kc_max.min(k - p0);
        let beta_one = accumulate || p0 > 0;
        let a_len = kc * MR;
        let pack_a = |(ip, dst): (usize, &mut [f32])| {
            let x0 = ip * MR;
            pack::<MR>(isa, Side::A, &s, &a, x0, MR.min(m - x0), p0, kc, dst);
        };
        let a_panels = &mut a_pack[..mp * a_len];
        if g.threads > 1 {
            a_panels.par_chunks_mut(a_len).enumerate().for_each(pack_a);
        } else {
            a_panels.chunks_mut(a_len).enumerate().for_each(pack_a);
        }
        let a_panels = &*a_panels;

        let item = |it: usize| {
            let (ri, ci) = (it / g.col_parts, it % g.col_parts);
            let (ip0, ip1) = (ri * rows_per, ((ri + 1) * rows_per).min(mp));
            let (jp0, jp1) = (ci * cols_per, ((ci + 1) * cols_per).min(np));
            if ip0 >= ip1 || jp0 >= jp1 {
                return;
            }
            let b_len = kc * NR;
            let mut b_vec = B_BUF.take();
            let b_pack = aligned(&mut b_vec, (jp1 - jp0) * b_len);
            for (jp, dst) in (jp0..jp1).zip(b_pack.chunks_mut(b_len)) {
                let x0 = jp * NR;
                pack::<NR>(isa, Side::B, &s, &b, x0, NR.min(n - x0), p0, kc, dst);
            }
            let c_ptr = c_ptr;
            for (jp, b_panel) in (jp0..jp1).zip(b_pack.chunks(b_len)) {
                let cols = NR.min(n - jp * NR);
                for ip in ip0..ip1 {
                    let rows = MR.min(m - ip * MR);
                    let a_panel = &a_panels[ip * a_len..(ip + 1) * a_len];
                    // SAFETY: the tile [ip*MR.., jp*NR..] lies inside C (full tiles) and
                    // belongs to this work item alone; `isa` came from detection.
                    unsafe {
                        let dst = c_ptr.0.add(ip * MR * n + jp * NR);
                        if rows == MR && cols == NR {
                            tile(isa, kc, a_panel, b_panel, dst, n, alpha, beta_one);
                        } else {
                            let mut t = [0f32; MR * NR];
                            tile(isa, kc, a_panel, b_panel, t.as_mut_ptr(), NR, 1.0, false);
                            for r in 0..rows {
                                for j in 0..cols {
                                    let d = dst.add(r * n + j);
                                    let v = alpha * t[r * NR + j];
                                    *d = if beta_one { *d + v } else { v };
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
        p0 += kc;
    }
    A_BUF.set(a_vec);
}

/// `1 / (scale_a * scale_b)`, rounded once (computed in f64).
pub(crate) fn combined_scale(a: &MatRef<'_>, b: &MatRef<'_>) -> f32 {
    let s = |m: &MatRef<'_>| match m {
        MatRef::Fp8 { scale, .. } => *scale as f64,
        _ => 1.0,
    };
    (1.0 / (s(a) * s(b))) as f32
}
