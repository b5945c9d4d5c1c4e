//! The fused pass for the FP8-LM formats in one loop (x86-64 AVX2 + F16C, or AVX-512).
//!
//! Master f16, first moment E4M3, second moment f16, gradient FP8: each block of eight
//! (AVX2) or sixteen (AVX-512, `fused512.rs`) elements is decoded, updated and encoded
//! in registers, so the chunk is read and written once and no f32 scratch row is stored
//! and re-read. It encodes with the provisional scales *before* it knows the chunk's
//! amax, so it keeps a copy of the chunk's old state (5 bytes per element, L1-resident;
//! the AVX-512 body stores it from the registers it loaded, the AVX2 one copies first)
//! and restores it when the chunk must be deferred. Every operation is the generic path's,
//! in the same order, without FMA contraction; a test checks all three bit for bit.
//!
//! The instruction set is picked at run time ([`Isa::detect`]): AVX-512 halves the
//! instruction count (16 lanes, mask registers instead of blends, `vpmovdb` instead of
//! two packs; measured on an L1-resident chunk, one thread: 0.63 against 1.30 ns per
//! element, thread CPU time), which brings the compute per element under the time its
//! ~19 bytes of memory traffic take, as the fp32 AdamW's 28 bytes already were.

use super::kernel::{ChunkOut, StepConsts};
use super::CHUNK;
use fp8lm_fp8::Fp8Format;
use std::arch::x86_64::*;
use std::cell::RefCell;

/// Vector instruction set of the fused loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Isa {
    /// AVX2 + F16C, 8 lanes.
    Avx2,
    /// AVX-512 F/BW/VL (+ F16C), 16 lanes.
    Avx512,
}

impl Isa {
    /// The widest fused loop this CPU runs, or None (then the generic path runs).
    pub(super) fn detect() -> Option<Isa> {
        if Isa::Avx512.supported() {
            Some(Isa::Avx512)
        } else if Isa::Avx2.supported() {
            Some(Isa::Avx2)
        } else {
            None
        }
    }
    pub(super) fn supported(self) -> bool {
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c");
        match self {
            Isa::Avx2 => avx2,
            Isa::Avx512 => {
                avx2 && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
            }
        }
    }
}

/// The per-chunk scalars of the loop body, as the generic kernel forms them.
pub(super) struct Consts {
    pub(super) b1: f32,
    pub(super) b2: f32,
    pub(super) omb1: f32,
    pub(super) omb2: f32,
    pub(super) ibc1: f32,
    pub(super) ibc2: f32,
    pub(super) eps: f32,
    pub(super) lr: f32,
    pub(super) wd: f32,
    /// Gradient: 1/scale, grad_scale.
    pub(super) ginv: f32,
    pub(super) gsc: f32,
    /// 1/old scale of master, exp_avg, exp_avg_sq.
    pub(super) iw: f32,
    pub(super) im: f32,
    pub(super) iv: f32,
    /// New (provisional) scales, and 1/ the master's.
    pub(super) sw: f32,
    pub(super) sm: f32,
    pub(super) sv: f32,
    pub(super) inv_sw: f32,
}

/// Streams of one chunk: master f16 bits, exp_avg E4M3 codes, exp_avg_sq f16 bits,
/// compute weights, gradient codes; all of one length.
pub(super) struct Streams<'a> {
    pub(super) w: &'a mut [u16],
    pub(super) m: &'a mut [u8],
    pub(super) v: &'a mut [u16],
    pub(super) p: &'a mut [f32],
    pub(super) g: &'a [u8],
    pub(super) gf: Fp8Format,
}

