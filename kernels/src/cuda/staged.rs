//! [`CudaStaged`]: the CUDA backend behind the model's seam ([`Backend`]), so the same
//! model code runs on a GPU (`device = "cuda[:N]"`).
//!
//! # What it is, and what it is not yet
//! The seam's ops take host slices (the CPU backends' storage). This adapter runs each
//! op on the GPU by *staging*: it uploads the op's inputs (and the current contents of
//! outputs the op accumulates into), runs the kernel or cuBLASLt GEMM of
//! [`CudaBackend`] on the compute stream, downloads the outputs and synchronises. The
//! numerics are the GPU's (cuBLASLt FP8 / bf16 / f32 GEMMs with f32 accumulation, the
//! NVRTC kernels, casts bit-identical to the CPU's), but every op pays two PCIe copies:
//! it is the correctness path (one model, checked step for step against the CPU backend
//! by `scripts/gpu-check.sh`), not the fast one. Device-resident tensors (weights,
//! activations and optimizer state kept on the GPU between ops) are the next step and
//! need the seam's `Tensor` storage to be backend-owned.
//!
//! **It has never run on a GPU**: no machine of this project has one. It builds, passes
//! clippy, and its kernels compile with NVRTC in CI (`tests/cuda_nvrtc.rs`).
//!
//! # Errors
//! The seam's methods return no `Result` (host ops cannot fail), but a device op can.
//! As CUDA itself does, the first failure is sticky: it is kept, later ops do nothing,
//! and [`Backend::take_error`] hands it to the trainer, which ends the step with it
//! (naming the op and the CUDA error) instead of panicking inside a kernel call.
//!
//! # What runs on the host here
//! The saturation/underflow counts of an FP8 cast (recomputed from the staged input and
//! the downloaded codes by `fp8lm_fp8::cast::cast_counts`; the device kernel returns the
//! amax only), the block-wise (tile-scaled) cast and GEMM of the block recipe (the
//! seam's default implementations: decode on the host, then this backend's GEMM), the
//! loss mean, and the optimizer update (`UpdateOps`, on `optim::HostUpdate` as on the
//! CPU; only the compute weights' FP8 cast runs on the GPU).

use super::device::CudaBackend;
use super::gemm::{LtPlan, LtType};
use super::{cast_mirror, CudaError, DevFp8};
use crate::backend::{Backend, Fp8CastResult};
use crate::{GemmOps, GemmShape, LayerOps, MatRef};
use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use fp8lm_fp8::{CastMode, Fp8Format};
use fp8lm_optim::update::{
    AdamWGrad, ChunkMut, ChunkOut, Fp8AdamChunk, HostUpdate, StepConsts, UpdateOps,
};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use std::sync::Mutex;

/// The CUDA backend on one GPU, behind [`Backend`] by staging host slices (module docs).
pub struct CudaStaged {
    dev: CudaBackend,
    /// The first device failure ("op: error"); ops after it do nothing.
    error: Mutex<Option<String>>,
    /// FP8 tensor cores present (sm_89 and later): FP8 GEMMs run on cuBLASLt, else they
    /// are decoded to f32 on the device first.
    fp8_tensor_cores: bool,
}

impl std::fmt::Debug for CudaStaged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaStaged({})", self.dev.arch)
    }
}

type R<T> = Result<T, CudaError>;

impl CudaStaged {
    /// Open GPU `ordinal`; errors name the missing library or the absent GPU.
    pub fn new(ordinal: usize) -> R<CudaStaged> {
        let dev = CudaBackend::new(ordinal)?;
        let fp8_tensor_cores = arch_has_fp8(&dev.arch);
        Ok(CudaStaged {
            dev,
            error: Mutex::new(None),
            fp8_tensor_cores,
        })
    }

    /// The GPU context underneath (streams, kernels, device tensors).
    pub fn device(&self) -> &CudaBackend {
        &self.dev
    }

    /// Run `f` unless an earlier op failed; keep its failure, named by `op`.
    fn run(&self, op: &str, f: impl FnOnce(&CudaBackend) -> R<()>) {
        let mut err = self.error.lock().unwrap_or_else(|e| e.into_inner());
        if err.is_some() {
            return;
        }
        let r = f(&self.dev).and_then(|()| Ok(self.dev.compute.synchronize()?));
        if let Err(e) = r {
            *err = Some(format!("{op} on the GPU ({}): {e}", self.dev.arch));
        }
    }

