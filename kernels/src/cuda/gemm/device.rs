//! The device half of the cuBLASLt FP8 GEMM: handle, workspace, per-key cache of
//! descriptors, layouts and the heuristic's algorithm.

use super::{LtKey, LtLayout, LtPlan, LtType};
use crate::cuda::libs::{self, CudaLib};
use crate::cuda::CudaError;
use cudarc::cublaslt::{result, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

/// Workspace size: NVIDIA's recommendation for Hopper (32 MiB), as cudarc's `Workspace`.
pub const WORKSPACE_BYTES: usize = 32 << 20;

fn dtype(t: LtType) -> sys::cudaDataType {
    match t {
        LtType::E4M3 => sys::cudaDataType::CUDA_R_8F_E4M3,
        LtType::E5M2 => sys::cudaDataType::CUDA_R_8F_E5M2,
        LtType::Bf16 => sys::cudaDataType::CUDA_R_16BF,
        LtType::F32 => sys::cudaDataType::CUDA_R_32F,
    }
}

fn lt(e: result::CublasError, what: &str) -> CudaError {
    CudaError::Api(format!("cuBLASLt {what}: {e:?}"))
}

/// Descriptors and algorithm of one [`LtKey`].
struct Prepared {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    d: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

// SAFETY: the descriptors are plain host objects of cuBLASLt; they are used under the
// cache's mutex only.
unsafe impl Send for Prepared {}

impl Drop for Prepared {
    fn drop(&mut self) {
        // SAFETY: created by us, destroyed once.
        unsafe {
            let _ = result::destroy_matrix_layout(self.a);
            let _ = result::destroy_matrix_layout(self.b);
            let _ = result::destroy_matrix_layout(self.c);
            let _ = result::destroy_matrix_layout(self.d);
            let _ = result::destroy_matmul_desc(self.desc);
        }
    }
}

/// Device pointers of one GEMM call. Scales: one-element f32 device buffers already
/// holding cuBLASLt's values (the *inverse* scales for A and B, see the module docs).
pub struct LtArgs<'a> {
    /// Our A and B buffers (the plan decides which goes where).
    pub a: u64,
    pub b: u64,
    /// Our row-major `[m, n]` output (also C when accumulating).
    pub d: u64,
    pub lt_a_scale_inv: Option<&'a CudaSlice<f32>>,
    pub lt_b_scale_inv: Option<&'a CudaSlice<f32>>,
    /// FP8 output only: the output scale and the amax (f32) cuBLASLt writes.
    pub d_scale: Option<&'a CudaSlice<f32>>,
    pub d_amax: Option<&'a mut CudaSlice<f32>>,
}

/// One cuBLASLt handle on one stream, with its workspace and plan cache.
pub struct LtGemm {
    handle: sys::cublasLtHandle_t,
    stream: Arc<CudaStream>,
    workspace: CudaSlice<u8>,
    cache: Mutex<HashMap<LtKey, Prepared>>,
}

// SAFETY: the handle is used from one stream; the cache is behind a mutex.
unsafe impl Send for LtGemm {}
unsafe impl Sync for LtGemm {}

impl Drop for LtGemm {
    fn drop(&mut self) {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { result::destroy_handle(self.handle) };
    }
}

impl LtGemm {
    pub fn new(stream: Arc<CudaStream>) -> Result<LtGemm, CudaError> {
        libs::require(CudaLib::CublasLt)?;
        let handle = result::create_handle().map_err(|e| lt(e, "create handle"))?;
        let workspace = stream.alloc_zeros::<u8>(WORKSPACE_BYTES)?;
        Ok(LtGemm {
            handle,
            stream,
            workspace,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// cuBLASLt's version number (e.g. 130200 for 13.2.0).
    pub fn version() -> Result<usize, CudaError> {
        libs::require(CudaLib::CublasLt)?;
        // SAFETY: the library is loaded (checked above); no arguments.
        Ok(unsafe { sys::cublasLtGetVersion() })
    }

    /// Number of cached plans (descriptor sets).
    pub fn cached(&self) -> usize {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn layout(l: &LtLayout) -> Result<sys::cublasLtMatrixLayout_t, CudaError> {
        result::create_matrix_layout(dtype(l.ty), l.rows, l.cols, l.ld)
            .map_err(|e| lt(e, "matrix layout"))
    }

    fn set_attr<T>(
        desc: sys::cublasLtMatmulDesc_t,
        attr: sys::cublasLtMatmulDescAttributes_t,
        v: &T,
    ) -> Result<(), CudaError> {
        // SAFETY: `v` is a live value of the attribute's documented type and size.
        unsafe {
            result::set_matmul_desc_attribute(
                desc,
                attr,
                v as *const T as *const c_void,
                std::mem::size_of::<T>(),
            )
        }
        .map_err(|e| lt(e, &format!("set {attr:?}")))
    }

    fn prepare(&self, plan: &LtPlan) -> Result<Prepared, CudaError> {
        use sys::cublasLtMatmulDescAttributes_t as A;
        let desc = result::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(|e| lt(e, "matmul desc"))?;
        let mut p = Prepared {
            desc,
            a: Self::layout(&plan.lt_a)?,
            b: Self::layout(&plan.lt_b)?,
            c: result::create_matrix_layout(dtype(plan.c), plan.d_rows, plan.d_cols, plan.d_ld)
                .map_err(|e| lt(e, "C layout"))?,
            d: result::create_matrix_layout(dtype(plan.key.d), plan.d_rows, plan.d_cols, plan.d_ld)
                .map_err(|e| lt(e, "D layout"))?,
            algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] },
        };
        // cublasOperation_t: CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 (as i32).
        Self::set_attr(
            desc,
            A::CUBLASLT_MATMUL_DESC_TRANSA,
            &(plan.lt_a.transposed as i32),
        )?;
        Self::set_attr(
            desc,
            A::CUBLASLT_MATMUL_DESC_TRANSB,
            &(plan.lt_b.transposed as i32),
        )?;
        if plan.key.a.is_fp8() {
            Self::set_attr(
                desc,
                A::CUBLASLT_MATMUL_DESC_FAST_ACCUM,
                &(plan.key.fast_accum as i8),
            )?;
        }
        let pref = result::create_matmul_pref().map_err(|e| lt(e, "preference"))?;
        let ws = WORKSPACE_BYTES as u64;
        // SAFETY: valid preference; the value is a u64 as documented.
        let r = unsafe {
            result::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                std::mem::size_of::<u64>(),
            )
        };
        let heur = r.and_then(|()| {
            // SAFETY: every descriptor is live.
            unsafe {
                result::get_matmul_algo_heuristic(self.handle, desc, p.a, p.b, p.c, p.d, pref)
            }
        });
        // SAFETY: created above.
        let _ = unsafe { result::destroy_matmul_pref(pref) };
        p.algo = heur
            .map_err(|e| lt(e, &format!("no algorithm for {:?}", plan.key)))?
            .algo;
        Ok(p)
    }

    /// Run a planned GEMM on this handle's stream. The descriptor, layouts and algorithm
    /// come from the cache (built on the first call with this key).
    ///
    /// # Safety
    /// The pointers in `args` must be live device buffers of the plan's sizes and types,
    /// used on this handle's stream.
    pub unsafe fn run(&self, plan: &LtPlan, args: LtArgs<'_>) -> Result<(), CudaError> {
        use sys::cublasLtMatmulDescAttributes_t as A;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let p = match cache.entry(plan.key) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(self.prepare(plan)?),
        };
        let p = &*p;
        let s = &self.stream;
        // Scale and amax pointers change per call; setting them is a host-side write.
        // The `_rec*` guards record the buffers' use on the stream when dropped (after
        // the matmul is queued).
        let set_ptr = |attr: A, ptr: Option<u64>| Self::set_attr(p.desc, attr, &ptr.unwrap_or(0));
        let rec_a = args.lt_a_scale_inv.map(|b| b.device_ptr(s));
        let rec_b = args.lt_b_scale_inv.map(|b| b.device_ptr(s));
        set_ptr(
            A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
            rec_a.as_ref().map(|r| r.0),
        )?;
        set_ptr(
            A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
            rec_b.as_ref().map(|r| r.0),
        )?;
        let rec_d = args.d_scale.map(|b| b.device_ptr(s));
        let rec_amax = args
            .d_amax
            .map(|b| cudarc::driver::DevicePtrMut::device_ptr_mut(b, s));
        if plan.key.d.is_fp8() {
            set_ptr(
                A::CUBLASLT_MATMUL_DESC_D_SCALE_POINTER,
                rec_d.as_ref().map(|r| r.0),
            )?;
            set_ptr(
                A::CUBLASLT_MATMUL_DESC_AMAX_D_POINTER,
                rec_amax.as_ref().map(|r| r.0),
            )?;
        }
        let (alpha, beta) = plan.alpha_beta();
        let (a_ptr, b_ptr) = match plan.lt_a.reads {
            super::OurOperand::B => (args.b, args.a),
            super::OurOperand::A => (args.a, args.b),
        };
        let (ws, _ws_rec) = self.workspace.device_ptr(s);
        result::matmul(
            self.handle,
            p.desc,
            &alpha as *const f32 as *const c_void,
            &beta as *const f32 as *const c_void,
            a_ptr as *const c_void,
            p.a,
            b_ptr as *const c_void,
            p.b,
            args.d as *const c_void,
            p.c,
            args.d as *mut c_void,
            p.d,
            &p.algo,
            ws as *mut c_void,
            WORKSPACE_BYTES,
            s.cu_stream() as sys::cudaStream_t,
        )
        .map_err(|e| lt(e, "matmul"))?;
        drop((rec_a, rec_b, rec_d, rec_amax));
        Ok(())
    }
}
