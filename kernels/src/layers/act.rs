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
    out.par_chunks_mut(EW_BLOCK)
        .zip(inp.par_chunks(EW_BLOCK))
        .for_each(|(o, x)| {
            if let (Some(o32), Some(x32)) = (as_f32_mut(o), as_f32(x)) {
                #[cfg(target_arch = "x86_64")]
                if avx512() {
                    // SAFETY: avx512f detected.
                    unsafe { gelu_fwd_avx512(o32, x32) };
                    return;
                }
                gelu_fwd(o32, x32);
            } else {
                gelu_fwd(o, x);
            }
        });
}

/// dinp = dout * gelu'(inp) (overwrites).
pub fn gelu_backward<T: Real>(dinp: &mut [T], inp: &[T], dout: &[T]) {
    assert!(dinp.len() == inp.len() && dout.len() == inp.len());
    dinp.par_chunks_mut(EW_BLOCK)
        .zip(inp.par_chunks(EW_BLOCK))
        .zip(dout.par_chunks(EW_BLOCK))
        .for_each(|((d, x), dy)| {
            if let (Some(d32), Some(x32), Some(dy32)) = (as_f32_mut(d), as_f32(x), as_f32(dy)) {
                #[cfg(target_arch = "x86_64")]
                if avx512() {
                    // SAFETY: avx512f detected.
                    unsafe { gelu_bwd_avx512(d32, x32, dy32) };
                    return;
                }
                gelu_bwd(d32, x32, dy32);
            } else {
                gelu_bwd(d, x, dy);
            }
        });
}

#[inline(always)]
fn gelu_fwd<T: Real>(o: &mut [T], x: &[T]) {
    let (k, a, h) = (T::from_f64(GELU_K), T::from_f64(GELU_A), T::from_f64(0.5));
    for (o, &x) in o.iter_mut().zip(x) {
        *o = h * x * (T::ONE + fast_tanh(k * (x + a * x * x * x)));
    }
}

#[inline(always)]
fn gelu_bwd<T: Real>(d: &mut [T], x: &[T], dy: &[T]) {
    let (k, a, h) = (T::from_f64(GELU_K), T::from_f64(GELU_A), T::from_f64(0.5));
    let a3 = T::from_f64(3.0 * GELU_A);
    for ((d, &x), &dy) in d.iter_mut().zip(x).zip(dy) {
        let th = fast_tanh(k * (x + a * x * x * x));
        let sech2 = T::ONE - th * th;
        *d = dy * (h * (T::ONE + th) + h * x * sech2 * k * (T::ONE + a3 * x * x));
    }
}

// The same loops compiled for AVX-512 (16 lanes; the crate's baseline target is SSE2).
// Same operations in the same order, no FMA contraction: bit-identical to the portable
// loops (tested).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gelu_fwd_avx512(o: &mut [f32], x: &[f32]) {
    gelu_fwd(o, x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gelu_bwd_avx512(d: &mut [f32], x: &[f32], dy: &[f32]) {
    gelu_bwd(d, x, dy)
}

#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| is_x86_feature_detected!("avx512f"))
}

/// `x` as `&[f32]` when `T` is f32 (the training type), for the vectorised loops.
fn as_f32<T: Real>(x: &[T]) -> Option<&[f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: T is f32, so the slice's layout is f32's.
        .then(|| unsafe { std::slice::from_raw_parts(x.as_ptr() as *const f32, x.len()) })
}

fn as_f32_mut<T: Real>(x: &mut [T]) -> Option<&mut [f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: as above.
        .then(|| unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr() as *mut f32, x.len()) })
}

/// tanh via one `exp` (libm's tanhf is several times slower and dominated GELU time);
/// |error| < 1e-7 absolute in f32, and exact to rounding in f64.
/// Branch-free (so the loops vectorise): beyond |y| = 15 the f32 result is +-1 exactly
/// either way, and a clamp keeps `exp` finite.
#[inline(always)]
fn fast_tanh<T: Real>(y: T) -> T {
    let lim = T::from_f64(15.0);
    let y = if y > lim {
        lim
    } else if y < -lim {
        -lim
    } else {
        y
    };
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

#[cfg(test)]
mod simd_tests {
    use super::*;

    /// The AVX-512 GELU loops give the portable loops' results bit for bit (same
    /// operations in the same order), over a sweep that crosses the tanh clamp, and NaN.
    #[test]
    fn gelu_avx512_matches_portable_bitwise() {
        #[cfg(target_arch = "x86_64")]
        {
            if !avx512() {
                eprintln!("no avx512f: only the portable GELU runs here");
                return;
            }
            let mut x: Vec<f32> = (0..40_001).map(|i| (i as f32 - 20_000.0) * 1e-3).collect();
            x.extend([f32::NAN, 1e30, -1e30, f32::INFINITY, 0.0, -0.0]);
            let dy: Vec<f32> = x.iter().map(|v| 1.0 - 0.25 * v).collect();
            let n = x.len();
            let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
            gelu_fwd(&mut a, &x);
            // SAFETY: avx512f detected.
            unsafe { gelu_fwd_avx512(&mut b, &x) };
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "forward");
            gelu_bwd(&mut a, &x, &dy);
            // SAFETY: as above.
            unsafe { gelu_bwd_avx512(&mut b, &x, &dy) };
            assert_eq!(bits(&a), bits(&b), "backward");
            // and the public entry points take the vectorised path with the same result
            let mut c = vec![0f32; n];
            gelu_forward(&mut c, &x);
            gelu_fwd(&mut a, &x);
            assert_eq!(bits(&a), bits(&c));
            // tanh saturates to exactly +-1 past the clamp
            assert_eq!(fast_tanh(20f32), 1.0);
            assert_eq!(fast_tanh(-20f32), -1.0);
        }
    }
}
