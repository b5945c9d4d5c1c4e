//! The blocked, threaded driver of the bf16 matrix-unit paths (AMX, AVX512-BF16):
//! `C (+)= alpha * op(A) @ op(B)` into an f32 C, both operands bf16 or FP8 (decoded to
//! bf16 exactly while packing, see [`super::pack_bf16`]).
//!
//! Same structure as the f32 driver ([`super::driver`]): K in balanced blocks of at most
//! [`KC_MAX`] steps (each rounded up to the kernel's K alignment with zeros), A packed
//! once per K-block into panels shared by all threads, the output cut into column strips
//! (and row ranges when strips are too few) by the same [`grid_mr`], each work item
//! packing its own B strip per K-block. Panels hold bf16 bits, half the bytes of the f32
//! panels, so the same K-block keeps the same cache footprint at twice the depth.
//!
//! AMX: every work item holds a [`TileGuard`] (this thread's `ldtilecfg` ...
//! `tilerelease`), so any rayon worker that picks up an item has its tiles configured.

use super::amx::{self, TileGuard};
use super::driver::{combined_scale, grid_mr, Grid, SendPtr};
use super::pack::{E4M3Byte, E5M2Byte, Operand};
use super::pack_bf16::{pack_pairs, pack_rows, BfSrc};
use super::{dpbf16, GemmShape, MatRef, NR};
use fp8lm_fp8::cast::{self, CastCounts};
use fp8lm_fp8::Fp8Format;
use rayon::prelude::*;
use std::cell::Cell;

/// Which bf16 kernel runs the tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Unit {
    /// `tdpbf16ps` tiles, 32 x 32 blocks.
    Amx,
    /// The software model of the AMX block ([`amx::tile_amx_model`]): same panels,
    /// same driver, scalar arithmetic; for testing the AMX path on any CPU.
    #[cfg_attr(not(test), allow(dead_code))]
    AmxModel,
    /// `vdpbf16ps`, 8 x 32 tiles.
    Dp,
}

impl Unit {
    fn mr(self) -> usize {
        match self {
            Unit::Amx | Unit::AmxModel => amx::MR,
            Unit::Dp => dpbf16::MR,
        }
    }
    fn k_align(self) -> usize {
        match self {
            Unit::Amx | Unit::AmxModel => amx::KCHUNK,
            Unit::Dp => 2,
        }
    }
}

/// Largest K-block: 512 bf16 steps = a 32 KiB B panel (32 columns), as the f32 path's
/// 256-step blocks on the AVX2 kernel (L1-resident), and a 32 KiB AMX A block.
pub(crate) const KC_MAX: usize = 512;
/// Rows of C run against each B panel before the next (packed A in use stays in L2).
const MC_ROWS: usize = 192;
/// Packed A is built for as many K-blocks at once as fit in this many bf16 values.
pub(crate) const A_PACK_VALUES: usize = 1 << 23;

thread_local! {
    static A_BUF: Cell<Vec<u16>> = const { Cell::new(Vec::new()) };
    static B_BUF: Cell<Vec<u16>> = const { Cell::new(Vec::new()) };
}

/// A 64-byte aligned window of `len` values inside `v` (grown as needed).
fn aligned(v: &mut Vec<u16>, len: usize) -> &mut [u16] {
    if v.len() < len + 32 {
        *v = vec![0; len + 32];
    }
    let off = v.as_ptr().align_offset(64).min(32);
    &mut v[off..off + len]
}

#[derive(Clone, Copy)]
enum Side {
    A,
    B,
}

