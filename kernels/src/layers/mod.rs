//! The non-GEMM ops of a transformer: embeddings, norms, activations, attention, rotary
//! positions, bias, residual and the softmax cross-entropy loss.
//!
//! Every op has its forward and backward side by side, written once as a generic function
//! over [`Real`] (`f32` for training, `f64` for the finite-difference tests that check
//! every backward). The model calls them through [`LayerOps`] (f32, object safe), part
//! of the backend seam [`crate::Backend`] next to [`crate::GemmOps`]; the `Reference`
//! backend runs this same generic code in f64 as its oracle.
//!
//! All of these stay in f32 at every precision level (FP8-LM keeps norms, softmax,
//! attention scores, residuals and the loss in high precision); only the linear layers'
//! GEMMs change precision.
//!
//! Parallelism (rayon): rows of norms/activations/loss, `(batch, head)` pairs in attention,
//! channel blocks for reductions over rows (norm gains, biases). Every reduction has a fixed
//! order independent of the thread count, so results are bit-reproducible.
//!
//! Gradient conventions: ops whose input gradient flows into the residual stream
//! (`layernorm_backward`, `rmsnorm_backward`) ACCUMULATE into `dinp`; every other op
//! OVERWRITES its input gradient. Parameter gradients (`dweight`, `dbias`, `dwte`, ...)
//! always accumulate (the trainer zeroes them once per step).

pub mod act;
pub mod attention;
pub mod embed;
pub mod loss;
pub mod norm;
pub mod real;
#[cfg(test)]
mod tests;

pub use real::Real;

use crate::Cpu;

/// Rows per rayon task for row-parallel ops over rows of `c` elements: about 8K elements
/// per task, so task overhead stays small on narrow models.
pub(crate) fn row_block(c: usize) -> usize {
    (8192 / c.max(1)).max(1)
}
/// Columns per rayon task for column reductions (dweight/dbias over rows).
pub(crate) const COL_BLOCK: usize = 32;

/// A raw pointer that may be shared across rayon tasks which write provably disjoint
/// elements (attention heads write disjoint column ranges of a `[B,T,C]` buffer). Each
/// use documents why its writes are disjoint.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr<T>(*mut T);
unsafe impl<T: Send> Send for SyncPtr<T> {}
unsafe impl<T: Send> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    pub(crate) fn new(s: &mut [T]) -> Self {
        SyncPtr(s.as_mut_ptr())
    }
    /// # Safety
    /// `off + len` is within the slice this was made from, and no other live reference
    /// (in any task) overlaps `[off, off + len)`.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self, off: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(off), len)
    }
}

/// The non-GEMM op set, in f32. Shapes are given as `n` rows of `c` channels, etc.; slice
/// lengths must match (checked with `assert!`, a programming error, not an input error).
pub trait LayerOps: Send + Sync {
    /// `out[n,c] = wte[tok] + wpe[t]` (wpe absent for rotary models); `tokens[b*t]`.
    fn encoder_forward(
        &self,
        out: &mut [f32],
        tokens: &[u32],
        wte: &[f32],
        wpe: Option<&[f32]>,
        t: usize,
        c: usize,
    );
    /// `dwte[tok] += dout`, `dwpe[t] += dout`.
    fn encoder_backward(
        &self,
        dwte: &mut [f32],
        dwpe: Option<&mut [f32]>,
        dout: &[f32],
        tokens: &[u32],
        t: usize,
        c: usize,
    );
    /// LayerNorm over the last dim; saves `mean[n]`, `rstd[n]`.
    fn layernorm_forward(
        &self,
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        inp: &[f32],
        w: &[f32],
        b: &[f32],
    );
    /// Accumulates into `dinp`, `dw`, `db`.
    #[allow(clippy::too_many_arguments)]
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
    );
    fn rmsnorm_forward(&self, out: &mut [f32], rstd: &mut [f32], inp: &[f32], w: &[f32]);
    /// Accumulates into `dinp`, `dw`.
    fn rmsnorm_backward(
        &self,
        dinp: &mut [f32],
        dw: &mut [f32],
        dout: &[f32],
        inp: &[f32],
        w: &[f32],
        rstd: &[f32],
    );
    fn gelu_forward(&self, out: &mut [f32], inp: &[f32]);
    fn gelu_backward(&self, dinp: &mut [f32], inp: &[f32], dout: &[f32]);
    /// `inp[n, 2f] = [gate | up]`, `out[n, f] = silu(gate) * up`.
    fn swiglu_forward(&self, out: &mut [f32], inp: &[f32], f: usize);
    fn swiglu_backward(&self, dinp: &mut [f32], inp: &[f32], dout: &[f32], f: usize);
    /// `out[n, oc] += bias[oc]`.
    fn bias_forward(&self, out: &mut [f32], bias: &[f32]);
    /// `dbias[oc] += sum over rows of dout[n, oc]`.
    fn bias_backward(&self, dbias: &mut [f32], dout: &[f32]);
    /// `out = a + b`.
    fn residual_forward(&self, out: &mut [f32], a: &[f32], b: &[f32]);
    /// `dst += src`.
    fn add_inplace(&self, dst: &mut [f32], src: &[f32]);
    /// Rotate q and k of `qkv[b,t,3c]` in place; `table` from [`attention::rope_table`].
    fn rope_forward(&self, qkv: &mut [f32], table: &[f32], t: usize, c: usize, nh: usize);
    /// Inverse rotation of dq, dk in `dqkv[b,t,3c]`, in place.
    fn rope_backward(&self, dqkv: &mut [f32], table: &[f32], t: usize, c: usize, nh: usize);
    /// Causal attention: `out[b,t,c]`, `att[b,nh,t,t]` (probabilities), `qkv[b,t,3c]`.
    fn attention_forward(
        &self,
        out: &mut [f32],
        att: &mut [f32],
        qkv: &[f32],
        t: usize,
        c: usize,
        nh: usize,
    );
    /// Overwrites `dqkv[b,t,3c]`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dqkv: &mut [f32],
        dout: &[f32],
        qkv: &[f32],
        att: &[f32],
        t: usize,
        c: usize,
        nh: usize,
    );
    /// In place: `logits[n,v]` become probabilities; `losses[n] = -ln p[target]`.
    fn softmax_xent_forward(
        &self,
        logits_to_probs: &mut [f32],
        losses: &mut [f32],
        targets: &[u32],
    );
    /// In place: probabilities become `dlogits = (p - onehot) * dloss`.
    fn softmax_xent_backward(&self, probs_to_dlogits: &mut [f32], targets: &[u32], dloss: f32);
}

