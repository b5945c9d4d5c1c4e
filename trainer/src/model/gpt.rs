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

use super::linear::{Linear, LinearPrecision};
use super::params::{split_tensors_mut, Dims, Layout};
use crate::config::Arch;
use fp8lm_kernels::layers::attention::rope_table;
use fp8lm_kernels::{Cpu, LayerOps};
use fp8lm_optim::Grad;
use std::ops::Range;

/// Rotary base (LLaMA).
const ROPE_THETA: f64 = 10000.0;

/// Activations kept for the backward pass, plus the backward's scratch gradients.
/// Per-layer buffers are `[L, ...]` with a stride of the full `B x T` size; a smaller
/// batch (evaluation, sampling) uses the front of each layer's slot.
struct Acts {
    encoded: Vec<f32>,   // [B,T,C]
    ln1: Vec<f32>,       // [L,B,T,C]
    ln1_mean: Vec<f32>,  // [L,B,T]
    ln1_rstd: Vec<f32>,  // [L,B,T]
    qkv: Vec<f32>,       // [L,B,T,3C] (after rope for llama)
    atty: Vec<f32>,      // [L,B,T,C]
    att: Vec<f32>,       // [L,B,H,T,T]
    attproj: Vec<f32>,   // [L,B,T,C]
    residual2: Vec<f32>, // [L,B,T,C]
    ln2: Vec<f32>,       // [L,B,T,C]
    ln2_mean: Vec<f32>,  // [L,B,T]
    ln2_rstd: Vec<f32>,  // [L,B,T]
    fch: Vec<f32>,       // [L,B,T,FC] FC = 4C (gpt2) or 2F (llama)
    fch_act: Vec<f32>,   // [L,B,T,F]
    fcproj: Vec<f32>,    // [L,B,T,C]
    residual3: Vec<f32>, // [L,B,T,C]
    lnf: Vec<f32>,       // [B,T,C]
    lnf_mean: Vec<f32>,  // [B,T]
    lnf_rstd: Vec<f32>,  // [B,T]
    logits: Vec<f32>,    // [B,T,V] -> probs -> dlogits, in place
    losses: Vec<f32>,    // [B,T]
    // backward scratch
    dresidual: Vec<f32>, // [B,T,C]
    dln: Vec<f32>,       // [B,T,C]
    datty: Vec<f32>,     // [B,T,C]
    dqkv: Vec<f32>,      // [B,T,3C]
    dfch: Vec<f32>,      // [B,T,FC]
    dfch_act: Vec<f32>,  // [B,T,F]
}

impl Acts {
    fn new(d: &Dims) -> Acts {
        let (bt, c, l) = (d.b * d.t, d.c, d.l);
        let z = |n: usize| vec![0f32; n];
        Acts {
            encoded: z(bt * c),
            ln1: z(l * bt * c),
            ln1_mean: z(l * bt),
            ln1_rstd: z(l * bt),
            qkv: z(l * bt * 3 * c),
            atty: z(l * bt * c),
            att: z(l * d.b * d.h * d.t * d.t),
            attproj: z(l * bt * c),
            residual2: z(l * bt * c),
            ln2: z(l * bt * c),
            ln2_mean: z(l * bt),
            ln2_rstd: z(l * bt),
            fch: z(l * bt * d.fc_out()),
            fch_act: z(l * bt * d.f),
            fcproj: z(l * bt * c),
            residual3: z(l * bt * c),
            lnf: z(bt * c),
            lnf_mean: z(bt),
            lnf_rstd: z(bt),
            logits: z(bt * d.v),
            losses: z(bt),
            dresidual: z(bt * c),
            dln: z(bt * c),
            datty: z(bt * c),
            dqkv: z(bt * 3 * c),
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
            &self.attproj,
            &self.residual2,
            &self.ln2,
            &self.ln2_mean,
            &self.ln2_rstd,
            &self.fch,
            &self.fch_act,
            &self.fcproj,
            &self.residual3,
            &self.lnf,
            &self.lnf_mean,
            &self.lnf_rstd,
            &self.logits,
            &self.losses,
            &self.dresidual,
            &self.dln,
            &self.datty,
            &self.dqkv,
            &self.dfch,
            &self.dfch_act,
        ];
        all.iter().map(|v| v.len() * 4).sum()
    }
}