/// Eight f32 (already scaled) to eight E4M3 codes in i32 lanes: `Fp8Format::encode(x,
/// true)` (round to nearest even, saturate, NaN -> S.1111.111), as `lanes::Fp8Lane`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn encode_e4m3(y: __m256) -> __m256i {
    const MBITS: i32 = 3;
    const BIAS: u32 = 7;
    let s = |x: u32| _mm256_set1_epi32(x as i32);
    let b = _mm256_castps_si256(y);
    let sign = _mm256_and_si256(_mm256_srli_epi32::<24>(b), s(0x80));
    let a = _mm256_and_si256(b, s(0x7FFF_FFFF));
    let odd = _mm256_and_si256(_mm256_srli_epi32::<{ 23 - MBITS }>(a), s(1));
    let rebias = BIAS.wrapping_sub(127) << 23;
    let bias = rebias.wrapping_add((1 << (23 - MBITS - 1)) - 1);
    let norm =
        _mm256_srli_epi32::<{ 23 - MBITS }>(_mm256_add_epi32(_mm256_add_epi32(a, s(bias)), odd));
    let qexp = 1i32 - BIAS as i32 - MBITS;
    let magic = ((127 + qexp + 23) as u32) << 23;
    let sub = _mm256_sub_epi32(
        _mm256_castps_si256(_mm256_add_ps(
            _mm256_castsi256_ps(a),
            _mm256_castsi256_ps(s(magic)),
        )),
        s(magic),
    );
    let min_normal = (127 + 1 - BIAS) << 23;
    let is_sub = _mm256_cmpgt_epi32(s(min_normal), a);
    let mut o = _mm256_blendv_epi8(norm, sub, is_sub);
    let max_bits = Fp8Format::E4M3.max_bits() as u32;
    let sat = _mm256_or_si256(
        _mm256_cmpgt_epi32(a, s(0x7F7F_FFFF)),
        _mm256_cmpgt_epi32(o, s(max_bits)),
    );
    o = _mm256_blendv_epi8(o, s(max_bits), sat);
    let nan = _mm256_cmpgt_epi32(a, s(0x7F80_0000));
    o = _mm256_blendv_epi8(o, s(Fp8Format::E4M3.nan_bits() as u32), nan);
    _mm256_or_si256(o, sign)
}

/// Eight FP8 codes to f32 (exact; NaN codes give NaN), times `a`.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn decode_fp8(fmt: Fp8Format, src: *const u8, a: __m256) -> __m256 {
    let w = _mm_cvtepu8_epi16(_mm_loadl_epi64(src as *const __m128i));
    let x = match fmt {
        Fp8Format::E5M2 => _mm256_cvtph_ps(_mm_slli_epi16::<8>(w)),
        Fp8Format::E4M3 => {
            let mag_mask = _mm_set1_epi16(0x7F);
            let mag = _mm_and_si128(w, mag_mask);
            let sign = _mm_slli_epi16::<8>(_mm_andnot_si128(mag_mask, w));
            let h = _mm_slli_epi16::<7>(mag);
            let h = _mm_blendv_epi8(h, _mm_set1_epi16(0x7E00), _mm_cmpeq_epi16(mag, mag_mask));
            _mm256_mul_ps(
                _mm256_cvtph_ps(_mm_or_si128(h, sign)),
                _mm256_set1_ps(256.0),
            )
        }
    };
    _mm256_mul_ps(x, a)
}

/// One chunk, default formats, on instruction set `isa` (which the caller checked with
/// [`Isa::supported`]). `g`: FP8 gradient codes with (1/scale, grad_scale).
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn update_chunk(
    isa: Isa,
    w: &mut [u16],
    m: &mut [u8],
    v: &mut [u16],
    p: &mut [f32],
    g: (&[u8], Fp8Format, f32, f32),
    k: &StepConsts,
    old_scale: [f32; 3],
    scale: [f32; 3],
    limits: Option<[f32; 3]>,
) -> ChunkOut {
    let n = p.len();
    assert!(n <= CHUNK && w.len() == n && m.len() == n && v.len() == n && g.0.len() == n);
    // Backup of the old state, restored if the chunk is deferred (per thread: a fresh
    // zeroed stack array per chunk would cost a memset).
    thread_local! {
        static BACKUP: RefCell<(Vec<u16>, Vec<u8>, Vec<u16>)> =
            RefCell::new((vec![0; CHUNK], vec![0; CHUNK], vec![0; CHUNK]));
    }
    BACKUP.with(|cell| {
        let mut b = cell.borrow_mut();
        let (bw, bm, bv) = &mut *b;
        let bk = (&mut bw[..n], &mut bm[..n], &mut bv[..n]);
        update_chunk_with(isa, w, m, v, p, g, k, old_scale, scale, limits, bk)
    })
}