#[allow(clippy::too_many_arguments)]
fn pack_typed<S: BfSrc>(
    unit: Unit,
    side: Side,
    op: Operand<'_, S>,
    x0: usize,
    w: usize,
    p0: usize,
    kc: usize,
    kcp: usize,
    dst: &mut [u16],
) {
    match (side, unit) {
        (Side::B, _) => pack_pairs::<S, NR>(true, op, x0, w, p0, kc, kcp, dst),
        (Side::A, Unit::Dp) => pack_pairs::<S, { dpbf16::MR }>(true, op, x0, w, p0, kc, kcp, dst),
        (Side::A, _) => pack_rows::<S, { amx::MR }>(true, op, x0, w, p0, kc, kcp, dst),
    }
}

/// Pack panel `x0 .. x0 + w` x `p0 .. p0 + kc` (padded to `kcp`) of operand `mat`.
#[allow(clippy::too_many_arguments)]
fn pack(
    unit: Unit,
    side: Side,
    s: &GemmShape,
    mat: &MatRef<'_>,
    x0: usize,
    w: usize,
    p0: usize,
    kc: usize,
    kcp: usize,
    dst: &mut [u16],
) {
    let (ld, k_contig) = match side {
        Side::A if s.trans_a => (s.m, false),
        Side::A => (s.k, true),
        Side::B if s.trans_b => (s.k, true),
        Side::B => (s.n, false),
    };
    match *mat {
        MatRef::Bf16(data) => {
            let op = Operand { data, ld, k_contig };
            pack_typed(unit, side, op, x0, w, p0, kc, kcp, dst)
        }
        MatRef::Fp8 { data, format, .. } => match format {
            Fp8Format::E4M3 => {
                // SAFETY: E4M3Byte is repr(transparent) over u8.
                let data = unsafe { &*(data as *const [u8] as *const [E4M3Byte]) };
                let op = Operand { data, ld, k_contig };
                pack_typed(unit, side, op, x0, w, p0, kc, kcp, dst)
            }
            Fp8Format::E5M2 => {
                // SAFETY: E5M2Byte is repr(transparent) over u8.
                let data = unsafe { &*(data as *const [u8] as *const [E5M2Byte]) };
                let op = Operand { data, ld, k_contig };
                pack_typed(unit, side, op, x0, w, p0, kc, kcp, dst)
            }
        },
        MatRef::F32(_) => unreachable!("f32 operands run on the f32 FMA path"),
    }
}

/// One full `mr x NR` tile.
///
/// # Safety
/// `c` valid for the tile at stride `ldc`; `unit` runnable here (AMX: a [`TileGuard`] is
/// held on this thread).
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    unit: Unit,
    kcp: usize,
    a: *const u16,
    b: *const u16,
    c: *mut f32,
    ldc: usize,
    alpha: f32,
    beta_one: bool,
) {
    match unit {
        #[cfg(target_arch = "x86_64")]
        Unit::Amx => amx::tile_amx(kcp, a, b, c, ldc, alpha, beta_one),
        #[cfg(target_arch = "x86_64")]
        Unit::Dp => dpbf16::tile_dp(kcp, a, b, c, ldc, alpha, beta_one),
        Unit::AmxModel => amx::tile_amx_model(kcp, a, b, c, ldc, alpha, beta_one),
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("bf16 matrix units exist only on x86_64"),
    }
}

/// The work split: [`grid_mr`]'s column strips, except for tall outputs (the weight
/// gradient of the LM head, 50257 x 768): there every column strip would stream all of
/// the (large, shared) packed A from memory once more, so the items take row ranges
/// with every column instead, each reading its own part of A once and packing the
/// (small) B whole.
fn grid_lowp(m: usize, n: usize, k: usize, mr: usize, pool_threads: usize) -> Grid {
    let g = grid_mr(m, n, k, mr, pool_threads);
    let (mp, np) = (m.div_ceil(mr), n.div_ceil(NR));
    if g.threads > 1 && m >= 4 * n && np <= TALL_MAX_COL_PANELS {
        // ranges of about MC_ROWS rows, at least one and at most 16 per thread (several,
        // so rayon can rebalance when a core is busy elsewhere)
        let rows = (m / MC_ROWS).clamp(g.threads, 16 * g.threads).min(mp);
        return Grid {
            threads: g.threads,
            row_parts: rows,
            col_parts: 1,
        };
    }
    g
}

