//! The model on the GPU, run by `scripts/gpu-check.sh` (never by CI, which only compiles
//! it: there is no GPU there). Exits 2 saying "nothing ran" without a usable GPU, 1 if a
//! check fails, 0 when all passed. **Never run yet**: no machine of this project has had
//! a GPU.
//!
//! 1. The same tiny model (2 layers, C = 64, context 16, batch 4), trained 8 steps from
//!    the same seed on the CPU backend and on `CudaStaged`, GPT-2 and LLaMA blocks,
//!    fp32 / bf16 / fp8-o1 / fp8-o2, compared with the bounds `trainer/tests/backends.rs`
//!    derives for two backends that sum in different orders (fp32: the f32 accumulation
//!    bound over the op depth; bf16 and FP8: the measured rounding-boundary-flip bound).
//!    cuBLASLt sums in its own order, as the Reference backend does, so the same bounds
//!    apply; a transposed operand or a wrong scale is 29-37x outside them (backends.rs).
//! 2. 20 steps of fp8-o2 and of fp32 on the GPU: both losses fall, and fp8-o2 ends
//!    within 2% of fp32 (the parity bar of `trainer/tests/parity_fp8_o2.rs`).
//! 3. Step time CPU vs GPU on the same model (staged: every op crosses PCIe, so this is
//!    not the GPU's speed; printed, not checked).

use fp8lm_kernels::cuda::CudaStaged;
use fp8lm_kernels::Backend;
use fp8lm_trainer::{Arch, Precision, RunConfig, Trainer};
use std::sync::Arc;
use std::time::Instant;

const STEPS: usize = 8;
const LAYERS: usize = 2;
const K: usize = 256;
const U: f64 = 1.0 / (1u64 << 24) as f64;
/// `trainer/tests/backends.rs`: N * (8L + 4) * k * 2^-24.
const TOL_F32: f64 = (STEPS * (8 * LAYERS + 4) * K) as f64 * U;
/// `trainer/tests/backends.rs` (measured, 4x the worst seen).
const TOL_LOWP_LOSS: f64 = 2e-3;
const TOL_LOWP_WEIGHTS: f64 = 1e-2;

#[path = "../tests/rows/mod.rs"]
mod rows;
use rows::Rows;

struct Run {
    losses: Vec<f32>,
    weights: Vec<f32>,
    step_ms: f64,
}

fn train(
    be: Arc<dyn Backend>,
    arch: Arch,
    precision: Precision,
    steps: usize,
) -> Result<Run, String> {
    let mut cfg = RunConfig {
        precision,
        batch: 4,
        max_steps: steps,
        ..RunConfig::default()
    };
    cfg.model.arch = arch;
    cfg.model.layers = LAYERS;
    cfg.model.context = 16;
    cfg.optim.lr = 3e-3;
    let mut data = Rows { next: 0, vocab: 64 };
    let mut tr = Trainer::new_on(&cfg, 64, be).map_err(|e| e.to_string())?;
    let mut losses = Vec::new();
    let t0 = Instant::now();
    for _ in 0..steps {
        losses.push(tr.train_step(&mut data).map_err(|e| e.to_string())?.loss);
    }
    Ok(Run {
        losses,
        weights: tr.weights_f32_all(),
        step_ms: t0.elapsed().as_secs_f64() * 1e3 / steps as f64,
    })
}

fn rel(a: f32, b: f32) -> f64 {
    ((a as f64 - b as f64) / b as f64).abs()
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut d, mut n) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        d += (x as f64 - y as f64).powi(2);
        n += (y as f64).powi(2);
    }
    (d / n).sqrt()
}

fn compare(gpu: &Arc<dyn Backend>, arch: Arch, p: Precision) -> Result<(), String> {
    let cpu = train(fp8lm_kernels::default_backend(), arch, p, STEPS)?;
    let dev = train(gpu.clone(), arch, p, STEPS)?;
    let loss = (0..STEPS)
        .map(|i| rel(dev.losses[i], cpu.losses[i]))
        .fold(0f64, f64::max);
    let w = rel_l2(&dev.weights, &cpu.weights);
    let (tl, tw) = match p {
        Precision::Fp32 => (TOL_F32, TOL_F32),
        _ => (TOL_LOWP_LOSS, TOL_LOWP_WEIGHTS),
    };
    println!(
        "      loss rel diff {loss:.2e} (bound {tl:.1e}), weights rel L2 {w:.2e} (bound {tw:.1e}); \
         step {:.1} ms cpu / {:.1} ms cuda (staged)",
        cpu.step_ms, dev.step_ms
    );
    if loss > tl || w > tw {
        return Err(format!("cpu {:?} vs cuda {:?}", cpu.losses, dev.losses));
    }
    Ok(())
}

fn main() {
    let gpu: Arc<dyn Backend> = match CudaStaged::new(0) {
        Ok(b) => Arc::new(b),
        Err(e) => {
            println!("gpu_train_check: NOTHING RAN: no usable GPU: {e}");
            std::process::exit(2);
        }
    };
    let mut failed = Vec::new();
    let mut check = |name: String, r: Result<(), String>| match r {
        Ok(()) => println!("PASS  {name}"),
        Err(why) => {
            println!("FAIL  {name}: {why}");
            failed.push(name);
        }
    };
    for arch in [Arch::Gpt2, Arch::Llama] {
        for p in [
            Precision::Fp32,
            Precision::Bf16,
            Precision::Fp8O1,
            Precision::Fp8O2,
        ] {
            let name = format!("{arch:?} {} {STEPS} steps, CUDA vs CPU", p.name());
            check(name, compare(&gpu, arch, p));
        }
    }
    let parity = (|| {
        let o2 = train(gpu.clone(), Arch::Gpt2, Precision::Fp8O2, 20)?;
        let f32 = train(gpu.clone(), Arch::Gpt2, Precision::Fp32, 20)?;
        let (a, b) = (o2.losses[19], f32.losses[19]);
        println!(
            "      loss after 20 steps on CUDA: fp8-o2 {a:.4}, fp32 {b:.4} (start {:.4})",
            f32.losses[0]
        );
        if rel(b, f32.losses[0]) < 0.05 {
            return Err(format!("fp32 did not train: {:?}", f32.losses));
        }
        if rel(a, b) > 0.02 {
            return Err(format!("fp8-o2 {a} vs fp32 {b}: more than 2% apart"));
        }
        Ok(())
    })();
    check("20 steps fp8-o2 vs fp32 on CUDA".into(), parity);
    if failed.is_empty() {
        println!("gpu_train_check: all passed");
    } else {
        println!("gpu_train_check: FAILED: {}", failed.join("; "));
        std::process::exit(1);
    }
}
