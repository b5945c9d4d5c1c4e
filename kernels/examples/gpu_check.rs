//! The GPU suite of the CUDA backend, run by `scripts/gpu-check.sh` (never by CI: CI only
//! compiles it). Exits 2 saying "nothing ran" when there is no usable GPU; 1 if any check
//! fails; 0 when every check here passed.
//!
//! Checks: (1) every FP8 cast on the GPU is bit-identical to the CPU cast, on all 65536
//! f16 patterns and the fp8 crate's seeded f32 set, every format, mode and several
//! scales, amax included; (2) each FP8 GEMM of a linear layer (forward E4M3 x E4M3,
//! dinp and dW with E5M2 gradients) against the CPU backend within the f32 accumulation
//! bound; (3) layer ops against the CPU ops; (4) the FP8-LM Adam kernel against the same
//! expressions evaluated on the host; (5) the FP8 GEMM throughput (TFLOP/s, CUDA events).

#[path = "../../fp8/tests/common/mod.rs"]
mod common;

use cudarc::driver::CudaSlice;
use fp8lm_fp8::cast::{self, Backend};
use fp8lm_fp8::{CastMode, Fp8Format};
use fp8lm_kernels::cuda::device::AdamConsts;
use fp8lm_kernels::cuda::{cast_mirror, CudaBackend, CudaError, DevFp8};
use fp8lm_kernels::{Cpu, GemmOps, GemmShape, LayerOps, MatRef};
use half::f16;

type R<T> = Result<T, CudaError>;

struct Suite {
    failed: Vec<String>,
}

impl Suite {
    fn check(&mut self, name: &str, r: R<Result<(), String>>) {
        match r {
            Ok(Ok(())) => println!("PASS  {name}"),
            Ok(Err(why)) => {
                println!("FAIL  {name}: {why}");
                self.failed.push(name.into());
            }
            Err(e) => {
                println!("FAIL  {name}: CUDA error: {e}");
                self.failed.push(name.into());
            }
        }
    }
}

fn main() {
    let be = match CudaBackend::new(0) {
        Ok(b) => b,
        Err(e) => {
            println!("gpu_check: NOTHING RAN: no usable GPU: {e}");
            std::process::exit(2);
        }
    };
    println!(
        "gpu_check on cuda:0 ({}), kernels compiled for {}",
        be.ctx.name().unwrap_or_default(),
        be.arch
    );
    let mut s = Suite { failed: Vec::new() };
    s.check(
        "casts f16 -> fp8 bit-exact (all 65536 patterns)",
        casts_f16(&be),
    );
    s.check("casts f32 -> fp8 bit-exact (seeded set)", casts_f32(&be));
    s.check("fp8 GEMM forward/dinp/dW vs CPU", gemms(&be));
    s.check("layer ops vs CPU", layers(&be));
    s.check("FP8-LM Adam kernel vs host expressions", adam(&be));
    match bench_gemm(&be) {
        Ok(line) => println!("BENCH {line}"),
        Err(e) => {
            println!("FAIL  bench gemm: {e}");
            s.failed.push("bench gemm".into());
        }
    }
    if s.failed.is_empty() {
        println!("gpu_check: all checks passed");
    } else {
        println!("gpu_check: {} failed: {:?}", s.failed.len(), s.failed);
        std::process::exit(1);
    }
}

const SCALES: [f32; 5] = [1.0, 1.0 / 128.0, 512.0, 0.3, 37.25];
const MODES: [CastMode; 3] = [CastMode::SatFinite, CastMode::SatAll, CastMode::NonSat];
const FORMATS: [Fp8Format; 2] = [Fp8Format::E4M3, Fp8Format::E5M2];