impl LayerOps for Cpu {
    fn encoder_forward(
        &self,
        out: &mut [f32],
        tokens: &[u32],
        wte: &[f32],
        wpe: Option<&[f32]>,
        t: usize,
        c: usize,
    ) {
        embed::encoder_forward(out, tokens, wte, wpe, t, c)
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
        embed::encoder_backward(dwte, dwpe, dout, tokens, t, c)
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
        norm::layernorm_forward(out, mean, rstd, inp, w, b)
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
        norm::layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd)
    }
    fn rmsnorm_forward(&self, out: &mut [f32], rstd: &mut [f32], inp: &[f32], w: &[f32]) {
        norm::rmsnorm_forward(out, rstd, inp, w)
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
        norm::rmsnorm_backward(dinp, dw, dout, inp, w, rstd)
    }
    fn gelu_forward(&self, out: &mut [f32], inp: &[f32]) {
        act::gelu_forward(out, inp)
    }
    fn gelu_backward(&self, dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
        act::gelu_backward(dinp, inp, dout)
    }
    fn swiglu_forward(&self, out: &mut [f32], inp: &[f32], f: usize) {
        act::swiglu_forward(out, inp, f)
    }
    fn swiglu_backward(&self, dinp: &mut [f32], inp: &[f32], dout: &[f32], f: usize) {
        act::swiglu_backward(dinp, inp, dout, f)
    }
    fn bias_forward(&self, out: &mut [f32], bias: &[f32]) {
        act::bias_forward(out, bias)
    }
    fn bias_backward(&self, dbias: &mut [f32], dout: &[f32]) {
        act::bias_backward(dbias, dout)
    }
    fn residual_forward(&self, out: &mut [f32], a: &[f32], b: &[f32]) {
        act::residual_forward(out, a, b)
    }
    fn add_inplace(&self, dst: &mut [f32], src: &[f32]) {
        act::add_inplace(dst, src)
    }
    fn rope_forward(&self, qkv: &mut [f32], table: &[f32], t: usize, c: usize, nh: usize) {
        attention::rope_forward(qkv, table, t, c, nh)
    }
    fn rope_backward(&self, dqkv: &mut [f32], table: &[f32], t: usize, c: usize, nh: usize) {
        attention::rope_backward(dqkv, table, t, c, nh)
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
        attention::attention_forward(out, att, qkv, t, c, nh)
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
        attention::attention_backward(dqkv, dout, qkv, att, t, c, nh)
    }
    fn softmax_xent_forward(
        &self,
        logits_to_probs: &mut [f32],
        losses: &mut [f32],
        targets: &[u32],
    ) {
        loss::softmax_xent_forward(logits_to_probs, losses, targets)
    }
    fn softmax_xent_backward(&self, probs_to_dlogits: &mut [f32], targets: &[u32], dloss: f32) {
        loss::softmax_xent_backward(probs_to_dlogits, targets, dloss)
    }
}