    fn up<T: DeviceRepr>(&self, host: &[T]) -> R<CudaSlice<T>> {
        Ok(self.dev.compute.clone_htod(host)?)
    }

    fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> R<CudaSlice<T>> {
        Ok(self.dev.compute.alloc_zeros::<T>(n)?)
    }

    fn down<T: DeviceRepr>(&self, dev: &CudaSlice<T>, host: &mut [T]) -> R<()> {
        Ok(self.dev.compute.memcpy_dtoh(dev, host)?)
    }

    fn up_fp8(&self, data: &[u8], format: Fp8Format, scale: f32) -> R<DevFp8> {
        Ok(DevFp8 {
            data: self.up(data)?,
            format,
            scale: self.up(&[scale])?,
            scale_inv: self.up(&[1.0 / scale])?,
            amax_bits: self.zeros(1)?,
        })
    }

    /// An operand as f32 on the device (FP8 decoded and descaled there; bf16 widened on
    /// the host, which is exact): the path for mixed-type or unaligned FP8 GEMMs.
    fn operand_f32(&self, m: MatRef<'_>) -> R<CudaSlice<f32>> {
        match m {
            MatRef::F32(s) => self.up(s),
            MatRef::Bf16(s) => self.up(&s.iter().map(|v| v.to_f32()).collect::<Vec<_>>()),
            MatRef::Fp8 {
                data,
                format,
                scale,
            } => {
                let q = self.up_fp8(data, format, scale)?;
                let mut out = self.zeros::<f32>(data.len())?;
                let mut amax = self.zeros::<u32>(1)?;
                self.dev.cast_fp8_to_f32(&q, &mut out, &mut amax)?;
                Ok(out)
            }
        }
    }

    /// Whether cuBLASLt's FP8 GEMM takes these operands as they are (after the TN
    /// transposes `CudaBackend::gemm_fp8_f32` makes itself).
    fn fp8_gemm_ok(&self, shape: GemmShape, a: Fp8Format, b: Fp8Format) -> bool {
        let tn = GemmShape {
            trans_a: false,
            trans_b: true,
            ..shape
        };
        self.fp8_tensor_cores
            && LtPlan::new(
                tn,
                LtType::fp8(a),
                LtType::fp8(b),
                LtType::F32,
                false,
                false,
            )
            .is_ok()
    }
}

/// sm_89 (Ada) and sm_90+ (Hopper, Blackwell) have FP8 tensor cores.
fn arch_has_fp8(arch: &str) -> bool {
    arch.strip_prefix("sm_")
        .and_then(|v| {
            v.trim_end_matches(|c: char| c.is_ascii_alphabetic())
                .parse::<u32>()
                .ok()
        })
        .is_some_and(|v| v >= 89)
}

impl GemmOps for CudaStaged {
    fn gemm(
        &self,
        shape: GemmShape,
        a: MatRef<'_>,
        b: MatRef<'_>,
        c: &mut [f32],
        accumulate: bool,
    ) {
        assert_eq!(c.len(), shape.m * shape.n, "gemm: C length");
        if c.is_empty() {
            return;
        }
        if shape.k == 0 {
            if !accumulate {
                c.fill(0.0);
            }
            return;
        }
        self.run("gemm", |d| {
            let mut c_dev = if accumulate {
                self.up(c)?
            } else {
                self.zeros::<f32>(c.len())?
            };
            match (a, b) {
                (
                    MatRef::Fp8 {
                        data: ad,
                        format: af,
                        scale: asc,
                    },
                    MatRef::Fp8 {
                        data: bd,
                        format: bf,
                        scale: bsc,
                    },
                ) if self.fp8_gemm_ok(shape, af, bf) => {
                    let (qa, qb) = (self.up_fp8(ad, af, asc)?, self.up_fp8(bd, bf, bsc)?);
                    d.gemm_fp8_f32(shape, &qa, &qb, &mut c_dev, accumulate, false)?;
                }
                (MatRef::Bf16(ab), MatRef::Bf16(bb)) => {
                    let (da, db) = (
                        self.up(ab.reinterpret_cast())?,
                        self.up(bb.reinterpret_cast())?,
                    );
                    d.gemm_dense(shape, LtType::Bf16, &da, &db, &mut c_dev, accumulate)?;
                }
                _ => {
                    let (da, db) = (self.operand_f32(a)?, self.operand_f32(b)?);
                    d.gemm_dense(shape, LtType::F32, &da, &db, &mut c_dev, accumulate)?;
                }
            }
            self.down(&c_dev, c)
        });
    }
}

