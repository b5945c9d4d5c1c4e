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

mod acts;
mod backward;
mod forward;
mod grads;

use acts::*;
pub use grads::{FinalGrads, GradGroup, GradGroupSpec};

/// Rotary base (LLaMA).
const ROPE_THETA: f64 = 10000.0;

/// Rows of the residual stream a rank holds (`n / spt`), their per-layer stride
/// (`bt / spt`), and the length of a `[rows, c]` shard buffer (0 without SP).
pub(super) fn sp_rows(n: usize, bt: usize, c: usize, spt: usize) -> (usize, usize, usize) {
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
}
