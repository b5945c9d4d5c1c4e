//! The one linear layer every GEMM of the model goes through, in each precision mode.
//!
//! `out[n, oc] = inp[n, c] @ W[oc, c]^T (+ bias)`; its three GEMMs (forward, dinp, dW)
//! take their operands in the mode's format, always accumulating in f32:
//! - fp32: f32 operands (the reference);
//! - bf16: inputs, weights and output gradients rounded to bf16;
//! - fp8 (O1): inputs and weights in E4M3, output gradients in E5M2, each with a
//!   per-tensor scale from its [`ScaleState`] (delayed by default; the first cast of a
//!   delayed tensor has no history yet and uses its own amax). The weight gradient leaves
//!   the backward in FP8 ([`WGRAD_FORMAT`]) with a current (just-in-time) scale:
//!   [`Linear::quantize_wgrad`].
//!
//! The forward's quantised input and weight are kept for the backward, so the dW and dinp
//! GEMMs see exactly the operands the forward used (as on a GPU).
//!
//! Every GEMM, cast, amax and decode goes through the layer's backend handle
//! ([`Linear::backend`], an `Arc<dyn Backend>`; [`Linear::new`] takes the default).

use fp8lm_fp8::block::{ACT_BLOCK, WEIGHT_BLOCK};
use fp8lm_fp8::{scale_for_amax, Fp8Format, ScaleState, ScaledFp8, ScalingRecipe};
use fp8lm_kernels::gemm::blockscaled::BlockOperand;
use fp8lm_kernels::{default_backend, Backend, DType, GemmShape, MatRef, Scaling, Tensor};
use fp8lm_optim::{Fp8Out, Fp8Written};
use half::bf16;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Format of the FP8 weight gradients (the project's convention: gradients in E5M2).
pub const WGRAD_FORMAT: Fp8Format = Fp8Format::E5M2;

/// Precision of the linear layers' GEMMs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LinearPrecision {
    Fp32,
    Bf16,
    /// FP8-LM O1 with the given scaling recipe and margin (binades).
    Fp8 {
        recipe: ScalingRecipe,
        margin: i32,
    },
}

/// What the last cast of one FP8 tensor did, plus running totals (for metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CastStats {
    /// amax of the tensor (unscaled) and the scale it was cast with, last cast.
    pub amax: f32,
    pub scale: f32,
    /// Values that saturated at the format's max / nonzero values that became zero,
    /// last cast.
    pub overflow: u64,
    pub underflow: u64,
    pub numel: u64,
    pub total_overflow: u64,
    pub total_underflow: u64,
    pub casts: u64,
    /// Block recipe: smallest and largest tile scale of the last cast (`scale` is then
    /// the smallest).
    pub block_scales: Option<(f32, f32)>,
}

/// One FP8 operand of a linear layer: its scaling state and quantised storage.
#[derive(Clone, Debug)]
pub struct Fp8Operand {
    pub state: ScaleState,
    pub stats: CastStats,
    /// The FP8 bytes held, with the scale (per tensor, or per tile with the block
    /// recipe) and the amax they were cast with: they travel together, on the backend.
    t: Tensor,
    /// Written by the optimizer rather than cast here (fp8-o2's weights): what that
    /// cast did, recorded by the next training forward as if it had cast itself.
    written: Option<Fp8Written>,
    /// Block recipe: the operand's columns and tile shape (the tile scales of the data
    /// held are in `t`, row-major grid, `fp8lm_fp8::block`).
    block: Option<(usize, (usize, usize))>,
}

impl Fp8Operand {
    fn new(format: Fp8Format, recipe: ScalingRecipe, margin: i32, cap: usize) -> Self {
        let mut state = ScaleState::new(format, recipe);
        state.margin = margin;
        Fp8Operand {
            state,
            stats: CastStats::default(),
            t: Tensor::zeros(DType::of_fp8(format), &[cap]),
            written: None,
            block: None,
        }
    }

