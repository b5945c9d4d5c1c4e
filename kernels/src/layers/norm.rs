//! LayerNorm (GPT-2) and RMSNorm (LLaMA), over the last dimension `c`, in f32.

use super::{row_block, Real, COL_BLOCK};
use rayon::prelude::*;

const EPS: f64 = 1e-5;

/// out\[n,c\] = (inp - mean) * rstd * w + b; mean\[n\], rstd\[n\] saved for the backward.
pub fn layernorm_forward<T: Real>(
    out: &mut [T],
    mean: &mut [T],
    rstd: &mut [T],
    inp: &[T],
    w: &[T],
    b: &[T],
) {
    let c = w.len();
    let rb = row_block(c);
    let n = mean.len();
    assert!(out.len() == n * c && inp.len() == n * c && rstd.len() == n && b.len() == c);
    let inv_c = T::from_f64(1.0 / c as f64);
    out.par_chunks_mut(c * rb)
        .zip(mean.par_chunks_mut(rb))
        .zip(rstd.par_chunks_mut(rb))
        .zip(inp.par_chunks(c * rb))
        .for_each(|(((out, mean), rstd), inp)| {
            for (r, (o, x)) in out.chunks_mut(c).zip(inp.chunks(c)).enumerate() {
                let m = x.iter().fold(T::ZERO, |s, &v| s + v) * inv_c;
                let var = x.iter().fold(T::ZERO, |s, &v| s + (v - m) * (v - m)) * inv_c;
                let s = T::ONE / (var + T::from_f64(EPS)).sqrt();
                for i in 0..c {
                    o[i] = (x[i] - m) * s * w[i] + b[i];
                }
                mean[r] = m;
                rstd[r] = s;
            }
        });
}

/// dinp += ..., dw += sum dout * norm, db += sum dout (all accumulate).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward<T: Real>(
    dinp: &mut [T],
    dw: &mut [T],
    db: &mut [T],
    dout: &[T],
    inp: &[T],
    w: &[T],
    mean: &[T],
    rstd: &[T],
) {
    let c = w.len();
    let rb = row_block(c);
    let n = mean.len();
    assert!(
        dinp.len() == n * c
            && dout.len() == n * c
            && inp.len() == n * c
            && db.len() == c
            && dw.len() == c
    );
    let inv_c = T::from_f64(1.0 / c as f64);
    dinp.par_chunks_mut(c * rb)
        .enumerate()
        .for_each(|(blk, dinp)| {
            for (r, di) in dinp.chunks_mut(c).enumerate() {
                let row = blk * rb + r;
                let (x, dy) = (&inp[row * c..(row + 1) * c], &dout[row * c..(row + 1) * c]);
                let (m, s) = (mean[row], rstd[row]);
                let (mut dnorm_mean, mut dnorm_norm_mean) = (T::ZERO, T::ZERO);
                for i in 0..c {
                    let dnorm = dy[i] * w[i];
                    dnorm_mean += dnorm;
                    dnorm_norm_mean += dnorm * (x[i] - m) * s;
                }
                dnorm_mean *= inv_c;
                dnorm_norm_mean *= inv_c;
                for i in 0..c {
                    let norm = (x[i] - m) * s;
                    di[i] += (dy[i] * w[i] - dnorm_mean - norm * dnorm_norm_mean) * s;
                }
            }
        });
    // Parameter gradients: each task owns a block of channels and sums over all rows in
    // row order, so the result does not depend on scheduling.
    dw.par_chunks_mut(COL_BLOCK)
        .zip(db.par_chunks_mut(COL_BLOCK))
        .enumerate()
        .for_each(|(blk, (dw, db))| {
            let c0 = blk * COL_BLOCK;
            for row in 0..n {
                let (m, s) = (mean[row], rstd[row]);
                for j in 0..dw.len() {
                    let dy = dout[row * c + c0 + j];
                    dw[j] += dy * (inp[row * c + c0 + j] - m) * s;
                    db[j] += dy;
                }
            }
        });
}

/// out\[n,c\] = inp * rstd * w with rstd = 1/sqrt(mean(inp^2) + eps); rstd\[n\] saved.
pub fn rmsnorm_forward<T: Real>(out: &mut [T], rstd: &mut [T], inp: &[T], w: &[T]) {
    let c = w.len();
    let rb = row_block(c);
    let n = rstd.len();
    assert!(out.len() == n * c && inp.len() == n * c);
    let inv_c = T::from_f64(1.0 / c as f64);
    out.par_chunks_mut(c * rb)
        .zip(rstd.par_chunks_mut(rb))
        .zip(inp.par_chunks(c * rb))
        .for_each(|((out, rstd), inp)| {
            for (r, (o, x)) in out.chunks_mut(c).zip(inp.chunks(c)).enumerate() {
                let ms = x.iter().fold(T::ZERO, |s, &v| s + v * v) * inv_c;
                let s = T::ONE / (ms + T::from_f64(EPS)).sqrt();
                for i in 0..c {
                    o[i] = x[i] * s * w[i];
                }
                rstd[r] = s;
            }
        });
}

/// dinp += rstd * (dn - n * mean(dn * n)) with n = inp * rstd, dn = dout * w; dw += dout * n.
pub fn rmsnorm_backward<T: Real>(
    dinp: &mut [T],
    dw: &mut [T],
    dout: &[T],
    inp: &[T],
    w: &[T],
    rstd: &[T],
) {
    let c = w.len();
    let rb = row_block(c);
    let n = rstd.len();
    assert!(dinp.len() == n * c && dout.len() == n * c && inp.len() == n * c && dw.len() == c);
    let inv_c = T::from_f64(1.0 / c as f64);
    dinp.par_chunks_mut(c * rb)
        .enumerate()
        .for_each(|(blk, dinp)| {
            for (r, di) in dinp.chunks_mut(c).enumerate() {
                let row = blk * rb + r;
                let (x, dy) = (&inp[row * c..(row + 1) * c], &dout[row * c..(row + 1) * c]);
                let s = rstd[row];
                let mut dn_n = T::ZERO;
                for i in 0..c {
                    dn_n += dy[i] * w[i] * x[i] * s;
                }
                dn_n *= inv_c;
                for i in 0..c {
                    di[i] += s * (dy[i] * w[i] - x[i] * s * dn_n);
                }
            }
        });
    dw.par_chunks_mut(COL_BLOCK)
        .enumerate()
        .for_each(|(blk, dw)| {
            let c0 = blk * COL_BLOCK;
            for row in 0..n {
                let s = rstd[row];
                for j in 0..dw.len() {
                    dw[j] += dout[row * c + c0 + j] * inp[row * c + c0 + j] * s;
                }
            }
        });
}