/// Upload every listed host slice to a device buffer of the same name.
macro_rules! up {
    ($self:ident; $($x:ident),+) => { $( let $x = $self.up($x)?; )+ };
}
/// Upload the current contents of outputs (the ops that accumulate read them).
macro_rules! up_mut {
    ($self:ident; $($x:ident => $d:ident),+) => { $( let mut $d = $self.up(&*$x)?; )+ };
}

impl LayerOps for CudaStaged {
    fn encoder_forward(
        &self,
        out: &mut [f32],
        tokens: &[u32],
        wte: &[f32],
        wpe: Option<&[f32]>,
        t: usize,
        c: usize,
    ) {
        if out.is_empty() {
            return;
        }
        self.run("encoder_forward", |d| {
            up!(self; tokens, wte);
            let wpe = wpe.map(|p| self.up(p)).transpose()?;
            let mut o = self.zeros::<f32>(out.len())?;
            d.encoder_forward(&mut o, &tokens, &wte, wpe.as_ref(), t, c)?;
            self.down(&o, out)
        });
    }

    fn encoder_backward(
        &self,
        dwte: &mut [f32],
        dwpe: Option<&mut [f32]>,
        dout: &[f32],
        tokens: &[u32],
        t: usize,
        c: usize,
    ) {
        if dout.is_empty() {
            return;
        }
        self.run("encoder_backward", |d| {
            up!(self; dout, tokens);
            up_mut!(self; dwte => g_wte);
            match dwpe {
                Some(p) => {
                    let mut g_wpe = self.up(&*p)?;
                    d.encoder_backward(&mut g_wte, Some(&mut g_wpe), &dout, &tokens, t, c)?;
                    self.down(&g_wpe, p)?;
                }
                None => d.encoder_backward(&mut g_wte, None, &dout, &tokens, t, c)?,
            }
            self.down(&g_wte, dwte)
        });
    }

    fn layernorm_forward(
        &self,
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        inp: &[f32],
        w: &[f32],
        b: &[f32],
    ) {
        if inp.is_empty() {
            return;
        }
        self.run("layernorm_forward", |d| {
            up!(self; inp, w, b);
            let (mut o, mut m, mut r) = (
                self.zeros(out.len())?,
                self.zeros(mean.len())?,
                self.zeros(rstd.len())?,
            );
            d.layernorm_forward(&mut o, &mut m, &mut r, &inp, &w, &b)?;
            self.down(&o, out)?;
            self.down(&m, mean)?;
            self.down(&r, rstd)
        });
    }

    fn layernorm_backward(
        &self,
        dinp: &mut [f32],
        dw: &mut [f32],
        db: &mut [f32],
        dout: &[f32],
        inp: &[f32],
        w: &[f32],
        mean: &[f32],
        rstd: &[f32],
    ) {
        if inp.is_empty() {
            return;
        }
        self.run("layernorm_backward", |d| {
            up!(self; dout, inp, w, mean, rstd);
            up_mut!(self; dinp => gi, dw => gw, db => gb);
            d.layernorm_backward(&mut gi, &mut gw, &mut gb, &dout, &inp, &w, &mean, &rstd)?;
            self.down(&gi, dinp)?;
            self.down(&gw, dw)?;
            self.down(&gb, db)
        });
    }

    fn rmsnorm_forward(&self, out: &mut [f32], rstd: &mut [f32], inp: &[f32], w: &[f32]) {
        if inp.is_empty() {
            return;
        }
        self.run("rmsnorm_forward", |d| {
            up!(self; inp, w);
            let (mut o, mut r) = (self.zeros(out.len())?, self.zeros(rstd.len())?);
            d.rmsnorm_forward(&mut o, &mut r, &inp, &w)?;
            self.down(&o, out)?;
            self.down(&r, rstd)
        });
    }