/// Widest B (in NR panels) a tall output's items pack whole: 1536 columns.
const TALL_MAX_COL_PANELS: usize = 48;

/// `c = alpha * op(A) @ op(B)`, or `c += ...`; shapes checked, operands not f32, `unit`
/// runnable on this CPU (AMX: [`amx::permission`] granted).
pub(crate) fn gemm_lowp(
    unit: Unit,
    s: GemmShape,
    a: MatRef<'_>,
    b: MatRef<'_>,
    c: &mut [f32],
    accumulate: bool,
    pool_threads: usize,
) {
    if s.m == 0 || s.n == 0 {
        return;
    }
    if s.k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    let dest = Dest::F32 {
        c: SendPtr(c.as_mut_ptr()),
        accumulate,
    };
    run(unit, s, a, b, dest, pool_threads);
}

/// Whether [`gemm_lowp_fp8_out`] can fuse the cast for this shape: the whole K fits one
/// K-block, so each tile's sum is final when the tile kernel returns.
pub(crate) fn fuses_fp8_out(s: &GemmShape) -> bool {
    s.k > 0 && s.k <= KC_MAX && s.m > 0 && s.n > 0
}

/// `out = fp8(alpha * op(A) @ op(B) * out_scale)` with the cast fused into the store:
/// each `mr x NR` tile is summed into a local f32 buffer and cast from there (the
/// casts of `fp8lm_fp8`, saturating, RNE), so the f32 result never reaches memory.
/// Returns the amax of the f32 result (before `out_scale`; NaN if it holds a NaN) and
/// the cast's counts: bit for bit what [`gemm_lowp`] into f32 followed by
/// `par_f32_to_fp8_counted` gives (the same tile products, the same `alpha` multiply,
/// the same cast). Requires [`fuses_fp8_out`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_lowp_fp8_out(
    unit: Unit,
    s: GemmShape,
    a: MatRef<'_>,
    b: MatRef<'_>,
    out: &mut [u8],
    format: Fp8Format,
    out_scale: f32,
    pool_threads: usize,
) -> (f32, CastCounts) {
    assert!(
        fuses_fp8_out(&s),
        "gemm_lowp_fp8_out: K {} needs several K-blocks",
        s.k
    );
    let dest = Dest::Fp8 {
        out: SendPtr(out.as_mut_ptr()),
        format,
        scale: out_scale,
        cast: cast::Backend::detect(),
    };
    let (bits, counts) = run(unit, s, a, b, dest, pool_threads);
    (f32::from_bits(bits), counts)
}

/// Where [`run`]'s tiles go.
#[derive(Clone, Copy)]
enum Dest {
    /// `c (+)= alpha * tile`, row stride n.
    F32 { c: SendPtr<f32>, accumulate: bool },
    /// `out = fp8(alpha * tile * scale)`, row stride n; one K-block only.
    Fp8 {
        out: SendPtr<u8>,
        format: Fp8Format,
        scale: f32,
        cast: cast::Backend,
    },
}

/// The fused FP8 store of one tile's valid `rows x cols` out of `t` (row stride NR) at
/// `dst` (row stride `ldo`); returns the masked amax bits and counts.
///
/// # Safety
/// `dst` valid for `rows` rows of `cols` bytes at stride `ldo`.
unsafe fn store_fp8(
    t: &[f32],
    rows: usize,
    cols: usize,
    dst: *mut u8,
    ldo: usize,
    (format, scale, backend): (Fp8Format, f32, cast::Backend),
) -> (u32, CastCounts) {
    let mut codes = [0u8; amx::MR * NR];
    let mut acc = (0u32, CastCounts::default());
    let mut put = |src: &[f32], dst: &mut [u8]| {
        let (a, c) = cast::f32_to_fp8_counted_with(format, backend, src, scale, dst);
        acc = (acc.0.max(a.to_bits() & 0x7FFF_FFFF), acc.1 + c);
    };
    if cols == NR {
        put(&t[..rows * NR], &mut codes[..rows * NR]);
        for r in 0..rows {
            std::ptr::copy_nonoverlapping(codes[r * NR..].as_ptr(), dst.add(r * ldo), NR);
        }
    } else {
        for r in 0..rows {
            put(
                &t[r * NR..r * NR + cols],
                std::slice::from_raw_parts_mut(dst.add(r * ldo), cols),
            );
        }
    }
    acc
}

