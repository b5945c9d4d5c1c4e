//! Finding and checking the CUDA libraries before cudarc touches them.
//!
//! cudarc (feature `dynamic-loading`) `dlopen`s each library by bare name the first time
//! one of its functions is called, and panics if none of its candidate names loads. So:
//! - [`require`] checks `is_culib_present()` first and turns absence into a
//!   [`CudaError::MissingLibrary`] that names the library and what provides it;
//! - [`preload`] first loads the library by absolute path from the directories of
//!   [`search_dirs`] (the pip wheels `nvidia-cuda-nvrtc` etc. put it under
//!   `site-packages/nvidia/cu13/lib`, which is on no loader path). glibc then resolves
//!   cudarc's later `dlopen("libnvrtc.so.13")` to the already loaded object by its
//!   SONAME, so nobody has to export `LD_LIBRARY_PATH`.

use super::CudaError;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// The CUDA libraries the backend loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CudaLib {
    /// `libcuda.so.1`, installed with the NVIDIA GPU driver (never from pip).
    Driver,
    /// `libnvrtc.so.13`: the run-time CUDA C compiler (pip `nvidia-cuda-nvrtc`).
    Nvrtc,
    /// `libcublasLt.so.13` (pip `nvidia-cublas`).
    CublasLt,
    /// `libnccl.so.2` (pip `nvidia-nccl-cu13`).
    Nccl,
}

impl CudaLib {
    pub const ALL: [CudaLib; 4] = [
        CudaLib::Driver,
        CudaLib::Nvrtc,
        CudaLib::CublasLt,
        CudaLib::Nccl,
    ];

    /// File name prefix of the shared object.
    pub fn file_prefix(self) -> &'static str {
        match self {
            CudaLib::Driver => "libcuda.so",
            CudaLib::Nvrtc => "libnvrtc.so",
            CudaLib::CublasLt => "libcublasLt.so",
            CudaLib::Nccl => "libnccl.so",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CudaLib::Driver => "CUDA driver (libcuda.so)",
            CudaLib::Nvrtc => "NVRTC (libnvrtc.so.13)",
            CudaLib::CublasLt => "cuBLASLt (libcublasLt.so.13)",
            CudaLib::Nccl => "NCCL (libnccl.so.2)",
        }
    }

    /// What to install to get it.
    pub fn provided_by(self) -> &'static str {
        match self {
            CudaLib::Driver => "the NVIDIA GPU driver (a machine without an NVIDIA GPU has none)",
            CudaLib::Nvrtc => "`pip install nvidia-cuda-nvrtc` (scripts/setup.sh does it)",
            CudaLib::CublasLt => "`pip install nvidia-cublas` (or a CUDA 13 toolkit)",
            CudaLib::Nccl => "`pip install nvidia-nccl-cu13` (or the system NCCL package)",
        }
    }

    /// cudarc's own presence check (which tries its list of candidate names).
    fn cudarc_present(self) -> bool {
        // SAFETY: these only try to dlopen candidate names; no symbol is called.
        unsafe {
            match self {
                CudaLib::Driver => cudarc::driver::sys::is_culib_present(),
                CudaLib::Nvrtc => cudarc::nvrtc::sys::is_culib_present(),
                CudaLib::CublasLt => cudarc::cublaslt::sys::is_culib_present(),
                CudaLib::Nccl => cudarc::nccl::sys::is_culib_present(),
            }
        }
    }
}

/// Directories searched for the pip-installed libraries, in order: `FP8LM_CUDA_LIB_DIR`
/// (colon-separated) if set, then `nvidia/*/lib` and `nvidia/*/lib64` under every
/// site-packages directory of `python3` (as `site` reports them), then
/// `/usr/local/cuda/lib64`.
pub fn search_dirs() -> &'static [PathBuf] {
    static DIRS: OnceLock<Vec<PathBuf>> = OnceLock::new();
    DIRS.get_or_init(|| {
        let mut dirs = Vec::new();
        if let Ok(v) = std::env::var("FP8LM_CUDA_LIB_DIR") {
            dirs.extend(v.split(':').filter(|s| !s.is_empty()).map(PathBuf::from));
        }
        for sp in python_site_packages() {
            dirs.extend(nvidia_subdirs(sp, &["lib", "lib64"]));
        }
        dirs.push(PathBuf::from("/usr/local/cuda/lib64"));
        dirs.retain(|d| d.is_dir());
        dirs.dedup();
        dirs
    })
}