    /// Block recipe: cast in `tile`s of a matrix `cols` wide (no effect otherwise).
    fn with_blocks(mut self, cols: usize, tile: (usize, usize)) -> Self {
        if let ScalingRecipe::Block { .. } = self.state.recipe {
            self.block = Some((cols, tile));
        }
        self
    }

    /// The block recipe's cast: one current scale per tile.
    fn quantize_blocks(
        &mut self,
        be: &dyn Backend,
        src: &[f32],
        record: bool,
        cols: usize,
        tile: (usize, usize),
    ) {
        let st = &self.state;
        let rounding = match st.recipe {
            ScalingRecipe::Block { exact: true } => fp8lm_fp8::ScaleRounding::Exact,
            _ => fp8lm_fp8::ScaleRounding::PowerOfTwo,
        };
        let rows = src.len() / cols.max(1);
        let b = be.cast_fp8_blocks_tensor(src, rows, cols, tile, rounding, st.margin, &mut self.t);
        if record {
            let s = &mut self.stats;
            (s.amax, s.scale, s.overflow, s.underflow, s.numel) = (
                b.amax,
                b.scale_min,
                b.overflow,
                b.underflow,
                src.len() as u64,
            );
            s.block_scales = Some((b.scale_min, b.scale_max));
            s.total_overflow += b.overflow;
            s.total_underflow += b.underflow;
            s.casts += 1;
        }
    }

    /// The operand for the GEMM: per-tensor FP8, or block-scaled FP8.
    fn operand(&self, len: usize) -> BlockOperand<'_> {
        self.t.block_operand(len)
    }

    /// The FP8 bytes held (scaled by [`Fp8Operand::held_scale`]).
    pub fn data(&self) -> &[u8] {
        self.t.fp8_bytes()
    }
    /// The scale of the bytes held (the smallest tile scale with the block recipe).
    pub fn held_scale(&self) -> f32 {
        self.t.scale().unwrap_or(1.0)
    }
    /// Block recipe: the tile scales of the bytes held (row-major grid; empty otherwise).
    pub fn block_scales(&self) -> &[f32] {
        self.t.block_scales()
    }
    /// The bytes held with their scaling.
    pub fn tensor(&self) -> &Tensor {
        &self.t
    }

    /// The optimizer's target for this operand's storage (fp8-o2's weights): the scale
    /// the next forward would cast with (delayed scaling with a history), else "from the
    /// weights' own amax" (current scaling, or a delayed state's first cast).
    pub fn optimizer_target(&mut self) -> Fp8Out<'_> {
        let st = &self.state;
        let known =
            matches!(st.recipe, ScalingRecipe::Delayed { .. }) && !st.amax_history.is_empty();
        Fp8Out {
            data: self.t.fp8_bytes_mut(),
            format: st.format,
            scale: known.then_some(st.scale),
            margin: st.margin,
            rounding: st.rounding,
            fallback: st.scale,
            written: None,
        }
    }

    /// Take the optimizer's cast ([`Fp8Operand::optimizer_target`]) as this operand's
    /// data.
    pub fn accept_written(&mut self, w: Fp8Written) {
        self.t.set_scaling(Scaling::PerTensor {
            scale: w.scale,
            amax: w.amax,
        });
        self.written = Some(w);
    }

    /// The training forward's bookkeeping for optimizer-written data: what
    /// [`Fp8Operand::quantize`] records, for the cast the optimizer did.
    fn record_written(&mut self) {
        let Some(w) = self.written else {
            panic!("FP8 weight operand read before the optimizer wrote it")
        };
        let st = &mut self.state;
        match st.recipe {
            ScalingRecipe::Current => {
                st.scale_for_cast(w.amax);
            }
            ScalingRecipe::Delayed { .. } => st.record_amax(w.amax),
            // Model::new_fp8_compute refuses the block recipe: its tile scales are cast
            // in the forward, the optimizer writes per-tensor E4M3 only.
            ScalingRecipe::Block { .. } => {
                unreachable!("block-scaled weights are never written by the optimizer")
            }
        }
        let s = &mut self.stats;
        (s.amax, s.scale, s.overflow, s.underflow, s.numel) = (
            w.amax,
            w.scale,
            w.saturated,
            w.flushed,
            self.t.numel() as u64,
        );
        s.total_overflow += w.saturated;
        s.total_underflow += w.flushed;
        s.casts += 1;
    }

    /// Cast `src` into this operand's storage. With `record` (training), the amax goes into
    /// the scaling history and the stats; evaluation casts leave both untouched.
    fn quantize(&mut self, be: &dyn Backend, src: &[f32], record: bool) {
        if let Some((cols, tile)) = self.block {
            return self.quantize_blocks(be, src, record, cols, tile);
        }
        debug_assert_eq!(self.t.dtype(), DType::of_fp8(self.state.format));
        let scale = self.cast_scale(record, || be.amax_f32(src));
        let r = be.cast_fp8_tensor(src, scale, &mut self.t);
        let c = r.counts;
        self.record_cast(record, r.amax, scale, c.saturated, c.flushed, src.len());
    }

    /// The scale the next cast uses: the delayed one from the history, or (current
    /// scaling, or an empty history) one from the tensor's own amax, computed by `amax`
    /// only then (a training cast with current scaling also updates the state).
    fn cast_scale(&mut self, record: bool, amax: impl FnOnce() -> f32) -> f32 {
        let st = &mut self.state;
        let needs_own_amax =
            matches!(st.recipe, ScalingRecipe::Current) || st.amax_history.is_empty();
        if !needs_own_amax {
            return st.scale;
        }
        let amax = amax();
        if record && matches!(st.recipe, ScalingRecipe::Current) {
            st.scale_for_cast(amax)
        } else {
            scale_for_amax(st.format.max(), amax, st.margin, st.rounding).unwrap_or(st.scale)
        }
    }

    /// A training cast's bookkeeping (`record`; evaluation casts keep none): the amax
    /// into a delayed history, the cast into the stats.
    fn record_cast(
        &mut self,
        record: bool,
        amax: f32,
        scale: f32,
        overflow: u64,
        underflow: u64,
        numel: usize,
    ) {
        if !record {
            return;
        }
        if let ScalingRecipe::Delayed { .. } = self.state.recipe {
            self.state.record_amax(amax);
        }
        let s = &mut self.stats;
        (s.amax, s.scale, s.overflow, s.underflow, s.numel) =
            (amax, scale, overflow, underflow, numel as u64);
        s.total_overflow += overflow;
        s.total_underflow += underflow;
        s.casts += 1;
    }
}

