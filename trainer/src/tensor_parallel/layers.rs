//! Column- and row-parallel linear layers (Megatron's `ColumnParallelLinear`,
//! `RowParallelLinear`), `out = inp @ W^T + b` with `W` stored `[OC, C]` as in llm.c.
//!
//! ```text
//!   column:  W_t = W[rows_t, :]      out_t[n, OC/T] = inp[n, C] @ W_t^T + b_t
//!            dinp_partial[n, C] = dout_t @ W_t   (summed over the group by f's / g's backward)
//!   row:     W_t = W[:, cols_t]      partial[n, OC] = inp_t[n, C/T] @ W_t^T
//!            (summed by f̄ / ḡ, then + b once);  dinp_t[n, C/T] = dout @ W_t
//! ```
//! FP8 ([`TpGemm::Fp8`]): inputs and weights in E4M3, output gradients in E5M2, each with
//! a just-in-time (current) power-of-two scale of the operand this rank holds; f32
//! accumulation, as the model's linear does. A weight shard's scale is that of the shard
//! (per-tensor scaling of the tensor this rank owns, as TE and MS-AMP do). Operands that
//! cross the group in FP8 (the SP all-gathers) arrive as [`MatRef::Fp8`] with the group's
//! shared scale and go into the GEMM as they are.

use fp8lm_fp8::cast::{amax_f32, f32_to_fp8_counted};
use fp8lm_fp8::{scale_for_amax, Fp8Format, ScaleRounding};
use fp8lm_kernels::{Cpu, GemmOps, GemmShape, LayerOps, MatRef};
use std::ops::Range;

/// Formats of the recipe: inputs and weights E4M3, gradients E5M2.
pub const X: Fp8Format = Fp8Format::E4M3;
pub const G: Fp8Format = Fp8Format::E5M2;

/// Operand format of the tensor-parallel linears' GEMMs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TpGemm {
    F32,
    /// E4M3 inputs/weights, E5M2 output gradients, current scaling with `margin` binades.
    Fp8 {
        margin: i32,
    },
}

/// `src` as a GEMM operand in the mode's format (FP8 bytes in `buf`, current scaling).
/// Public so a caller can quantize an activation once and hand it to several GEMMs.
pub fn quantize<'a>(
    mode: TpGemm,
    fmt: Fp8Format,
    src: &'a [f32],
    buf: &'a mut Vec<u8>,
) -> MatRef<'a> {
    match mode {
        TpGemm::F32 => MatRef::F32(src),
        TpGemm::Fp8 { margin } => {
            // A zero or non-finite amax keeps scale 1 (nothing to resolve; NaN propagates).
            let amax = amax_f32(src);
            let scale =
                scale_for_amax(fmt.max(), amax, margin, ScaleRounding::PowerOfTwo).unwrap_or(1.0);
            buf.resize(src.len(), 0);
            f32_to_fp8_counted(fmt, src, scale, buf);
            MatRef::Fp8 {
                data: buf,
                format: fmt,
                scale,
            }
        }
    }
}

/// Output features split over the group.
#[derive(Clone, Debug)]
pub struct ColumnParallelLinear {
    /// Input width (full) and this rank's output features.
    pub c: usize,
    pub oc_local: usize,
    /// `[oc_local, c]`, `[oc_local]`.
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    pub dweight: Vec<f32>,
    pub dbias: Option<Vec<f32>>,
}

impl ColumnParallelLinear {
    /// This rank's shard of a full layer (`full_w[oc, c]`): the given row ranges of the
    /// full weight, concatenated (one range for fc, three for qkv, [`super::qkv_rows`]).
    pub fn from_full(
        full_w: &[f32],
        full_b: Option<&[f32]>,
        c: usize,
        rows: &[Range<usize>],
    ) -> Self {
        let weight: Vec<f32> = rows
            .iter()
            .flat_map(|r| full_w[r.start * c..r.end * c].iter().copied())
            .collect();
        let bias = full_b.map(|b| {
            rows.iter()
                .flat_map(|r| b[r.clone()].iter().copied())
                .collect::<Vec<_>>()
        });
        ColumnParallelLinear {
            c,
            oc_local: weight.len() / c,
            dweight: vec![0.0; weight.len()],
            dbias: bias.as_ref().map(|b| vec![0.0; b.len()]),
            weight,
            bias,
        }
    }

    /// `out[n, oc_local] = inp[n, c] @ W_t^T + b_t`. `inp` is the full input (after f, or
    /// the gathered FP8 bytes of g), already in the mode's format ([`quantize`]).
    pub fn forward(&self, mode: TpGemm, out: &mut [f32], inp: MatRef<'_>, n: usize) {
        let mut wb = Vec::new();
        let w = quantize(mode, X, &self.weight, &mut wb);
        let shape = GemmShape::new(n, self.oc_local, self.c).trans_b();
        Cpu.gemm(shape, inp, w, out, false);
        if let Some(b) = &self.bias {
            Cpu.bias_forward(out, b);
        }
    }

