//! The optimizer, gradient norm and FP8 scale bookkeeping kernels (`cu/optim.cu`).

use super::{ew_cfg, CudaBackend, DevFp8};
use crate::cuda::{cast_mirror, nvrtc, CudaError};
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use fp8lm_fp8::Fp8Format;

/// The Adam constants passed by value to `fp8_adam_update` (`struct AdamConsts`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AdamConsts {
    pub b1: f32,
    pub b2: f32,
    pub one_minus_b1: f32,
    pub one_minus_b2: f32,
    pub inv_bc1: f32,
    pub inv_bc2: f32,
    pub eps: f32,
    pub lr: f32,
    pub wd: f32,
}
// SAFETY: repr(C) plain f32 fields, the same layout as the CUDA struct.
unsafe impl DeviceRepr for AdamConsts {}

impl CudaBackend {
    // ---- optimizer (cu/optim.cu) ---------------------------------------------------------

    /// The FP8-LM Adam update of one tensor (see `cu/optim.cu`): the gradient is
    /// `grad` descaled, times `grad_mult[0]` (the clip factor); `scales[0..3]` the
    /// state's old scales, `scales[3..6]` the new ones; `amax_bits[0..3]` zeroed and
    /// filled with the new values' amaxes.
    #[allow(clippy::too_many_arguments)]
    pub fn fp8_adam_update(
        &self,
        master_f16: &mut CudaSlice<u16>,
        m1_e4m3: &mut CudaSlice<u8>,
        m2_f16: &mut CudaSlice<u16>,
        p: &mut CudaSlice<f32>,
        grad: &DevFp8,
        grad_mult: &CudaSlice<f32>,
        scales: &CudaSlice<f32>,
        amax_bits: &mut CudaSlice<u32>,
        k: AdamConsts,
    ) -> Result<(), CudaError> {
        let n = p.len();
        assert!(
            master_f16.len() == n
                && m1_e4m3.len() == n
                && m2_f16.len() == n
                && grad.data.len() == n
        );
        assert!(scales.len() == 6 && amax_bits.len() == 3);
        let f = self.function(&nvrtc::OPTIM, "fp8_adam_update")?;
        self.compute.memset_zeros(amax_bits)?;
        let (gf, nu) = (cast_mirror::fmt_code(grad.format), n as u64);
        launch!(
            self,
            f,
            ew_cfg(n),
            master_f16,
            m1_e4m3,
            m2_f16,
            p,
            &grad.data,
            &gf,
            &grad.scale,
            grad_mult,
            scales,
            amax_bits,
            &k,
            &nu
        )
    }

    /// `total[0] += sum (decode(g) / g.scale)^2` in f64, in a fixed order.
    pub fn sumsq_fp8(&self, g: &DevFp8, total: &mut CudaSlice<f64>) -> Result<(), CudaError> {
        let cfg = ew_cfg(g.data.len());
        let blocks = cfg.grid_dim.0 as usize;
        let mut partial = self.compute.alloc_zeros::<f64>(blocks)?;
        let f1 = self.function(&nvrtc::OPTIM, "sumsq_partial_fp8")?;
        let f2 = self.function(&nvrtc::OPTIM, "sum_partials")?;
        let (n, fmt, nb) = (
            g.data.len() as u64,
            cast_mirror::fmt_code(g.format),
            blocks as i32,
        );
        launch!(self, f1, cfg, &mut partial, &g.data, &fmt, &g.scale, &n)?;
        launch!(
            self,
            f2,
            LaunchConfig::for_num_elems(1),
            total,
            &partial,
            &nb
        )
    }

    /// Re-encode FP8 codes in place by `target_scale / own_scale` (kernel `fp8_rescale`:
    /// saturating, NaN codes kept, as collectives' `requant_table`). `T` is any 1-byte
    /// element type (`u8`, or collectives' NCCL FP8 newtypes).
    pub fn fp8_rescale_bytes<T: DeviceRepr>(
        &self,
        codes: &mut CudaSlice<T>,
        format: Fp8Format,
        own_scale: &CudaSlice<f32>,
        target_scale: &CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        assert_eq!(
            std::mem::size_of::<T>(),
            1,
            "fp8_rescale_bytes: 1-byte codes only"
        );
        let f = self.function(&nvrtc::OPTIM, "fp8_rescale")?;
        let (fmt, n, cfg) = (
            cast_mirror::fmt_code(format),
            codes.len() as u64,
            ew_cfg(codes.len()),
        );
        launch!(self, f, cfg, codes, &fmt, own_scale, target_scale, &n)
    }

    /// `dst[0] = src[0] * factor` on the device.
    pub fn scale_copy(
        &self,
        src: &CudaSlice<f32>,
        dst: &mut CudaSlice<f32>,
        factor: f32,
    ) -> Result<(), CudaError> {
        let f = self.function(&nvrtc::OPTIM, "scale_scalar")?;
        launch!(self, f, LaunchConfig::for_num_elems(1), dst, src, &factor)
    }

    /// `total[0] += sum g^2` in f64, in a fixed order (deterministic).
    pub fn sumsq_f32(
        &self,
        g: &CudaSlice<f32>,
        total: &mut CudaSlice<f64>,
    ) -> Result<(), CudaError> {
        let cfg = ew_cfg(g.len());
        let blocks = cfg.grid_dim.0 as usize;
        let mut partial = self.compute.alloc_zeros::<f64>(blocks)?;
        let f1 = self.function(&nvrtc::OPTIM, "sumsq_partial_f32")?;
        let f2 = self.function(&nvrtc::OPTIM, "sum_partials")?;
        let n = g.len() as u64;
        launch!(self, f1, cfg, &mut partial, g, &n)?;
        let nb = blocks as i32;
        launch!(
            self,
            f2,
            LaunchConfig::for_num_elems(1),
            total,
            &partial,
            &nb
        )
    }
}