fn same_amax(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

fn casts_f16(be: &CudaBackend) -> R<Result<(), String>> {
    let bits: Vec<u16> = (0..=u16::MAX).collect();
    let halfs: Vec<f16> = bits.iter().map(|&b| f16::from_bits(b)).collect();
    let src = be.compute.clone_htod(&bits)?;
    let mut want = vec![0u8; bits.len()];
    for fmt in FORMATS {
        for mode in MODES {
            for scale in SCALES {
                let mut dst = be.alloc_fp8(bits.len(), fmt, scale)?;
                be.cast_f16_to_fp8(&src, &mut dst, mode)?;
                let got = be.compute.clone_dtoh(&dst.data)?;
                let want_amax = cast::f16_to_fp8_amax_with(
                    fmt,
                    mode,
                    Backend::Portable,
                    &halfs,
                    scale,
                    &mut want,
                );
                if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
                    return Ok(Err(format!(
                        "{fmt:?} {mode:?} scale {scale}: f16 {:#06x}: GPU {:#04x} CPU {:#04x}",
                        bits[i], got[i], want[i]
                    )));
                }
                let amax = be.read_amax(&dst.amax_bits)?;
                if !same_amax(amax, want_amax) {
                    return Ok(Err(format!("{fmt:?} amax GPU {amax} CPU {want_amax}")));
                }
            }
        }
    }
    Ok(Ok(()))
}

fn casts_f32(be: &CudaBackend) -> R<Result<(), String>> {
    let xs = common::f32_test_set(400_000, 0x005E_EDF8);
    let src = be.compute.clone_htod(&xs)?;
    let mut want = vec![0u8; xs.len()];
    for fmt in FORMATS {
        for mode in MODES {
            for scale in SCALES {
                let mut dst = be.alloc_fp8(xs.len(), fmt, scale)?;
                be.cast_f32_to_fp8(&src, &mut dst, mode)?;
                let got = be.compute.clone_dtoh(&dst.data)?;
                let want_amax =
                    cast::f32_to_fp8_amax_with(fmt, mode, Backend::Portable, &xs, scale, &mut want);
                if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
                    return Ok(Err(format!("{fmt:?} {mode:?} scale {scale}: x={:e} ({:#010x}): GPU {:#04x} CPU {:#04x}", xs[i], xs[i].to_bits(), got[i], want[i])));
                }
                let amax = be.read_amax(&dst.amax_bits)?;
                if !same_amax(amax, want_amax) {
                    return Ok(Err(format!("{fmt:?} amax GPU {amax} CPU {want_amax}")));
                }
            }
        }
    }
    Ok(Ok(()))
}

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// Codes of the CPU cast of random values (so both backends see the same FP8 bytes).
fn fp8_of(rng: &mut Lcg, n: usize, fmt: Fp8Format, scale: f32) -> Vec<u8> {
    let x: Vec<f32> = (0..n).map(|_| rng.next() * 4.0).collect();
    let mut c = vec![0u8; n];
    cast::f32_to_fp8_amax(fmt, &x, scale, &mut c);
    c
}

fn upload_fp8(be: &CudaBackend, codes: &[u8], fmt: Fp8Format, scale: f32) -> R<DevFp8> {
    let mut t = be.alloc_fp8(codes.len(), fmt, scale)?;
    be.compute.memcpy_htod(codes, &mut t.data)?;
    Ok(t)
}