/// FP8 state of one linear layer: input x and weight w (E4M3), output gradient dy (E5M2),
/// and the FP8 weight gradient handed to the optimizer.
#[derive(Clone, Debug)]
pub struct Fp8Linear {
    pub x: Fp8Operand,
    pub w: Fp8Operand,
    pub dy: Fp8Operand,
    pub wgrad: ScaledFp8,
    pub wgrad_stats: CastStats,
}

#[derive(Clone, Debug)]
/// The bf16 input saved for the backward's dW GEMM (the weight and the output gradient
/// are rounded tile by tile into per-thread scratch instead: [`BF16_TILE_ELEMS`]).
struct Bf16Cache {
    x: Vec<bf16>,
}

/// Largest weight tile (elements) a bf16 GEMM rounds at once. The weight is rounded
/// again in the backward rather than kept: a bf16 copy of every weight (2 B/param) would
/// make a bf16 run bigger than fp32. The LM head (`[V, C]`) is the only layer of GPT-2
/// shapes cut into several row tiles; a single-tile layer makes exactly the GEMM calls
/// of an untiled one.
pub const BF16_TILE_ELEMS: usize = 1 << 22;

/// Per-thread bf16 GEMM scratch: a weight tile, an output-gradient tile and (several
/// tiles only) the f32 forward output of one tile.
#[derive(Default)]
struct Bf16Tiles {
    w: Vec<bf16>,
    dy: Vec<bf16>,
    out: Vec<f32>,
}

