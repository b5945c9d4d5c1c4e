//! Layer ops (`cu/layers.cu`) on the device, shaped like the CPU's `LayerOps`: same
//! arguments on device buffers, same semantics (accumulate / overwrite as the CPU op).

use super::{ew_cfg, row_cfg, CudaBackend, EW_THREADS};
use crate::cuda::{nvrtc, CudaError};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

impl CudaBackend {
    // ---- layer ops (cu/layers.cu), shaped like `LayerOps` ---------------------------------

    /// `out[n,c] = layernorm(inp) * w + b`, saving `mean[n]`, `rstd[n]`.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_forward(
        &self,
        out: &mut CudaSlice<f32>,
        mean: &mut CudaSlice<f32>,
        rstd: &mut CudaSlice<f32>,
        inp: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let (c, n) = (w.len(), mean.len());
        assert!(out.len() == n * c && inp.len() == n * c && rstd.len() == n && b.len() == c);
        let f = self.function(&nvrtc::LAYERS, "layernorm_forward")?;
        let ci = c as i32;
        launch!(self, f, row_cfg(n, c), out, mean, rstd, inp, w, b, &ci)
    }

    /// Accumulates into `dinp`, `dw`, `db`.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_backward(
        &self,
        dinp: &mut CudaSlice<f32>,
        dw: &mut CudaSlice<f32>,
        db: &mut CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        inp: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        mean: &CudaSlice<f32>,
        rstd: &CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let (c, n) = (w.len(), mean.len());
        assert!(
            dinp.len() == n * c
                && dout.len() == n * c
                && inp.len() == n * c
                && dw.len() == c
                && db.len() == c
        );
        let f1 = self.function(&nvrtc::LAYERS, "layernorm_backward_dinp")?;
        let f2 = self.function(&nvrtc::LAYERS, "layernorm_backward_dwdb")?;
        let (ci, nu) = (c as i32, n as u64);
        launch!(self, f1, row_cfg(n, c), dinp, dout, inp, w, mean, rstd, &ci)?;
        launch!(self, f2, ew_cfg(c), dw, db, dout, inp, mean, rstd, &nu, &ci)
    }

    /// Element-wise GELU (tanh form).
    pub fn gelu_forward(
        &self,
        out: &mut CudaSlice<f32>,
        inp: &CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        assert_eq!(out.len(), inp.len());
        let f = self.function(&nvrtc::LAYERS, "gelu_forward")?;
        let n = inp.len() as u64;
        launch!(self, f, ew_cfg(inp.len()), out, inp, &n)
    }

    /// `dinp = dout * gelu'(inp)` (overwrites).
    pub fn gelu_backward(
        &self,
        dinp: &mut CudaSlice<f32>,
        inp: &CudaSlice<f32>,
        dout: &CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        assert!(dinp.len() == inp.len() && dout.len() == inp.len());
        let f = self.function(&nvrtc::LAYERS, "gelu_backward")?;
        let n = inp.len() as u64;
        launch!(self, f, ew_cfg(inp.len()), dinp, inp, dout, &n)
    }

    /// `out = a + b`.
    pub fn residual_forward(
        &self,
        out: &mut CudaSlice<f32>,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        assert!(out.len() == a.len() && b.len() == a.len());
        let f = self.function(&nvrtc::LAYERS, "residual_forward")?;
        let n = a.len() as u64;
        launch!(self, f, ew_cfg(a.len()), out, a, b, &n)
    }

    /// In place: `logits[n,v]` become probabilities; `losses[n] = -ln p[target]`.
    pub fn softmax_xent_forward(
        &self,
        logits_to_probs: &mut CudaSlice<f32>,
        losses: &mut CudaSlice<f32>,
        targets: &CudaSlice<u32>,
    ) -> Result<(), CudaError> {
        let n = losses.len();
        assert!(n > 0 && targets.len() == n && logits_to_probs.len().is_multiple_of(n));
        let v = logits_to_probs.len() / n;
        let f = self.function(&nvrtc::LAYERS, "softmax_xent_forward")?;
        let vi = v as i32;
        launch!(
            self,
            f,
            row_cfg(n, v),
            logits_to_probs,
            losses,
            targets,
            &vi
        )
    }

    /// In place: probabilities become `(p - onehot) * dloss`.
    pub fn softmax_xent_backward(
        &self,
        probs_to_dlogits: &mut CudaSlice<f32>,
        targets: &CudaSlice<u32>,
        dloss: f32,
    ) -> Result<(), CudaError> {
        let n = targets.len();
        assert!(n > 0 && probs_to_dlogits.len().is_multiple_of(n));
        let v = probs_to_dlogits.len() / n;
        let f = self.function(&nvrtc::LAYERS, "softmax_xent_backward")?;
        let (nu, vi) = (n as u64, v as i32);
        launch!(
            self,
            f,
            ew_cfg(n * v),
            probs_to_dlogits,
            targets,
            &dloss,
            &nu,
            &vi
        )
    }

    /// `out[n,c] = wte[tok] + wpe[t]` (wpe absent for rotary models); `tokens[b*t]`.
    pub fn encoder_forward(
        &self,
        out: &mut CudaSlice<f32>,
        tokens: &CudaSlice<u32>,
        wte: &CudaSlice<f32>,
        wpe: Option<&CudaSlice<f32>>,
        t: usize,
        c: usize,
    ) -> Result<(), CudaError> {
        let n = tokens.len();
        assert!(
            out.len() == n * c
                && wte.len().is_multiple_of(c)
                && wpe.is_none_or(|p| p.len() >= t * c)
        );
        let f = self.function(&nvrtc::LAYERS, "encoder_forward")?;
        let (nu, ti, ci, cfg) = (n as u64, t as i32, c as i32, ew_cfg(n * c));
        let null = 0u64;
        match wpe {
            Some(p) => launch!(self, f, cfg, out, tokens, wte, p, &nu, &ti, &ci),
            None => launch!(self, f, cfg, out, tokens, wte, &null, &nu, &ti, &ci),
        }
    }

    /// `out[n,c] = f32(wte_f16[tok]) * inv_scale (+ wpe[t])`: fp8-o2's tied embedding read
    /// from its FP16 master (bit patterns), as `Backend::encoder_forward_f16`.
    #[allow(clippy::too_many_arguments)]
    pub fn encoder_forward_f16(
        &self,
        out: &mut CudaSlice<f32>,
        tokens: &CudaSlice<u32>,
        wte_f16: &CudaSlice<u16>,
        inv_scale: f32,
        wpe: Option<&CudaSlice<f32>>,
        t: usize,
        c: usize,
    ) -> Result<(), CudaError> {
        let n = tokens.len();
        assert!(
            out.len() == n * c
                && wte_f16.len().is_multiple_of(c)
                && wpe.is_none_or(|p| p.len() >= t * c)
        );
        let f = self.function(&nvrtc::LAYERS, "encoder_forward_f16")?;
        let (nu, ti, ci, cfg) = (n as u64, t as i32, c as i32, ew_cfg(n * c));
        let null = 0u64;
        match wpe {
            Some(p) => launch!(self, f, cfg, out, tokens, wte_f16, &inv_scale, p, &nu, &ti, &ci),
            None => launch!(self, f, cfg, out, tokens, wte_f16, &inv_scale, &null, &nu, &ti, &ci),
        }
    }

    /// `dwte[tok] += dout`, `dwpe[t] += dout` (atomics: summation order not fixed).
    pub fn encoder_backward(
        &self,
        dwte: &mut CudaSlice<f32>,
        dwpe: Option<&mut CudaSlice<f32>>,
        dout: &CudaSlice<f32>,
        tokens: &CudaSlice<u32>,
        t: usize,
        c: usize,
    ) -> Result<(), CudaError> {
        let n = tokens.len();
        assert!(dout.len() == n * c);
        let f = self.function(&nvrtc::LAYERS, "encoder_backward")?;
        let (nu, ti, ci, cfg) = (n as u64, t as i32, c as i32, ew_cfg(n * c));
        let null = 0u64;
        match dwpe {
            Some(p) => launch!(self, f, cfg, dwte, p, dout, tokens, &nu, &ti, &ci),
            None => launch!(self, f, cfg, dwte, &null, dout, tokens, &nu, &ti, &ci),
        }
    }

    /// `out = inp * rstd * w`, saving `rstd[n]`.
    pub fn rmsnorm_forward(
        &self,
        out: &mut CudaSlice<f32>,
        rstd: &mut CudaSlice<f32>,
        inp: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let (c, n) = (w.len(), rstd.len());
        assert!(out.len() == n * c && inp.len() == n * c);
        let f = self.function(&nvrtc::LAYERS, "rmsnorm_forward")?;
        let (ci, cfg) = (c as i32, row_cfg(n, c));
        launch!(self, f, cfg, out, rstd, inp, w, &ci)
    }

    /// Accumulates into `dinp`, `dw`.
    pub fn rmsnorm_backward(
        &self,
        dinp: &mut CudaSlice<f32>,
        dw: &mut CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        inp: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        rstd: &CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let (c, n) = (w.len(), rstd.len());
        assert!(dinp.len() == n * c && dout.len() == n * c && inp.len() == n * c && dw.len() == c);
        let f1 = self.function(&nvrtc::LAYERS, "rmsnorm_backward_dinp")?;
        let f2 = self.function(&nvrtc::LAYERS, "rmsnorm_backward_dw")?;
        let (ci, nu, cfg1, cfg2) = (c as i32, n as u64, row_cfg(n, c), ew_cfg(c));
        launch!(self, f1, cfg1, dinp, dout, inp, w, rstd, &ci)?;
        launch!(self, f2, cfg2, dw, dout, inp, rstd, &nu, &ci)
    }

    /// `inp[n, 2f] = [gate | up]`, `out[n, f] = silu(gate) * up`.
    pub fn swiglu_forward(
        &self,
        out: &mut CudaSlice<f32>,
        inp: &CudaSlice<f32>,
        f: usize,
    ) -> Result<(), CudaError> {
        assert!(inp.len() == 2 * out.len() && out.len().is_multiple_of(f));
        let k = self.function(&nvrtc::LAYERS, "swiglu_forward")?;
        let (nu, fi, cfg) = ((out.len() / f) as u64, f as i32, ew_cfg(out.len()));
        launch!(self, k, cfg, out, inp, &nu, &fi)
    }

    /// `dinp[n, 2f] = [dgate | dup]` (overwrites).
    pub fn swiglu_backward(
        &self,
        dinp: &mut CudaSlice<f32>,
        inp: &CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        f: usize,
    ) -> Result<(), CudaError> {
        assert!(
            dinp.len() == inp.len() && inp.len() == 2 * dout.len() && dout.len().is_multiple_of(f)
        );
        let k = self.function(&nvrtc::LAYERS, "swiglu_backward")?;
        let (nu, fi, cfg) = ((dout.len() / f) as u64, f as i32, ew_cfg(dout.len()));
        launch!(self, k, cfg, dinp, inp, dout, &nu, &fi)
    }

    /// `out[n, oc] += bias[oc]`.
    pub fn bias_forward(
        &self,
        out: &mut CudaSlice<f32>,
        bias: &CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let oc = bias.len();
        assert!(oc > 0 && out.len().is_multiple_of(oc));
        let f = self.function(&nvrtc::LAYERS, "bias_forward")?;
        let (nu, oci, cfg) = ((out.len() / oc) as u64, oc as i32, ew_cfg(out.len()));
        launch!(self, f, cfg, out, bias, &nu, &oci)
    }

    /// `dbias[oc] += sum over rows of dout[n, oc]` (rows in order: deterministic).
    pub fn bias_backward(
        &self,
        dbias: &mut CudaSlice<f32>,
        dout: &CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let oc = dbias.len();
        assert!(oc > 0 && dout.len().is_multiple_of(oc));
        let f = self.function(&nvrtc::LAYERS, "bias_backward")?;
        let (nu, oci, cfg) = ((dout.len() / oc) as u64, oc as i32, ew_cfg(oc));
        launch!(self, f, cfg, dbias, dout, &nu, &oci)
    }

    /// `dst += src`.
    pub fn add_inplace(
        &self,
        dst: &mut CudaSlice<f32>,
        src: &CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        assert_eq!(dst.len(), src.len());
        let f = self.function(&nvrtc::LAYERS, "add_inplace")?;
        let (n, cfg) = (src.len() as u64, ew_cfg(src.len()));
        launch!(self, f, cfg, dst, src, &n)
    }

    /// Rotate q, k of `qkv[b,t,3c]` in place (`inverse`: the backward's rotation back);
    /// `table` from `layers::attention::rope_table`.
    pub fn rope(
        &self,
        qkv: &mut CudaSlice<f32>,
        table: &CudaSlice<f32>,
        t: usize,
        c: usize,
        nh: usize,
        inverse: bool,
    ) -> Result<(), CudaError> {
        assert!(
            qkv.len().is_multiple_of(3 * c * t)
                && (c / nh).is_multiple_of(2)
                && table.len() >= t * (c / nh)
        );
        let f = self.function(&nvrtc::LAYERS, "rope_apply")?;
        let bt = (qkv.len() / (3 * c)) as u64;
        let (ti, ci, nhi, dir) = (
            t as i32,
            c as i32,
            nh as i32,
            if inverse { -1.0f32 } else { 1.0 },
        );
        let cfg = ew_cfg(bt as usize * c);
        launch!(self, f, cfg, qkv, table, &bt, &ti, &ci, &nhi, &dir)
    }

    /// Causal attention: `out[b,t,c]`, `att[b,nh,t,t]` (probabilities), `qkv[b,t,3c]`.
    pub fn attention_forward(
        &self,
        out: &mut CudaSlice<f32>,
        att: &mut CudaSlice<f32>,
        qkv: &CudaSlice<f32>,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<(), CudaError> {
        let b = qkv.len() / (3 * c * t);
        assert!(
            (c / nh) * nh == c
                && qkv.len() == b * t * 3 * c
                && out.len() == b * t * c
                && att.len() == b * nh * t * t
        );
        let f = self.function(&nvrtc::LAYERS, "attention_forward")?;
        let (bi, ti, ci, nhi, cfg) = (b as i32, t as i32, c as i32, nh as i32, ew_cfg(b * nh * t));
        // One thread per (b, h, t) row: the grid must cover them all (no grid-stride loop).
        let cfg = LaunchConfig {
            grid_dim: (((b * nh * t) as u32).div_ceil(EW_THREADS), 1, 1),
            ..cfg
        };
        launch!(self, f, cfg, out, att, qkv, &bi, &ti, &ci, &nhi)
    }

    /// Overwrites `dqkv[b,t,3c]`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward(
        &self,
        dqkv: &mut CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        qkv: &CudaSlice<f32>,
        att: &CudaSlice<f32>,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<(), CudaError> {
        let b = qkv.len() / (3 * c * t);
        assert!(dqkv.len() == qkv.len() && dout.len() == b * t * c && att.len() == b * nh * t * t);
        let f = self.function(&nvrtc::LAYERS, "attention_backward")?;
        let mut datt = self.compute.alloc_zeros::<f32>(b * nh * t)?;
        let (bi, ti, ci, nhi) = (b as i32, t as i32, c as i32, nh as i32);
        let cfg = LaunchConfig {
            grid_dim: (((b * nh) as u32).div_ceil(64), 1, 1),
            block_dim: (64, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, f, cfg, dqkv, &mut datt, dout, qkv, att, &bi, &ti, &ci, &nhi)
    }
}