fn gemms(be: &CudaBackend) -> R<Result<(), String>> {
    let mut rng = Lcg(3);
    let (bt, c, oc) = (256, 384, 512);
    let (e4, e5) = (Fp8Format::E4M3, Fp8Format::E5M2);
    let inp = fp8_of(&mut rng, bt * c, e4, 16.0);
    let w = fp8_of(&mut rng, oc * c, e4, 32.0);
    let dout = fp8_of(&mut rng, bt * oc, e5, 8.0);
    let cases = [
        (
            "forward",
            GemmShape::new(bt, oc, c).trans_b(),
            (&inp, e4, 16.0),
            (&w, e4, 32.0),
        ),
        (
            "dinp",
            GemmShape::new(bt, c, oc),
            (&dout, e5, 8.0),
            (&w, e4, 32.0),
        ),
        (
            "dW",
            GemmShape::new(oc, c, bt).trans_a(),
            (&dout, e5, 8.0),
            (&inp, e4, 16.0),
        ),
    ];
    for (name, shape, (a, fa, sa), (b, fb, sb)) in cases {
        let mut cpu = vec![0f32; shape.m * shape.n];
        let ma = MatRef::Fp8 {
            data: a,
            format: fa,
            scale: sa,
        };
        let mb = MatRef::Fp8 {
            data: b,
            format: fb,
            scale: sb,
        };
        Cpu.gemm(shape, ma, mb, &mut cpu, false);
        let (da, db) = (upload_fp8(be, a, fa, sa)?, upload_fp8(be, b, fb, sb)?);
        let mut out: CudaSlice<f32> = be.compute.alloc_zeros(shape.m * shape.n)?;
        be.gemm_fp8_f32(shape, &da, &db, &mut out, false, false)?;
        let got = be.compute.clone_dtoh(&out)?;
        // Bound: both sides accumulate in f32; each is within k * 2^-24 * sum|a||b| of
        // the exact sum, so they differ by at most twice that.
        for i in 0..shape.m {
            for j in 0..shape.n {
                let abs: f64 = (0..shape.k)
                    .map(|l| {
                        let ai = if shape.trans_a {
                            l * shape.m + i
                        } else {
                            i * shape.k + l
                        };
                        let bi = if shape.trans_b {
                            j * shape.k + l
                        } else {
                            l * shape.n + j
                        };
                        (ma.get(ai) as f64 * mb.get(bi) as f64).abs()
                    })
                    .sum();
                let bound = 2.0 * shape.k as f64 * 2f64.powi(-24) * abs + 1e-30;
                let d = (got[i * shape.n + j] as f64 - cpu[i * shape.n + j] as f64).abs();
                if d > bound {
                    return Ok(Err(format!(
                        "{name} [{i},{j}]: GPU {} CPU {} (bound {bound:e})",
                        got[i * shape.n + j],
                        cpu[i * shape.n + j]
                    )));
                }
            }
        }
    }
    // FP8 output (forward, E4M3 D with a scale, D amax): each code within one E4M3 step
    // of the CPU's (the f32 results differ within the accumulation bound, so a value near
    // a rounding boundary may round the other way), amax within 1e-5 relative.
    let shape = GemmShape::new(bt, oc, c).trans_b();
    let out_scale = 4.0f32;
    let mut cpu8 = vec![0u8; bt * oc];
    let cpu_amax = Cpu
        .gemm_fp8_out(
            shape,
            MatRef::Fp8 {
                data: &inp,
                format: e4,
                scale: 16.0,
            },
            MatRef::Fp8 {
                data: &w,
                format: e4,
                scale: 32.0,
            },
            &mut cpu8,
            e4,
            out_scale,
        )
        .amax;
    let (da, db) = (
        upload_fp8(be, &inp, e4, 16.0)?,
        upload_fp8(be, &w, e4, 32.0)?,
    );
    let mut out = be.alloc_fp8(bt * oc, e4, out_scale)?;
    let mut amax = be.compute.alloc_zeros::<f32>(1)?;
    be.gemm_fp8_out(shape, &da, &db, &mut out, &mut amax, false)?;
    let got = be.compute.clone_dtoh(&out.data)?;
    let gpu_amax = be.compute.clone_dtoh(&amax)?[0];
    for (i, (g, w)) in got.iter().zip(&cpu8).enumerate() {
        if (*g as i32 - *w as i32).abs() > 1 || (g ^ w) & 0x80 != 0 && (g & 0x7F) != 0 {
            return Ok(Err(format!("fp8 out [{i}]: GPU {g:#04x} CPU {w:#04x}")));
        }
    }
    if (gpu_amax - cpu_amax).abs() > 1e-5 * cpu_amax.abs() {
        return Ok(Err(format!("fp8 out amax: GPU {gpu_amax} CPU {cpu_amax}")));
    }
    Ok(Ok(()))
}