thread_local! {
    /// The E5M2 output gradient (bytes, scale, amax) of the linear whose backward runs
    /// on this thread.
    static DY_E5M2: std::cell::RefCell<Tensor> =
        std::cell::RefCell::new(Tensor::zeros(DType::E5M2, &[0]));
    static BF16_TILES: std::cell::RefCell<Bf16Tiles> = std::cell::RefCell::new(Bf16Tiles::default());
}

fn grow<T: Clone + Default>(v: &mut Vec<T>, n: usize) {
    if v.len() < n {
        v.resize(n, T::default());
    }
}

/// Rows of `w[oc, c]` per bf16 tile.
pub fn bf16_tile_rows(c: usize, oc: usize) -> usize {
    (BF16_TILE_ELEMS / c.max(1)).clamp(1, oc.max(1))
}

/// Bytes of the per-thread bf16 scratch a layer of `rows x c -> oc` needs.
pub fn bf16_tile_bytes(rows: usize, c: usize, oc: usize) -> usize {
    let m = bf16_tile_rows(c, oc);
    2 * m * c + 2 * rows * m + if m < oc { 4 * rows * m } else { 0 }
}

/// Bytes held by one linear layer's precision state ([`Linear::memory`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinearMemory {
    /// E4M3 copy of the weight.
    pub fp8_weight: usize,
    /// E4M3 input copy (the E5M2 output gradient lives in a per-thread buffer shared
    /// by all layers, `rows x oc` bytes of the widest: [`Linear::fp8_dy_bytes`]).
    pub fp8_activations: usize,
    /// FP8 weight gradient handed to the optimizer.
    pub fp8_wgrad: usize,
    /// bf16 copy of the input (bf16 runs).
    pub bf16_cache: usize,
}

/// One linear layer's precision state (the weights themselves live in the model's flat
/// buffer and are passed in).
#[derive(Clone, Debug)]
pub struct Linear {
    /// The backend every GEMM, cast and decode of this layer runs on.
    be: Arc<dyn Backend>,
    pub name: String,
    /// Input width c and output width oc.
    pub c: usize,
    pub oc: usize,
    pub precision: LinearPrecision,
    pub fp8: Option<Fp8Linear>,
    /// FP8 only: the E4M3 weight is written by the optimizer (fp8-o2: it is the only
    /// copy of the weight the layers see; no f32 weight exists).
    pub weight_from_optimizer: bool,
    /// Gradient accumulation: the backward adds this micro-batch's weight gradient to
    /// the one held (f32 `dw` by the dW GEMM; FP8 by [`Linear::quantize_wgrad`]).
    pub accumulate: bool,
    /// FP8 column-parallel layer under sequence parallelism: the E4M3 input is kept as
    /// this rank's `1 / input_shards` of the rows (re-gathered for the backward,
    /// `model/linear_sp.rs`); 1 otherwise.
    input_shards: usize,
    /// fp32 column-parallel layer under sequence parallelism: this rank's `[n / T, c]`
    /// rows of the f32 input (re-gathered for the dW GEMM, `model/linear_sp.rs`); empty
    /// otherwise.
    x_shard_f32: Vec<f32>,
    bf16: Option<Bf16Cache>,
    /// Time spent inside GEMMs since the last [`Linear::take_gemm_time`].
    gemm_time: Duration,
    /// GEMM operand bytes consumed, by element type, since the layer was built.
    pub operand_bytes: OperandBytes,
}

/// Bytes of GEMM operands a layer handed to the kernels, by element type: what the tests
/// check so that a low-precision mode cannot silently compute in a higher one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OperandBytes {
    pub f32: u64,
    pub bf16: u64,
    pub e4m3: u64,
    pub e5m2: u64,
}

