//! A GPU context for the backend: device, streams, events, device tensors, kernel
//! launches. Shaped like the CPU op set (`GemmOps`, `LayerOps`) but on device buffers;
//! `super::staged::CudaStaged` puts it behind the model's seam (`Backend`).
//!
//! Streams: `compute` runs kernels and GEMMs; `comm` runs NCCL collectives (in
//! `fp8lm-collectives`, feature `cuda`). [`CudaBackend::compute_to_comm`] /
//! [`CudaBackend::comm_to_compute`] record an event on one and make the other wait, so
//! a gradient is reduced after its backward kernel and used after its reduction, with no
//! host synchronisation.
//!
//! Scales and amaxes live on the device as one-element buffers (no host sync per
//! tensor): an FP8 tensor's `scale` is read by the cast kernel and (inverted by kernel
//! `invert_scales`) by cuBLASLt; its `amax_bits` accumulates `|x|` bits (see
//! `cu/fp8.cuh`), zeroed by the op that fills it.

use super::gemm::{LtArgs, LtGemm, LtPlan, LtType, PlanError};
use super::libs::{self, CudaLib};
use super::nvrtc::{self, KernelSource};
use super::{cast_mirror, CudaError};
use crate::GemmShape;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, LaunchConfig,
    PushKernelArg,
};
use fp8lm_fp8::{CastMode, Fp8Format};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Launch kernel `$f` on the compute stream with the given parameters, in order.
macro_rules! launch {
    ($self:expr, $f:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        let mut b = $self.compute.launch_builder(&$f);
        $( b.arg($arg); )*
        // SAFETY: every call site passes exactly the kernel's parameters, in order, with
        // buffers whose lengths it checked against the sizes it passes.
        unsafe { b.launch($cfg) }.map(|_| ()).map_err(CudaError::from)
    }};
}

mod layers;
mod optim;
pub use optim::AdamConsts;

/// One GPU as `fp8lm devices` reports it.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_mem: usize,
}

/// The CUDA driver's version (e.g. 13020), after checking the driver is present.
pub fn driver_version() -> Result<i32, CudaError> {
    libs::require(CudaLib::Driver)?;
    let mut v = 0;
    // SAFETY: the library is loaded; valid out-pointer.
    let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    if r != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
        return Err(CudaError::Api(format!("cuDriverGetVersion: {r:?}")));
    }
    Ok(v)
}

/// Every GPU the driver sees (an error naming the library when the driver is missing).
pub fn list_devices() -> Result<Vec<DeviceInfo>, CudaError> {
    libs::require(CudaLib::Driver)?;
    let n = CudaContext::device_count()? as usize;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let ctx = CudaContext::new(i)?;
        out.push(DeviceInfo {
            ordinal: i,
            name: ctx.name()?,
            compute_capability: ctx.compute_capability()?,
            total_mem: ctx.total_mem()?,
        });
    }
    Ok(out)
}

/// An FP8 tensor on the device: codes, format, and its scale (`real = stored / scale`),
/// inverse scale (for cuBLASLt) and amax accumulator, each a one-element device buffer.
pub struct DevFp8 {
    pub data: CudaSlice<u8>,
    pub format: Fp8Format,
    pub scale: CudaSlice<f32>,
    pub scale_inv: CudaSlice<f32>,
    pub amax_bits: CudaSlice<u32>,
}

/// Threads per block of the element-wise kernels, and the cap on their grid (they are
/// grid-stride loops).
pub(crate) const EW_THREADS: u32 = 256;
const EW_MAX_BLOCKS: u64 = 4096;