fn close(name: &str, got: &[f32], want: &[f32], rel: f32) -> Result<(), String> {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if (g - w).abs() > rel * w.abs().max(1.0) {
            return Err(format!("{name}[{i}]: GPU {g} CPU {w}"));
        }
    }
    Ok(())
}

fn layers(be: &CudaBackend) -> R<Result<(), String>> {
    let mut rng = Lcg(5);
    let (n, c) = (64, 256);
    let x: Vec<f32> = (0..n * c).map(|_| rng.next() * 3.0).collect();
    let w: Vec<f32> = (0..c).map(|_| 1.0 + rng.next() * 0.1).collect();
    let b: Vec<f32> = (0..c).map(|_| rng.next() * 0.1).collect();
    let dy: Vec<f32> = (0..n * c).map(|_| rng.next()).collect();
    // Tolerance: f32 sums of c = 256 terms in different orders (~c * 2^-24 relative),
    // and libm vs CUDA tanhf/expf (a few ulp): 1e-4 relative covers both with margin.
    let tol = 1e-4;
    let (mut out, mut mean, mut rstd) = (vec![0f32; n * c], vec![0f32; n], vec![0f32; n]);
    Cpu.layernorm_forward(&mut out, &mut mean, &mut rstd, &x, &w, &b);
    let s = &be.compute;
    let (dx, dw_, db_) = (s.clone_htod(&x)?, s.clone_htod(&w)?, s.clone_htod(&b)?);
    let (mut gout, mut gmean, mut grstd) = (
        s.alloc_zeros::<f32>(n * c)?,
        s.alloc_zeros::<f32>(n)?,
        s.alloc_zeros::<f32>(n)?,
    );
    be.layernorm_forward(&mut gout, &mut gmean, &mut grstd, &dx, &dw_, &db_)?;
    if let Err(e) = close("layernorm out", &s.clone_dtoh(&gout)?, &out, tol) {
        return Ok(Err(e));
    }
    let (mut dinp, mut dw, mut db) = (vec![0f32; n * c], vec![0f32; c], vec![0f32; c]);
    Cpu.layernorm_backward(&mut dinp, &mut dw, &mut db, &dy, &x, &w, &mean, &rstd);
    let gdy = s.clone_htod(&dy)?;
    let (mut gdinp, mut gdw, mut gdb) = (
        s.alloc_zeros::<f32>(n * c)?,
        s.alloc_zeros::<f32>(c)?,
        s.alloc_zeros::<f32>(c)?,
    );
    be.layernorm_backward(
        &mut gdinp, &mut gdw, &mut gdb, &gdy, &dx, &dw_, &gmean, &grstd,
    )?;
    for (nm, g, wv) in [
        ("layernorm dinp", &gdinp, &dinp),
        ("layernorm dw", &gdw, &dw),
        ("layernorm db", &gdb, &db),
    ] {
        if let Err(e) = close(nm, &s.clone_dtoh(g)?, wv, tol) {
            return Ok(Err(e));
        }
    }
    let mut gl = vec![0f32; n * c];
    Cpu.gelu_forward(&mut gl, &x);
    let mut ggl = s.alloc_zeros::<f32>(n * c)?;
    be.gelu_forward(&mut ggl, &dx)?;
    if let Err(e) = close("gelu", &s.clone_dtoh(&ggl)?, &gl, tol) {
        return Ok(Err(e));
    }
    let targets: Vec<u32> = (0..n as u32).map(|i| (i * 7) % c as u32).collect();
    let mut probs = x.clone();
    let mut losses = vec![0f32; n];
    Cpu.softmax_xent_forward(&mut probs, &mut losses, &targets);
    let mut gp = s.clone_htod(&x)?;
    let mut glo = s.alloc_zeros::<f32>(n)?;
    let gt = s.clone_htod(&targets)?;
    be.softmax_xent_forward(&mut gp, &mut glo, &gt)?;
    if let Err(e) = close("softmax probs", &s.clone_dtoh(&gp)?, &probs, tol).and(close(
        "xent loss",
        &s.clone_dtoh(&glo)?,
        &losses,
        tol,
    )) {
        return Ok(Err(e));
    }
    // RMSNorm, SwiGLU, attention forward and backward.
    let (mut ro, mut rr) = (vec![0f32; n * c], vec![0f32; n]);
    Cpu.rmsnorm_forward(&mut ro, &mut rr, &x, &w);
    let (mut gro, mut grr) = (s.alloc_zeros::<f32>(n * c)?, s.alloc_zeros::<f32>(n)?);
    be.rmsnorm_forward(&mut gro, &mut grr, &dx, &dw_)?;
    if let Err(e) = close("rmsnorm", &s.clone_dtoh(&gro)?, &ro, tol) {
        return Ok(Err(e));
    }
    let f = c / 2;
    let mut so = vec![0f32; n * f];
    Cpu.swiglu_forward(&mut so, &x, f);
    let mut gso = s.alloc_zeros::<f32>(n * f)?;
    be.swiglu_forward(&mut gso, &dx, f)?;
    if let Err(e) = close("swiglu", &s.clone_dtoh(&gso)?, &so, tol) {
        return Ok(Err(e));
    }
    let (bsz, t, ch, nh) = (2, 16, 64, 4);
    let qkv: Vec<f32> = (0..bsz * t * 3 * ch).map(|_| rng.next()).collect();
    let dout: Vec<f32> = (0..bsz * t * ch).map(|_| rng.next()).collect();
    let (mut ao, mut att) = (vec![0f32; bsz * t * ch], vec![0f32; bsz * nh * t * t]);
    Cpu.attention_forward(&mut ao, &mut att, &qkv, t, ch, nh);
    let mut dq = vec![0f32; qkv.len()];
    Cpu.attention_backward(&mut dq, &dout, &qkv, &att, t, ch, nh);
    let (gq, gdo) = (s.clone_htod(&qkv)?, s.clone_htod(&dout)?);
    let (mut gao, mut gatt, mut gdq) = (
        s.alloc_zeros::<f32>(ao.len())?,
        s.alloc_zeros::<f32>(att.len())?,
        s.alloc_zeros::<f32>(qkv.len())?,
    );
    be.attention_forward(&mut gao, &mut gatt, &gq, t, ch, nh)?;
    be.attention_backward(&mut gdq, &gdo, &gq, &gatt, t, ch, nh)?;
    for (nm, g, wv) in [
        ("attention out", &gao, &ao),
        ("attention probs", &gatt, &att),
        ("attention dqkv", &gdq, &dq),
    ] {
        if let Err(e) = close(nm, &s.clone_dtoh(g)?, wv, tol) {
            return Ok(Err(e));
        }
    }
    Ok(Ok(()))
}

