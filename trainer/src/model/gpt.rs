//! The GPT model: forward and backward of the whole network, llm.c style.
//!
//! One flat f32 parameter buffer and one gradient buffer (views described by
//! [`Layout`]), one activation arena (`Acts`) sized for `B x T` once. Each block:
//!
//! ```text
//! x -> norm1 -> qkv (linear) [-> rope] -> attention -> proj (linear) -> +x = r2
//! r2 -> norm2 -> fc (linear) -> gelu | swiglu -> proj (linear) -> +r2 = r3
//! ```
//! Norms, attention, residuals and the loss are f32 in every mode; only the four linears
//! per block and the LM head change precision (see [`super::linear`]).
//!
//! Every op runs on the model's backend handle (`Arc<dyn Backend>`, chosen at
//! construction: [`Model::new_on`]; the other constructors take the default), which it
//! shares with its linears; no backend type is named here.

use super::linear::{Linear, LinearPrecision};
use super::params::{split_tensors_mut, Dims, Layout};
use crate::config::Arch;
use crate::tensor_parallel::layers::{ColumnParallelLinear, RowParallelLinear};
use crate::tensor_parallel::shard::{self as tp, TpShard};
use crate::tensor_parallel::sp;
use fp8lm_collectives::Communicator;
use fp8lm_kernels::layers::attention::rope_table;
use fp8lm_kernels::{default_backend, Backend};
use fp8lm_optim::{Fp8Written, Grad, Optimizer, ParamOut};
use std::ops::Range;
use std::sync::Arc;

/// Rotary base (LLaMA).
const ROPE_THETA: f64 = 10000.0;