pub(crate) fn ew_cfg(n: usize) -> LaunchConfig {
    let blocks = (n as u64)
        .div_ceil(EW_THREADS as u64)
        .clamp(1, EW_MAX_BLOCKS) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (EW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block per row (norms, softmax): 256 threads, or fewer for narrow rows (a
/// multiple of 32).
pub(crate) fn row_cfg(rows: usize, width: usize) -> LaunchConfig {
    let threads = (width.div_ceil(32) * 32).clamp(32, 256) as u32;
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The backend on one GPU.
pub struct CudaBackend {
    pub ctx: Arc<CudaContext>,
    pub compute: Arc<CudaStream>,
    pub comm: Arc<CudaStream>,
    /// `sm_XY` of this GPU: what the kernels are compiled for.
    pub arch: String,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    gemm: OnceLock<Result<LtGemm, String>>,
}

impl CudaBackend {
    /// Open GPU `ordinal` (the N of `device = "cuda:N"`).
    pub fn new(ordinal: usize) -> Result<CudaBackend, CudaError> {
        libs::require(CudaLib::Driver)?;
        let found = CudaContext::device_count()? as usize;
        if ordinal >= found {
            return Err(CudaError::NoDevice {
                wanted: ordinal,
                found,
            });
        }
        libs::require(CudaLib::Nvrtc)?;
        let ctx = CudaContext::new(ordinal)?;
        let (major, minor) = ctx.compute_capability()?;
        let compute = ctx.new_stream()?;
        let comm = ctx.new_stream()?;
        Ok(CudaBackend {
            ctx,
            compute,
            comm,
            arch: nvrtc::arch_of(major, minor),
            modules: Mutex::new(HashMap::new()),
            gemm: OnceLock::new(),
        })
    }

    /// Kernel `name` of `src`, compiled for this GPU on first use (cached).
    pub fn function(&self, src: &KernelSource, name: &str) -> Result<CudaFunction, CudaError> {
        let mut mods = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        let module = match mods.get(src.name) {
            Some(m) => m.clone(),
            None => {
                let compiled = nvrtc::compile_cached(src, &self.arch)?;
                let m = self
                    .ctx
                    .load_module(cudarc::nvrtc::Ptx::from_binary(compiled.cubin.clone()))?;
                mods.insert(src.name, m.clone());
                m
            }
        };
        Ok(module.load_function(name)?)
    }

    /// The cuBLASLt handle on the compute stream (created on first use).
    pub fn lt(&self) -> Result<&LtGemm, CudaError> {
        self.gemm
            .get_or_init(|| LtGemm::new(self.compute.clone()).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| CudaError::Api(e.clone()))
    }

    /// Make the communication stream wait for the work queued on the compute stream.
    pub fn compute_to_comm(&self) -> Result<(), CudaError> {
        let ev = self.compute.record_event(None)?;
        self.comm.wait(&ev)?;
        Ok(())
    }

    /// Make the compute stream wait for the work queued on the communication stream.
    pub fn comm_to_compute(&self) -> Result<(), CudaError> {
        let ev = self.comm.record_event(None)?;
        self.compute.wait(&ev)?;
        Ok(())
    }

    // ---- tensors -------------------------------------------------------------------------

    /// A zeroed FP8 tensor of `n` codes with scale `scale`.
    pub fn alloc_fp8(&self, n: usize, format: Fp8Format, scale: f32) -> Result<DevFp8, CudaError> {
        let s = &self.compute;
        Ok(DevFp8 {
            data: s.alloc_zeros::<u8>(n)?,
            format,
            scale: s.clone_htod(&[scale])?,
            scale_inv: s.clone_htod(&[1.0 / scale])?,
            amax_bits: s.alloc_zeros::<u32>(1)?,
        })
    }

    /// Read an amax accumulator back (synchronises: for metrics and tests, not per step).
    pub fn read_amax(&self, amax_bits: &CudaSlice<u32>) -> Result<f32, CudaError> {
        let v = self.compute.clone_dtoh(amax_bits)?;
        Ok(cast_mirror::amax_from_bits(v[0]))
    }

    // ---- casts (cu/cast.cu) --------------------------------------------------------------

    /// `dst = fp8(src * dst.scale)`, `dst.amax_bits = max |src|` (zeroed first).
    pub fn cast_f32_to_fp8(
        &self,
        src: &CudaSlice<f32>,
        dst: &mut DevFp8,
        mode: CastMode,
    ) -> Result<(), CudaError> {
        assert_eq!(src.len(), dst.data.len(), "cast_f32_to_fp8: lengths differ");
        let f = self.function(&nvrtc::CAST, "cast_f32_to_fp8")?;
        self.compute.memset_zeros(&mut dst.amax_bits)?;
        let (n, fmt, mode) = (
            src.len() as u64,
            cast_mirror::fmt_code(dst.format),
            cast_mirror::mode_code(mode),
        );
        launch!(
            self,
            f,
            ew_cfg(src.len()),
            &mut dst.data,
            src,
            &dst.scale,
            &mut dst.amax_bits,
            &n,
            &fmt,
            &mode
        )
    }

    /// As [`Self::cast_f32_to_fp8`] from f16 (bit patterns).
    pub fn cast_f16_to_fp8(
        &self,
        src: &CudaSlice<u16>,
        dst: &mut DevFp8,
        mode: CastMode,
    ) -> Result<(), CudaError> {
        assert_eq!(src.len(), dst.data.len(), "cast_f16_to_fp8: lengths differ");
        let f = self.function(&nvrtc::CAST, "cast_f16_to_fp8")?;
        self.compute.memset_zeros(&mut dst.amax_bits)?;
        let (n, fmt, mode) = (
            src.len() as u64,
            cast_mirror::fmt_code(dst.format),
            cast_mirror::mode_code(mode),
        );
        launch!(
            self,
            f,
            ew_cfg(src.len()),
            &mut dst.data,
            src,
            &dst.scale,
            &mut dst.amax_bits,
            &n,
            &fmt,
            &mode
        )
    }

    /// `dst = decode(src) / src.scale`; returns nothing, `amax` receives max |decoded|.
    pub fn cast_fp8_to_f32(
        &self,
        src: &DevFp8,
        dst: &mut CudaSlice<f32>,
        amax: &mut CudaSlice<u32>,
    ) -> Result<(), CudaError> {
        assert_eq!(src.data.len(), dst.len(), "cast_fp8_to_f32: lengths differ");
        let f = self.function(&nvrtc::CAST, "cast_fp8_to_f32")?;
        self.compute.memset_zeros(amax)?;
        let (n, fmt, cfg) = (
            dst.len() as u64,
            cast_mirror::fmt_code(src.format),
            ew_cfg(dst.len()),
        );
        launch!(self, f, cfg, dst, &src.data, &src.scale, amax, &n, &fmt)
    }

    /// `amax_bits[0] = max |src|` as bits (zeroed first; NaN bits win, see `fp8.cuh`).
    pub fn amax_f32(
        &self,
        src: &CudaSlice<f32>,
        amax_bits: &mut CudaSlice<u32>,
    ) -> Result<(), CudaError> {
        let f = self.function(&nvrtc::CAST, "amax_f32")?;
        self.compute.memset_zeros(amax_bits)?;
        let n = src.len() as u64;
        launch!(self, f, ew_cfg(src.len()), src, amax_bits, &n)
    }

    /// `dst = bf16(src)` as bit patterns, round to nearest even (as `half::bf16::from_f32`).
    pub fn cast_f32_to_bf16(
        &self,
        src: &CudaSlice<f32>,
        dst: &mut CudaSlice<u16>,
    ) -> Result<(), CudaError> {
        assert_eq!(src.len(), dst.len(), "cast_f32_to_bf16: lengths differ");
        let f = self.function(&nvrtc::CAST, "cast_f32_to_bf16")?;
        let n = src.len() as u64;
        launch!(self, f, ew_cfg(src.len()), dst, src, &n)
    }

    /// `t.scale_inv = 1 / t.scale` on the device (after a scale update, before a GEMM).
    pub fn refresh_scale_inv(&self, t: &mut DevFp8) -> Result<(), CudaError> {
        let f = self.function(&nvrtc::CAST, "invert_scales")?;
        let n = 1i32;
        launch!(
            self,
            f,
            LaunchConfig::for_num_elems(1),
            &mut t.scale_inv,
            &t.scale,
            &n
        )
    }

    /// `dst[cols, rows] = src[rows, cols]^T` of FP8 codes (scale and format carried over).
    pub fn transpose_fp8(
        &self,
        src: &DevFp8,
        rows: usize,
        cols: usize,
    ) -> Result<DevFp8, CudaError> {
        assert_eq!(src.data.len(), rows * cols, "transpose_fp8: shape");
        let f = self.function(&nvrtc::CAST, "transpose_u8")?;
        let s = &self.compute;
        let mut out = DevFp8 {
            data: s.alloc_zeros::<u8>(rows * cols)?,
            format: src.format,
            scale: s.alloc_zeros::<f32>(1)?,
            scale_inv: s.alloc_zeros::<f32>(1)?,
            amax_bits: s.alloc_zeros::<u32>(1)?,
        };
        s.memcpy_dtod(&src.scale, &mut out.scale)?;
        s.memcpy_dtod(&src.scale_inv, &mut out.scale_inv)?;
        s.memcpy_dtod(&src.amax_bits, &mut out.amax_bits)?;
        let cfg = LaunchConfig {
            grid_dim: (cols.div_ceil(32) as u32, rows.div_ceil(32) as u32, 1),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        let (r, c) = (rows as i32, cols as i32);
        launch!(self, f, cfg, &mut out.data, &src.data, &r, &c)?;
        Ok(out)
    }

    // ---- GEMM (cuBLASLt) -----------------------------------------------------------------

    /// The TN plan of an FP8 GEMM, with the operands the TN layout needs transposed
    /// materialised on the device (the backward GEMMs; as Transformer Engine does).
    #[allow(clippy::type_complexity)]
    fn tn_plan(
        &self,
        shape: GemmShape,
        a: &DevFp8,
        b: &DevFp8,
        d: LtType,
        accumulate: bool,
        fast_accum: bool,
    ) -> Result<(LtPlan, Option<DevFp8>, Option<DevFp8>), CudaError> {
        let mut shape = shape;
        let (mut ta, mut tb) = (None, None);
        let (fa, fb) = (LtType::fp8(a.format), LtType::fp8(b.format));
        match LtPlan::new(shape, fa, fb, d, accumulate, fast_accum) {
            Err(PlanError::NotTn(need)) => {
                for nt in need {
                    match nt.operand {
                        super::gemm::OurOperand::A => {
                            ta = Some(self.transpose_fp8(a, nt.rows, nt.cols)?);
                            shape.trans_a = false;
                        }
                        super::gemm::OurOperand::B => {
                            tb = Some(self.transpose_fp8(b, nt.rows, nt.cols)?);
                            shape.trans_b = true;
                        }
                    }
                }
            }
            Err(e) => return Err(e.into()),
            Ok(_) => {}
        }
        Ok((
            LtPlan::new(shape, fa, fb, d, accumulate, fast_accum)?,
            ta,
            tb,
        ))
    }

    /// `c[m,n] (+)= op(a) @ op(b)` with FP8 operands and an f32 output (as
    /// `GemmOps::gemm` with two `MatRef::Fp8`).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_fp8_f32(
        &self,
        shape: GemmShape,
        a: &DevFp8,
        b: &DevFp8,
        c: &mut CudaSlice<f32>,
        accumulate: bool,
        fast_accum: bool,
    ) -> Result<(), CudaError> {
        assert_eq!(c.len(), shape.m * shape.n, "gemm: C length");
        let (plan, ta, tb) = self.tn_plan(shape, a, b, LtType::F32, accumulate, fast_accum)?;
        let (a, b) = (ta.as_ref().unwrap_or(a), tb.as_ref().unwrap_or(b));
        let lt = self.lt()?;
        let s = &self.compute;
        let (ap, _ra) = a.data.device_ptr(s);
        let (bp, _rb) = b.data.device_ptr(s);
        let (cp, _rc) = cudarc::driver::DevicePtrMut::device_ptr_mut(c, s);
        // lt_a reads our B, lt_b our A: their scale pointers take our B's / A's inverse.
        let args = LtArgs {
            a: ap,
            b: bp,
            d: cp,
            lt_a_scale_inv: Some(&b.scale_inv),
            lt_b_scale_inv: Some(&a.scale_inv),
            d_scale: None,
            d_amax: None,
        };
        // SAFETY: lengths checked above and by the plan's shape; all on the compute stream.
        unsafe { lt.run(&plan, args) }
    }

    /// `c[m,n] (+)= op(a) @ op(b)` with f32 or bf16 operands (`ty`: `LtType::F32` or
    /// `LtType::Bf16`, bit patterns in `T`) and an f32 output, f32 accumulation
    /// (`CUBLAS_COMPUTE_32F`: no TF32). Any layout (no TN constraint off FP8).
    pub fn gemm_dense<T: cudarc::driver::DeviceRepr>(
        &self,
        shape: GemmShape,
        ty: LtType,
        a: &CudaSlice<T>,
        b: &CudaSlice<T>,
        c: &mut CudaSlice<f32>,
        accumulate: bool,
    ) -> Result<(), CudaError> {
        assert!(
            !ty.is_fp8(),
            "gemm_dense: FP8 operands go through gemm_fp8_f32"
        );
        assert_eq!(c.len(), shape.m * shape.n, "gemm: C length");
        assert!(
            a.len() == shape.m * shape.k && b.len() == shape.k * shape.n,
            "gemm: A/B length"
        );
        let plan = LtPlan::new(shape, ty, ty, LtType::F32, accumulate, false)?;
        let lt = self.lt()?;
        let s = &self.compute;
        let (ap, _ra) = a.device_ptr(s);
        let (bp, _rb) = b.device_ptr(s);
        let (cp, _rc) = cudarc::driver::DevicePtrMut::device_ptr_mut(c, s);
        let args = LtArgs {
            a: ap,
            b: bp,
            d: cp,
            lt_a_scale_inv: None,
            lt_b_scale_inv: None,
            d_scale: None,
            d_amax: None,
        };
        // SAFETY: lengths checked above against the plan's shape; all on the compute stream.
        unsafe { lt.run(&plan, args) }
    }

    /// `out = fp8(op(a) @ op(b) * out.scale)` (as `GemmOps::gemm_fp8_out`), with
    /// `d_amax[0]` = max |result| before the scale, written by cuBLASLt (f32).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_fp8_out(
        &self,
        shape: GemmShape,
        a: &DevFp8,
        b: &DevFp8,
        out: &mut DevFp8,
        d_amax: &mut CudaSlice<f32>,
        fast_accum: bool,
    ) -> Result<(), CudaError> {
        assert_eq!(out.data.len(), shape.m * shape.n, "gemm: D length");
        assert_eq!(d_amax.len(), 1, "gemm: amax is one element");
        let (plan, ta, tb) =
            self.tn_plan(shape, a, b, LtType::fp8(out.format), false, fast_accum)?;
        let (a, b) = (ta.as_ref().unwrap_or(a), tb.as_ref().unwrap_or(b));
        let lt = self.lt()?;
        let s = &self.compute;
        let (ap, _ra) = a.data.device_ptr(s);
        let (bp, _rb) = b.data.device_ptr(s);
        let (dp, _rd) = cudarc::driver::DevicePtrMut::device_ptr_mut(&mut out.data, s);
        let args = LtArgs {
            a: ap,
            b: bp,
            d: dp,
            lt_a_scale_inv: Some(&b.scale_inv),
            lt_b_scale_inv: Some(&a.scale_inv),
            d_scale: Some(&out.scale),
            d_amax: Some(d_amax),
        };
        // SAFETY: as in `gemm_fp8_f32`.
        unsafe { lt.run(&plan, args) }
    }
}
