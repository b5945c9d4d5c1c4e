//! The reference layer ops: the generic code of [`crate::layers`] evaluated in f64 on
//! one thread, inputs widened (exactly) to f64 and outputs rounded to f32 once.
//! Accumulating outputs (`dinp` of the norms, parameter gradients) are widened too, so
//! the sum happens in f64 and is rounded once.

use super::{single, Reference};
use crate::layers::{act, attention, embed, loss, norm, LayerOps};

fn wide(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn narrow(dst: &mut [f32], src: &[f64]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = s as f32;
    }
}

impl LayerOps for Reference {
    fn encoder_forward(
        &self,
        out: &mut [f32],
        tokens: &[u32],
        wte: &[f32],
        wpe: Option<&[f32]>,
        t: usize,
        c: usize,
    ) {
        let (wte, wpe) = (wide(wte), wpe.map(wide));
        let mut o = wide(out);
        single(|| embed::encoder_forward(&mut o, tokens, &wte, wpe.as_deref(), t, c));
        narrow(out, &o);
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
        let (mut dte, dy) = (wide(dwte), wide(dout));
        let mut dpe = dwpe.as_deref().map(wide);
        single(|| embed::encoder_backward(&mut dte, dpe.as_deref_mut(), &dy, tokens, t, c));
        narrow(dwte, &dte);
        if let (Some(dst), Some(src)) = (dwpe, dpe) {
            narrow(dst, &src);
        }
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
        let (mut o, mut m, mut r) = (wide(out), wide(mean), wide(rstd));
        let (x, w, b) = (wide(inp), wide(w), wide(b));
        single(|| norm::layernorm_forward(&mut o, &mut m, &mut r, &x, &w, &b));
        narrow(out, &o);
        narrow(mean, &m);
        narrow(rstd, &r);
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
        let (mut di, mut dw64, mut db64) = (wide(dinp), wide(dw), wide(db));
        let (dy, x, w, m, r) = (wide(dout), wide(inp), wide(w), wide(mean), wide(rstd));
        single(|| norm::layernorm_backward(&mut di, &mut dw64, &mut db64, &dy, &x, &w, &m, &r));
        narrow(dinp, &di);
        narrow(dw, &dw64);
        narrow(db, &db64);
    }
    fn rmsnorm_forward(&self, out: &mut [f32], rstd: &mut [f32], inp: &[f32], w: &[f32]) {
        let (mut o, mut r, x, w) = (wide(out), wide(rstd), wide(inp), wide(w));
        single(|| norm::rmsnorm_forward(&mut o, &mut r, &x, &w));
        narrow(out, &o);
        narrow(rstd, &r);
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
        let (mut di, mut dw64) = (wide(dinp), wide(dw));
        let (dy, x, w, r) = (wide(dout), wide(inp), wide(w), wide(rstd));
        single(|| norm::rmsnorm_backward(&mut di, &mut dw64, &dy, &x, &w, &r));
        narrow(dinp, &di);
        narrow(dw, &dw64);
    }
    fn gelu_forward(&self, out: &mut [f32], inp: &[f32]) {
        let (mut o, x) = (wide(out), wide(inp));
        single(|| act::gelu_forward(&mut o, &x));
        narrow(out, &o);
    }
    fn gelu_backward(&self, dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
        let (mut di, x, dy) = (wide(dinp), wide(inp), wide(dout));
        single(|| act::gelu_backward(&mut di, &x, &dy));
        narrow(dinp, &di);
    }
    fn swiglu_forward(&self, out: &mut [f32], inp: &[f32], f: usize) {
        let (mut o, x) = (wide(out), wide(inp));
        single(|| act::swiglu_forward(&mut o, &x, f));
        narrow(out, &o);
    }
    fn swiglu_backward(&self, dinp: &mut [f32], inp: &[f32], dout: &[f32], f: usize) {
        let (mut di, x, dy) = (wide(dinp), wide(inp), wide(dout));
        single(|| act::swiglu_backward(&mut di, &x, &dy, f));
        narrow(dinp, &di);
    }
    fn bias_forward(&self, out: &mut [f32], bias: &[f32]) {
        let (mut o, b) = (wide(out), wide(bias));
        single(|| act::bias_forward(&mut o, &b));
        narrow(out, &o);
    }
    fn bias_backward(&self, dbias: &mut [f32], dout: &[f32]) {
        let (mut db, dy) = (wide(dbias), wide(dout));
        single(|| act::bias_backward(&mut db, &dy));
        narrow(dbias, &db);
    }
    fn residual_forward(&self, out: &mut [f32], a: &[f32], b: &[f32]) {
        let (mut o, a, b) = (wide(out), wide(a), wide(b));
        single(|| act::residual_forward(&mut o, &a, &b));
        narrow(out, &o);
    }
    fn add_inplace(&self, dst: &mut [f32], src: &[f32]) {
        let (mut d, s) = (wide(dst), wide(src));
        single(|| act::add_inplace(&mut d, &s));
        narrow(dst, &d);
    }
    fn rope_forward(&self, qkv: &mut [f32], table: &[f32], t: usize, c: usize, nh: usize) {
        let (mut q, tb) = (wide(qkv), wide(table));
        single(|| attention::rope_forward(&mut q, &tb, t, c, nh));
        narrow(qkv, &q);
    }
    fn rope_backward(&self, dqkv: &mut [f32], table: &[f32], t: usize, c: usize, nh: usize) {
        let (mut q, tb) = (wide(dqkv), wide(table));
        single(|| attention::rope_backward(&mut q, &tb, t, c, nh));
        narrow(dqkv, &q);
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
        let (mut o, mut a, q) = (wide(out), wide(att), wide(qkv));
        single(|| attention::attention_forward(&mut o, &mut a, &q, t, c, nh));
        narrow(out, &o);
        narrow(att, &a);
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
        let (mut dq, dy, q, a) = (wide(dqkv), wide(dout), wide(qkv), wide(att));
        single(|| attention::attention_backward(&mut dq, &dy, &q, &a, t, c, nh));
        narrow(dqkv, &dq);
    }
    fn softmax_xent_forward(
        &self,
        logits_to_probs: &mut [f32],
        losses: &mut [f32],
        targets: &[u32],
    ) {
        let (mut p, mut l) = (wide(logits_to_probs), wide(losses));
        single(|| loss::softmax_xent_forward(&mut p, &mut l, targets));
        narrow(logits_to_probs, &p);
        narrow(losses, &l);
    }
    fn softmax_xent_backward(&self, probs_to_dlogits: &mut [f32], targets: &[u32], dloss: f32) {
        let mut p = wide(probs_to_dlogits);
        single(|| loss::softmax_xent_backward(&mut p, targets, dloss as f64));
        narrow(probs_to_dlogits, &p);
    }
}