/// Activations kept for the backward pass, plus the backward's scratch gradients.
/// Per-layer buffers are `[L, ...]` with a stride of the full `B x T` size; a smaller
/// batch (evaluation, sampling) uses the front of each layer's slot.
struct Acts {
    /// See [`Acts::new`]; when false, ln1/atty/ln2/fch_act are `[1, ...]`.
    keep_linear_inputs: bool,
    encoded: Vec<f32>,   // [B,T,C]
    ln1: Vec<f32>,       // [L,B,T,C]
    ln1_mean: Vec<f32>,  // [L,B,T]
    ln1_rstd: Vec<f32>,  // [L,B,T]
    qkv: Vec<f32>,       // [L,B,T,3C] (after rope for llama)
    atty: Vec<f32>,      // [L,B,T,C]
    att: Vec<f32>,       // [L,B,H,T,T]
    attproj: Vec<f32>,   // [B,T,C] (one slot: the backward needs no projection output)
    residual2: Vec<f32>, // [L,B,T,C]
    ln2: Vec<f32>,       // [L,B,T,C]
    ln2_mean: Vec<f32>,  // [L,B,T]
    ln2_rstd: Vec<f32>,  // [L,B,T]
    fch: Vec<f32>,       // [L,B,T,FC] FC = 4C (gpt2) or 2F (llama)
    fch_act: Vec<f32>,   // [L,B,T,F]
    fcproj: Vec<f32>,    // [B,T,C] (one slot, as attproj)
    residual3: Vec<f32>, // [L,B,T,C]
    // Sequence parallelism (empty without): a norm output shard, a row-parallel output
    // shard; the residual stream above (encoded, residual2/3, norm statistics,
    // dresidual) then holds B*T/T_p rows.
    sp_a: Vec<f32>,     // [B*T/T_p, C]
    sp_b: Vec<f32>,     // [B*T/T_p, C]
    lnf: Vec<f32>,      // [B,T,C]
    lnf_mean: Vec<f32>, // [B,T]
    lnf_rstd: Vec<f32>, // [B,T]
    logits: Vec<f32>,   // [B,T,V] -> probs -> dlogits, in place
    losses: Vec<f32>,   // [B,T]
    // backward scratch
    dresidual: Vec<f32>, // [B,T,C]
    dln: Vec<f32>,       // [B,T,C]
    datty: Vec<f32>,     // [B,T,C]
    dqkv: Vec<f32>,      // [B,T,3C]
    dfch: Vec<f32>,      // [B,T,FC]
    dfch_act: Vec<f32>,  // [B,T,F]
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
    fn new(d: &Dims, ca: usize, spt: usize, keep_linear_inputs: bool) -> Acts {
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

    fn bytes(&self) -> usize {
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
    fn scratch_bytes(&self) -> usize {
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
fn in_stride(keep_linear_inputs: bool, per_layer: usize) -> usize {
    if keep_linear_inputs {
        per_layer
    } else {
        0
    }
}

/// Under SP: the f32 `[n, C]` norm-output buffer a column-parallel linear is handed
/// (`Acts::ln1`'s one shared slot, or nothing in fp32: see [`Acts::new`]).
fn sp_norm_full(v: &mut [f32], len: usize) -> &mut [f32] {
    let k = v.len().min(len);
    &mut v[..k]
}

/// Slot `l` of a `[L, stride]` buffer, first `len` elements.
fn at(v: &[f32], l: usize, stride: usize, len: usize) -> &[f32] {
    &v[l * stride..l * stride + len]
}
fn at_mut(v: &mut [f32], l: usize, stride: usize, len: usize) -> &mut [f32] {
    &mut v[l * stride..l * stride + len]
}

/// Where a linear's dW GEMM writes: its f32 gradient, or (FP8) the front of the scratch.
fn wgrad_target<'a>(fp8: bool, dw: &'a mut [f32], scratch: &'a mut [f32]) -> &'a mut [f32] {
    if fp8 {
        let n = dw.len();
        &mut scratch[..n]
    } else {
        dw
    }
}

/// Two disjoint gradient tensors (`a` before `b` in the layout) borrowed mutably.
fn two_mut(
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

#[allow(clippy::too_many_arguments)]
fn norm_forward(
    be: &dyn Backend,
    arch: Arch,
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
) {
    match (arch, b) {
        (Arch::Gpt2, Some(b)) => be.layernorm_forward(out, mean, rstd, inp, w, b),
        _ => be.rmsnorm_forward(out, rstd, inp, w),
    }
}

#[allow(clippy::too_many_arguments)]
fn norm_backward(
    be: &dyn Backend,
    arch: Arch,
    dinp: &mut [f32],
    dw: &mut [f32],
    db: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    w: &[f32],
    mean: &[f32],
    rstd: &[f32],
) {
    match (arch, db) {
        (Arch::Gpt2, Some(db)) => be.layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd),
        _ => be.rmsnorm_backward(dinp, dw, dout, inp, w, rstd),
    }
}

/// Rows of the residual stream a rank holds (`n / spt`), their per-layer stride
/// (`bt / spt`), and the length of a `[rows, c]` shard buffer (0 without SP).
fn sp_rows(n: usize, bt: usize, c: usize, spt: usize) -> (usize, usize, usize) {
    assert!(
        n.is_multiple_of(spt),
        "sequence parallelism: {n} tokens do not divide by dist.tensor_parallel = {spt}"
    );
    let ns = n / spt;
    (ns, bt / spt, if spt > 1 { ns * c } else { 0 })
}

/// The tensor-parallel group a forward or backward uses: `comm` on a rank of a group,
/// none for the whole model (a missing group is a caller's bug: panics, naming it).
fn tp_comm(tp: Option<TpShard>, comm: Option<&dyn Communicator>) -> Option<&dyn Communicator> {
    match (tp, comm) {
        (None, _) => None,
        (Some(_), Some(c)) => Some(c),
        (Some(s), None) => panic!(
            "tensor-parallel rank {} of {}: forward/backward need its group's \
             communicator (forward_tp / backward_tp)",
            s.rank, s.size
        ),
    }
}

/// [`Model::new_fp8_compute`]'s callback: (tensor index, its initial values, whether it
/// is an FP8 linear's weight).
pub type TensorInit<'a> = dyn FnMut(usize, &mut [f32], bool) -> Result<(), String> + 'a;

/// The FP8 targets' results after an update, per tensor.
pub fn written_of(outs: &[ParamOut<'_>]) -> Vec<Option<Fp8Written>> {
    outs.iter()
        .map(|o| match o {
            ParamOut::Fp8(f) => f.written,
            ParamOut::F32(_) => None,
        })
        .collect()
}

/// One ZeRO unit of fp8-o3's tied token embedding: its element range (whole rows) and
/// the power-of-two scale of its FP16 master.
pub(crate) type WteUnit = (Range<usize>, f32);

/// fp8-o3's tied token embedding on a data-parallel rank: the FP16 masters of its ZeRO
/// units, each with its own power-of-two scale (`real = stored / scale`).
struct WteF16Units {
    bits: Vec<half::f16>,
    /// Element ranges of the tensor (row blocks, in order) and their scales.
    units: Vec<WteUnit>,
}

impl WteF16Units {
    /// `out[r] = wte[tok] (+ wpe[pos])` with each row decoded with its unit's scale:
    /// the values and additions of `encoder_forward` on the f32 view (`f16 / scale` is
    /// exact for a power-of-two scale), through the backend's FP16 lookup.
    fn encoder_forward(
        &self,
        be: &dyn Backend,
        out: &mut [f32],
        tokens: &[u32],
        wpe: Option<&[f32]>,
        t: usize,
        c: usize,
    ) {
        let s0 = self.units.first().map_or(1.0, |u| u.1);
        if self.units.iter().all(|u| u.1.to_bits() == s0.to_bits()) {
            return be.encoder_forward_f16(out, tokens, &self.bits, s0, wpe, t, c);
        }
        for (r, (o, &tok)) in out.chunks_mut(c).zip(tokens).enumerate() {
            let at = tok as usize * c;
            let (range, scale) = self
                .units
                .iter()
                .find(|(u, _)| u.contains(&at))
                .expect("the units cover the table");
            // The unit's rows as a table of their own (units are whole rows).
            let row0 = range.start / c;
            let table = &self.bits[range.clone()];
            let pos = wpe.map(|w| &w[(r % t) * c..(r % t + 1) * c]);
            be.encoder_forward_f16(o, &[tok - row0 as u32], table, *scale, pos, 1, c);
        }
    }
}

/// Which part of the network a group of finished gradients belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradGroup {
    /// Final norm, and the LM head when it is not tied to the embedding (LLaMA).
    Head,
    /// Block `l`.
    Block(usize),
    /// Token (and GPT-2's position) embeddings, with GPT-2's tied LM head.
    Embedding,
}

/// Where a [`GradGroup`] lies: its flat-buffer range and the indices of the linears
/// (into `Model::linears`) whose weights are in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GradGroupSpec {
    pub group: GradGroup,
    pub range: Range<usize>,
    pub linears: Range<usize>,
}

/// A group of gradients the backward is done with (see [`Model::backward_with`]).
pub struct FinalGrads<'a> {
    pub group: GradGroup,
    /// Flat-buffer offset of `grads[0]`.
    pub offset: usize,
    /// f32 gradients of the group's range (for FP8 linears, the f32 copy their FP8
    /// weight gradient was cast from).
    pub grads: &'a mut [f32],
    /// The linears whose weights lie in the group, FP8 weight gradients quantised.
    pub linears: &'a mut [Linear],
}

/// The model: parameters, gradients, activations and per-linear precision state.
///
/// Where each tensor lives, by precision:
/// - fp32 / bf16: every weight and gradient in `params` / `grads` (f32);
/// - fp8-o1: weights f32 in `params` (the AdamW master); the linears' weight gradients
///   leave their dW GEMM through `wgrad_f32` and are stored only as E5M2 + scale
///   (`Linear::fp8.wgrad`);
/// - fp8-o2 ([`Model::new_fp8_compute`]): in addition the linears' weights exist only as
///   the optimizer's FP16 master and the E4M3 copy it writes (`Linear::fp8.w`);
/// - fp8-o3 on several data-parallel ranks ([`Model::hold_linear_weights_as_e4m3`]): as
///   fp8-o2, except that each FP16 master lives on its ZeRO owner only; every rank holds
///   the linears' E4M3 weights the owners cast and all-gather, GPT-2's tied embedding
///   as the owners' FP16 masters (`wte_f16_units`, for the lookup), and the other
///   tensors f32 in `params`. (With the block recipe or tensor parallelism, fp8-o3
///   keeps the f32 view of the masters in `params`, as fp8-o1.)
///
/// `params` and `grads` keep the flat layout's offsets in every mode; the ranges of
/// tensors stored elsewhere are never written (nor read), so their pages are never
/// touched and never become resident (`vec![0.0; n]` is a fresh zero mapping).
pub struct Model {
    /// The backend every op runs on (shared with the linears).
    be: Arc<dyn Backend>,
    pub dims: Dims,
    pub layout: Layout,
    /// Flat f32 weights `[layout.total]`, the compute copy the layers read (see above
    /// for the ranges that are not stored here).
    pub params: Vec<f32>,
    /// Flat f32 gradients, same layout (FP8 linears' weight gradients are not here).
    pub grads: Vec<f32>,
    /// FP8 linears' f32 weight-gradient scratch: `[head | largest block linear]`. The
    /// tied LM head's part lives through the whole backward (the embedding's scatter
    /// adds to it last); the block part is reused by every block linear, each cast to
    /// E5M2 right after its dW GEMM. Empty without FP8 linears.
    wgrad_f32: Vec<f32>,
    /// fp8-o2: the linears' E4M3 weights are written by the optimizer (no f32 copy).
    weights_from_optimizer: bool,
    /// fp8-o3 on several ranks with a tied embedding: the token embedding's FP16
    /// masters, as their ZeRO owners share them (one power-of-two scale per unit).
    wte_f16_units: Option<WteF16Units>,
    /// The next backward adds to the gradients held (micro-batch 2.. of a step).
    accumulate: bool,
    /// Linears in order `[qkv, attn.proj, mlp.fc, mlp.proj] x L`, then the LM head.
    pub linears: Vec<Linear>,
    /// Tensor index -> the linear whose weight it is (the tied wte maps to the head).
    pub linear_of_tensor: Vec<Option<usize>>,
    acts: Acts,
    rope: Vec<f32>,
    inputs: Vec<u32>,
    targets: Vec<u32>,
    /// (b, t) of the last forward with targets (what `backward` differentiates).
    last_bt: Option<(usize, usize)>,
    /// Tensor parallelism: this rank's place in its group (`None`: the whole model).
    pub tp: Option<TpShard>,
    /// The sizes this rank computes with: `dims`, or its tensor-parallel share of heads,
    /// MLP width and vocabulary ([`TpShard::local_dims`]).
    pub local: Dims,
}

impl Model {
    /// A model whose every weight is f32 in `params`, GPT-2 initialised (`seed`).
    /// On the default backend ([`Model::new_on`] chooses one).
    pub fn new(dims: Dims, precision: LinearPrecision, seed: u64) -> Model {
        Self::new_on(default_backend(), dims, precision, seed)
    }

    /// [`Model::new`] on backend `be`.
    pub fn new_on(
        be: Arc<dyn Backend>,
        dims: Dims,
        precision: LinearPrecision,
        seed: u64,
    ) -> Model {
        let layout = Layout::new(&dims);
        let params = layout.init(&dims, seed);
        Self::assemble(be, dims, layout, params, precision, false, None)
    }

    /// [`Model::new`] on tensor-parallel rank `tp` (or the whole model for `None`): each
    /// tensor is this rank's slice of the whole model's initial values from `seed`.
    pub fn new_tp(dims: Dims, precision: LinearPrecision, seed: u64, tp: Option<TpShard>) -> Model {
        Self::new_tp_on(default_backend(), dims, precision, seed, tp)
    }

    /// [`Model::new_tp`] on backend `be`.
    pub fn new_tp_on(
        be: Arc<dyn Backend>,
        dims: Dims,
        precision: LinearPrecision,
        seed: u64,
        tp: Option<TpShard>,
    ) -> Model {
        let Some(s) = tp else {
            return Self::new_on(be, dims, precision, seed);
        };
        let full = Layout::new(&dims);
        let all = full.init(&dims, seed);
        let layout = Self::layout_of(&dims, tp);
        let mut params = Vec::with_capacity(layout.total);
        for i in 0..full.metas.len() {
            params.extend(s.shard(&dims, &full, i, &all[full.range(i)]));
        }
        Self::assemble(be, dims, layout, params, precision, false, tp)
    }

    /// The layout of the tensors a rank holds (the whole model's for `None`).
    pub fn layout_of(dims: &Dims, tp: Option<TpShard>) -> Layout {
        match tp {
            None => Layout::new(dims),
            Some(s) => Layout::with_attn_width(&s.local_dims(dims), s.attn_width(dims)),
        }
    }

    /// Whether the model runs sequence-parallel, and the group size whose rank holds
    /// `1 / size` of the residual stream's rows (1 without SP).
    fn sp_size(&self) -> (bool, usize) {
        match self.tp {
            Some(s) if s.sp => (true, s.size),
            _ => (false, 1),
        }
    }

    /// Width of this rank's attention: heads held x head size (`C` without TP).
    fn attn_width(&self) -> usize {
        self.dims.c / self.dims.h * self.local.h
    }

    /// fp8-o2's model: the FP8 linears' weights get no f32 storage. Every tensor is
    /// initialised in order (the same values as [`Model::new`]) and handed to
    /// `on_tensor(i, values, is_linear_weight)`, which builds the optimizer's master
    /// from it (`values` is then its f32 view: f32 tensors' values live in `params`,
    /// linear weights' in the weight-gradient scratch, so start-up holds no
    /// full-precision copy of the model). The E4M3 weights are then written by the
    /// optimizer ([`Model::write_compute_weights`]).
    pub fn new_fp8_compute(
        dims: Dims,
        precision: LinearPrecision,
        seed: u64,
        on_tensor: &mut TensorInit<'_>,
    ) -> Result<Model, String> {
        Self::new_fp8_compute_tp_on(default_backend(), dims, precision, seed, None, on_tensor)
    }

    /// [`Model::new_fp8_compute`] on backend `be`.
    pub fn new_fp8_compute_on(
        be: Arc<dyn Backend>,
        dims: Dims,
        precision: LinearPrecision,
        seed: u64,
        on_tensor: &mut TensorInit<'_>,
    ) -> Result<Model, String> {
        Self::new_fp8_compute_tp_on(be, dims, precision, seed, None, on_tensor)
    }

    /// [`Model::new_fp8_compute`] on tensor-parallel rank `tp` ([`Model::new_tp`]'s
    /// shards: each whole tensor is drawn in turn, and this rank's slice kept).
    pub fn new_fp8_compute_tp(
        dims: Dims,
        precision: LinearPrecision,
        seed: u64,
        tp: Option<TpShard>,
        on_tensor: &mut TensorInit<'_>,
    ) -> Result<Model, String> {
        Self::new_fp8_compute_tp_on(default_backend(), dims, precision, seed, tp, on_tensor)
    }

    /// [`Model::new_fp8_compute_tp`] on backend `be`.
    pub fn new_fp8_compute_tp_on(
        be: Arc<dyn Backend>,
        dims: Dims,
        precision: LinearPrecision,
        seed: u64,
        tp: Option<TpShard>,
        on_tensor: &mut TensorInit<'_>,
    ) -> Result<Model, String> {
        match precision {
            LinearPrecision::Fp8 {
                recipe: fp8lm_fp8::ScalingRecipe::Block { .. },
                ..
            } => {
                return Err(
                    "new_fp8_compute: the block recipe's weights are cast tile by \
                            tile in the forward, not written by the optimizer"
                        .into(),
                )
            }
            LinearPrecision::Fp8 { .. } => {}
            _ => return Err("new_fp8_compute needs FP8 linears".into()),
        }
        let layout = Self::layout_of(&dims, tp);
        let params = vec![0f32; layout.total];
        let mut m = Self::assemble(be, dims, layout, params, precision, true, tp);
        m.init_tensors(seed, on_tensor)?;
        Ok(m)
    }

    /// fp8-o3 on several data-parallel ranks: a model whose weights are not drawn yet
    /// (`params` a fresh zero mapping, never touched): the rank draws them once it knows
    /// its ZeRO units ([`Model::init_tensors`]) or restores them from a checkpoint.
    pub(crate) fn new_undrawn_on(
        be: Arc<dyn Backend>,
        dims: Dims,
        precision: LinearPrecision,
    ) -> Model {
        let layout = Layout::new(&dims);
        let params = vec![0f32; layout.total];
        Self::assemble(be, dims, layout, params, precision, false, None)
    }

    /// Draw every tensor's initial values from `seed`, in order ([`Model::new_tp`]'s
    /// values), handing each to `on_tensor(i, values, is_linear_weight)`: the other
    /// tensors' values are drawn into `params`, the linears' weights one at a time into
    /// the weight-gradient scratch, so no full-precision copy of the model is made.
    pub(crate) fn init_tensors(
        &mut self,
        seed: u64,
        on_tensor: &mut TensorInit<'_>,
    ) -> Result<(), String> {
        let (dims, tp) = (self.dims, self.tp);
        let full = Layout::new(&dims);
        let mut rng = crate::rng::Rng::new(seed);
        let mut scratch = std::mem::take(&mut self.wgrad_f32);
        let mut out = Ok(());
        for i in 0..self.layout.metas.len() {
            let r = self.layout.range(i);
            let linear = self.linear_of_tensor[i].is_some();
            let dst = if linear {
                &mut scratch[..r.len()]
            } else {
                &mut self.params[r]
            };
            match tp {
                None => self.layout.init_tensor(&dims, i, dst, &mut rng),
                Some(s) => {
                    let mut whole = vec![0f32; full.metas[i].numel()];
                    full.init_tensor(&dims, i, &mut whole, &mut rng);
                    dst.copy_from_slice(&s.shard(&dims, &full, i, &whole));
                }
            }
            out = on_tensor(i, dst, linear);
            if out.is_err() {
                break;
            }
        }
        self.wgrad_f32 = scratch;
        out
    }

    /// The FP8 linears' weight-gradient scratch (resident while training anyway), lent
    /// as working space outside the backward (fp8-o3's start-up).
    pub(crate) fn wgrad_scratch_mut(&mut self) -> &mut [f32] {
        &mut self.wgrad_f32
    }

    fn assemble(
        be: Arc<dyn Backend>,
        dims: Dims,
        layout: Layout,
        params: Vec<f32>,
        precision: LinearPrecision,
        weights_from_optimizer: bool,
        tp: Option<TpShard>,
    ) -> Model {
        let rows = dims.b * dims.t;
        let mut linears = Vec::new();
        let mut linear_of_tensor = vec![None; layout.metas.len()];
        let ld = tp.map_or(dims, |s| s.local_dims(&dims));
        let ca = tp.map_or(dims.c, |s| s.attn_width(&dims));
        let (c, f) = (dims.c, ld.f);
        for (l, bp) in layout.blocks.iter().enumerate() {
            for (name, w, cin, oc) in [
                ("attn.qkv", bp.qkvw, c, 3 * ca),
                ("attn.proj", bp.projw, ca, c),
                ("mlp.fc", bp.fcw, c, ld.fc_out()),
                ("mlp.proj", bp.fprojw, f, c),
            ] {
                linear_of_tensor[w] = Some(linears.len());
                linears.push(Linear::new_on(
                    be.clone(),
                    format!("h.{l}.{name}"),
                    cin,
                    oc,
                    rows,
                    precision,
                ));
            }
        }
        linear_of_tensor[layout.head] = Some(linears.len());
        linears.push(Linear::new_on(
            be.clone(),
            "lm_head".into(),
            c,
            ld.v,
            rows,
            precision,
        ));
        let fp8 = matches!(precision, LinearPrecision::Fp8 { .. });
        let spt = tp.map_or(1, |s| if s.sp { s.size } else { 1 });
        for (i, lin) in linears.iter_mut().enumerate() {
            lin.weight_from_optimizer = weights_from_optimizer;
            // Column-parallel (qkv, fc, head) under SP: keep only this rank's rows of the
            // input (E4M3, f32 or bf16; Megatron's SP; the backward re-gathers them).
            if matches!(i % 4, 0 | 2) || i == 4 * dims.l {
                lin.keep_input_shard(spt, rows);
            }
        }
        let block_max = linears[..4 * dims.l]
            .iter()
            .map(|l| l.c * l.oc)
            .max()
            .unwrap_or(0);
        let wgrad_len = if fp8 { ld.v * c + block_max } else { 0 };
        Model {
            be,
            grads: vec![0f32; layout.total],
            wgrad_f32: vec![0f32; wgrad_len],
            weights_from_optimizer,
            wte_f16_units: None,
            accumulate: false,
            acts: Acts::new(
                &ld,
                ca,
                tp.map_or(1, |s| if s.sp { s.size } else { 1 }),
                precision == LinearPrecision::Fp32,
            ),
            rope: if dims.arch == Arch::Llama {
                rope_table(dims.t, dims.c / dims.h, ROPE_THETA)
            } else {
                vec![]
            },
            inputs: vec![0; rows],
            targets: vec![0; rows],
            last_bt: None,
            tp,
            local: ld,
            dims,
            layout,
            params,
            linears,
            linear_of_tensor,
        }
    }

    /// The backend this model (and its linears) run on.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.be
    }

    /// Whether the next backward adds its gradients to those held (gradient
    /// accumulation over micro-batches) instead of replacing them.
    pub fn set_accumulate(&mut self, accumulate: bool) {
        self.accumulate = accumulate;
    }

    /// fp8-o2: the linears' E4M3 weights are the optimizer's (no f32 copy exists).
    pub fn weights_from_optimizer(&self) -> bool {
        self.weights_from_optimizer
    }

    /// fp8-o3 on several data-parallel ranks: from now on the linears' weights exist on
    /// this rank only as the E4M3 bytes the ZeRO owners cast from their FP16 masters and
    /// share (written into `Linear::fp8.w` by the owners' all-gather, as fp8-o2's
    /// optimizer writes them), and a tied token embedding as the owners' FP16 masters,
    /// one scale per unit (`units`: element ranges of the tensor, with `numel` elements
    /// in all). `params` is replaced by a fresh buffer holding only the other tensors,
    /// so the f32 values of the linears' ranges are released. Errors without FP8
    /// linears or with the block recipe (whose weights are cast in the forward).
    pub fn hold_linear_weights_as_e4m3(
        &mut self,
        wte_units: Option<Vec<(Range<usize>, f32)>>,
    ) -> Result<(), String> {
        if self.linears.iter().any(|l| l.fp8.is_none()) {
            return Err("E4M3 weight storage needs FP8 linears".into());
        }
        if self.linears.iter().any(|l| {
            matches!(
                l.precision,
                LinearPrecision::Fp8 {
                    recipe: fp8lm_fp8::ScalingRecipe::Block { .. },
                    ..
                }
            )
        }) {
            return Err("the block recipe casts its weights tile by tile in the forward:                         it keeps f32 weights"
                .into());
        }
        let mut fresh = vec![0f32; self.layout.total];
        for i in 0..self.layout.metas.len() {
            if self.linear_of_tensor[i].is_none() {
                let r = self.layout.range(i);
                fresh[r.clone()].copy_from_slice(&self.params[r]);
            }
        }
        self.params = fresh;
        self.weights_from_optimizer = true;
        for lin in &mut self.linears {
            lin.weight_from_optimizer = true;
        }
        let wte = self.layout.wte;
        self.wte_f16_units = match (self.linear_of_tensor[wte], wte_units) {
            (Some(_), Some(units)) => {
                let numel = self.layout.metas[wte].numel();
                let covered: usize = units.iter().map(|(r, _)| r.len()).sum();
                if covered != numel {
                    return Err(format!(
                        "the token embedding's FP16 units cover {covered} of its {numel} values"
                    ));
                }
                Some(WteF16Units {
                    bits: vec![half::f16::ZERO; numel],
                    units,
                })
            }
            (Some(_), None) => return Err("the tied token embedding needs its FP16 units".into()),
            (None, _) => None,
        };
        Ok(())
    }

    /// fp8-o3 ([`Model::hold_linear_weights_as_e4m3`]): the tied token embedding's FP16
    /// masters and each unit's range and scale, to be written by the owners' all-gather.
    pub(crate) fn wte_f16_units_mut(&mut self) -> Option<(&mut [half::f16], &mut [WteUnit])> {
        self.wte_f16_units
            .as_mut()
            .map(|w| (&mut w.bits[..], &mut w.units[..]))
    }

    /// fp8-o3: the tied token embedding's f32 view (`f16 / scale` per unit, exact), when
    /// this model holds it as FP16 units.
    pub fn wte_f16_view(&self) -> Option<Vec<f32>> {
        let w = self.wte_f16_units.as_ref()?;
        let mut out = vec![0f32; w.bits.len()];
        for (r, s) in &w.units {
            fp8lm_fp8::cast::f16_to_f32_amax(&w.bits[r.clone()], 1.0 / s, &mut out[r.clone()]);
        }
        Some(out)
    }

    /// Linear weight `i`'s E4M3 compute bytes decoded (`e4m3 / scale`): what the GEMMs
    /// read, where no f32 copy exists (empty for a tensor that is no FP8 linear's).
    pub fn e4m3_weight_view(&self, i: usize) -> Vec<f32> {
        let Some(f) = self.linear_of_tensor[i].and_then(|li| self.linears[li].fp8.as_ref()) else {
            return Vec::new();
        };
        let table = fp8lm_fp8::cast::decode_table(f.w.state.format);
        let inv = 1.0 / f.w.held_scale();
        f.w.data()
            .iter()
            .map(|&b| table[b as usize] * inv)
            .collect()
    }

    /// Bytes of the FP16 token embedding fp8-o3 ranks hold for the lookup (0 otherwise).
    pub fn wte_f16_bytes(&self) -> usize {
        self.wte_f16_units.as_ref().map_or(0, |w| 2 * w.bits.len())
    }

    /// Whether tensor `i` has f32 storage in `params` (see [`Model`]).
    pub fn param_is_f32(&self, i: usize) -> bool {
        !(self.weights_from_optimizer && self.linear_of_tensor[i].is_some())
    }

    /// Whether tensor `i`'s gradient is f32 in `grads` (else E5M2 in its linear).
    pub fn grad_is_f32(&self, i: usize) -> bool {
        self.linear_of_tensor[i]
            .and_then(|li| self.linears[li].fp8.as_ref())
            .is_none()
    }

    /// Bytes of the FP8 linears' f32 weight-gradient scratch.
    pub fn wgrad_scratch_bytes(&self) -> usize {
        4 * self.wgrad_f32.len()
    }

    pub fn num_params(&self) -> usize {
        self.layout.total
    }

    /// Bytes of the activation arena.
    pub fn activation_bytes(&self) -> usize {
        self.acts.bytes() - self.acts.scratch_bytes()
    }

    /// Bytes of the one-layer scratch (the backward's activation gradients, the
    /// row-parallel outputs).
    pub fn backward_scratch_bytes(&self) -> usize {
        self.acts.scratch_bytes()
    }

    /// Bytes of the activation arena, backward scratch included.
    pub fn arena_bytes(&self) -> usize {
        self.acts.bytes()
    }

    /// Named parameter tensors (checkpoints).
    pub fn named_params(&self) -> impl Iterator<Item = (&fp8lm_optim::ParamMeta, &[f32])> {
        self.layout
            .metas
            .iter()
            .enumerate()
            .map(|(i, m)| (m, &self.params[self.layout.range(i)]))
    }

    /// Replace one named tensor; the error names the tensor and the mismatch.
    pub fn set_param(&mut self, name: &str, data: &[f32]) -> Result<(), String> {
        let i = self
            .layout
            .index(name)
            .ok_or_else(|| format!("no parameter named {name}"))?;
        let r = self.layout.range(i);
        if data.len() != r.len() {
            return Err(format!(
                "parameter {name}: {} values given, shape {:?} needs {}",
                data.len(),
                self.layout.metas[i].shape,
                r.len()
            ));
        }
        self.params[r].copy_from_slice(data);
        Ok(())
    }

    /// Logits of the last forward for row `row` (before softmax only when the forward
    /// had no targets).
    pub fn logits_row(&self, row: usize) -> &[f32] {
        &self.acts.logits[row * self.local.v..(row + 1) * self.local.v]
    }

    /// Forward over `inputs[b*t]` (token ids already checked `< V`). With targets, returns
    /// the mean loss (accumulated in f64) and readies `backward`; without, leaves logits.
    /// `record`: training forward (FP8 scaling histories advance).
    pub fn forward(
        &mut self,
        inputs: &[u32],
        targets: Option<&[u32]>,
        b: usize,
        t: usize,
        record: bool,
    ) -> Option<f32> {
        self.forward_ext(inputs, targets, b, t, record, None)
    }

    /// [`Model::forward`] for a model whose token embedding has no f32 copy (fp8-o2's
    /// tied embedding/LM head): `wte_f16` is the optimizer's FP16 master and its scale,
    /// decoded row by row (`f16 / scale`, exact: the f32 view the optimizer keeps).
    pub fn forward_ext(
        &mut self,
        inputs: &[u32],
        targets: Option<&[u32]>,
        b: usize,
        t: usize,
        record: bool,
        wte_f16: Option<(&[half::f16], f32)>,
    ) -> Option<f32> {
        self.forward_tp(inputs, targets, b, t, record, wte_f16, None)
            .expect("no collectives without tensor parallelism")
    }

    /// [`Model::forward_ext`] on a tensor-parallel rank: `comm` is its tensor-parallel
    /// group (required when [`Model::tp`] is set; its collectives' errors are returned).
    /// With targets, the vocabulary-parallel cross-entropy also leaves the gradient of
    /// the logits for the backward.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_tp(
        &mut self,
        inputs: &[u32],
        targets: Option<&[u32]>,
        b: usize,
        t: usize,
        record: bool,
        wte_f16: Option<(&[half::f16], f32)>,
        comm: Option<&dyn Communicator>,
    ) -> fp8lm_collectives::Result<Option<f32>> {
        let comm = tp_comm(self.tp, comm);
        let tp_vocab = self.tp.map(|s| s.vocab(&self.dims));
        let ca = self.attn_width();
        let (sp, spt) = self.sp_size();
        let d = self.local;
        assert!(
            b <= d.b && t <= d.t && inputs.len() == b * t,
            "forward: b={b} t={t} exceeds B={} T={}",
            d.b,
            d.t
        );
        let (n, c, l_n) = (b * t, d.c, d.l);
        let (fc, f) = (d.fc_out(), d.f);
        let bt = d.b * d.t; // per-layer stride unit
        let (ns, bts, ks) = sp_rows(n, bt, c, spt);
        let wte_stored = self.param_is_f32(self.layout.wte);
        let keep = self.acts.keep_linear_inputs;
        let Model {
            be,
            params,
            layout: lay,
            linears,
            acts: a,
            rope,
            wte_f16_units,
            ..
        } = self;
        let be: &dyn Backend = &**be;
        let p = |i: usize| &params[lay.range(i)];
        match (wte_stored, wte_f16) {
            (false, None) if tp_vocab.is_none() && wte_f16_units.is_some() => wte_f16_units
                .as_ref()
                .expect("checked")
                .encoder_forward(be, &mut a.encoded[..n * c], inputs, lay.wpe.map(p), t, c),
            _ if tp_vocab.is_some() => tp::embed_forward_model(
                comm.expect("tp_comm"),
                &mut a.encoded[..],
                inputs,
                tp_vocab.clone().expect("checked"),
                wte_stored.then(|| p(lay.wte)),
                wte_f16,
                lay.wpe.map(p),
                t,
                c,
                sp.then_some(&mut a.dln[..]),
            )?,
            (true, _) => be.encoder_forward(
                &mut a.encoded[..n * c],
                inputs,
                p(lay.wte),
                lay.wpe.map(p),
                t,
                c,
            ),
            (false, Some((wte, scale))) => be.encoder_forward_f16(
                &mut a.encoded[..n * c],
                inputs,
                wte,
                scale,
                lay.wpe.map(p),
                t,
                c,
            ),
            (false, None) => panic!(
                "forward: this model's token embedding is the optimizer's FP16 master; \
                 call forward_ext with it (Trainer does)"
            ),
        }
        for l in 0..l_n {
            let bp = lay.blocks[l];
            let lin = &mut linears[4 * l..4 * l + 4];
            let (done, cur) = a.residual3.split_at_mut(l * bts * c);
            let residual = if l == 0 {
                &a.encoded[..ns * c]
            } else {
                at(done, l - 1, bts * c, ns * c)
            };
            let (s_c, s_f) = (in_stride(keep, bt * c), in_stride(keep, bt * f));
            let s_a = in_stride(keep, bt * ca);
            let ln1 = match sp {
                true => sp_norm_full(&mut a.ln1, n * c),
                false => at_mut(&mut a.ln1, l, s_c, n * c),
            };
            let (ln1_mean, ln1_rstd) = (
                at_mut(&mut a.ln1_mean, l, bts, ns),
                at_mut(&mut a.ln1_rstd, l, bts, ns),
            );
            norm_forward(
                be,
                d.arch,
                sp::norm_out(sp, ln1, &mut a.sp_a, ks),
                ln1_mean,
                ln1_rstd,
                residual,
                p(bp.n1w),
                bp.n1b.map(p),
            );
            let qkv = at_mut(&mut a.qkv, l, bt * 3 * ca, n * 3 * ca);
            let (w, bias, sh) = (p(bp.qkvw), bp.qkvb.map(p), &a.sp_a[..ks]);
            ColumnParallelLinear::new(&mut lin[0], comm, sp)
                .forward(qkv, ln1, sh, w, bias, n, record)?;
            if d.arch == Arch::Llama {
                be.rope_forward(qkv, rope, t, ca, d.h);
            }
            let atty = at_mut(&mut a.atty, l, s_a, n * ca);
            let att = at_mut(&mut a.att, l, d.b * d.h * d.t * d.t, b * d.h * t * t);
            be.attention_forward(atty, att, qkv, t, ca, d.h);
            let attproj = RowParallelLinear::new(&mut lin[1], comm, sp).forward(
                &mut a.attproj[..n * c],
                &mut a.sp_b,
                atty,
                p(bp.projw),
                bp.projb.map(p),
                n,
                record,
            )?;
            let residual2 = at_mut(&mut a.residual2, l, bts * c, ns * c);
            be.residual_forward(residual2, residual, attproj);
            let ln2 = match sp {
                true => sp_norm_full(&mut a.ln1, n * c),
                false => at_mut(&mut a.ln2, l, s_c, n * c),
            };
            let (ln2_mean, ln2_rstd) = (
                at_mut(&mut a.ln2_mean, l, bts, ns),
                at_mut(&mut a.ln2_rstd, l, bts, ns),
            );
            norm_forward(
                be,
                d.arch,
                sp::norm_out(sp, ln2, &mut a.sp_a, ks),
                ln2_mean,
                ln2_rstd,
                residual2,
                p(bp.n2w),
                bp.n2b.map(p),
            );
            let fch = at_mut(&mut a.fch, l, bt * fc, n * fc);
            let (w, bias, sh) = (p(bp.fcw), bp.fcb.map(p), &a.sp_a[..ks]);
            ColumnParallelLinear::new(&mut lin[2], comm, sp)
                .forward(fch, ln2, sh, w, bias, n, record)?;
            let fch_act = at_mut(&mut a.fch_act, l, s_f, n * f);
            match d.arch {
                Arch::Gpt2 => be.gelu_forward(fch_act, fch),
                Arch::Llama => be.swiglu_forward(fch_act, fch, f),
            }
            let fcproj = RowParallelLinear::new(&mut lin[3], comm, sp).forward(
                &mut a.fcproj[..n * c],
                &mut a.sp_b,
                fch_act,
                p(bp.fprojw),
                bp.fprojb.map(p),
                n,
                record,
            )?;
            be.residual_forward(&mut cur[..ns * c], residual2, fcproj);
        }
        let last = at(&a.residual3, l_n - 1, bts * c, ns * c);
        let (lnf, lnf_mean, lnf_rstd) = (
            match sp {
                true => sp_norm_full(&mut a.ln1, n * c),
                false => &mut a.lnf[..n * c],
            },
            &mut a.lnf_mean[..ns],
            &mut a.lnf_rstd[..ns],
        );
        norm_forward(
            be,
            d.arch,
            sp::norm_out(sp, lnf, &mut a.sp_a, ks),
            lnf_mean,
            lnf_rstd,
            last,
            p(lay.nfw),
            lay.nfb.map(p),
        );
        let logits = &mut a.logits[..n * d.v];
        let (head, sh) = (&mut linears[4 * l_n], &a.sp_a[..ks]);
        ColumnParallelLinear::new(head, comm, sp).forward(
            logits,
            lnf,
            sh,
            p(lay.head),
            None,
            n,
            record,
        )?;
        let Some(targets) = targets else {
            return Ok(None);
        };
        assert_eq!(targets.len(), n);
        match (comm, tp_vocab) {
            (Some(comm), Some(v)) => crate::tensor_parallel::vocab_parallel_cross_entropy(
                comm,
                logits,
                v,
                targets,
                &mut a.losses[..n],
                1.0 / n as f32,
            )?,
            _ => be.softmax_xent_forward(logits, &mut a.losses[..n], targets),
        }
        self.inputs[..n].copy_from_slice(inputs);
        self.targets[..n].copy_from_slice(targets);
        self.last_bt = Some((b, t));
        Ok(Some(be.mean_f64(&a.losses[..n]) as f32))
    }

