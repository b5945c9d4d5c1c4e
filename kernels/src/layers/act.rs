//! Element-wise ops: GELU (tanh form, as GPT-2), SwiGLU (LLaMA), bias, residual.

use super::{Real, COL_BLOCK};
use rayon::prelude::*;

/// Elements per rayon task for element-wise ops.
const EW_BLOCK: usize = 4096;
const GELU_K: f64 = 0.797_884_560_802_865_4; // sqrt(2/pi)
const GELU_A: f64 = 0.044715;

/// out = 0.5 x (1 + tanh(k (x + a x^3))).
pub fn gelu_forward<T: Real>(out: &mut [T], inp: &[T]) {
    assert_eq!(out.len(), inp.len());
    let (k, a, h) = (T::from_f64(GELU_K), T::from_f64(GELU_A), T::from_f64(0.5));
    out.par_chunks_mut(EW_BLOCK)
        .zip(inp.par_chunks(EW_BLOCK))
        .for_each(|(o, x)| {
            for (o, &x) in o.iter_mut().zip(x) {
                *o = h * x * (T::ONE + fast_tanh(k * (x + a * x * x * x)));
            }
        });
}

/// dinp = dout * gelu'(inp) (overwrites).
pub fn gelu_backward<T: Real>(dinp: &mut [T], inp: &[T], dout: &[T]) {
    assert!(dinp.len() == inp.len() && dout.len() == inp.len());
    let (k, a, h) = (T::from_f64(GELU_K), T::from_f64(GELU_A), T::from_f64(0.5));
    let a3 = T::from_f64(3.0 * GELU_A);
    dinp.par_chunks_mut(EW_BLOCK)
        .zip(inp.par_chunks(EW_BLOCK))
        .zip(dout.par_chunks(EW_BLOCK))
        .for_each(|((d, x), dy)| {
            for ((d, &x), &dy) in d.iter_mut().zip(x).zip(dy) {
                let th = fast_tanh(k * (x + a * x * x * x));
                let sech2 = T::ONE - th * th;
                *d = dy * (h * (T::ONE + th) + h * x * sech2 * k * (T::ONE + a3 * x * x));
            }
        });
}

/// tanh via one `exp` (libm's tanhf is several times slower and dominated GELU time);
/// |error| < 1e-7 absolute in f32, and exact to rounding in f64.
#[inline]
fn fast_tanh<T: Real>(y: T) -> T {
    let lim = T::from_f64(15.0);
    if y > lim {
        return T::ONE;
    }
    if y < -lim {
        return -T::ONE;
    }
    let e = (y + y).exp();
    (e - T::ONE) / (e + T::ONE)
}

#[inline]
fn sigmoid<T: Real>(x: T) -> T {
    T::ONE / (T::ONE + (-x).exp())
}

/// inp[n, 2f] = [gate | up]; out[n, f] = silu(gate) * up.
pub fn swiglu_forward<T: Real>(out: &mut [T], inp: &[T], f: usize) {
    assert!(inp.len() == 2 * out.len() && out.len().is_multiple_of(f));
    out.par_chunks_mut(f)
        .zip(inp.par_chunks(2 * f))
        .for_each(|(o, x)| {
            let (g, u) = x.split_at(f);
            for i in 0..f {
                o[i] = g[i] * sigmoid(g[i]) * u[i];
            }
        });
}

/// dinp[n, 2f] = [dgate | dup] (overwrites).
pub fn swiglu_backward<T: Real>(dinp: &mut [T], inp: &[T], dout: &[T], f: usize) {
    assert!(dinp.len() == inp.len() && inp.len() == 2 * dout.len() && dout.len().is_multiple_of(f));
    dinp.par_chunks_mut(2 * f)
        .zip(inp.par_chunks(2 * f))
        .zip(dout.par_chunks(f))
        .for_each(|((d, x), dy)| {
            let (g, u) = x.split_at(f);
            let (dg, du) = d.split_at_mut(f);
            for i in 0..f {
                let s = sigmoid(g[i]);
                let silu = g[i] * s;
                dg[i] = dy[i] * u[i] * s * (T::ONE + g[i] * (T::ONE - s));
                du[i] = dy[i] * silu;
            }
        });
}

/// out\[n, oc\] += bias\[oc\].
pub fn bias_forward<T: Real>(out: &mut [T], bias: &[T]) {
    let oc = bias.len();
    assert_eq!(out.len() % oc, 0);
    out.par_chunks_mut(oc * 16).for_each(|o| {
        for row in o.chunks_mut(oc) {
            for (o, &b) in row.iter_mut().zip(bias) {
                *o += b;
            }
        }
    });
}

/// dbias\[oc\] += sum over rows of dout\[n, oc\] (row order fixed per channel block).
pub fn bias_backward<T: Real>(dbias: &mut [T], dout: &[T]) {
    let oc = dbias.len();
    assert_eq!(dout.len() % oc, 0);
    let n = dout.len() / oc;
    dbias
        .par_chunks_mut(COL_BLOCK)
        .enumerate()
        .for_each(|(blk, db)| {
            let c0 = blk * COL_BLOCK;
            for row in 0..n {
                for (j, d) in db.iter_mut().enumerate() {
                    *d += dout[row * oc + c0 + j];
                }
            }
        });
}

/// out = a + b.
pub fn residual_forward<T: Real>(out: &mut [T], a: &[T], b: &[T]) {
    assert!(out.len() == a.len() && a.len() == b.len());
    out.par_chunks_mut(EW_BLOCK)
        .zip(a.par_chunks(EW_BLOCK))
        .zip(b.par_chunks(EW_BLOCK))
        .for_each(|((o, a), b)| {
            for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                *o = a + b;
            }
        });
}

/// dst += src.
pub fn add_inplace<T: Real>(dst: &mut [T], src: &[T]) {
    assert_eq!(dst.len(), src.len());
    dst.par_chunks_mut(EW_BLOCK)
        .zip(src.par_chunks(EW_BLOCK))
        .for_each(|(d, s)| {
            for (d, &s) in d.iter_mut().zip(s) {
                *d += s;
            }
        });
}