impl OperandBytes {
    fn add_blocks(&mut self, m: &BlockOperand<'_>) {
        match m {
            BlockOperand::Mat(m) => self.add(m),
            BlockOperand::Blocks(b) => self.add(&MatRef::Fp8 {
                data: b.data,
                format: b.format,
                scale: 1.0,
            }),
        }
    }
    fn add(&mut self, m: &MatRef<'_>) {
        let n = m.len() as u64;
        match m {
            MatRef::F32(_) => self.f32 += 4 * n,
            MatRef::Bf16(_) => self.bf16 += 2 * n,
            MatRef::Fp8 { format, .. } if *format == Fp8Format::E4M3 => self.e4m3 += n,
            MatRef::Fp8 { .. } => self.e5m2 += n,
        }
    }
}

impl Linear {
    /// `rows` is the largest row count (B*T) the layer will see. On the default backend
    /// ([`Linear::new_on`] chooses one).
    pub fn new(name: String, c: usize, oc: usize, rows: usize, precision: LinearPrecision) -> Self {
        Self::new_on(default_backend(), name, c, oc, rows, precision)
    }

    /// [`Linear::new`] on backend `be`.
    pub fn new_on(
        be: Arc<dyn Backend>,
        name: String,
        c: usize,
        oc: usize,
        rows: usize,
        precision: LinearPrecision,
    ) -> Self {
        let fp8 = match precision {
            LinearPrecision::Fp8 { recipe, margin } => Some(Fp8Linear {
                x: Fp8Operand::new(Fp8Format::E4M3, recipe, margin, rows * c)
                    .with_blocks(c, ACT_BLOCK),
                w: Fp8Operand::new(Fp8Format::E4M3, recipe, margin, oc * c)
                    .with_blocks(c, WEIGHT_BLOCK),
                // storage lent per backward from DY_E5M2
                dy: Fp8Operand::new(Fp8Format::E5M2, recipe, margin, 0).with_blocks(oc, ACT_BLOCK),
                wgrad: ScaledFp8::zeros(&[oc, c], WGRAD_FORMAT),
                wgrad_stats: CastStats::default(),
            }),
            _ => None,
        };
        let bf16 = (precision == LinearPrecision::Bf16).then(|| Bf16Cache {
            x: vec![bf16::ZERO; rows * c],
        });
        Linear {
            be,
            name,
            c,
            oc,
            precision,
            fp8,
            weight_from_optimizer: false,
            accumulate: false,
            input_shards: 1,
            x_shard_f32: Vec::new(),
            bf16,
            gemm_time: Duration::ZERO,
            operand_bytes: OperandBytes::default(),
        }
    }

    /// Bytes of this layer's precision state, for the memory ledger.
    pub fn memory(&self) -> LinearMemory {
        let mut m = LinearMemory::default();
        if let Some(f) = &self.fp8 {
            m.fp8_weight = f.w.t.size_bytes();
            m.fp8_activations = f.x.t.size_bytes() + f.dy.t.size_bytes();
            m.fp8_wgrad = f.wgrad.data.len();
        }
        if let Some(b) = &self.bf16 {
            m.bf16_cache = 2 * b.x.len();
        }
        m
    }

    /// Bytes of the shared E5M2 output-gradient buffer this layer needs (`rows x oc`).
    pub fn fp8_dy_bytes(&self, rows: usize) -> usize {
        if self.fp8.is_some() {
            rows * self.oc
        } else {
            0
        }
    }