    /// Gradients of the mean loss of the last forward (with targets) into `grads`
    /// (overwritten). Consumes that forward: a second call panics.
    pub fn backward(&mut self) {
        self.backward_with(&mut |_| {});
    }

    /// The groups of gradients the backward finishes one after another, in the order it
    /// finishes them (the order [`Model::backward_with`] hands them out): the final norm
    /// (and LLaMA's untied LM head), the blocks from last to first, then the embeddings
    /// (with GPT-2's tied LM head, whose gradient the embedding backward adds to last).
    /// Each group is a contiguous range of the flat buffer.
    pub fn grad_groups(&self) -> Vec<GradGroupSpec> {
        let lay = &self.layout;
        let l_n = self.dims.l;
        let head = 4 * l_n..4 * l_n + 1;
        let block_start = |l: usize| lay.offsets[lay.blocks[l].n1w];
        let tied = lay.head == lay.wte;
        let mut out = vec![GradGroupSpec {
            group: GradGroup::Head,
            range: lay.offsets[lay.nfw]..lay.total,
            linears: if tied {
                head.end..head.end
            } else {
                head.clone()
            },
        }];
        for l in (0..l_n).rev() {
            let end = if l + 1 < l_n {
                block_start(l + 1)
            } else {
                lay.offsets[lay.nfw]
            };
            out.push(GradGroupSpec {
                group: GradGroup::Block(l),
                range: block_start(l)..end,
                linears: 4 * l..4 * l + 4,
            });
        }
        out.push(GradGroupSpec {
            group: GradGroup::Embedding,
            range: 0..block_start(0),
            linears: if tied { head } else { 0..0 },
        });
        out
    }