/// [`update_chunk`] with the backup rows `bk` (this chunk's length).
#[allow(clippy::too_many_arguments)]
unsafe fn update_chunk_with(
    isa: Isa,
    w: &mut [u16],
    m: &mut [u8],
    v: &mut [u16],
    p: &mut [f32],
    g: (&[u8], Fp8Format, f32, f32),
    k: &StepConsts,
    old_scale: [f32; 3],
    scale: [f32; 3],
    limits: Option<[f32; 3]>,
    bk: (&mut [u16], &mut [u8], &mut [u16]),
) -> ChunkOut {
    let n = p.len();
    let c = Consts {
        b1: k.b1,
        b2: k.b2,
        omb1: k.one_minus_b1,
        omb2: k.one_minus_b2,
        ibc1: k.inv_bc1,
        ibc2: k.inv_bc2,
        eps: k.eps,
        lr: k.lr,
        wd: k.wd,
        ginv: g.2,
        gsc: g.3,
        iw: 1.0 / old_scale[0],
        im: 1.0 / old_scale[1],
        iv: 1.0 / old_scale[2],
        sw: scale[0],
        sm: scale[1],
        sv: scale[2],
        inv_sw: 1.0 / scale[0],
    };
    let mut st = Streams {
        w,
        m,
        v,
        p,
        g: g.0,
        gf: g.1,
    };
    let backup = limits.is_some();
    let wide = isa == Isa::Avx512 && super::fused512::exact_for(&c, g.1);
    // SAFETY: the caller checked that the CPU supports `isa`.
    let (done, [mut aw, mut am, mut av, mut ar]) = if wide {
        // Backs up the old state block by block as it loads it.
        super::fused512::body(
            &mut st,
            &c,
            backup.then_some((&mut *bk.0, &mut *bk.1, &mut *bk.2)),
        )
    } else {
        if backup {
            bk.0.copy_from_slice(st.w);
            bk.1.copy_from_slice(st.m);
            bk.2.copy_from_slice(st.v);
        }
        body_avx2(&mut st, &c)
    };
    let Streams { w, m, v, p, .. } = st;
    if backup && wide {
        bk.0[done..].copy_from_slice(&w[done..]);
        bk.1[done..].copy_from_slice(&m[done..]);
        bk.2[done..].copy_from_slice(&v[done..]);
    }
    // Scalar tail: the generic kernel's expressions, element by element.
    let e4m3 = crate::lanes::fp8_lane(Fp8Format::E4M3);
    let gl = crate::lanes::fp8_lane(g.1);
    for i in done..n {
        let gx = gl.decode(g.0[i]) * g.2 * g.3;
        let wx = half::f16::from_bits(w[i]).to_f32() * (1.0 / old_scale[0]);
        let mx = e4m3.decode(m[i]) * (1.0 / old_scale[1]);
        let vx = half::f16::from_bits(v[i]).to_f32() * (1.0 / old_scale[2]);
        let mn = k.b1 * mx + k.one_minus_b1 * gx;
        let vn = k.b2 * vx + k.one_minus_b2 * gx * gx;
        let u = (mn * k.inv_bc1) / ((vn * k.inv_bc2).sqrt() + k.eps);
        let wn = wx - k.lr * (u + k.wd * wx);
        aw = aw.max(wn.to_bits() & 0x7FFF_FFFF);
        am = am.max(mn.to_bits() & 0x7FFF_FFFF);
        av = av.max(vn.to_bits() & 0x7FFF_FFFF);
        ar = ar.max(u.to_bits() & 0x7FFF_FFFF);
        let wh = half::f16::from_f32(wn * scale[0]);
        w[i] = wh.to_bits();
        p[i] = wh.to_f32() * (1.0 / scale[0]);
        v[i] = half::f16::from_f32(vn * scale[2]).to_bits();
        m[i] = e4m3.encode(mn * scale[1]);
    }
    let nan = aw.max(am).max(av) > 0x7F80_0000;
    let amax = [f32::from_bits(aw), f32::from_bits(am), f32::from_bits(av)];
    let mut out = ChunkOut {
        amax,
        saw_nan: nan,
        ratio: f32::from_bits(ar),
        deferred: false,
    };
    if let Some(lim) = limits {
        let defer = (0..3).any(|s| amax[s] * scale[s] > lim[s]);
        // The wide body's E4M3 encode relies on the deferral check instead of saturating,
        // which a NaN in the chunk defeats (NaN amax, no deferral): redo such a chunk.
        if defer || (wide && nan) {
            // p is rewritten by the deferred chunk's recompute.
            w.copy_from_slice(bk.0);
            m.copy_from_slice(bk.1);
            v.copy_from_slice(bk.2);
            if !defer {
                return update_chunk_with(
                    Isa::Avx2,
                    w,
                    m,
                    v,
                    p,
                    g,
                    k,
                    old_scale,
                    scale,
                    limits,
                    bk,
                );
            }
            out.deferred = true;
        }
    }
    out
}

