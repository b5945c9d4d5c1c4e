//! The activation arena ([`Acts`]) the forward fills and the backward reads, and the
//! views into it and into the flat gradient buffer that both passes use.

use super::Dims;
use std::ops::Range;

/// Activations kept for the backward pass, plus the backward's scratch gradients.
/// Per-layer buffers are `[L, ...]` with a stride of the full `B x T` size; a smaller
/// batch (evaluation, sampling) uses the front of each layer's slot.
pub(super) struct Acts {
    /// See [`Acts::new`]; when false, ln1/atty/ln2/fch_act are `[1, ...]`.
    pub(super) keep_linear_inputs: bool,
    pub(super) encoded: Vec<f32>,   // [B,T,C]
    pub(super) ln1: Vec<f32>,       // [L,B,T,C]
    pub(super) ln1_mean: Vec<f32>,  // [L,B,T]
    pub(super) ln1_rstd: Vec<f32>,  // [L,B,T]
    pub(super) qkv: Vec<f32>,       // [L,B,T,3C] (after rope for llama)
    pub(super) atty: Vec<f32>,      // [L,B,T,C]
    pub(super) att: Vec<f32>,       // [L,B,H,T,T]
    pub(super) attproj: Vec<f32>,   // [B,T,C] (one slot: the backward needs no projection output)
    pub(super) residual2: Vec<f32>, // [L,B,T,C]
    pub(super) ln2: Vec<f32>,       // [L,B,T,C]
    pub(super) ln2_mean: Vec<f32>,  // [L,B,T]
    pub(super) ln2_rstd: Vec<f32>,  // [L,B,T]
    pub(super) fch: Vec<f32>,       // [L,B,T,FC] FC = 4C (gpt2) or 2F (llama)
    pub(super) fch_act: Vec<f32>,   // [L,B,T,F]
    pub(super) fcproj: Vec<f32>,    // [B,T,C] (one slot, as attproj)
    pub(super) residual3: Vec<f32>, // [L,B,T,C]
    // Sequence parallelism (empty without): a norm output shard, a row-parallel output
    // shard; the residual stream above (encoded, residual2/3, norm statistics,
    // dresidual) then holds B*T/T_p rows.
    pub(super) sp_a: Vec<f32>,     // [B*T/T_p, C]
    pub(super) sp_b: Vec<f32>,     // [B*T/T_p, C]
    pub(super) lnf: Vec<f32>,      // [B,T,C]
    pub(super) lnf_mean: Vec<f32>, // [B,T]
    pub(super) lnf_rstd: Vec<f32>, // [B,T]
    pub(super) logits: Vec<f32>,   // [B,T,V] -> probs -> dlogits, in place
    pub(super) losses: Vec<f32>,   // [B,T]
    // backward scratch
    pub(super) dresidual: Vec<f32>, // [B,T,C]
    pub(super) dln: Vec<f32>,       // [B,T,C]
    pub(super) datty: Vec<f32>,     // [B,T,C]
    pub(super) dqkv: Vec<f32>,      // [B,T,3C]
    pub(super) dfch: Vec<f32>,      // [B,T,FC]
    pub(super) dfch_act: Vec<f32>,  // [B,T,F]
}

impl Acts {
    /// `keep_linear_inputs`: keep each layer's f32 linear inputs (ln1, atty, ln2,
    /// fch_act) for the backward, as the fp32 dW GEMMs read them. The bf16 and FP8
    /// linears keep their own low-precision copy of the input, so those four are one
    /// slot shared by all layers (per-layer stride 0, see [`in_stride`]).
    /// `ca`: the attention's width (`C`, or `C / T` on a tensor-parallel rank, whose
    /// `d` are its local dims).
    /// `spt`: the sequence-parallel group size (1 without SP), whose rank keeps
    /// `B*T / spt` rows of the residual stream. With SP the column-parallel linears
    /// (qkv, fc, head) keep their own shard of the norm outputs and gather them into a
    /// per-thread buffer (`model/linear_sp.rs`): ln2 and lnf are empty then, and ln1 is
    /// one `[B*T, C]` slot shared by the three (bf16's f32 gather, the input the bf16 /
    /// FP8 backwards are handed and do not read), empty in fp32 ([`sp_norm_full`]).
    pub(super) fn new(d: &Dims, ca: usize, spt: usize, keep_linear_inputs: bool) -> Acts {
        let (bt, c, l) = (d.b * d.t, d.c, d.l);
        let bts = bt / spt;
        let sp_len = if spt > 1 { bts * c } else { 0 };
        let z = |n: usize| vec![0f32; n];
        let li = if keep_linear_inputs { l } else { 1 };
        let (ln1, ln2, lnf) = match (spt > 1, keep_linear_inputs) {
            (false, _) => (li * bt * c, li * bt * c, bt * c),
            (true, false) => (bt * c, 0, 0),
            (true, true) => (0, 0, 0),
        };
        Acts {
            keep_linear_inputs,
            encoded: z(bts * c),
            ln1: z(ln1),
            ln1_mean: z(l * bts),
            ln1_rstd: z(l * bts),
            qkv: z(l * bt * 3 * ca),
            atty: z(li * bt * ca),
            att: z(l * d.b * d.h * d.t * d.t),
            attproj: z(bt * c),
            residual2: z(l * bts * c),
            ln2: z(ln2),
            ln2_mean: z(l * bts),
            ln2_rstd: z(l * bts),
            fch: z(l * bt * d.fc_out()),
            fch_act: z(li * bt * d.f),
            fcproj: z(bt * c),
            residual3: z(l * bts * c),
            sp_a: z(sp_len),
            sp_b: z(sp_len),
            lnf: z(lnf),
            lnf_mean: z(bts),
            lnf_rstd: z(bts),
            logits: z(bt * d.v),
            losses: z(bt),
            dresidual: z(bts * c),
            dln: z(bt * c),
            datty: z(bt * ca),
            dqkv: z(bt * 3 * ca),
            dfch: z(bt * d.fc_out()),
            dfch_act: z(bt * d.f),
        }
    }

