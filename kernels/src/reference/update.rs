//! The reference optimizer updates ([`UpdateOps`] for [`Reference`]): one element at a
//! time, in index order, with the `fp8` crate's scalar decode / encode
//! (`Fp8Format::decode`, `Fp8Format::encode`) and `half`'s scalar f16 conversions; none
//! of the host update's code (no lanes, tables, bulk casts or SIMD).
//!
//! The update rule is defined in f32 (the expressions [`UpdateOps`] documents, in that
//! order, no FMA), so this evaluates exactly those expressions in f32: the results
//! must equal the host kernels bit for bit, not to within a tolerance, and
//! `kernels/tests/update.rs` asserts that.

use super::Reference;
use crate::backend::Backend;
use fp8lm_fp8::cast::CastCounts;
use fp8lm_fp8::merge_amax;
use fp8lm_fp8::Fp8Format;
use fp8lm_optim::update::{
    AdamWGrad, ChunkMut, ChunkOut, Fp8AdamChunk, GradChunk, StepConsts, UpdateOps,
};
use half::f16;
use std::sync::atomic::{AtomicU64, Ordering};

/// Chunk updates this process ran on [`Reference`] (both optimizers), so a test can
/// tell that a step on `backend = "reference"` ran the reference update.
static UPDATE_CALLS: AtomicU64 = AtomicU64::new(0);

/// How many chunk updates ([`UpdateOps::adamw_chunk`], [`UpdateOps::fp8_adam_chunk`])
/// ran on [`Reference`] in this process so far.
pub fn update_calls() -> u64 {
    UPDATE_CALLS.load(Ordering::Relaxed)
}

/// One element of the AdamW rule: new (m, v, u, w).
fn adam(k: &StepConsts, g: f32, m: f32, v: f32, w: f32) -> (f32, f32, f32, f32) {
    let m = k.b1 * m + k.one_minus_b1 * g;
    let v = k.b2 * v + k.one_minus_b2 * g * g;
    let u = (m * k.inv_bc1) / ((v * k.inv_bc2).sqrt() + k.eps);
    let w = w - k.lr * (u + k.wd * w);
    (m, v, u, w)
}

/// Stored element `i` of a state chunk, times `inv_scale` (f32 states are unscaled).
fn decode(c: &ChunkMut, i: usize, inv_scale: f32) -> f32 {
    match c {
        ChunkMut::F32(s) => s[i],
        ChunkMut::F16(s) => f16::from_bits(s[i]).to_f32() * inv_scale,
        ChunkMut::Fp8(s, f) => f.decode(s[i]) * inv_scale,
    }
}

/// Store `x * scale` at element `i` (FP8: RNE, infinities saturate too, as
/// `Fp8Format::encode(x, true)`); returns the stored value's f32 view, `stored / scale`.
fn encode(c: &mut ChunkMut, i: usize, x: f32, scale: f32) -> f32 {
    match c {
        ChunkMut::F32(s) => {
            s[i] = x;
            x
        }
        ChunkMut::F16(s) => {
            let h = f16::from_f32(x * scale);
            s[i] = h.to_bits();
            h.to_f32() * (1.0 / scale)
        }
        ChunkMut::Fp8(s, f) => {
            s[i] = f.encode(x * scale, true);
            f.decode(s[i]) * (1.0 / scale)
        }
    }
}

fn len(c: &ChunkMut) -> usize {
    match c {
        ChunkMut::F32(s) => s.len(),
        ChunkMut::F16(s) => s.len(),
        ChunkMut::Fp8(s, _) => s.len(),
    }
}

/// Gradient element `i` as the update sees it: `(value / scale) * grad_scale`, the
/// division by a power-of-two scale done as the multiply by its exact inverse.
fn grad(g: &GradChunk, i: usize) -> f32 {
    match *g {
        GradChunk::F32(g, f) => g[i] * f,
        GradChunk::Fp8(g, fmt, inv_scale, f) => fmt.decode(g[i]) * inv_scale * f,
    }
}