/// The AVX2 loop over whole blocks of 8: returns the elements done and the amax bits of
/// (master, exp_avg, exp_avg_sq, update).
#[target_feature(enable = "avx2,f16c")]
unsafe fn body_avx2(st: &mut Streams, c: &Consts) -> (usize, [u32; 4]) {
    let Streams { w, m, v, p, g, gf } = st;
    let set = _mm256_set1_ps;
    let (b1, b2, omb1, omb2) = (set(c.b1), set(c.b2), set(c.omb1), set(c.omb2));
    let (ibc1, ibc2, eps, lr, wd) = (set(c.ibc1), set(c.ibc2), set(c.eps), set(c.lr), set(c.wd));
    let (ginv, gsc) = (set(c.ginv), set(c.gsc));
    let (iw, im, iv) = (set(c.iw), set(c.im), set(c.iv));
    let (sw, sm, sv) = (set(c.sw), set(c.sm), set(c.sv));
    let inv_sw = set(c.inv_sw);
    let abs = _mm256_set1_epi32(0x7FFF_FFFF);
    let (mut aw, mut am, mut av, mut ar) = (
        _mm256_setzero_si256(),
        _mm256_setzero_si256(),
        _mm256_setzero_si256(),
        _mm256_setzero_si256(),
    );
    let amax = |acc: __m256i, x: __m256| -> __m256i {
        _mm256_max_epu32(acc, _mm256_and_si256(_mm256_castps_si256(x), abs))
    };
    let n8 = p.len() / 8;
    let nxt = next_chunk(w, m, v, p, g);
    for i in 0..n8 {
        let o = 8 * i;
        if i % 8 == 0 {
            prefetch_next(&nxt, o);
        }
        let gx = _mm256_mul_ps(decode_fp8(*gf, g.as_ptr().add(o), ginv), gsc);
        let wx = _mm256_mul_ps(
            _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(o) as *const __m128i)),
            iw,
        );
        let mx = decode_fp8(Fp8Format::E4M3, m.as_ptr().add(o), im);
        let vx = _mm256_mul_ps(
            _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(o) as *const __m128i)),
            iv,
        );
        let mn = _mm256_add_ps(_mm256_mul_ps(b1, mx), _mm256_mul_ps(omb1, gx));
        let vn = _mm256_add_ps(
            _mm256_mul_ps(b2, vx),
            _mm256_mul_ps(_mm256_mul_ps(omb2, gx), gx),
        );
        let u = _mm256_div_ps(
            _mm256_mul_ps(mn, ibc1),
            _mm256_add_ps(_mm256_sqrt_ps(_mm256_mul_ps(vn, ibc2)), eps),
        );
        let wn = _mm256_sub_ps(
            wx,
            _mm256_mul_ps(lr, _mm256_add_ps(u, _mm256_mul_ps(wd, wx))),
        );
        aw = amax(aw, wn);
        am = amax(am, mn);
        av = amax(av, vn);
        ar = amax(ar, u);
        let wh = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_mul_ps(wn, sw));
        _mm_storeu_si128(w.as_mut_ptr().add(o) as *mut __m128i, wh);
        _mm256_storeu_ps(
            p.as_mut_ptr().add(o),
            _mm256_mul_ps(_mm256_cvtph_ps(wh), inv_sw),
        );
        let vh = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_mul_ps(vn, sv));
        _mm_storeu_si128(v.as_mut_ptr().add(o) as *mut __m128i, vh);
        let mc = encode_e4m3(_mm256_mul_ps(mn, sm));
        let lo = _mm256_castsi256_si128(mc);
        let hi = _mm256_extracti128_si256::<1>(mc);
        let b16 = _mm_packus_epi32(lo, hi);
        _mm_storel_epi64(
            m.as_mut_ptr().add(o) as *mut __m128i,
            _mm_packus_epi16(b16, b16),
        );
    }
    let hmax = |acc: __m256i| -> u32 {
        let mut l = [0u32; 8];
        _mm256_storeu_si256(l.as_mut_ptr() as *mut __m256i, acc);
        l.into_iter().max().unwrap_or(0)
    };
    (8 * n8, [hmax(aw), hmax(am), hmax(av), hmax(ar)])
}