    fn rmsnorm_backward(
        &self,
        dinp: &mut [f32],
        dw: &mut [f32],
        dout: &[f32],
        inp: &[f32],
        w: &[f32],
        rstd: &[f32],
    ) {
        if inp.is_empty() {
            return;
        }
        self.run("rmsnorm_backward", |d| {
            up!(self; dout, inp, w, rstd);
            up_mut!(self; dinp => gi, dw => gw);
            d.rmsnorm_backward(&mut gi, &mut gw, &dout, &inp, &w, &rstd)?;
            self.down(&gi, dinp)?;
            self.down(&gw, dw)
        });
    }

    fn gelu_forward(&self, out: &mut [f32], inp: &[f32]) {
        if inp.is_empty() {
            return;
        }
        self.run("gelu_forward", |d| {
            up!(self; inp);
            let mut o = self.zeros(out.len())?;
            d.gelu_forward(&mut o, &inp)?;
            self.down(&o, out)
        });
    }

    fn gelu_backward(&self, dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
        if inp.is_empty() {
            return;
        }
        self.run("gelu_backward", |d| {
            up!(self; inp, dout);
            let mut g = self.zeros(dinp.len())?;
            d.gelu_backward(&mut g, &inp, &dout)?;
            self.down(&g, dinp)
        });
    }

    fn swiglu_forward(&self, out: &mut [f32], inp: &[f32], f: usize) {
        if inp.is_empty() {
            return;
        }
        self.run("swiglu_forward", |d| {
            up!(self; inp);
            let mut o = self.zeros(out.len())?;
            d.swiglu_forward(&mut o, &inp, f)?;
            self.down(&o, out)
        });
    }

    fn swiglu_backward(&self, dinp: &mut [f32], inp: &[f32], dout: &[f32], f: usize) {
        if inp.is_empty() {
            return;
        }
        self.run("swiglu_backward", |d| {
            up!(self; inp, dout);
            up_mut!(self; dinp => g);
            d.swiglu_backward(&mut g, &inp, &dout, f)?;
            self.down(&g, dinp)
        });
    }

    fn bias_forward(&self, out: &mut [f32], bias: &[f32]) {
        if out.is_empty() {
            return;
        }
        self.run("bias_forward", |d| {
            up!(self; bias);
            up_mut!(self; out => o);
            d.bias_forward(&mut o, &bias)?;
            self.down(&o, out)
        });
    }

    fn bias_backward(&self, dbias: &mut [f32], dout: &[f32]) {
        if dout.is_empty() {
            return;
        }
        self.run("bias_backward", |d| {
            up!(self; dout);
            up_mut!(self; dbias => g);
            d.bias_backward(&mut g, &dout)?;
            self.down(&g, dbias)
        });
    }

    fn residual_forward(&self, out: &mut [f32], a: &[f32], b: &[f32]) {
        if a.is_empty() {
            return;
        }
        self.run("residual_forward", |d| {
            up!(self; a, b);
            let mut o = self.zeros(out.len())?;
            d.residual_forward(&mut o, &a, &b)?;
            self.down(&o, out)
        });
    }

    fn add_inplace(&self, dst: &mut [f32], src: &[f32]) {
        if src.is_empty() {
            return;
        }
        self.run("add_inplace", |d| {
            up!(self; src);
            up_mut!(self; dst => o);
            d.add_inplace(&mut o, &src)?;
            self.down(&o, dst)
        });
    }

    fn rope_forward(&self, qkv: &mut [f32], table: &[f32], t: usize, c: usize, nh: usize) {
        self.rope("rope_forward", qkv, table, t, c, nh, false);
    }

    fn rope_backward(&self, dqkv: &mut [f32], table: &[f32], t: usize, c: usize, nh: usize) {
        self.rope("rope_backward", dqkv, table, t, c, nh, true);
    }

    fn attention_forward(
        &self,
        out: &mut [f32],
        att: &mut [f32],
        qkv: &[f32],
        t: usize,
        c: usize,
        nh: usize,
    ) {
        if qkv.is_empty() {
            return;
        }
        self.run("attention_forward", |d| {
            up!(self; qkv);
            let (mut o, mut a) = (self.zeros(out.len())?, self.zeros(att.len())?);
            d.attention_forward(&mut o, &mut a, &qkv, t, c, nh)?;
            self.down(&o, out)?;
            self.down(&a, att)
        });
    }

