//! # The CUDA backend (feature `cuda`)
//!
//! Built on cudarc 0.19 with dynamic loading: it compiles without a CUDA toolkit and
//! loads `libcuda`, `libnvrtc`, `libcublasLt` and `libnccl` at run time, each checked
//! first ([`libs::require`]) so a missing one is an error naming it, never a panic.
//!
//! - [`libs`]: finding the libraries (pip wheels under `site-packages/nvidia/*/lib`
//!   included) and presence checks.
//! - [`nvrtc`]: the kernels as CUDA C sources (`cu/*.cu`, `cu/fp8.cuh`), compiled once
//!   per (source, GPU architecture) and cached.
//! - [`cast_mirror`]: the FP8 casts of `cu/fp8.cuh` ported line by line to Rust, tested
//!   on the CPU against the fp8 crate's reference.
//! - [`gemm`]: cuBLASLt FP8 GEMM (host-side plan, tested without a device, and the
//!   device call with cached descriptors).
//! - [`device`]: a GPU context with one compute and one communication stream, events
//!   between them, device tensors (FP8 data with one-element scale and amax buffers) and
//!   the op methods, shaped like the CPU's `GemmOps` / `LayerOps`.
//!
//! ## What has run where
//! **Nothing here has run on a GPU.** No machine of this project has one. What is checked
//! without one (in CI): it builds and passes clippy; every kernel compiles with NVRTC to
//! a cubin for sm_89 and sm_90 (`tests/cuda_nvrtc.rs`); the cast algorithm, ported to
//! Rust, is bit-identical to the CPU casts (`tests/cuda_cast_mirror.rs`); the cuBLASLt
//! plan maps our layouts correctly (`gemm/tests.rs`). The device paths are exercised only
//! by `scripts/gpu-check.sh` (the `gpu_check` example, and the trainer's `gpu_train_check`:
//! the model on [`staged::CudaStaged`] vs the CPU), which has never been run.
//! - [`staged`]: [`CudaStaged`], the model's [`crate::Backend`] on a GPU: each op stages
//!   its host slices to the device and back (correct and slow; device-resident tensors
//!   are the next step). `device = "cuda[:N]"` selects it.

pub mod cast_mirror;
pub mod device;
pub mod gemm;
pub mod libs;
pub mod nvrtc;
pub mod staged;

pub use device::{CudaBackend, DevFp8, DeviceInfo};
pub use libs::CudaLib;
pub use staged::CudaStaged;

use std::path::PathBuf;

/// Errors of the CUDA backend.
#[derive(Debug)]
pub enum CudaError {
    /// A CUDA library could not be loaded.
    MissingLibrary {
        lib: CudaLib,
        searched: Vec<PathBuf>,
        /// Files of the library that were found but could not be used.
        found: Vec<PathBuf>,
    },
    /// The driver loaded but reports no GPU (or not the one asked for).
    NoDevice { wanted: usize, found: usize },
    /// NVRTC rejected a kernel source.
    Compile {
        source: &'static str,
        arch: String,
        log: String,
    },
    /// A CUDA API call failed.
    Api(String),
    /// A GEMM the cuBLASLt path cannot take as asked.
    Plan(gemm::PlanError),
}

impl std::fmt::Display for CudaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CudaError::MissingLibrary {
                lib,
                searched,
                found,
            } => {
                if !found.is_empty() {
                    let files: Vec<String> =
                        found.iter().map(|d| d.display().to_string()).collect();
                    write!(
                        f,
                        "{} found ({}) but not loadable by cudarc",
                        lib.name(),
                        files.join(", ")
                    )?;
                    if *lib == CudaLib::Nccl {
                        // cudarc 0.19 asks the loader for libnccl.so or libnccl.so.<CUDA
                        // major> (13, 12, ...); NCCL's own soname is libnccl.so.2.
                        write!(
                            f,
                            ": cudarc 0.19 loads NCCL only as `libnccl.so` (or libnccl.so.<CUDA major>); \
                             put a `libnccl.so` link to it in a directory on LD_LIBRARY_PATH \
                             (scripts/gpu-check.sh does this)"
                        )?;
                    }
                    return Ok(());
                }
                write!(
                    f,
                    "{} not found; it comes with {}",
                    lib.name(),
                    lib.provided_by()
                )?;
                if !searched.is_empty() {
                    let dirs: Vec<String> =
                        searched.iter().map(|d| d.display().to_string()).collect();
                    write!(
                        f,
                        " (searched the system loader path and {})",
                        dirs.join(", ")
                    )?;
                }
                Ok(())
            }
            CudaError::NoDevice { wanted, found } => {
                if *found == 0 {
                    write!(f, "the CUDA driver reports no GPU")
                } else {
                    write!(
                        f,
                        "GPU cuda:{wanted} asked for, but only {found} present (cuda:0..cuda:{})",
                        found - 1
                    )
                }
            }
            CudaError::Compile { source, arch, log } => {
                write!(f, "NVRTC could not compile {source} for {arch}:\n{log}")
            }
            CudaError::Api(s) => write!(f, "{s}"),
            CudaError::Plan(p) => write!(f, "{p}"),
        }
    }
}

impl std::error::Error for CudaError {}

impl From<cudarc::driver::DriverError> for CudaError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        CudaError::Api(format!("CUDA driver: {e:?}"))
    }
}

impl From<gemm::PlanError> for CudaError {
    fn from(e: gemm::PlanError) -> Self {
        CudaError::Plan(e)
    }
}