/// Include directories with the CUDA headers from pip (`nvidia-cuda-runtime`:
/// `site-packages/nvidia/cu13/include`), and `/usr/local/cuda/include`. The kernels
/// themselves need no header; these are passed to NVRTC for its own builtins.
pub fn include_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = python_site_packages()
        .iter()
        .flat_map(|sp| nvidia_subdirs(sp, &["include"]))
        .collect();
    dirs.push(PathBuf::from("/usr/local/cuda/include"));
    dirs.retain(|d| d.join("cuda_runtime.h").is_file() || d.join("cuda_fp16.h").is_file());
    dirs
}

fn nvidia_subdirs(site_packages: &Path, leaves: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(site_packages.join("nvidia")) else {
        return out;
    };
    let mut pkgs: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    pkgs.sort();
    for p in pkgs {
        for leaf in leaves {
            let d = p.join(leaf);
            if d.is_dir() {
                out.push(d);
            }
        }
    }
    out
}

/// The site-packages directories of `python3` (empty if there is no python3).
fn python_site_packages() -> &'static [PathBuf] {
    static SP: OnceLock<Vec<PathBuf>> = OnceLock::new();
    SP.get_or_init(|| {
        let code = "import site, sys\n\
                    ds = list(getattr(site, 'getsitepackages', lambda: [])())\n\
                    u = getattr(site, 'getusersitepackages', lambda: None)()\n\
                    ds += [u] if u else []\n\
                    print('\\n'.join(ds))";
        match std::process::Command::new("python3")
            .args(["-c", code])
            .output()
        {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| PathBuf::from(l.trim()))
                .collect(),
            _ => Vec::new(),
        }
    })
}

/// Files of `lib` found in [`search_dirs`] (`libnvrtc.so*`, ...), newest name last.
pub fn find_files(lib: CudaLib) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for d in search_dirs() {
        let Ok(entries) = std::fs::read_dir(d) else {
            continue;
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(lib.file_prefix()))
            })
            .collect();
        files.sort();
        out.extend(files);
    }
    out
}

/// dlopen every file of `lib` found in [`search_dirs`] (once per process; the handles
/// stay open for the life of the process, as cudarc's own do).
pub fn preload(lib: CudaLib) {
    static DONE: Mutex<Vec<CudaLib>> = Mutex::new(Vec::new());
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if done.contains(&lib) {
        return;
    }
    done.push(lib);
    if lib == CudaLib::Driver {
        // The driver comes with the GPU's kernel module; it is found by the system loader
        // or not at all (a pip-installed copy would not match the kernel module).
        return;
    }
    for f in find_files(lib) {
        let Some(c) = f.to_str().and_then(|s| CString::new(s).ok()) else {
            continue;
        };
        // SAFETY: dlopen of a CUDA library runs its initialisers only (no GPU access).
        unsafe {
            libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL);
        }
    }
}

/// Whether `lib` can be loaded (after [`preload`]).
pub fn is_present(lib: CudaLib) -> bool {
    preload(lib);
    lib.cudarc_present()
}

/// `Ok` if `lib` loads; otherwise an error naming it, what provides it, and where we looked.
/// Call before the first cudarc function of that library (cudarc would panic instead).
pub fn require(lib: CudaLib) -> Result<(), CudaError> {
    if is_present(lib) {
        Ok(())
    } else {
        // The driver is looked for on the system loader path only (see `preload`).
        let searched = if lib == CudaLib::Driver {
            Vec::new()
        } else {
            search_dirs().to_vec()
        };
        let found = if lib == CudaLib::Driver {
            Vec::new()
        } else {
            find_files(lib)
        };
        Err(CudaError::MissingLibrary {
            lib,
            searched,
            found,
        })
    }
}