    fn attention_backward(
        &self,
        dqkv: &mut [f32],
        dout: &[f32],
        qkv: &[f32],
        att: &[f32],
        t: usize,
        c: usize,
        nh: usize,
    ) {
        if qkv.is_empty() {
            return;
        }
        self.run("attention_backward", |d| {
            up!(self; dout, qkv, att);
            let mut g = self.zeros(dqkv.len())?;
            d.attention_backward(&mut g, &dout, &qkv, &att, t, c, nh)?;
            self.down(&g, dqkv)
        });
    }

    fn softmax_xent_forward(
        &self,
        logits_to_probs: &mut [f32],
        losses: &mut [f32],
        targets: &[u32],
    ) {
        if losses.is_empty() {
            return;
        }
        self.run("softmax_xent_forward", |d| {
            up!(self; targets);
            up_mut!(self; logits_to_probs => p);
            let mut l = self.zeros(losses.len())?;
            d.softmax_xent_forward(&mut p, &mut l, &targets)?;
            self.down(&p, logits_to_probs)?;
            self.down(&l, losses)
        });
    }

    fn softmax_xent_backward(&self, probs_to_dlogits: &mut [f32], targets: &[u32], dloss: f32) {
        if targets.is_empty() {
            return;
        }
        self.run("softmax_xent_backward", |d| {
            up!(self; targets);
            up_mut!(self; probs_to_dlogits => p);
            d.softmax_xent_backward(&mut p, &targets, dloss)?;
            self.down(&p, probs_to_dlogits)
        });
    }
}

impl CudaStaged {
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        op: &str,
        qkv: &mut [f32],
        table: &[f32],
        t: usize,
        c: usize,
        nh: usize,
        inverse: bool,
    ) {
        if qkv.is_empty() {
            return;
        }
        self.run(op, |d| {
            up!(self; table);
            up_mut!(self; qkv => q);
            d.rope(&mut q, &table, t, c, nh, inverse)?;
            self.down(&q, qkv)
        });
    }
}

/// The optimizer update runs on the host (`optim::HostUpdate`, as on `Cpu`): the seam's
/// storage is host memory, and a staged update would copy the whole optimizer state over
/// PCIe every step for no gain. The E4M3 compute-weight cast runs on the GPU's cast
/// kernel. (The device update kernel, `cu/optim.cu`, waits for device-resident state.)
impl UpdateOps for CudaStaged {
    fn update_name(&self) -> &'static str {
        "cuda (host update)"
    }
    fn adamw_chunk(
        &self,
        p: &mut [f32],
        m: &mut [f32],
        v: &mut [f32],
        g: AdamWGrad<'_>,
        k: &StepConsts,
        grad_scale: f32,
    ) {
        HostUpdate.adamw_chunk(p, m, v, g, k, grad_scale)
    }
    fn fp8_adam_chunk(&self, c: Fp8AdamChunk<'_, '_>) -> ChunkOut {
        HostUpdate.fp8_adam_chunk(c)
    }
    fn rescale_state(&self, c: &mut ChunkMut<'_>, factor: f32) {
        HostUpdate.rescale_state(c, factor)
    }
    fn decode_state(&self, c: &ChunkMut<'_>, inv_scale: f32, dst: &mut [f32]) {
        HostUpdate.decode_state(c, inv_scale, dst)
    }
    fn cast_weights_fp8(
        &self,
        format: Fp8Format,
        view: &[f32],
        scale: f32,
        dst: &mut [u8],
    ) -> (f32, fp8lm_fp8::cast::CastCounts) {
        let r = self.cast_fp8(format, view, scale, dst);
        (r.amax, r.counts)
    }
}

impl Backend for CudaStaged {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn take_error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn amax_f32(&self, src: &[f32]) -> f32 {
        let mut bits = [0u32];
        if !src.is_empty() {
            self.run("amax_f32", |d| {
                up!(self; src);
                let mut a = self.zeros::<u32>(1)?;
                d.amax_f32(&src, &mut a)?;
                self.down(&a, &mut bits)
            });
        }
        cast_mirror::amax_from_bits(bits[0])
    }