    pub(super) fn bytes(&self) -> usize {
        let all = [
            &self.encoded,
            &self.ln1,
            &self.ln1_mean,
            &self.ln1_rstd,
            &self.qkv,
            &self.atty,
            &self.att,
            &self.residual2,
            &self.ln2,
            &self.ln2_mean,
            &self.ln2_rstd,
            &self.fch,
            &self.fch_act,
            &self.residual3,
            &self.sp_a,
            &self.sp_b,
            &self.lnf,
            &self.lnf_mean,
            &self.lnf_rstd,
            &self.logits,
            &self.losses,
        ];
        all.iter().map(|v| v.len() * 4).sum::<usize>() + self.scratch_bytes()
    }

    /// The backward's one-layer gradient scratch (dresidual, dln, datty, dqkv, dfch,
    /// dfch_act) and the two one-slot row-parallel outputs (attproj, fcproj: written
    /// by every layer's forward and read by no backward, so not kept activations).
    pub(super) fn scratch_bytes(&self) -> usize {
        [
            &self.attproj,
            &self.fcproj,
            &self.dresidual,
            &self.dln,
            &self.datty,
            &self.dqkv,
            &self.dfch,
            &self.dfch_act,
        ]
        .iter()
        .map(|v| v.len() * 4)
        .sum()
    }
}

/// Per-layer stride of a linear-input buffer ([`Acts::new`]): `per_layer` when every
/// layer keeps its own, 0 when all share one slot.
pub(super) fn in_stride(keep_linear_inputs: bool, per_layer: usize) -> usize {
    if keep_linear_inputs {
        per_layer
    } else {
        0
    }
}

/// Under SP: the f32 `[n, C]` norm-output buffer a column-parallel linear is handed
/// (`Acts::ln1`'s one shared slot, or nothing in fp32: see [`Acts::new`]).
pub(super) fn sp_norm_full(v: &mut [f32], len: usize) -> &mut [f32] {
    let k = v.len().min(len);
    &mut v[..k]
}

/// Slot `l` of a `[L, stride]` buffer, first `len` elements.
pub(super) fn at(v: &[f32], l: usize, stride: usize, len: usize) -> &[f32] {
    &v[l * stride..l * stride + len]
}

pub(super) fn at_mut(v: &mut [f32], l: usize, stride: usize, len: usize) -> &mut [f32] {
    &mut v[l * stride..l * stride + len]
}

/// Where a linear's dW GEMM writes: its f32 gradient, or (FP8) the front of the scratch.
pub(super) fn wgrad_target<'a>(
    fp8: bool,
    dw: &'a mut [f32],
    scratch: &'a mut [f32],
) -> &'a mut [f32] {
    if fp8 {
        let n = dw.len();
        &mut scratch[..n]
    } else {
        dw
    }
}

/// Two disjoint gradient tensors (`a` before `b` in the layout) borrowed mutably.
pub(super) fn two_mut(
    g: &mut [f32],
    a: Range<usize>,
    b: Option<Range<usize>>,
) -> (&mut [f32], Option<&mut [f32]>) {
    match b {
        None => (&mut g[a], None),
        Some(b) => {
            assert!(a.end <= b.start);
            let (lo, hi) = g.split_at_mut(b.start);
            (&mut lo[a], Some(&mut hi[..b.end - b.start]))
        }
    }
}