fn adam(be: &CudaBackend) -> R<Result<(), String>> {
    let mut rng = Lcg(9);
    let n = 10_000;
    let k = AdamConsts {
        b1: 0.9,
        b2: 0.95,
        one_minus_b1: 0.1,
        one_minus_b2: 0.05,
        inv_bc1: 1.0 / 0.1,
        inv_bc2: 1.0 / 0.05,
        eps: 1e-8,
        lr: 1e-3,
        wd: 0.1,
    };
    let (sw, sm, sv) = (1024.0f32, 64.0f32, 4096.0f32);
    let master: Vec<u16> = (0..n)
        .map(|_| f16::from_f32(rng.next() * 0.05 * sw).to_bits())
        .collect();
    let m1 = fp8_of(&mut rng, n, Fp8Format::E4M3, 0.01 * sm);
    let m2: Vec<u16> = (0..n)
        .map(|_| f16::from_f32((rng.next().abs() * 1e-4) * sv).to_bits())
        .collect();
    let g = fp8_of(&mut rng, n, Fp8Format::E5M2, 64.0);
    // Gradient scale 64 (real = stored / 64) and a clip factor 0.75.
    let (gi, gm) = (1.0f32 / 64.0, 0.75f32);
    // Host evaluation of the kernel's expressions, in its order, no FMA.
    let e4 = cast_mirror::fp8_consts(0, 0);
    let (mut hw, mut hm, mut hv, mut hp) = (master.clone(), m1.clone(), m2.clone(), vec![0f32; n]);
    for i in 0..n {
        let gx = cast_mirror::fp8_decode(1, g[i] as u32) * gi * gm;
        let wx = cast_mirror::f16_bits_to_f32(master[i]) * (1.0 / sw);
        let mx = cast_mirror::fp8_decode(0, m1[i] as u32) * (1.0 / sm);
        let vx = cast_mirror::f16_bits_to_f32(m2[i]) * (1.0 / sv);
        let mn = k.b1 * mx + k.one_minus_b1 * gx;
        let vn = k.b2 * vx + k.one_minus_b2 * gx * gx;
        let u = (mn * k.inv_bc1) / ((vn * k.inv_bc2).sqrt() + k.eps);
        let wn = wx - k.lr * (u + k.wd * wx);
        let wh = cast_mirror::f32_to_f16_bits(wn * sw);
        hw[i] = wh;
        hp[i] = cast_mirror::f16_bits_to_f32(wh) * (1.0 / sw);
        hv[i] = cast_mirror::f32_to_f16_bits(vn * sv);
        hm[i] = cast_mirror::fp8_encode_bits(&e4, (mn * sm).to_bits()) as u8;
    }
    let s = &be.compute;
    let (mut dw, mut dm, mut dv) = (
        s.clone_htod(&master)?,
        s.clone_htod(&m1)?,
        s.clone_htod(&m2)?,
    );
    let mut dp = s.alloc_zeros::<f32>(n)?;
    let dg = upload_fp8(be, &g, Fp8Format::E5M2, 64.0)?;
    let dgm = s.clone_htod(&[gm])?;
    let scales = s.clone_htod(&[sw, sm, sv, sw, sm, sv])?;
    let mut amax = s.alloc_zeros::<u32>(3)?;
    be.fp8_adam_update(
        &mut dw, &mut dm, &mut dv, &mut dp, &dg, &dgm, &scales, &mut amax, k,
    )?;
    let ok = s.clone_dtoh(&dw)? == hw && s.clone_dtoh(&dm)? == hm && s.clone_dtoh(&dv)? == hv;
    let p = s.clone_dtoh(&dp)?;
    if !ok || p.iter().zip(&hp).any(|(a, b)| a.to_bits() != b.to_bits()) {
        return Ok(Err(
            "GPU Adam state differs from the host evaluation of the same expressions (bitwise)"
                .into(),
        ));
    }
    Ok(Ok(()))
}

