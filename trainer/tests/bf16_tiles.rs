//! A bf16 linear too big for one weight tile (`BF16_TILE_ELEMS`) runs its three GEMMs
//! tile by tile (weights and output gradients rounded per tile, never kept whole): each
//! result must equal the f64 product of the bf16-rounded operands within f32
//! accumulation error, `k * 2^-24 * sum |a_i b_i|` (k: the reduction length; bf16 inputs
//! are exact in f32, so only the accumulation rounds).

use fp8lm_trainer::model::linear::{bf16_tile_rows, BF16_TILE_ELEMS};
use fp8lm_trainer::model::{Linear, LinearPrecision};
use half::bf16;

fn r(x: f32) -> f64 {
    bf16::from_f32(x).to_f64()
}

#[test]
fn tiled_bf16_gemms_match_the_f64_reference() {
    let (n, c) = (6, 32);
    let oc = BF16_TILE_ELEMS / c + 777; // two tiles, the second partial
    assert!(bf16_tile_rows(c, oc) < oc);
    let mut s = 0x9E37_79B9u32;
    let mut rnd = move || {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        (s as f32 / u32::MAX as f32) - 0.5
    };
    let x: Vec<f32> = (0..n * c).map(|_| rnd()).collect();
    let w: Vec<f32> = (0..oc * c).map(|_| rnd()).collect();
    let dy: Vec<f32> = (0..n * oc).map(|_| rnd()).collect();
    let mut lin = Linear::new("big".into(), c, oc, n, LinearPrecision::Bf16);
    let mut out = vec![0f32; n * oc];
    lin.forward(&mut out, &x, &w, None, n, true);
    let (mut dx, mut dw) = (vec![0f32; n * c], vec![0f32; oc * c]);
    lin.backward(&mut dx, &mut dw, None, &dy, &x, &w, n);
    let tol = |k: usize, abs_sum: f64| k as f64 * 2f64.powi(-24) * abs_sum + 1e-30;
    // Spot-check rows/columns on both sides of the tile edge and at the ends.
    let edge = bf16_tile_rows(c, oc);
    for &o in &[0, 1, edge - 1, edge, edge + 1, oc - 1] {
        for i in 0..n {
            let (mut v, mut a) = (0f64, 0f64);
            for k in 0..c {
                let t = r(x[i * c + k]) * r(w[o * c + k]);
                v += t;
                a += t.abs();
            }
            let got = out[i * oc + o] as f64;
            assert!((got - v).abs() <= tol(c, a), "out[{i},{o}] {got} vs {v}");
        }
        for k in 0..c {
            let (mut v, mut a) = (0f64, 0f64);
            for i in 0..n {
                let t = r(dy[i * oc + o]) * r(x[i * c + k]);
                v += t;
                a += t.abs();
            }
            let got = dw[o * c + k] as f64;
            assert!((got - v).abs() <= tol(n, a), "dw[{o},{k}] {got} vs {v}");
        }
    }
    for i in 0..n {
        for k in 0..c {
            let (mut v, mut a) = (0f64, 0f64);
            for o in 0..oc {
                let t = r(dy[i * oc + o]) * r(w[o * c + k]);
                v += t;
                a += t.abs();
            }
            let got = dx[i * c + k] as f64;
            assert!((got - v).abs() <= tol(oc, a), "dx[{i},{k}] {got} vs {v}");
        }
    }
}