/// (end address, bytes per element) of g, w, m, v, p: the next chunk starts there.
pub(super) type NextChunk = [(*const u8, usize); 5];

pub(super) fn next_chunk(w: &[u16], m: &[u8], v: &[u16], p: &[f32], g: &[u8]) -> NextChunk {
    [
        (g.as_ptr_range().end, 1),
        (w.as_ptr_range().end as *const u8, 2),
        (m.as_ptr_range().end, 1),
        (v.as_ptr_range().end as *const u8, 2),
        (p.as_ptr_range().end as *const u8, 4),
    ]
}

/// Prefetch elements [o, o + 64) of the next chunk (just past this one's slices, which
/// this thread most likely takes next): g 1 line, w 2, m 1, v 2, p 4.
#[inline(always)]
pub(super) unsafe fn prefetch_next(nxt: &[(*const u8, usize)], o: usize) {
    for &(base, size) in nxt {
        let mut off = 0;
        while off < 64 * size {
            // A prefetch is a hint: it never faults, whatever the address.
            _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(o * size + off) as *const i8);
            off += 64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::kernel::update_chunk_impl;
    use super::super::state::{ChunkMut, GradChunk};
    use super::*;

    fn xorshift(s: &mut u64) -> u64 {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s
    }

    /// The fused kernel on every instruction set this CPU has against the generic one
    /// (decode rows, f32 loop, bulk encodes), bit for bit: stored states, compute
    /// weights, amaxes, deferral.
    #[test]
    fn fused_matches_generic_bit_for_bit() {
        let mut checked = Vec::new();
        for isa in [Isa::Avx2, Isa::Avx512] {
            if isa.supported() {
                fused_matches_generic(isa);
                checked.push(isa);
            } else {
                eprintln!("!!! fused kernel {isa:?} NOT CHECKED: this CPU lacks it !!!");
            }
        }
        eprintln!("fused kernel checked bit for bit on {checked:?}");
    }

    fn fused_matches_generic(isa: Isa) {
        let mut s = 0x0DDB_1A5E_5BAD_5EEDu64;
        let mut deferred_seen = 0;
        let mut nan_seen = 0;
        for case in 0..36 {
            // Lengths: full chunk, odd tails.
            let n = [CHUNK, 2047, 13, 1000][case % 4];
            let gf = [Fp8Format::E5M2, Fp8Format::E4M3][case / 4 % 2];
            let rnd = |s: &mut u64| (xorshift(s) >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            let w0: Vec<u16> = (0..n)
                .map(|_| half::f16::from_f32(rnd(&mut s) * 6e4).to_bits())
                .collect();
            // Moments: random non-NaN E4M3 codes, f16 of non-negative values incl.
            // subnormals; gradients: random non-NaN codes incl. subnormals and zero.
            let m0: Vec<u8> = (0..n).map(|_| (xorshift(&mut s) as u8) & 0xFE).collect();
            let v0: Vec<u16> = (0..n).map(|_| (xorshift(&mut s) as u16) & 0x7BFF).collect();
            let mut g: Vec<u8> = (0..n)
                .map(|_| (xorshift(&mut s) as u8) & 0xFB)
                .map(|b| if b & 0x7C == 0x7C { b & 0xF3 } else { b })
                .collect();
            // Some chunks with a NaN gradient (0x7F is NaN in both formats).
            if case % 6 == 5 {
                g[n / 2] = 0x7F;
            }
            let k = StepConsts {
                b1: 0.9,
                b2: 0.95,
                one_minus_b1: 1.0 - 0.9,
                one_minus_b2: 1.0 - 0.95,
                inv_bc1: 1.0 / (1.0 - 0.9f32.powi(1 + case as i32)),
                inv_bc2: 1.0 / (1.0 - 0.95f32.powi(1 + case as i32)),
                eps: 1e-8,
                lr: [1e-3, 0.3][case % 2],
                wd: [0.0, 0.1][case / 2 % 2],
            };
            // A tiny exp_avg scale makes 2^8 / scale overflow: the AVX-512 path must
            // then fall back to multiplying twice.
            let old_m = if case % 9 == 7 { -121 } else { -6 };
            let old = [2f32.powi(-2), 2f32.powi(old_m), 2f32.powi(10)];
            // Provisional scales: as old, or too large so chunks must be deferred.
            let prov = if case % 3 == 0 {
                [old[0], old[1] * 2f32.powi(20), old[2]]
            } else {
                old
            };
            let lim = Some([65504.0, 448.0, 65504.0]);
            let gi = 2f32.powi(-3);
            let gs = [1.0, 0.5][case / 8 % 2];
            for limits in [lim, None] {
                // Compute weights at every 4-byte offset from a 64-byte boundary.
                let mut p_buf = vec![0f32; n + 16];
                let off = case % 16;
                let (mut wa, mut ma, mut va, pa) =
                    (w0.clone(), m0.clone(), v0.clone(), &mut p_buf[off..off + n]);
                let oa = unsafe {
                    update_chunk(
                        isa,
                        &mut wa,
                        &mut ma,
                        &mut va,
                        pa,
                        (&g, gf, gi, gs),
                        &k,
                        old,
                        prov,
                        limits,
                    )
                };
                let (mut wb, mut mb, mut vb, mut pb) =
                    (w0.clone(), m0.clone(), v0.clone(), vec![0f32; n]);
                let mut scratch = vec![0f32; 4 * CHUNK];
                let ob = update_chunk_impl(
                    &mut ChunkMut::F16(&mut wb),
                    &mut ChunkMut::Fp8(&mut mb, Fp8Format::E4M3),
                    &mut ChunkMut::F16(&mut vb),
                    &mut pb,
                    GradChunk::Fp8(&g, gf, gi, gs),
                    &k,
                    old,
                    prov,
                    limits,
                    &mut scratch,
                );
                nan_seen += oa.saw_nan as usize;
                assert_eq!(oa.deferred, ob.deferred, "case {case}");
                assert_eq!(oa.saw_nan, ob.saw_nan, "case {case}");
                let bits = |a: [f32; 3]| a.map(f32::to_bits);
                assert_eq!(bits(oa.amax), bits(ob.amax), "case {case}");
                assert_eq!(oa.ratio.to_bits(), ob.ratio.to_bits(), "case {case}");
                assert_eq!(wa, wb, "master, case {case}");
                assert_eq!(ma, mb, "exp_avg, case {case}");
                assert_eq!(va, vb, "exp_avg_sq, case {case}");
                if oa.deferred {
                    deferred_seen += 1;
                    assert_eq!(wa, w0, "a deferred chunk keeps its old state");
                } else {
                    let pa: Vec<u32> = pa.iter().map(|x| x.to_bits()).collect();
                    let pb: Vec<u32> = pb.iter().map(|x| x.to_bits()).collect();
                    assert_eq!(pa, pb, "compute weights, case {case}");
                }
            }
        }
        assert!(deferred_seen > 0, "no case exercised the deferral");
        assert!(nan_seen > 0, "no case exercised a NaN");
    }
}