    /// [`Model::backward`], handing each group of gradients to `on_final` as soon as the
    /// backward is done with it (order and groups: [`Model::grad_groups`]). A group's f32
    /// gradients and its linears (FP8 weight gradients already quantised) are never
    /// touched again by this backward, so `on_final` may send them to another thread and
    /// reduce them there while the backward goes on with the earlier layers: the
    /// overlap of data-parallel training. The split is plain `split_at_mut`: the
    /// borrows handed out are disjoint by construction.
    pub fn backward_with<'a>(&'a mut self, on_final: &mut dyn FnMut(FinalGrads<'a>)) {
        self.backward_tp(None, on_final)
            .expect("no collectives without tensor parallelism")
    }

    /// [`Model::backward_with`] on a tensor-parallel rank (`comm`: its group, required
    /// when [`Model::tp`] is set). The group's collectives run on the calling thread.
    pub fn backward_tp<'a>(
        &'a mut self,
        comm: Option<&dyn Communicator>,
        on_final: &mut dyn FnMut(FinalGrads<'a>),
    ) -> fp8lm_collectives::Result<()> {
        let comm = tp_comm(self.tp, comm);
        let tp_vocab = self.tp.map(|s| s.vocab(&self.dims));
        let ca = self.attn_width();
        let (sp, spt) = self.sp_size();
        let spc = comm.filter(|_| sp);
        let (b, t) = self
            .last_bt
            .take()
            .expect("backward without a forward with targets");
        let d = self.local;
        let (n, c, l_n) = (b * t, d.c, d.l);
        let (fc, f) = (d.fc_out(), d.f);
        let bt = d.b * d.t;
        let (ns, bts, _) = sp_rows(n, bt, c, spt);
        // Linear weights' gradients are overwritten by their dW GEMM; zero the rest
        // (unless accumulating micro-batches: then every backward op adds).
        let accumulate = self.accumulate;
        for lin in &mut self.linears {
            lin.accumulate = accumulate;
        }
        if !accumulate {
            for (i, li) in self.linear_of_tensor.iter().enumerate() {
                if li.is_none() {
                    self.grads[self.layout.range(i)].fill(0.0);
                }
            }
        } else {
            sp::count_accumulated_once(spc, &mut self.grads, &self.layout);
        }
        let specs = self.grad_groups();
        let fp8 = !self.wgrad_f32.is_empty();
        let keep = self.acts.keep_linear_inputs;
        let Model {
            be,
            params,
            grads,
            wgrad_f32,
            layout: lay,
            linears,
            acts: a,
            rope,
            inputs,
            targets,
            ..
        } = self;
        // FP8: each linear's dW GEMM writes f32 scratch, cast to E5M2 right after (the
        // tied head's part waits for the embedding's scatter-add at the end).
        let (head_scratch, block_scratch) = wgrad_f32.split_at_mut(if fp8 { d.v * c } else { 0 });
        let lay: &Layout = lay;
        let be: &dyn Backend = &**be;
        let p = |i: usize| &params[lay.range(i)];
        let (inputs, targets) = (&inputs[..n], &targets[..n]);
        // Flat buffer: [embeddings | block 0 | ... | block L-1 | final norm (+ head)].
        let (emb_g, rest) = grads.split_at_mut(specs[l_n + 1].range.end);
        let (blocks_g, head_g) = rest.split_at_mut(specs[0].range.start - emb_g.len());
        let mut block_g: Vec<&mut [f32]> = Vec::with_capacity(l_n);
        let mut tail = blocks_g;
        for spec in specs[1..=l_n].iter().rev() {
            let (g, t2) = tail.split_at_mut(spec.range.len());
            block_g.push(g);
            tail = t2;
        }
        let (block_lin, head_lin) = linears.split_at_mut(4 * l_n);
        let head = &mut head_lin[0];
        let mut block_lin: Vec<&mut [Linear]> = block_lin.chunks_mut(4).collect();
        // Range of tensor `i` inside the group that starts at flat offset `base`.
        let local = |i: usize, base: usize| {
            let r = lay.range(i);
            r.start - base..r.end - base
        };
        let head_base = specs[0].range.start;
        let tied = lay.head == lay.wte;

        // loss and LM head: dlogits[n,V] in place of the probabilities
        let dlogits = &mut a.logits[..n * d.v];
        if comm.is_none() {
            // (under TP the vocabulary-parallel cross-entropy left dlogits in the forward)
            be.softmax_xent_backward(dlogits, targets, 1.0 / n as f32);
        }
        let dlnf = &mut a.dln[..n * c];
        let dhead = if fp8 {
            &mut head_scratch[..]
        } else if tied {
            &mut emb_g[lay.range(lay.head)]
        } else {
            &mut head_g[local(lay.head, head_base)]
        };
        let lnf = match sp {
            true => sp_norm_full(&mut a.ln1, n * c),
            false => &a.lnf[..n * c],
        };
        let mut head_col = ColumnParallelLinear::new(&mut *head, comm, sp);
        head_col.backward(dlnf, dhead, None, dlogits, lnf, p(lay.head), n)?;
        let dlnf = head_col.input_grad(dlnf, &mut a.sp_a)?;
        let dres = &mut a.dresidual[..ns * c];
        dres.fill(0.0);
        let last = at(&a.residual3, l_n - 1, bts * c, ns * c);
        let (dw, db) = two_mut(
            head_g,
            local(lay.nfw, head_base),
            lay.nfb.map(|i| local(i, head_base)),
        );
        norm_backward(
            be,
            d.arch,
            dres,
            dw,
            db,
            dlnf,
            last,
            p(lay.nfw),
            &a.lnf_mean[..ns],
            &a.lnf_rstd[..ns],
        );
        let nf = [
            Some(local(lay.nfw, head_base)),
            lay.nfb.map(|i| local(i, head_base)),
        ];
        sp::reduce_partial_grads(spc, head_g, &nf)?;
        let head = if tied {
            on_final(FinalGrads {
                group: GradGroup::Head,
                offset: head_base,
                grads: head_g,
                linears: &mut [],
            });
            Some(head)
        } else {
            if fp8 {
                head.quantize_wgrad_acc(&mut head_scratch[..]);
            }
            on_final(FinalGrads {
                group: GradGroup::Head,
                offset: head_base,
                grads: head_g,
                linears: std::slice::from_mut(head),
            });
            None
        };

        for l in (0..l_n).rev() {
            let bp = lay.blocks[l];
            let lin = block_lin.pop().expect("one linear chunk per block");
            let grads = block_g.pop().expect("one gradient range per block");
            let base = specs[l_n - l].range.start;
            let residual = if l == 0 {
                &a.encoded[..ns * c]
            } else {
                at(&a.residual3, l - 1, bts * c, ns * c)
            };
            let rng = |i: usize| local(i, base);
            // MLP: dres is d(residual3) = d(fcproj), and flows on to residual2
            let dfch_act = &mut a.dfch_act[..n * f];
            let (dw, db) = two_mut(grads, rng(bp.fprojw), bp.fprojb.map(rng));
            let dw = wgrad_target(fp8, dw, block_scratch);
            RowParallelLinear::new(&mut lin[3], comm, sp).backward(
                dfch_act,
                dw,
                db,
                dres,
                &mut a.fcproj,
                at(&a.fch_act, l, in_stride(keep, bt * f), n * f),
                p(bp.fprojw),
                n,
            )?;
            if fp8 {
                let len = lin[3].c * lin[3].oc;
                lin[3].quantize_wgrad_acc(&mut block_scratch[..len]);
            }
            let fch = at(&a.fch, l, bt * fc, n * fc);
            let dfch = &mut a.dfch[..n * fc];
            match d.arch {
                Arch::Gpt2 => be.gelu_backward(dfch, fch, dfch_act),
                Arch::Llama => be.swiglu_backward(dfch, fch, dfch_act, f),
            }
            let dln = &mut a.dln[..n * c];
            let (dw, db) = two_mut(grads, rng(bp.fcw), bp.fcb.map(rng));
            let dw = wgrad_target(fp8, dw, block_scratch);
            let ln2 = match sp {
                true => sp_norm_full(&mut a.ln1, n * c),
                false => at(&a.ln2, l, in_stride(keep, bt * c), n * c),
            };
            let mut fc_col = ColumnParallelLinear::new(&mut lin[2], comm, sp);
            fc_col.backward(dln, dw, db, dfch, ln2, p(bp.fcw), n)?;
            if fp8 {
                let len = fc_col.lin.c * fc_col.lin.oc;
                fc_col.lin.quantize_wgrad_acc(&mut block_scratch[..len]);
            }
            let dln_s = fc_col.input_grad(dln, &mut a.sp_a)?;
            let (dw, db) = two_mut(grads, rng(bp.n2w), bp.n2b.map(rng));
            let residual2 = at(&a.residual2, l, bts * c, ns * c);
            norm_backward(
                be,
                d.arch,
                dres,
                dw,
                db,
                dln_s,
                residual2,
                p(bp.n2w),
                at(&a.ln2_mean, l, bts, ns),
                at(&a.ln2_rstd, l, bts, ns),
            );
            // attention: dres is now d(residual2) = d(attproj), and flows on to the input
            let datty = &mut a.datty[..n * ca];
            let (dw, db) = two_mut(grads, rng(bp.projw), bp.projb.map(rng));
            let dw = wgrad_target(fp8, dw, block_scratch);
            RowParallelLinear::new(&mut lin[1], comm, sp).backward(
                datty,
                dw,
                db,
                dres,
                &mut a.fcproj,
                at(&a.atty, l, in_stride(keep, bt * ca), n * ca),
                p(bp.projw),
                n,
            )?;
            if fp8 {
                let len = lin[1].c * lin[1].oc;
                lin[1].quantize_wgrad_acc(&mut block_scratch[..len]);
            }
            let qkv = at(&a.qkv, l, bt * 3 * ca, n * 3 * ca);
            let att = at(&a.att, l, d.b * d.h * d.t * d.t, b * d.h * t * t);
            let dqkv = &mut a.dqkv[..n * 3 * ca];
            be.attention_backward(dqkv, datty, qkv, att, t, ca, d.h);
            if d.arch == Arch::Llama {
                be.rope_backward(dqkv, rope, t, ca, d.h);
            }
            let (dw, db) = two_mut(grads, rng(bp.qkvw), bp.qkvb.map(rng));
            let dw = wgrad_target(fp8, dw, block_scratch);
            let ln1 = match sp {
                true => sp_norm_full(&mut a.ln1, n * c),
                false => at(&a.ln1, l, in_stride(keep, bt * c), n * c),
            };
            let mut qkv_col = ColumnParallelLinear::new(&mut lin[0], comm, sp);
            qkv_col.backward(dln, dw, db, dqkv, ln1, p(bp.qkvw), n)?;
            if fp8 {
                let len = qkv_col.lin.c * qkv_col.lin.oc;
                qkv_col.lin.quantize_wgrad_acc(&mut block_scratch[..len]);
            }
            let dln_s = qkv_col.input_grad(dln, &mut a.sp_a)?;
            let (dw, db) = two_mut(grads, rng(bp.n1w), bp.n1b.map(rng));
            norm_backward(
                be,
                d.arch,
                dres,
                dw,
                db,
                dln_s,
                residual,
                p(bp.n1w),
                at(&a.ln1_mean, l, bts, ns),
                at(&a.ln1_rstd, l, bts, ns),
            );
            let partial = [
                Some(rng(bp.n1w)),
                bp.n1b.map(rng),
                Some(rng(bp.n2w)),
                bp.n2b.map(rng),
                bp.projb.map(rng),
                bp.fprojb.map(rng),
            ];
            sp::reduce_partial_grads(spc, grads, &partial)?;
            on_final(FinalGrads {
                group: GradGroup::Block(l),
                offset: base,
                grads,
                linears: lin,
            });
        }
        let (dwte, dwpe) = two_mut(emb_g, lay.range(lay.wte), lay.wpe.map(|i| lay.range(i)));
        let dwte = if fp8 && tied {
            &mut head_scratch[..]
        } else {
            dwte
        };
        match tp_vocab {
            Some(v) => {
                let dres = sp::gather_rows(spc, dres, &mut a.dln)?;
                tp::embed_backward(dwte, dwpe, dres, inputs, v, t, c)
            }
            None => be.encoder_backward(dwte, dwpe, dres, inputs, t, c),
        }
        let linears: &mut [Linear] = match head {
            Some(head) => {
                // the tied LM head's gradient is final only now (embedding lookup added)
                if fp8 {
                    head.quantize_wgrad_acc(&mut head_scratch[..]);
                }
                std::slice::from_mut(head)
            }
            None => &mut [],
        };
        on_final(FinalGrads {
            group: GradGroup::Embedding,
            offset: 0,
            grads: emb_g,
            linears,
        });
        Ok(())
    }