/// The blocked loop of [`gemm_lowp`] and [`gemm_lowp_fp8_out`] (m, n, k > 0); returns
/// the FP8 store's masked amax bits and counts (zero for an f32 destination).
fn run(
    unit: Unit,
    s: GemmShape,
    a: MatRef<'_>,
    b: MatRef<'_>,
    dest: Dest,
    pool_threads: usize,
) -> (u32, CastCounts) {
    let (m, n, k) = (s.m, s.n, s.k);
    let (mr, ka) = (unit.mr(), unit.k_align());
    let alpha = combined_scale(&a, &b);
    let g = grid_lowp(m, n, k, mr, pool_threads);
    let k_blocks = k.div_ceil(KC_MAX);
    let kc_max = k.div_ceil(k_blocks);
    let kcp_max = kc_max.div_ceil(ka) * ka;
    let (mp, np) = (m.div_ceil(mr), n.div_ceil(NR));
    let rows_per = mp.div_ceil(g.row_parts);
    let cols_per = np.div_ceil(g.col_parts);
    let items = g.row_parts * g.col_parts;
    let mc_panels = (MC_ROWS / mr).max(1);

    let a_block = mp * kcp_max * mr; // values of packed A per K-block
    let blocks_per_phase = (A_PACK_VALUES / a_block).clamp(1, k_blocks);
    let mut a_vec = A_BUF.take();
    let a_pack = aligned(&mut a_vec, blocks_per_phase * a_block);
    let mut stats = (0u32, CastCounts::default());

    for phase0 in (0..k_blocks).step_by(blocks_per_phase) {
        let phase = phase0..(phase0 + blocks_per_phase).min(k_blocks);
        let kc_of = |bi: usize| kc_max.min(k - bi * kc_max);
        let kcp_of = |bi: usize| kc_of(bi).div_ceil(ka) * ka;
        let pack_a = |(pi, dst): (usize, &mut [u16])| {
            let (bi, ip) = (phase0 + pi / mp, pi % mp);
            let (x0, kc, kcp) = (ip * mr, kc_of(bi), kcp_of(bi));
            let dst = &mut dst[..kcp * mr];
            pack(
                unit,
                Side::A,
                &s,
                &a,
                x0,
                mr.min(m - x0),
                bi * kc_max,
                kc,
                kcp,
                dst,
            );
        };
        let a_panels = &mut a_pack[..phase.len() * a_block];
        if g.threads > 1 {
            a_panels
                .par_chunks_mut(kcp_max * mr)
                .enumerate()
                .for_each(pack_a);
        } else {
            a_panels
                .chunks_mut(kcp_max * mr)
                .enumerate()
                .for_each(pack_a);
        }
        let a_panels = &*a_panels;

        let item = |it: usize| {
            let mut item_stats = (0u32, CastCounts::default());
            let (ri, ci) = (it / g.col_parts, it % g.col_parts);
            let (ip0, ip1) = (ri * rows_per, ((ri + 1) * rows_per).min(mp));
            let (jp0, jp1) = (ci * cols_per, ((ci + 1) * cols_per).min(np));
            if ip0 >= ip1 || jp0 >= jp1 {
                return item_stats;
            }
            // SAFETY (AMX): the caller checked amx::permission; this thread's tiles are
            // configured for the item and released at its end.
            #[cfg(target_arch = "x86_64")]
            let _tiles = (unit == Unit::Amx).then(|| unsafe { TileGuard::new() });
            let mut b_vec = B_BUF.take();
            let b_pack = aligned(&mut b_vec, (jp1 - jp0) * kcp_max * NR);
            let mut edge = [0f32; amx::MR * NR];
            for bi in phase.clone() {
                let (p0, kc, kcp) = (bi * kc_max, kc_of(bi), kcp_of(bi));

                let (a_len, b_len) = (kcp * mr, kcp * NR);
                let a_blk = &a_panels[(bi - phase0) * a_block..];
                for (jp, dst) in (jp0..jp1).zip(b_pack.chunks_mut(b_len)) {
                    let x0 = jp * NR;
                    pack(unit, Side::B, &s, &b, x0, NR.min(n - x0), p0, kc, kcp, dst);
                }
                for ic in (ip0..ip1).step_by(mc_panels) {
                    let ic1 = (ic + mc_panels).min(ip1);
                    for (jp, b_panel) in (jp0..jp1).zip(b_pack.chunks(b_len)) {
                        let cols = NR.min(n - jp * NR);
                        for ip in ic..ic1 {
                            let rows = mr.min(m - ip * mr);
                            let a_panel = &a_blk[ip * kcp_max * mr..][..a_len];
                            let at = ip * mr * n + jp * NR;
                            let (ap, bp) = (a_panel.as_ptr(), b_panel.as_ptr());
                            // SAFETY: the tile [ip*mr.., jp*NR..] lies inside the output
                            // (full tiles) and belongs to this work item alone; edge
                            // tiles and FP8 stores go through a local buffer; the unit
                            // was checked by the caller.
                            unsafe {
                                match dest {
                                    Dest::F32 { c, accumulate } => {
                                        let beta_one = accumulate || bi > 0;
                                        let dst = c.get().add(at);
                                        if rows == mr && cols == NR {
                                            tile(unit, kcp, ap, bp, dst, n, alpha, beta_one);
                                        } else {
                                            let t = edge.as_mut_ptr();
                                            tile(unit, kcp, ap, bp, t, NR, 1.0, false);
                                            for r in 0..rows {
                                                for j in 0..cols {
                                                    let d = dst.add(r * n + j);
                                                    let v = alpha * edge[r * NR + j];
                                                    *d = if beta_one { *d + v } else { v };
                                                }
                                            }
                                        }
                                    }
                                    Dest::Fp8 {
                                        out,
                                        format,
                                        scale,
                                        cast,
                                    } => {
                                        // one K-block: this tile's sum is final; alpha
                                        // is applied by the kernel's store, as for C
                                        let t = edge.as_mut_ptr();
                                        tile(unit, kcp, ap, bp, t, NR, alpha, false);
                                        let o = (format, scale, cast);
                                        let r =
                                            store_fp8(&edge, rows, cols, out.get().add(at), n, o);
                                        item_stats = merge_stats(item_stats, r);
                                    }
                                }
                            }
                        }
                    }
                }
            }
            B_BUF.set(b_vec);
            item_stats
        };
        let phase_stats = if g.threads > 1 && items > 1 {
            (0..items)
                .into_par_iter()
                .map(item)
                .reduce(Default::default, merge_stats)
        } else {
            (0..items).map(item).fold(Default::default(), merge_stats)
        };
        stats = merge_stats(stats, phase_stats);
    }
    A_BUF.set(a_vec);
    stats
}

/// Two parts' FP8 store results: the larger masked amax bits (a NaN's bits exceed every
/// finite value's and infinity's, so NaN propagates) and the summed counts.
fn merge_stats(x: (u32, CastCounts), y: (u32, CastCounts)) -> (u32, CastCounts) {
    (x.0.max(y.0), x.1 + y.1)
}