    /// The backend this layer runs on.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.be
    }

    pub fn take_gemm_time(&mut self) -> Duration {
        std::mem::take(&mut self.gemm_time)
    }

    fn gemm(&mut self, shape: GemmShape, a: MatRef<'_>, b: MatRef<'_>, c: &mut [f32], acc: bool) {
        self.operand_bytes.add(&a);
        self.operand_bytes.add(&b);
        let t0 = Instant::now();
        self.be.gemm(shape, a, b, c, acc);
        self.gemm_time += t0.elapsed();
    }

    /// [`Self::gemm`] on FP8 operands that may be block-scaled (block recipe).
    fn gemm_fp8(
        &mut self,
        shape: GemmShape,
        a: BlockOperand<'_>,
        b: BlockOperand<'_>,
        c: &mut [f32],
    ) {
        match (a, b) {
            (BlockOperand::Mat(a), BlockOperand::Mat(b)) => self.gemm(shape, a, b, c, false),
            (a, b) => {
                self.operand_bytes.add_blocks(&a);
                self.operand_bytes.add_blocks(&b);
                let t0 = Instant::now();
                self.be.gemm_blocks(shape, a, b, c, false);
                self.gemm_time += t0.elapsed();
            }
        }
    }

    /// out\[n,oc\] = inp\[n,c\] @ w\[oc,c\]^T + bias\[oc\]. `record`: update FP8 scaling history.
    pub fn forward(
        &mut self,
        out: &mut [f32],
        inp: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        n: usize,
        record: bool,
    ) {
        let (c, oc) = (self.c, self.oc);
        assert!(
            out.len() == n * oc
                && inp.len() == n * c
                && (w.len() == oc * c || self.weight_from_optimizer),
            "{}: shape mismatch",
            self.name
        );
        let shape = GemmShape::new(n, oc, c).trans_b();
        // Temporarily move the caches out so the GEMM timer can borrow self.
        match self.precision {
            LinearPrecision::Fp32 => self.gemm(shape, MatRef::F32(inp), MatRef::F32(w), out, false),
            LinearPrecision::Bf16 => {
                let cache = self.bf16.as_mut().expect("bf16 cache");
                self.be.cast_bf16(inp, &mut cache.x[..n * c]);
                self.gemm_bf16_input(out, w, n);
            }
            LinearPrecision::Fp8 { .. } => {
                let mut f = self.fp8.take().expect("fp8 state");
                let be = &*self.be;
                f.x.quantize(be, inp, record);
                if self.weight_from_optimizer {
                    if record {
                        f.w.record_written();
                    }
                } else {
                    f.w.quantize(be, w, record);
                }
                self.gemm_fp8(shape, f.x.operand(n * c), f.w.operand(oc * c), out);
                self.fp8 = Some(f);
            }
        }
        if let Some(b) = bias {
            self.be.bias_forward(out, b);
        }
    }

    /// The bf16 forward GEMM, out\[n,oc\] = x @ w^T, on the input already rounded to bf16
    /// in the cache's `x` (`forward` rounds it; under sequence parallelism the bf16
    /// gather fills it, `linear_sp`), the weight rounded tile by tile. No bias.
    pub(super) fn gemm_bf16_input(&mut self, out: &mut [f32], w: &[f32], n: usize) {
        let (c, oc) = (self.c, self.oc);
        let cache = self.bf16.take().expect("bf16 cache");
        let x = MatRef::Bf16(&cache.x[..n * c]);
        let tr = bf16_tile_rows(c, oc);
        BF16_TILES.with(|t| {
            let t = &mut *t.borrow_mut();
            for o0 in (0..oc).step_by(tr) {
                let m = tr.min(oc - o0);
                grow(&mut t.w, m * c);
                self.be
                    .cast_bf16(&w[o0 * c..(o0 + m) * c], &mut t.w[..m * c]);
                let wt = MatRef::Bf16(&t.w[..m * c]);
                let sh = GemmShape::new(n, m, c).trans_b();
                if m == oc {
                    self.gemm(sh, x, wt, out, false);
                } else {
                    // out[:, o0..o0+m] through a contiguous tile.
                    grow(&mut t.out, n * m);
                    self.gemm(sh, x, wt, &mut t.out[..n * m], false);
                    for r in 0..n {
                        out[r * oc + o0..r * oc + o0 + m]
                            .copy_from_slice(&t.out[r * m..(r + 1) * m]);
                    }
                }
            }
        });
        self.bf16 = Some(cache);
    }

    /// dinp\[n,c\] = dout @ w and dw\[oc,c\] = dout^T @ inp (both overwritten: each weight has
    /// one GEMM contribution, so the trainer need not zero 4 bytes x params every step);
    /// dbias += sum(dout).
    /// Must follow this layer's own `forward` on the same `inp`/`w` (it reuses their casts).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &mut self,
        dinp: &mut [f32],
        dw: &mut [f32],
        dbias: Option<&mut [f32]>,
        dout: &[f32],
        inp: &[f32],
        w: &[f32],
        n: usize,
    ) {
        let (c, oc) = (self.c, self.oc);
        let acc_dw = self.accumulate;
        assert!(
            dinp.len() == n * c && dw.len() == oc * c && dout.len() == n * oc && inp.len() == n * c,
            "{}: shape mismatch",
            self.name
        );
        if let Some(db) = dbias {
            self.be.bias_backward(db, dout);
        }
        let s_dinp = GemmShape::new(n, c, oc); // dout[n,oc] @ w[oc,c]
        let s_dw = GemmShape::new(oc, c, n).trans_a(); // dout[n,oc]^T @ inp[n,c]
        match self.precision {
            LinearPrecision::Fp32 => {
                self.gemm(s_dinp, MatRef::F32(dout), MatRef::F32(w), dinp, false);
                let acc = self.accumulate;
                self.gemm(s_dw, MatRef::F32(dout), MatRef::F32(inp), dw, acc);
            }
            LinearPrecision::Bf16 => {
                let cache = self.bf16.take().expect("bf16 cache");
                let x = MatRef::Bf16(&cache.x[..n * c]);
                let tr = bf16_tile_rows(c, oc);
                BF16_TILES.with(|t| {
                    let t = &mut *t.borrow_mut();
                    for o0 in (0..oc).step_by(tr) {
                        let m = tr.min(oc - o0);
                        // dy[:, o0..o0+m] and w[o0..o0+m, :] rounded to bf16 (the same
                        // values the forward used: rounding is deterministic).
                        grow(&mut t.dy, n * m);
                        if m == oc {
                            self.be.cast_bf16(dout, &mut t.dy[..n * m]);
                        } else {
                            for r in 0..n {
                                self.be.cast_bf16(
                                    &dout[r * oc + o0..r * oc + o0 + m],
                                    &mut t.dy[r * m..(r + 1) * m],
                                );
                            }
                        }
                        grow(&mut t.w, m * c);
                        self.be
                            .cast_bf16(&w[o0 * c..(o0 + m) * c], &mut t.w[..m * c]);
                        let dy = MatRef::Bf16(&t.dy[..n * m]);
                        // dinp[n,c] += dy_tile[n,m] @ w_tile[m,c]; dW[o0..o0+m] = dy_tile^T @ x
                        let sh = GemmShape::new(n, c, m);
                        self.gemm(sh, dy, MatRef::Bf16(&t.w[..m * c]), dinp, o0 > 0);
                        let sh = GemmShape::new(m, c, n).trans_a();
                        self.gemm(sh, dy, x, &mut dw[o0 * c..(o0 + m) * c], acc_dw);
                    }
                });
                self.bf16 = Some(cache);
            }
            LinearPrecision::Fp8 { .. } => {
                let mut f = self.fp8.take().expect("fp8 state");
                // dy is needed only by these two GEMMs: its E5M2 bytes live in one
                // per-thread buffer shared by every layer, lent to the operand here.
                DY_E5M2.with(|b| {
                    let mut b = b.borrow_mut();
                    b.ensure_len(n * oc);
                    std::mem::swap(&mut *b, &mut f.dy.t);
                    f.dy.quantize(&*self.be, dout, true);
                    self.gemm_fp8(s_dinp, f.dy.operand(n * oc), f.w.operand(oc * c), dinp);
                    self.gemm_fp8(s_dw, f.dy.operand(n * oc), f.x.operand(n * c), dw);
                    std::mem::swap(&mut *b, &mut f.dy.t);
                    // The bytes go back to the pool; the scaling of this cast stays
                    // with the operand (metrics and tests read the last cast's scales).
                    std::mem::swap(b.scaling_mut(), f.dy.t.scaling_mut());
                });
                self.fp8 = Some(f);
            }
        }
    }

    /// FP8 mode: cast the finished f32 weight gradient (all contributions summed, e.g. a
    /// tied embedding's) to [`WGRAD_FORMAT`] with a current power-of-two scale.
    pub fn quantize_wgrad(&mut self, dw_f32: &[f32]) {
        self.quantize_wgrad_impl(dw_f32)
    }

    /// [`Linear::quantize_wgrad`] of a scratch gradient; with [`Linear::accumulate`] the
    /// gradient held is decoded and added into `dw_f32` first, so the E5M2 buffer holds
    /// the running sum over micro-batches (one E5M2 rounding per micro-batch).
    pub fn quantize_wgrad_acc(&mut self, dw_f32: &mut [f32]) {
        if let (true, Some(f)) = (self.accumulate, self.fp8.as_ref()) {
            self.be
                .add_decoded_fp8(dw_f32, &f.wgrad.data, f.wgrad.format, f.wgrad.scale);
        }
        self.quantize_wgrad_impl(dw_f32)
    }

    fn quantize_wgrad_impl(&mut self, dw_f32: &[f32]) {
        let be = &*self.be;
        if let Some(f) = self.fp8.as_mut() {
            let scale_of = |amax| {
                scale_for_amax(WGRAD_FORMAT.max(), amax, 0, Default::default()).unwrap_or(1.0)
            };
            // A current scale needs the amax before the cast: an extra pass over 4 bytes per
            // weight. The power-of-two scale rarely changes from step to step, so cast with
            // the last one (the cast returns the amax) and redo the cast only when the
            // amax asks for another scale: same bits and counts as amax-then-cast.
            let (scale, (amax, overflow, underflow)) = if f.wgrad_stats.casts > 0 {
                let guess = f.wgrad.scale;
                let r = cast_counting_on(be, WGRAD_FORMAT, dw_f32, guess, &mut f.wgrad.data);
                let scale = scale_of(r.0);
                if scale.to_bits() == guess.to_bits() {
                    (scale, r)
                } else {
                    (
                        scale,
                        cast_counting_on(be, WGRAD_FORMAT, dw_f32, scale, &mut f.wgrad.data),
                    )
                }
            } else {
                let scale = scale_of(be.amax_f32(dw_f32));
                (
                    scale,
                    cast_counting_on(be, WGRAD_FORMAT, dw_f32, scale, &mut f.wgrad.data),
                )
            };
            f.wgrad.scale = scale;
            let s = &mut f.wgrad_stats;
            (s.amax, s.scale, s.overflow, s.underflow, s.numel) =
                (amax, scale, overflow, underflow, dw_f32.len() as u64);
            s.total_overflow += overflow;
            s.total_underflow += underflow;
            s.casts += 1;
        }
    }
}

/// max |x| over the slice (NaN if any NaN) on the default backend
/// ([`Backend::amax_f32`]).
pub fn par_amax(src: &[f32]) -> f32 {
    default_backend().amax_f32(src)
}

/// Saturating RNE cast `dst = fp8(src * scale)` on the default backend; returns (amax of
/// src, values that saturated, nonzero values flushed to zero). See
/// [`Backend::cast_fp8`].
pub fn cast_counting(fmt: Fp8Format, src: &[f32], scale: f32, dst: &mut [u8]) -> (f32, u64, u64) {
    cast_counting_on(&*default_backend(), fmt, src, scale, dst)
}

/// [`cast_counting`] on `be`.
fn cast_counting_on(
    be: &dyn Backend,
    fmt: Fp8Format,
    src: &[f32],
    scale: f32,
    dst: &mut [u8],
) -> (f32, u64, u64) {
    let r = be.cast_fp8(fmt, src, scale, dst);
    (r.amax, r.counts.saturated, r.counts.flushed)
}

// Sequence parallelism's converters on this layer (a child module: it reaches the FP8
// operands' storage).
#[path = "linear_sp.rs"]
mod sp;