    /// `dinp_partial[n, c] = dout[n, oc_local] @ W_t` (overwritten; the caller sums it over
    /// the group: f's or g's backward), `dW_t += dout^T @ inp` (`inp`: the forward's
    /// operand, as it was), `db_t += sum dout`.
    pub fn backward(
        &mut self,
        mode: TpGemm,
        dinp_partial: &mut [f32],
        dout: &[f32],
        inp: MatRef<'_>,
        n: usize,
    ) {
        let (oc, c) = (self.oc_local, self.c);
        let (mut gb, mut wb) = (Vec::new(), Vec::new());
        let g = quantize(mode, G, dout, &mut gb);
        let w = quantize(mode, X, &self.weight, &mut wb);
        Cpu.gemm(GemmShape::new(n, c, oc), g, w, dinp_partial, false);
        Cpu.gemm(
            GemmShape::new(oc, c, n).trans_a(),
            g,
            inp,
            &mut self.dweight,
            true,
        );
        if let Some(db) = &mut self.dbias {
            Cpu.bias_backward(db, dout);
        }
    }
}

/// Input features split over the group.
#[derive(Clone, Debug)]
pub struct RowParallelLinear {
    /// This rank's input features and the output width (full).
    pub c_local: usize,
    pub oc: usize,
    /// `[oc, c_local]`; the bias `[oc]` is whole on every rank, added after the reduction.
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    pub dweight: Vec<f32>,
    pub dbias: Option<Vec<f32>>,
}

impl RowParallelLinear {
    /// This rank's shard of a full layer (`full_w[oc, c]`): columns `cols`.
    pub fn from_full(full_w: &[f32], full_b: Option<&[f32]>, c: usize, cols: Range<usize>) -> Self {
        let oc = full_w.len() / c;
        let weight: Vec<f32> = (0..oc)
            .flat_map(|o| full_w[o * c + cols.start..o * c + cols.end].iter().copied())
            .collect();
        RowParallelLinear {
            c_local: cols.len(),
            oc,
            dweight: vec![0.0; weight.len()],
            dbias: full_b.map(|b| vec![0.0; b.len()]),
            bias: full_b.map(<[f32]>::to_vec),
            weight,
        }
    }

    /// `partial[n, oc] = inp_t[n, c_local] @ W_t^T`: the caller reduces it over the group
    /// (f̄ or ḡ) and then calls [`RowParallelLinear::add_bias`].
    pub fn forward(&self, mode: TpGemm, partial: &mut [f32], inp: &[f32], n: usize) {
        let (mut xb, mut wb) = (Vec::new(), Vec::new());
        let x = quantize(mode, X, inp, &mut xb);
        let w = quantize(mode, X, &self.weight, &mut wb);
        let shape = GemmShape::new(n, self.oc, self.c_local).trans_b();
        Cpu.gemm(shape, x, w, partial, false);
    }

    /// `out += b` on the reduced output (all rows, or this rank's sequence shard with SP).
    pub fn add_bias(&self, out: &mut [f32]) {
        if let Some(b) = &self.bias {
            Cpu.bias_forward(out, b);
        }
    }

    /// `dinp_t[n, c_local] = dout[n, oc] @ W_t` (overwritten), `dW_t += dout^T @ inp_t`.
    /// `dout` is the full output gradient in the mode's format: without SP the same f32
    /// tensor on every rank (f̄'s backward is the identity); with SP the E5M2 all-gather
    /// of the gradient shards (ḡ's backward) with the group's shared scale. The bias
    /// gradient `db += sum dout` is taken over `dout_rows_f32`, the rows whose bias this
    /// rank accounts for: all rows without SP (then every rank holds the full `db`), its
    /// own shard with SP (then `db` is partial and is all-reduced with the norms').
    pub fn backward(
        &mut self,
        mode: TpGemm,
        dinp: &mut [f32],
        dout: MatRef<'_>,
        dout_rows_f32: &[f32],
        inp: &[f32],
        n: usize,
    ) {
        let (oc, c) = (self.oc, self.c_local);
        let (mut xb, mut wb) = (Vec::new(), Vec::new());
        let x = quantize(mode, X, inp, &mut xb);
        let w = quantize(mode, X, &self.weight, &mut wb);
        Cpu.gemm(GemmShape::new(n, c, oc), dout, w, dinp, false);
        Cpu.gemm(
            GemmShape::new(oc, c, n).trans_a(),
            dout,
            x,
            &mut self.dweight,
            true,
        );
        if let Some(db) = &mut self.dbias {
            Cpu.bias_backward(db, dout_rows_f32);
        }
    }
}