/// Slot `l` of a `[L, stride]` buffer, first `len` elements.
fn at(v: &[f32], l: usize, stride: usize, len: usize) -> &[f32] {
    &v[l * stride..l * stride + len]
}
fn at_mut(v: &mut [f32], l: usize, stride: usize, len: usize) -> &mut [f32] {
    &mut v[l * stride..l * stride + len]
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

fn norm_forward(
    arch: Arch,
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
) {
    match (arch, b) {
        (Arch::Gpt2, Some(b)) => Cpu.layernorm_forward(out, mean, rstd, inp, w, b),
        _ => Cpu.rmsnorm_forward(out, rstd, inp, w),
    }
}

#[allow(clippy::too_many_arguments)]
fn norm_backward(
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
        (Arch::Gpt2, Some(db)) => Cpu.layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd),
        _ => Cpu.rmsnorm_backward(dinp, dw, dout, inp, w, rstd),
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
pub struct Model {
    pub dims: Dims,
    pub layout: Layout,
    /// Flat f32 weights `[layout.total]`, the compute copy the layers read.
    pub params: Vec<f32>,
    /// Flat f32 gradients, same layout (FP8 weight gradients are cast from these).
    pub grads: Vec<f32>,
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
}

impl Model {
    pub fn new(dims: Dims, precision: LinearPrecision, seed: u64) -> Model {
        let layout = Layout::new(&dims);
        let params = layout.init(&dims, seed);
        let rows = dims.b * dims.t;
        let mut linears = Vec::new();
        let mut linear_of_tensor = vec![None; layout.metas.len()];
        let (c, f) = (dims.c, dims.f);
        for (l, bp) in layout.blocks.iter().enumerate() {
            for (name, w, cin, oc) in [
                ("attn.qkv", bp.qkvw, c, 3 * c),
                ("attn.proj", bp.projw, c, c),
                ("mlp.fc", bp.fcw, c, dims.fc_out()),
                ("mlp.proj", bp.fprojw, f, c),
            ] {
                linear_of_tensor[w] = Some(linears.len());
                linears.push(Linear::new(
                    format!("h.{l}.{name}"),
                    cin,
                    oc,
                    rows,
                    precision,
                ));
            }
        }
        linear_of_tensor[layout.head] = Some(linears.len());
        linears.push(Linear::new("lm_head".into(), c, dims.v, rows, precision));
        Model {
            grads: vec![0f32; layout.total],
            acts: Acts::new(&dims),
            rope: if dims.arch == Arch::Llama {
                rope_table(dims.t, dims.c / dims.h, ROPE_THETA)
            } else {
                vec![]
            },
            inputs: vec![0; rows],
            targets: vec![0; rows],
            last_bt: None,
            dims,
            layout,
            params,
            linears,
            linear_of_tensor,
        }
    }

    pub fn num_params(&self) -> usize {
        self.layout.total
    }

    /// Bytes of the activation arena.
    pub fn activation_bytes(&self) -> usize {
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
        &self.acts.logits[row * self.dims.v..(row + 1) * self.dims.v]
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
        let d = self.dims;
        assert!(
            b <= d.b && t <= d.t && inputs.len() == b * t,
            "forward: b={b} t={t} exceeds B={} T={}",
            d.b,
            d.t
        );
        let (n, c, l_n) = (b * t, d.c, d.l);
        let (fc, f) = (d.fc_out(), d.f);
        let bt = d.b * d.t; // per-layer stride unit
        let Model {
            params,
            layout: lay,
            linears,
            acts: a,
            rope,
            ..
        } = self;
        let p = |i: usize| &params[lay.range(i)];
        Cpu.encoder_forward(
            &mut a.encoded[..n * c],
            inputs,
            p(lay.wte),
            lay.wpe.map(p),
            t,
            c,
        );
        for l in 0..l_n {
            let bp = lay.blocks[l];
            let lin = &mut linears[4 * l..4 * l + 4];
            let (done, cur) = a.residual3.split_at_mut(l * bt * c);
            let residual = if l == 0 {
                &a.encoded[..n * c]
            } else {
                at(done, l - 1, bt * c, n * c)
            };
            let ln1 = at_mut(&mut a.ln1, l, bt * c, n * c);
            let (ln1_mean, ln1_rstd) = (
                at_mut(&mut a.ln1_mean, l, bt, n),
                at_mut(&mut a.ln1_rstd, l, bt, n),
            );
            norm_forward(
                d.arch,
                ln1,
                ln1_mean,
                ln1_rstd,
                residual,
                p(bp.n1w),
                bp.n1b.map(p),
            );
            let qkv = at_mut(&mut a.qkv, l, bt * 3 * c, n * 3 * c);
            lin[0].forward(qkv, ln1, p(bp.qkvw), bp.qkvb.map(p), n, record);
            if d.arch == Arch::Llama {
                Cpu.rope_forward(qkv, rope, t, c, d.h);
            }
            let atty = at_mut(&mut a.atty, l, bt * c, n * c);
            let att = at_mut(&mut a.att, l, d.b * d.h * d.t * d.t, b * d.h * t * t);
            Cpu.attention_forward(atty, att, qkv, t, c, d.h);
            let attproj = at_mut(&mut a.attproj, l, bt * c, n * c);
            lin[1].forward(attproj, atty, p(bp.projw), bp.projb.map(p), n, record);
            let residual2 = at_mut(&mut a.residual2, l, bt * c, n * c);
            Cpu.residual_forward(residual2, residual, attproj);
            let ln2 = at_mut(&mut a.ln2, l, bt * c, n * c);
            let (ln2_mean, ln2_rstd) = (
                at_mut(&mut a.ln2_mean, l, bt, n),
                at_mut(&mut a.ln2_rstd, l, bt, n),
            );
            norm_forward(
                d.arch,
                ln2,
                ln2_mean,
                ln2_rstd,
                residual2,
                p(bp.n2w),
                bp.n2b.map(p),
            );
            let fch = at_mut(&mut a.fch, l, bt * fc, n * fc);
            lin[2].forward(fch, ln2, p(bp.fcw), bp.fcb.map(p), n, record);
            let fch_act = at_mut(&mut a.fch_act, l, bt * f, n * f);
            match d.arch {
                Arch::Gpt2 => Cpu.gelu_forward(fch_act, fch),
                Arch::Llama => Cpu.swiglu_forward(fch_act, fch, f),
            }
            let fcproj = at_mut(&mut a.fcproj, l, bt * c, n * c);
            lin[3].forward(fcproj, fch_act, p(bp.fprojw), bp.fprojb.map(p), n, record);
            Cpu.residual_forward(&mut cur[..n * c], residual2, fcproj);
        }
        let last = at(&a.residual3, l_n - 1, bt * c, n * c);
        let (lnf, lnf_mean, lnf_rstd) = (
            &mut a.lnf[..n * c],
            &mut a.lnf_mean[..n],
            &mut a.lnf_rstd[..n],
        );
        norm_forward(
            d.arch,
            lnf,
            lnf_mean,
            lnf_rstd,
            last,
            p(lay.nfw),
            lay.nfb.map(p),
        );
        let logits = &mut a.logits[..n * d.v];
        linears[4 * l_n].forward(logits, lnf, p(lay.head), None, n, record);
        let targets = targets?;
        assert_eq!(targets.len(), n);
        Cpu.softmax_xent_forward(logits, &mut a.losses[..n], targets);
        self.inputs[..n].copy_from_slice(inputs);
        self.targets[..n].copy_from_slice(targets);
        self.last_bt = Some((b, t));
        let sum: f64 = a.losses[..n].iter().map(|&x| x as f64).sum();
        Some((sum / n as f64) as f32)
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
        let (b, t) = self
            .last_bt
            .take()
            .expect("backward without a forward with targets");
        let d = self.dims;
        let (n, c, l_n) = (b * t, d.c, d.l);
        let (fc, f) = (d.fc_out(), d.f);
        let bt = d.b * d.t;
        // Linear weights' gradients are overwritten by their dW GEMM; zero the rest.
        for (i, li) in self.linear_of_tensor.iter().enumerate() {
            if li.is_none() {
                self.grads[self.layout.range(i)].fill(0.0);
            }
        }
        let specs = self.grad_groups();
        let Model {
            params,
            grads,
            layout: lay,
            linears,
            acts: a,
            rope,
            inputs,
            targets,
            ..
        } = self;
        let lay: &Layout = lay;
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
        Cpu.softmax_xent_backward(dlogits, targets, 1.0 / n as f32);
        let dlnf = &mut a.dln[..n * c];
        let dhead = if tied {
            &mut emb_g[lay.range(lay.head)]
        } else {
            &mut head_g[local(lay.head, head_base)]
        };
        head.backward(dlnf, dhead, None, dlogits, &a.lnf[..n * c], p(lay.head), n);
        let dres = &mut a.dresidual[..n * c];
        dres.fill(0.0);
        let last = at(&a.residual3, l_n - 1, bt * c, n * c);
        let (dw, db) = two_mut(
            head_g,
            local(lay.nfw, head_base),
            lay.nfb.map(|i| local(i, head_base)),
        );
        norm_backward(
            d.arch,
            dres,
            dw,
            db,
            dlnf,
            last,
            p(lay.nfw),
            &a.lnf_mean[..n],
            &a.lnf_rstd[..n],
        );
        let head = if tied {
            on_final(FinalGrads {
                group: GradGroup::Head,
                offset: head_base,
                grads: head_g,
                linears: &mut [],
            });
            Some(head)
        } else {
            head.quantize_wgrad(&head_g[local(lay.head, head_base)]);
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
                &a.encoded[..n * c]
            } else {
                at(&a.residual3, l - 1, bt * c, n * c)
            };
            let rng = |i: usize| local(i, base);
            // MLP: dres is d(residual3) = d(fcproj), and flows on to residual2
            let dfch_act = &mut a.dfch_act[..n * f];
            let (dw, db) = two_mut(grads, rng(bp.fprojw), bp.fprojb.map(rng));
            lin[3].backward(
                dfch_act,
                dw,
                db,
                dres,
                at(&a.fch_act, l, bt * f, n * f),
                p(bp.fprojw),
                n,
            );
            let fch = at(&a.fch, l, bt * fc, n * fc);
            let dfch = &mut a.dfch[..n * fc];
            match d.arch {
                Arch::Gpt2 => Cpu.gelu_backward(dfch, fch, dfch_act),
                Arch::Llama => Cpu.swiglu_backward(dfch, fch, dfch_act, f),
            }
            let dln = &mut a.dln[..n * c];
            let (dw, db) = two_mut(grads, rng(bp.fcw), bp.fcb.map(rng));
            lin[2].backward(
                dln,
                dw,
                db,
                dfch,
                at(&a.ln2, l, bt * c, n * c),
                p(bp.fcw),
                n,
            );
            let (dw, db) = two_mut(grads, rng(bp.n2w), bp.n2b.map(rng));
            let residual2 = at(&a.residual2, l, bt * c, n * c);
            norm_backward(
                d.arch,
                dres,
                dw,
                db,
                dln,
                residual2,
                p(bp.n2w),
                at(&a.ln2_mean, l, bt, n),
                at(&a.ln2_rstd, l, bt, n),
            );
            // attention: dres is now d(residual2) = d(attproj), and flows on to the input
            let datty = &mut a.datty[..n * c];
            let (dw, db) = two_mut(grads, rng(bp.projw), bp.projb.map(rng));
            lin[1].backward(
                datty,
                dw,
                db,
                dres,
                at(&a.atty, l, bt * c, n * c),
                p(bp.projw),
                n,
            );
            let qkv = at(&a.qkv, l, bt * 3 * c, n * 3 * c);
            let att = at(&a.att, l, d.b * d.h * d.t * d.t, b * d.h * t * t);
            let dqkv = &mut a.dqkv[..n * 3 * c];
            Cpu.attention_backward(dqkv, datty, qkv, att, t, c, d.h);
            if d.arch == Arch::Llama {
                Cpu.rope_backward(dqkv, rope, t, c, d.h);
            }
            let (dw, db) = two_mut(grads, rng(bp.qkvw), bp.qkvb.map(rng));
            lin[0].backward(
                dln,
                dw,
                db,
                dqkv,
                at(&a.ln1, l, bt * c, n * c),
                p(bp.qkvw),
                n,
            );
            let (dw, db) = two_mut(grads, rng(bp.n1w), bp.n1b.map(rng));
            norm_backward(
                d.arch,
                dres,
                dw,
                db,
                dln,
                residual,
                p(bp.n1w),
                at(&a.ln1_mean, l, bt, n),
                at(&a.ln1_rstd, l, bt, n),
            );
            // FP8: the block's weight gradients are final; they leave the backward in FP8
            for (k, w) in [bp.qkvw, bp.projw, bp.fcw, bp.fprojw]
                .into_iter()
                .enumerate()
            {
                lin[k].quantize_wgrad(&grads[rng(w)]);
            }
            on_final(FinalGrads {
                group: GradGroup::Block(l),
                offset: base,
                grads,
                linears: lin,
            });
        }
        let (dwte, dwpe) = two_mut(emb_g, lay.range(lay.wte), lay.wpe.map(|i| lay.range(i)));
        Cpu.encoder_backward(dwte, dwpe, dres, inputs, t, c);
        let linears: &mut [Linear] = match head {
            Some(head) => {
                // the tied LM head's gradient is final only now (embedding lookup added)
                head.quantize_wgrad(&emb_g[lay.range(lay.head)]);
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

    /// Total time spent in GEMMs since the last call.
    pub fn take_gemm_time(&mut self) -> std::time::Duration {
        self.linears.iter_mut().map(|l| l.take_gemm_time()).sum()
    }
}
