//! Causal multi-head self-attention (scores and softmax in f32 at every precision level)
//! and rotary position embeddings.
//!
//! Layout as llm.c: `qkv[b,t,3c]` holds q, k, v side by side; head `h` uses channels
//! `h*hs..(h+1)*hs` of each; `att[b,nh,t,t]` keeps the softmax probabilities (row `t`
//! valid for `t2 <= t`, zero above the diagonal). One rayon task per `(b, h)` pair.

use super::real::{axpy, dot, exp_shift_sum};
use super::{row_block, Real, SyncPtr};
use rayon::prelude::*;

/// out\[b,t,c\] = softmax(q k^T / sqrt(hs), causal) v, per head; att\[b,nh,t,t\] saved.
pub fn attention_forward<T: Real>(
    out: &mut [T],
    att: &mut [T],
    qkv: &[T],
    t: usize,
    c: usize,
    nh: usize,
) {
    let hs = c / nh;
    let b = qkv.len() / (3 * c * t);
    assert!(
        hs * nh == c
            && qkv.len() == b * t * 3 * c
            && out.len() == b * t * c
            && att.len() == b * nh * t * t
    );
    let scale = T::ONE / T::from_f64(hs as f64).sqrt();
    let outp = SyncPtr::new(out);
    att.par_chunks_mut(t * t).enumerate().for_each(|(bh, att)| {
        let (bi, h) = (bh / nh, bh % nh);
        let base = bi * t * 3 * c;
        for ti in 0..t {
            let q = &qkv[base + ti * 3 * c + h * hs..][..hs];
            let row = &mut att[ti * t..(ti + 1) * t];
            let mut maxv = T::from_f64(f64::NEG_INFINITY);
            for t2 in 0..=ti {
                let k = &qkv[base + t2 * 3 * c + c + h * hs..][..hs];
                let s = dot(q, k) * scale;
                row[t2] = s;
                maxv = maxv.max(s);
            }
            let sum = exp_shift_sum(&mut row[..=ti], maxv);
            let inv = T::ONE / sum;
            row[..=ti].iter_mut().for_each(|x| *x *= inv);
            row[ti + 1..].iter_mut().for_each(|x| *x = T::ZERO);
            // SAFETY: task (bi, h) alone writes out[bi, ti, h*hs..(h+1)*hs].
            let o = unsafe { outp.slice(bi * t * c + ti * c + h * hs, hs) };
            o.fill(T::ZERO);
            for t2 in 0..=ti {
                axpy(o, row[t2], &qkv[base + t2 * 3 * c + 2 * c + h * hs..][..hs]);
            }
        }
    });
}

/// dqkv\[b,t,3c\] (overwritten) from dout\[b,t,c\], the saved qkv and att.
pub fn attention_backward<T: Real>(
    dqkv: &mut [T],
    dout: &[T],
    qkv: &[T],
    att: &[T],
    t: usize,
    c: usize,
    nh: usize,
) {
    let hs = c / nh;
    let b = qkv.len() / (3 * c * t);
    assert!(dqkv.len() == qkv.len() && dout.len() == b * t * c && att.len() == b * nh * t * t);
    let scale = T::ONE / T::from_f64(hs as f64).sqrt();
    let dp = SyncPtr::new(dqkv);
    (0..b * nh).into_par_iter().for_each(|bh| {
        let (bi, h) = (bh / nh, bh % nh);
        let base = bi * t * 3 * c;
        // SAFETY (all `dp.slice` calls below): task (bi, h) alone touches the q/k/v
        // columns of head h in batch row bi, and holds at most one such slice at a time.
        for ti in 0..t {
            for part in 0..3 {
                unsafe { dp.slice(base + ti * 3 * c + part * c + h * hs, hs) }.fill(T::ZERO);
            }
        }
        let mut datt = vec![T::ZERO; t];
        for ti in 0..t {
            let arow = &att[(bh * t + ti) * t..][..t];
            let dy = &dout[bi * t * c + ti * c + h * hs..][..hs];
            let q = &qkv[base + ti * 3 * c + h * hs..][..hs];
            for t2 in 0..=ti {
                let v = &qkv[base + t2 * 3 * c + 2 * c + h * hs..][..hs];
                datt[t2] = dot(v, dy);
                axpy(
                    unsafe { dp.slice(base + t2 * 3 * c + 2 * c + h * hs, hs) },
                    arow[t2],
                    dy,
                );
            }
            let s = dot(&arow[..=ti], &datt[..=ti]);
            for t2 in 0..=ti {
                let dpre = arow[t2] * (datt[t2] - s) * scale;
                let k = &qkv[base + t2 * 3 * c + c + h * hs..][..hs];
                axpy(unsafe { dp.slice(base + ti * 3 * c + h * hs, hs) }, dpre, k);
                axpy(
                    unsafe { dp.slice(base + t2 * 3 * c + c + h * hs, hs) },
                    dpre,
                    q,
                );
            }
        }
    });
}

/// Rotary table `[t, hs/2, 2]` of (cos, sin) of `pos * theta^(-2i/hs)`.
pub fn rope_table<T: Real>(t: usize, hs: usize, theta: f64) -> Vec<T> {
    assert!(
        hs.is_multiple_of(2),
        "rope needs an even head size, got {hs}"
    );
    let mut tab = Vec::with_capacity(t * hs);
    for pos in 0..t {
        for i in 0..hs / 2 {
            let ang = pos as f64 * theta.powf(-2.0 * i as f64 / hs as f64);
            tab.push(T::from_f64(ang.cos()));
            tab.push(T::from_f64(ang.sin()));
        }
    }
    tab
}

/// Rotate pairs (2i, 2i+1) of every head of q and k by the position's angle, in place.
/// `sign` = +1 forward, -1 the inverse rotation (backward: R^T = R(-angle)).
fn rope_apply<T: Real>(qkv: &mut [T], table: &[T], t: usize, c: usize, nh: usize, sign: T) {
    let rb = row_block(3 * c);
    let hs = c / nh;
    assert!(qkv.len().is_multiple_of(3 * c * t) && table.len() >= t * hs);
    qkv.par_chunks_mut(3 * c * rb)
        .enumerate()
        .for_each(|(blk, rows)| {
            for (r, row) in rows.chunks_mut(3 * c).enumerate() {
                let pos = (blk * rb + r) % t;
                let tab = &table[pos * hs..(pos + 1) * hs];
                for x in row[..2 * c].chunks_mut(hs) {
                    for i in 0..hs / 2 {
                        let (cs, sn) = (tab[2 * i], sign * tab[2 * i + 1]);
                        let (x0, x1) = (x[2 * i], x[2 * i + 1]);
                        x[2 * i] = x0 * cs - x1 * sn;
                        x[2 * i + 1] = x0 * sn + x1 * cs;
                    }
                }
            }
        });
}

/// q, k of qkv\[b,t,3c\] rotated in place.
pub fn rope_forward<T: Real>(qkv: &mut [T], table: &[T], t: usize, c: usize, nh: usize) {
    rope_apply(qkv, table, t, c, nh, T::ONE)
}

/// dq, dk of dqkv\[b,t,3c\] rotated back in place.
pub fn rope_backward<T: Real>(dqkv: &mut [T], table: &[T], t: usize, c: usize, nh: usize) {
    rope_apply(dqkv, table, t, c, nh, -T::ONE)
}
