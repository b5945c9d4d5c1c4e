//! Speed of one FP8 sum hop (E5M2, 32 MiB, with the saturation count) on every kernel
//! this CPU has, plain and with FP8-LM's re-quantisation table fused in, next to a memcpy
//! and an f32 add of the same element count (4x the bytes). Best of 15 passes; on a
//! shared machine compare the rows of one run.
//!
//! ```text
//! cargo run --release -p fp8lm-collectives --example hop_speed
//! ```

use fp8lm_collectives::fp8sum::{sum_hop_with, Kernel, Requant};
use fp8lm_fp8::Fp8Format;
use std::time::Instant;

fn best_ms(mut f: impl FnMut()) -> f64 {
    (0..15)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let n = 32 << 20;
    let mut s = 12345u64;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        // Mostly finite codes, both signs (0xBB clears the bits that make NaN/inf common).
        s as u8 & 0xBB
    };
    let inc: Vec<u8> = (0..n).map(|_| next()).collect();
    let mut acc: Vec<u8> = (0..n).map(|_| next()).collect();
    println!("fp8 sum hop, E5M2, {n} elements, best of 15 (noisy on a shared machine)");
    let fmt = Fp8Format::E5M2;
    // fp8(value / 2) for every code (NaN codes kept), as mu = 1/2 would give.
    let lut: [u8; 256] = std::array::from_fn(|v| {
        let x = fmt.decode(v as u8);
        if x.is_nan() {
            v as u8
        } else {
            fmt.encode(x * 0.5, true)
        }
    });
    let rq = Requant {
        lut: &lut,
        flush_hi: 1,
    };
    println!("{:<12} {:>10} {:>14}", "kernel", "plain", "+requant");
    for k in Kernel::available() {
        let plain = best_ms(|| {
            sum_hop_with(k, fmt, &mut acc, &inc, None, None, true);
        });
        let fused = best_ms(|| {
            sum_hop_with(k, fmt, &mut acc, &inc, Some(rq), None, true);
        });
        println!("{:<12} {plain:7.2} ms {fused:11.2} ms", k.name());
    }
    let ms = best_ms(|| acc.copy_from_slice(&inc));
    println!("{:<12} {ms:8.2} ms", "memcpy u8");
    let (mut a, b) = (vec![0f32; n], vec![1f32; n]);
    let ms = best_ms(|| a.iter_mut().zip(&b).for_each(|(a, b)| *a += b));
    println!("{:<12} {ms:8.2} ms", "f32 add");
}