    fn cast_fp8(
        &self,
        format: Fp8Format,
        src: &[f32],
        scale: f32,
        dst: &mut [u8],
    ) -> Fp8CastResult {
        assert_eq!(src.len(), dst.len(), "cast_fp8: lengths differ");
        let mut bits = [0u32];
        if !src.is_empty() {
            self.run("cast_fp8", |d| {
                let s = self.up(src)?;
                let mut q = self.up_fp8(dst, format, scale)?;
                d.cast_f32_to_fp8(&s, &mut q, CastMode::SatFinite)?;
                self.down(&q.data, dst)?;
                self.down(&q.amax_bits, &mut bits)
            });
        }
        let amax = cast_mirror::amax_from_bits(bits[0]);
        let may_saturate = amax * scale > format.max() || amax.is_nan();
        Fp8CastResult {
            amax,
            counts: fp8lm_fp8::cast::cast_counts(format, src, scale, dst, may_saturate),
        }
    }

    fn cast_bf16(&self, src: &[f32], dst: &mut [bf16]) {
        assert_eq!(src.len(), dst.len(), "cast_bf16: lengths differ");
        if src.is_empty() {
            return;
        }
        self.run("cast_bf16", |d| {
            up!(self; src);
            let mut o = self.zeros::<u16>(dst.len())?;
            d.cast_f32_to_bf16(&src, &mut o)?;
            self.down(&o, dst.reinterpret_cast_mut())
        });
    }

    fn add_decoded_fp8(&self, dst: &mut [f32], src: &[u8], format: Fp8Format, scale: f32) {
        assert_eq!(src.len(), dst.len(), "add_decoded_fp8: lengths differ");
        if src.is_empty() {
            return;
        }
        self.run("add_decoded_fp8", |d| {
            let decoded = self.operand_f32(MatRef::Fp8 {
                data: src,
                format,
                scale,
            })?;
            up_mut!(self; dst => o);
            d.add_inplace(&mut o, &decoded)?;
            self.down(&o, dst)
        });
    }

    fn encoder_forward_f16(
        &self,
        out: &mut [f32],
        tokens: &[u32],
        wte: &[f16],
        scale: f32,
        wpe: Option<&[f32]>,
        t: usize,
        c: usize,
    ) {
        if out.is_empty() {
            return;
        }
        self.run("encoder_forward_f16", |d| {
            up!(self; tokens);
            let w = self.up(wte.reinterpret_cast())?;
            let wpe = wpe.map(|p| self.up(p)).transpose()?;
            let mut o = self.zeros::<f32>(out.len())?;
            d.encoder_forward_f16(&mut o, &tokens, &w, 1.0 / scale, wpe.as_ref(), t, c)?;
            self.down(&o, out)
        });
    }

    fn sum_squares_f32(&self, src: &[f32]) -> f64 {
        let mut total = [0f64];
        if !src.is_empty() {
            self.run("sum_squares_f32", |d| {
                up!(self; src);
                let mut s = self.zeros::<f64>(1)?;
                d.sumsq_f32(&src, &mut s)?;
                self.down(&s, &mut total)
            });
        }
        total[0]
    }

    fn sum_squares_fp8(&self, src: &[u8], format: Fp8Format) -> f64 {
        let mut total = [0f64];
        if !src.is_empty() {
            self.run("sum_squares_fp8", |d| {
                // Unscaled (the caller divides by scale^2): scale 1.
                let q = self.up_fp8(src, format, 1.0)?;
                let mut s = self.zeros::<f64>(1)?;
                d.sumsq_fp8(&q, &mut s)?;
                self.down(&s, &mut total)
            });
        }
        total[0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_tensor_cores_from_the_arch_name() {
        for (arch, fp8) in [
            ("sm_80", false),
            ("sm_86", false),
            ("sm_89", true),
            ("sm_90", true),
            ("sm_90a", true),
            ("sm_100", true),
            ("sm_75", false),
            ("bogus", false),
        ] {
            assert_eq!(arch_has_fp8(arch), fp8, "{arch}");
        }
    }

    /// Without a GPU (every machine of this project) opening the backend is an error that
    /// names what is missing, not a panic.
    #[test]
    fn no_gpu_is_an_error_naming_it() {
        match CudaStaged::new(0) {
            Ok(b) => eprintln!("a GPU is present here: {b:?}"),
            Err(e) => {
                let s = e.to_string();
                assert!(
                    s.contains("libcuda") || s.contains("no GPU") || s.contains("driver"),
                    "{s}"
                );
            }
        }
    }
}