fn grad_len(g: &GradChunk) -> usize {
    match g {
        GradChunk::F32(g, _) => g.len(),
        GradChunk::Fp8(g, ..) => g.len(),
    }
}

impl UpdateOps for Reference {
    fn update_name(&self) -> &'static str {
        "reference"
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
        UPDATE_CALLS.fetch_add(1, Ordering::Relaxed);
        let n = p.len();
        assert!(
            m.len() == n && v.len() == n && g.len() == n,
            "adamw_chunk: lengths differ"
        );
        for i in 0..n {
            let gi = match g {
                AdamWGrad::F32(g) => g[i],
                AdamWGrad::Fp8 {
                    codes,
                    format,
                    scale,
                } => format.decode(codes[i]) / scale,
            } * grad_scale;
            let (mi, vi, _, wi) = adam(k, gi, m[i], v[i], p[i]);
            (m[i], v[i], p[i]) = (mi, vi, wi);
        }
    }

    fn fp8_adam_chunk(&self, c: Fp8AdamChunk<'_, '_>) -> ChunkOut {
        UPDATE_CALLS.fetch_add(1, Ordering::Relaxed);
        let Fp8AdamChunk {
            w,
            m,
            v,
            p,
            g,
            k,
            old_scale,
            scale,
            limits,
        } = c;
        let n = p.len();
        assert!(
            len(w) == n && len(m) == n && len(v) == n && grad_len(&g) == n,
            "fp8_adam_chunk: lengths differ"
        );
        let inv_old = old_scale.map(|s| 1.0 / s);
        // First pass: the new values and their amaxes only (nothing is written until
        // the deferral check has seen the whole chunk's amax).
        let mut out = ChunkOut::default();
        for i in 0..n {
            let (mi, vi, u, wi) = adam(
                k,
                grad(&g, i),
                decode(m, i, inv_old[1]),
                decode(v, i, inv_old[2]),
                decode(w, i, inv_old[0]),
            );
            for (s, x) in [wi, mi, vi].into_iter().enumerate() {
                out.amax[s] = merge_amax(out.amax[s], x.abs());
            }
            out.ratio = merge_amax(out.ratio, u.abs());
        }
        out.saw_nan = out.amax.iter().any(|a| a.is_nan());
        if let Some(lim) = limits {
            if (0..3).any(|s| out.amax[s] * scale[s] > lim[s]) {
                out.deferred = true;
                return out;
            }
        }
        // Second pass: the same values again (pure functions of the unchanged inputs),
        // stored.
        for (i, pi) in p.iter_mut().enumerate() {
            let (mi, vi, _, wi) = adam(
                k,
                grad(&g, i),
                decode(m, i, inv_old[1]),
                decode(v, i, inv_old[2]),
                decode(w, i, inv_old[0]),
            );
            *pi = encode(w, i, wi, scale[0]);
            encode(m, i, mi, scale[1]);
            encode(v, i, vi, scale[2]);
        }
        out
    }

    fn rescale_state(&self, c: &mut ChunkMut<'_>, factor: f32) {
        for i in 0..len(c) {
            let x = decode(c, i, factor);
            encode(c, i, x, 1.0);
        }
    }

    fn decode_state(&self, c: &ChunkMut<'_>, inv_scale: f32, dst: &mut [f32]) {
        assert_eq!(len(c), dst.len(), "decode_state: lengths differ");
        for (i, d) in dst.iter_mut().enumerate() {
            *d = decode(c, i, inv_scale);
        }
    }

    fn cast_weights_fp8(
        &self,
        format: Fp8Format,
        view: &[f32],
        scale: f32,
        dst: &mut [u8],
    ) -> (f32, CastCounts) {
        let r = self.cast_fp8(format, view, scale, dst);
        (r.amax, r.counts)
    }
}
