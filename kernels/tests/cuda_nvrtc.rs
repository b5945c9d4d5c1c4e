//! Every CUDA kernel source compiles with NVRTC to a cubin for sm_89 and sm_90, and
//! defines every kernel the backend launches. Runs without a GPU (NVRTC is a compiler
//! library; `scripts/setup.sh` installs it from pip). A missing NVRTC FAILS this test:
//! it is not skipped.

use fp8lm_kernels::cuda::libs::{self, CudaLib};
use fp8lm_kernels::cuda::nvrtc::{self, ALL_SOURCES, CHECKED_ARCHS};

#[test]
fn nvrtc_is_present() {
    if let Err(e) = libs::require(CudaLib::Nvrtc) {
        panic!("{e}\nRun scripts/setup.sh (pip install nvidia-cuda-nvrtc).");
    }
    let (major, minor) = nvrtc::version().expect("nvrtcVersion");
    // cudarc is built for CUDA 13.2 (feature cuda-13020): its NVRTC bindings need 13.x.
    assert_eq!(
        major, 13,
        "NVRTC {major}.{minor}: the cuda-13020 bindings need NVRTC 13.x"
    );
}

#[test]
fn every_kernel_compiles_for_sm89_and_sm90() {
    libs::require(CudaLib::Nvrtc).unwrap_or_else(|e| panic!("{e}"));
    let mut failures = Vec::new();
    for src in ALL_SOURCES {
        for arch in CHECKED_ARCHS {
            match nvrtc::compile(&src, arch) {
                Ok(c) => {
                    // A cubin is an ELF file; NVRTC emits one only for a real sm_ arch.
                    assert!(
                        c.cubin.len() > 64 && c.cubin[..4] == *b"\x7fELF",
                        "{} {arch}: no cubin",
                        src.name
                    );
                    assert!(
                        c.ptx.contains(&format!(".target {arch}")),
                        "{} {arch}: PTX target",
                        src.name
                    );
                    for k in src.kernels {
                        assert!(
                            c.ptx.contains(&format!(".entry {k}(")),
                            "{} {arch}: kernel {k} missing from the PTX",
                            src.name
                        );
                    }
                    // The compiler's warnings are failures too: a warning in a numeric
                    // kernel (narrowing, unused result) is usually a bug.
                    assert!(
                        !c.log.contains("warning"),
                        "{} {arch}: NVRTC warnings:\n{}",
                        src.name,
                        c.log
                    );
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "kernels failed to compile:\n{}",
        failures.join("\n\n")
    );
}

#[test]
fn compile_cache_returns_the_same_object() {
    libs::require(CudaLib::Nvrtc).unwrap_or_else(|e| panic!("{e}"));
    let a = nvrtc::compile_cached(&nvrtc::CAST, "sm_90").unwrap();
    let b = nvrtc::compile_cached(&nvrtc::CAST, "sm_90").unwrap();
    assert!(std::sync::Arc::ptr_eq(&a, &b));
    let c = nvrtc::compile_cached(&nvrtc::CAST, "sm_89").unwrap();
    assert!(!std::sync::Arc::ptr_eq(&a, &c));
}

#[test]
fn a_broken_kernel_is_reported_with_the_compiler_log() {
    libs::require(CudaLib::Nvrtc).unwrap_or_else(|e| panic!("{e}"));
    let bad = nvrtc::KernelSource {
        name: "bad.cu",
        body: "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }",
        kernels: &["k"],
    };
    let e = nvrtc::compile(&bad, "sm_90").unwrap_err().to_string();
    assert!(
        e.contains("bad.cu") && e.contains("sm_90") && e.contains("undefined_name"),
        "{e}"
    );
}
