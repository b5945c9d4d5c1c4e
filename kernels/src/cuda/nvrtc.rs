//! The CUDA C sources of the backend's kernels, compiled with NVRTC once per
//! (source, architecture) and cached for the life of the process.
//!
//! Every source is `fp8.cuh` (the FP8/f16 conversions in integer arithmetic) followed by
//! one `.cu` file; none includes a CUDA header. Options: `--fmad=false` (no FMA
//! contraction: the optimizer's and the casts' products round exactly as the CPU's),
//! `--ftz=false`, `--prec-div=true`, `--prec-sqrt=true` (IEEE f32 throughout), `-std=c++17`.

use super::libs::{self, CudaLib};
use super::CudaError;
use cudarc::nvrtc::{result, sys};
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::sync::{Arc, Mutex, OnceLock};

/// The shared prelude (FP8 / f16 conversions, amax reduction).
pub const FP8_PRELUDE: &str = include_str!("cu/fp8.cuh");

/// One compilation unit: a name and its `.cu` body (compiled after [`FP8_PRELUDE`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelSource {
    pub name: &'static str,
    pub body: &'static str,
    /// The `extern "C"` kernels it defines (checked present in the compiled output).
    pub kernels: &'static [&'static str],
}

pub const CAST: KernelSource = KernelSource {
    name: "cast.cu",
    body: include_str!("cu/cast.cu"),
    kernels: &[
        "cast_f32_to_fp8",
        "cast_f16_to_fp8",
        "cast_fp8_to_f32",
        "cast_f32_to_f16",
        "amax_f32",
        "invert_scales",
        "transpose_u8",
        "cast_f32_to_bf16",
    ],
};

pub const LAYERS: KernelSource = KernelSource {
    name: "layers.cu",
    body: include_str!("cu/layers.cu"),
    kernels: &[
        "encoder_forward",
        "encoder_backward",
        "layernorm_forward",
        "layernorm_backward_dinp",
        "layernorm_backward_dwdb",
        "rmsnorm_forward",
        "rmsnorm_backward_dinp",
        "rmsnorm_backward_dw",
        "gelu_forward",
        "gelu_backward",
        "swiglu_forward",
        "swiglu_backward",
        "bias_forward",
        "bias_backward",
        "residual_forward",
        "add_inplace",
        "attention_forward",
        "attention_backward",
        "softmax_xent_forward",
        "softmax_xent_backward",
        "rope_apply",
        "encoder_forward_f16",
    ],
};

pub const OPTIM: KernelSource = KernelSource {
    name: "optim.cu",
    body: include_str!("cu/optim.cu"),
    kernels: &[
        "fp8_adam_update",
        "sumsq_partial_f32",
        "sumsq_partial_fp8",
        "sum_partials",
        "fp8_rescale",
        "scale_scalar",
    ],
};

/// Every source of the backend.
pub const ALL_SOURCES: [KernelSource; 3] = [CAST, LAYERS, OPTIM];

/// The architectures CI compiles every kernel for (Ada and Hopper: the FP8 tensor-core GPUs).
pub const CHECKED_ARCHS: [&str; 2] = ["sm_89", "sm_90"];

impl KernelSource {
    /// The full CUDA C text handed to NVRTC.
    pub fn full_source(&self) -> String {
        format!("{FP8_PRELUDE}\n// ---- {} ----\n{}", self.name, self.body)
    }
}

/// NVRTC output for one (source, arch): the cubin (SASS for exactly that GPU) and PTX.
#[derive(Debug)]
pub struct Compiled {
    pub source: &'static str,
    pub arch: String,
    pub cubin: Vec<u8>,
    pub ptx: String,
    pub log: String,
}

/// The NVRTC options used for every kernel (see the module docs for why).
pub fn options(arch: &str) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={arch}"),
        "--fmad=false".to_string(),
        "--ftz=false".to_string(),
        "--prec-div=true".to_string(),
        "--prec-sqrt=true".to_string(),
        "-std=c++17".to_string(),
    ];
    for d in libs::include_dirs() {
        o.push(format!("--include-path={}", d.display()));
    }
    o
}

/// NVRTC's version (major, minor).
pub fn version() -> Result<(i32, i32), CudaError> {
    libs::require(CudaLib::Nvrtc)?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loaded (checked above); the out-pointers are valid.
    let r = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    nvrtc_ok(r, "nvrtcVersion")?;
    Ok((major, minor))
}

fn nvrtc_ok(r: sys::nvrtcResult, what: &str) -> Result<(), CudaError> {
    if r == sys::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(CudaError::Api(format!("{what}: {r:?}")))
    }
}

/// Compile `src` for `arch` (e.g. `sm_90`) to a cubin and PTX, uncached.
pub fn compile(src: &KernelSource, arch: &str) -> Result<Compiled, CudaError> {
    libs::require(CudaLib::Nvrtc)?;
    let text = CString::new(src.full_source()).expect("kernel sources contain no NUL");
    let name = CString::new(src.name).expect("no NUL");
    let prog = result::create_program(&text, Some(&name))
        .map_err(|e| CudaError::Api(format!("nvrtcCreateProgram({}): {e:?}", src.name)))?;
    let opts = options(arch);
    // SAFETY: `prog` was just created and is destroyed below exactly once.
    let compiled = unsafe { result::compile_program(prog, &opts) };
    let log = unsafe { result::get_program_log(prog) }
        .map(|l| {
            unsafe { CStr::from_ptr(l.as_ptr()) }
                .to_string_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    let out = compiled
        .map_err(|e| CudaError::Compile {
            source: src.name,
            arch: arch.to_string(),
            log: format!("{e:?}\noptions: {opts:?}\n{log}"),
        })
        .and_then(|()| {
            let ptx = unsafe { result::get_ptx(prog) }
                .map_err(|e| CudaError::Api(format!("nvrtcGetPTX: {e:?}")))?;
            let ptx = unsafe { CStr::from_ptr(ptx.as_ptr()) }
                .to_string_lossy()
                .into_owned();
            let mut size = 0usize;
            // SAFETY: valid program and out-pointer; the buffer has `size` bytes.
            nvrtc_ok(
                unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) },
                "nvrtcGetCUBINSize",
            )?;
            let mut cubin = vec![0u8; size];
            nvrtc_ok(
                unsafe { sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut _) },
                "nvrtcGetCUBIN",
            )?;
            Ok(Compiled {
                source: src.name,
                arch: arch.to_string(),
                cubin,
                ptx,
                log: log.clone(),
            })
        });
    // SAFETY: created above, not destroyed yet.
    let _ = unsafe { result::destroy_program(prog) };
    out
}

/// [`compile`] through a process-wide cache keyed by (source name, arch).
pub fn compile_cached(src: &KernelSource, arch: &str) -> Result<Arc<Compiled>, CudaError> {
    type Cache = Mutex<HashMap<(&'static str, String), Arc<Compiled>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (src.name, arch.to_string());
    if let Some(c) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(c.clone());
    }
    // Compiled outside the lock (seconds); a racing thread may compile it twice, harmless.
    let c = Arc::new(compile(src, arch)?);
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(key)
        .or_insert(c.clone());
    Ok(c)
}

/// `sm_XY` of a compute capability.
pub fn arch_of(major: i32, minor: i32) -> String {
    format!("sm_{major}{minor}")
}