    /// Each tensor's gradient as the optimizer sees it: FP8 for linear weights in FP8
    /// mode, f32 otherwise.
    pub fn grad_views(&self) -> Vec<Grad<'_>> {
        (0..self.layout.metas.len())
            .map(
                |i| match self.linear_of_tensor[i].and_then(|li| self.linears[li].fp8.as_ref()) {
                    Some(f) => Grad::Fp8(&f.wgrad),
                    None => Grad::F32(&self.grads[self.layout.range(i)]),
                },
            )
            .collect()
    }

    /// Parameters and the optimizer-facing gradients, borrowed together for an update.
    pub fn params_and_grads(&mut self) -> (Vec<&mut [f32]>, Vec<Grad<'_>>) {
        let Model {
            params,
            grads,
            layout,
            linears,
            linear_of_tensor,
            ..
        } = self;
        let ps = split_tensors_mut(params, layout);
        let gs = (0..layout.metas.len())
            .map(
                |i| match linear_of_tensor[i].and_then(|li| linears[li].fp8.as_ref()) {
                    Some(f) => Grad::Fp8(&f.wgrad),
                    None => Grad::F32(&grads[layout.range(i)]),
                },
            )
            .collect();
        (ps, gs)
    }

    /// Where the optimizer writes each tensor's compute weights (f32 in `params`, or
    /// fp8-o2's E4M3 copy of a linear's weight), and the optimizer-facing gradients.
    /// After the update, hand the FP8 targets' results to [`Model::accept_written`].
    pub fn outs_and_grads(&mut self) -> (Vec<ParamOut<'_>>, Vec<Grad<'_>>) {
        let Model {
            params,
            grads,
            layout,
            linears,
            linear_of_tensor,
            weights_from_optimizer,
            ..
        } = self;
        let ext = *weights_from_optimizer;
        let mut parts: Vec<Option<(&mut super::linear::Fp8Operand, &fp8lm_fp8::ScaledFp8)>> =
            linears
                .iter_mut()
                .map(|l| {
                    l.fp8.as_mut().map(|f| {
                        let super::linear::Fp8Linear { w, wgrad, .. } = f;
                        (w, &*wgrad)
                    })
                })
                .collect();
        let mut outs = Vec::with_capacity(layout.metas.len());
        let mut gs = Vec::with_capacity(layout.metas.len());
        for (i, p) in split_tensors_mut(params, layout).into_iter().enumerate() {
            match linear_of_tensor[i].and_then(|li| parts[li].take()) {
                Some((w, wgrad)) => {
                    gs.push(Grad::Fp8(wgrad));
                    outs.push(if ext {
                        ParamOut::Fp8(w.optimizer_target())
                    } else {
                        ParamOut::F32(p)
                    });
                }
                None => {
                    gs.push(Grad::F32(&grads[layout.range(i)]));
                    outs.push(ParamOut::F32(p));
                }
            }
        }
        (outs, gs)
    }

    /// Take the optimizer's FP8 casts (one entry per tensor, `Some` for FP8 targets).
    pub fn accept_written(&mut self, written: &[Option<Fp8Written>]) {
        for (i, w) in written.iter().enumerate() {
            if let (Some(w), Some(li)) = (w, self.linear_of_tensor[i]) {
                if let Some(f) = self.linears[li].fp8.as_mut() {
                    f.w.accept_written(*w);
                }
            }
        }
    }

    /// Have `opt` write the compute weights from its current master (fp8-o2 after
    /// construction, a checkpoint restore, or a skipped step). A no-op for models whose
    /// f32 weights are the master. The FP8 casts run on the model's backend.
    pub fn write_compute_weights(&mut self, opt: &dyn Optimizer) -> Result<(), String> {
        if !self.weights_from_optimizer {
            return Ok(());
        }
        let be = self.backend().clone();
        let (mut outs, _) = self.outs_and_grads();
        opt.write_compute_weights_on(&*be, &mut outs)?;
        let written = written_of(&outs);
        drop(outs);
        self.accept_written(&written);
        Ok(())
    }

    /// Total time spent in GEMMs since the last call.
    pub fn take_gemm_time(&mut self) -> std::time::Duration {
        self.linears.iter_mut().map(|l| l.take_gemm_time()).sum()
    }
}
