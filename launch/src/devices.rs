//! `fp8lm devices` (what CUDA support this binary has and what the machine offers) and
//! the start-up check of the `device` config key.
//!
//! `device = "cuda[:N]"` runs the model on `fp8lm_kernels::cuda::CudaStaged` (the CUDA
//! backend behind the model's seam, staging each op through host memory; never run on a
//! GPU by this project). It is refused at start, saying why, when the feature, the
//! driver or the GPU is missing.

use anyhow::Result;
use fp8lm_trainer::config::Device;

use crate::UsageError;

/// Print GPUs and library versions, or exactly what is missing. Never fails for a
/// missing GPU or library: saying so is its job.
pub fn devices() -> Result<()> {
    print!("{}", report());
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn report() -> String {
    "CUDA: not built in (this fp8lm was built without the `cuda` cargo feature; \
     rebuild with `cargo build --release --features cuda`)\n\
     devices: cpu\n"
        .to_string()
}

#[cfg(feature = "cuda")]
fn report() -> String {
    use fp8lm_kernels::cuda::{device, libs, nvrtc, CudaLib};
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "CUDA: built in (cudarc 0.19, bindings for CUDA 13.2, libraries loaded at run time)"
    );
    let missing = |lib: CudaLib| libs::require(lib).err().map(|e| e.to_string());
    let _ = writeln!(s, "libraries:");
    match device::driver_version() {
        Ok(v) => {
            let _ = writeln!(s, "  driver:   CUDA {}.{}", v / 1000, (v % 1000) / 10);
        }
        Err(e) => {
            let _ = writeln!(s, "  driver:   missing: {e}");
        }
    }
    match nvrtc::version() {
        Ok((a, b)) => {
            let _ = writeln!(s, "  NVRTC:    {a}.{b}");
        }
        Err(e) => {
            let _ = writeln!(s, "  NVRTC:    missing: {e}");
        }
    }
    match missing(CudaLib::CublasLt) {
        None => match fp8lm_kernels::cuda::gemm::LtGemm::version() {
            Ok(v) => {
                let _ = writeln!(
                    s,
                    "  cuBLASLt: {}.{}.{}",
                    v / 10000,
                    (v / 100) % 100,
                    v % 100
                );
            }
            Err(e) => {
                let _ = writeln!(s, "  cuBLASLt: {e}");
            }
        },
        Some(e) => {
            let _ = writeln!(s, "  cuBLASLt: missing: {e}");
        }
    }
    match fp8lm_collectives::nccl::NcclComm::version() {
        Ok(v) => {
            let _ = writeln!(
                s,
                "  NCCL:     {}.{}.{}",
                v / 10000,
                (v / 100) % 100,
                v % 100
            );
        }
        Err(e) => {
            let _ = writeln!(s, "  NCCL:     missing: {e}");
        }
    }
    let _ = writeln!(s, "devices:");
    let _ = writeln!(s, "  cpu");
    match device::list_devices() {
        Ok(gpus) if gpus.is_empty() => {
            let _ = writeln!(s, "  (no GPU: the CUDA driver reports none)");
        }
        Ok(gpus) => {
            for g in gpus {
                let (ma, mi) = g.compute_capability;
                let _ = writeln!(
                    s,
                    "  cuda:{}  {}  compute capability {ma}.{mi} (sm_{ma}{mi}{})  {:.1} GiB",
                    g.ordinal,
                    g.name,
                    if ma >= 9 || (ma == 8 && mi >= 9) {
                        ", FP8 tensor cores"
                    } else {
                        ", no FP8 tensor cores"
                    },
                    g.total_mem as f64 / (1u64 << 30) as f64
                );
            }
        }
        Err(e) => {
            let _ = writeln!(s, "  (no GPU usable: {e})");
        }
    }
    s
}

/// Refuse a run on a device it cannot use, naming why (exit code 2): CUDA not built in,
/// no driver, or no such GPU. A GPU that is there is accepted: the model then runs on
/// `fp8lm_kernels::cuda::CudaStaged` (never run on a GPU by this project; see the README).
pub fn check_run_device(device: &str) -> Result<()> {
    let d = Device::parse(device)
        .map_err(|allowed| UsageError(format!("device = {device:?}: expected {allowed}")))?;
    let Device::Cuda(n) = d else {
        return Ok(());
    };
    match cuda_refusal(n, device) {
        Some(why) => Err(UsageError(why).into()),
        None => Ok(()),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_refusal(_n: usize, device: &str) -> Option<String> {
    Some(format!(
        "device = {device:?}: this fp8lm was built without the `cuda` feature \
         (rebuild with `cargo build --release --features cuda`); use device = \"cpu\""
    ))
}

#[cfg(feature = "cuda")]
fn cuda_refusal(n: usize, device: &str) -> Option<String> {
    use fp8lm_kernels::cuda::device;
    let why = match device::list_devices() {
        Err(e) => e.to_string(),
        Ok(g) if n >= g.len() => fp8lm_kernels::cuda::CudaError::NoDevice {
            wanted: n,
            found: g.len(),
        }
        .to_string(),
        Ok(_) => return None,
    };
    Some(format!(
        "device = {device:?}: {why}; use device = \"cpu\" (`fp8lm devices` shows what is available)"
    ))
}