fn bench_gemm(be: &CudaBackend) -> R<String> {
    let (m, n, k) = (4096usize, 4096usize, 4096usize);
    let a = be.alloc_fp8(m * k, Fp8Format::E4M3, 1.0)?;
    let b = be.alloc_fp8(n * k, Fp8Format::E4M3, 1.0)?;
    let mut c = be.compute.alloc_zeros::<f32>(m * n)?;
    let shape = GemmShape::new(m, n, k).trans_b();
    be.gemm_fp8_f32(shape, &a, &b, &mut c, false, false)?; // warm-up, plan cached
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let (start, end) = (be.ctx.new_event(flags)?, be.ctx.new_event(flags)?);
    let iters = 20;
    start.record(&be.compute)?;
    for _ in 0..iters {
        be.gemm_fp8_f32(shape, &a, &b, &mut c, false, false)?;
    }
    end.record(&be.compute)?;
    end.synchronize()?;
    let ms = start.elapsed_ms(&end)? as f64 / iters as f64;
    let tflops = 2.0 * (m * n * k) as f64 / (ms * 1e-3) / 1e12;
    Ok(format!(
        "gemm fp8 e4m3 {m}x{n}x{k} f32 out: {ms:.3} ms, {tflops:.1} TFLOP/s"
    ))
}
