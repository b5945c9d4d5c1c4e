//! Every GEMM of a GPT-2 124M training step at 256 tokens (batch 4 x context 64): the
//! forward, input-gradient and weight-gradient GEMMs of qkv, MLP fc and MLP projection,
//! and the LM head's three, each as FP8 on this machine's path (AMX, AVX512-BF16 or FMA),
//! the same FP8 GEMM forced onto the FMA kernel, and our f32 GEMM; best of back-to-back
//! runs. `COLD=1` evicts the caches (a 64 MiB sweep) before each timed run, closer to a
//! GEMM inside a step than back-to-back runs are. Usage:
//! `cargo run --release -p fp8lm-kernels --example step_gemms [ms-per-case]`.
//! (`fp8lm bench gemm` is the benchmark; this shows the step's other shapes.)

use fp8lm_fp8::{Fp8Format, E4M3, E5M2};
use fp8lm_kernels::{Cpu, GemmOps, GemmPath, GemmShape, MatRef};
use std::time::{Duration, Instant};

fn main() {
    let ms: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(300);
    let cold = std::env::var_os("COLD").is_some();
    // (name, M, N, K, trans_a, trans_b, A format): fwd = x @ W^T (E4M3 x E4M3), dinp =
    // dy @ W and dW = dy^T @ x (E5M2 x E4M3).
    let shapes: &[(&str, usize, usize, usize, bool, bool, Fp8Format)] = &[
        ("fwd qkv", 256, 2304, 768, false, true, Fp8Format::E4M3),
        ("fwd fc", 256, 3072, 768, false, true, Fp8Format::E4M3),
        ("fwd proj", 256, 768, 3072, false, true, Fp8Format::E4M3),
        ("fwd head", 256, 50257, 768, false, true, Fp8Format::E4M3),
        ("dinp qkv", 256, 768, 2304, false, false, Fp8Format::E5M2),
        ("dinp fc", 256, 768, 3072, false, false, Fp8Format::E5M2),
        ("dinp proj", 256, 3072, 768, false, false, Fp8Format::E5M2),
        ("dinp head", 256, 768, 50257, false, false, Fp8Format::E5M2),
        ("dW qkv", 2304, 768, 256, true, false, Fp8Format::E5M2),
        ("dW fc", 3072, 768, 256, true, false, Fp8Format::E5M2),
        ("dW proj", 768, 3072, 256, true, false, Fp8Format::E5M2),
        ("dW head", 50257, 768, 256, true, false, Fp8Format::E5M2),
    ];
    let path = GemmPath::detect();
    let mut junk = vec![0u8; 64 << 20];
    println!(
        "step GEMMs, path {}, {} threads, best of {ms} ms per case{}",
        path.name(),
        rayon::current_num_threads(),
        if cold {
            ", caches evicted before each run"
        } else {
            ""
        }
    );
    println!(
        "{:10} {:>18} {:>10} {:>10} {:>10} {:>8}",
        "gemm", "M x N x K", "fp8 GF/s", "fp8-fma", "f32 GF/s", "fp8/f32"
    );
    let (mut t_fp8, mut t_f32) = (0.0, 0.0);
    for &(name, m, n, k, ta, tb, fa) in shapes {
        let val = |i: usize, s: usize| ((i.wrapping_mul(s) % 255) as f32 - 127.0) / 64.0;
        let enc = |f: Fp8Format, x: f32| match f {
            Fp8Format::E4M3 => E4M3::from_f32(x).to_bits(),
            Fp8Format::E5M2 => E5M2::from_f32(x).to_bits(),
        };
        let a32: Vec<f32> = (0..m * k).map(|i| val(i, 7919)).collect();
        let b32: Vec<f32> = (0..n * k).map(|i| val(i, 104729)).collect();
        let a8: Vec<u8> = a32.iter().map(|&x| enc(fa, x * 16.0)).collect();
        let b8: Vec<u8> = b32
            .iter()
            .map(|&x| enc(Fp8Format::E4M3, x * 16.0))
            .collect();
        let mut s = GemmShape::new(m, n, k);
        if ta {
            s = s.trans_a();
        }
        if tb {
            s = s.trans_b();
        }
        let fp8 = |d, format| MatRef::Fp8 {
            data: d,
            format,
            scale: 16.0,
        };
        let mut c = vec![0f32; m * n];
        let mut time = |f: &mut dyn FnMut(&mut [f32])| {
            f(&mut c);
            let (t0, mut best) = (Instant::now(), Duration::MAX);
            while t0.elapsed() < Duration::from_millis(ms) || best == Duration::MAX {
                if cold {
                    junk.iter_mut()
                        .step_by(64)
                        .for_each(|x| *x = x.wrapping_add(1));
                }
                let t = Instant::now();
                f(&mut c);
                best = best.min(t.elapsed());
            }
            best.as_secs_f64()
        };
        let q = time(&mut |c| Cpu.gemm(s, fp8(&a8, fa), fp8(&b8, Fp8Format::E4M3), c, false));
        let qf = time(&mut |c| {
            let (a, b) = (fp8(&a8, fa), fp8(&b8, Fp8Format::E4M3));
            Cpu.gemm_with_path(GemmPath::Fma, s, a, b, c, false)
        });
        let f = time(&mut |c| Cpu.gemm(s, MatRef::F32(&a32), MatRef::F32(&b32), c, false));
        let gf = |t: f64| 2.0 * (m * n * k) as f64 / t / 1e9;
        println!(
            "{name:10} {:>18} {:>10.1} {:>10.1} {:>10.1} {:>8.2}",
            format!("{m}x{n}x{k}"),
            gf(q),
            gf(qf),
            gf(f),
            f / q
        );
        (t_fp8, t_f32) = (t_fp8 + q, t_f32 + f);
    }
    println!(
        "all: fp8 {:.1} ms, f32 {:.1} ms, f32/fp8 = {:.2}",
        t_fp8 * 1e3,
        t_f32 * 1e3,
        t_f32 / t_fp8
    );
}
