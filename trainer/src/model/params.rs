//! Model shape and the flat parameter buffer's layout (llm.c style: one f32 buffer, each
//! tensor a named view described by an [`optim::ParamMeta`](fp8lm_optim::ParamMeta)).

use crate::config::{Arch, RunConfig};
use crate::rng::Rng;
use anyhow::{bail, Result};
use fp8lm_optim::ParamMeta;
use std::ops::Range;

/// Every size the model needs, validated once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub arch: Arch,
    /// Blocks L, heads H, width C, context T (max), vocab V, batch B (max).
    pub l: usize,
    pub h: usize,
    pub c: usize,
    pub t: usize,
    pub v: usize,
    pub b: usize,
    /// MLP hidden width: 4C (GPT-2) or the SwiGLU width F = 8C/3 rounded up to 16 (LLaMA).
    pub f: usize,
}

impl Dims {
    /// Sizes from the config; `vocab` comes from the data (used when `model.vocab` is 0).
    pub fn from_config(cfg: &RunConfig, vocab: usize) -> Result<Dims> {
        let m = &cfg.model;
        let v = if m.vocab == 0 { vocab } else { m.vocab };
        if m.vocab != 0 && m.vocab < vocab {
            bail!(
                "model.vocab = {} is smaller than the data's vocabulary ({vocab})",
                m.vocab
            );
        }
        for (key, val) in [
            ("model.layers", m.layers),
            ("model.heads", m.heads),
            ("model.channels", m.channels),
            ("model.context", m.context),
            ("batch", cfg.batch),
        ] {
            if val == 0 {
                bail!("{key} must be at least 1, got 0");
            }
        }
        if v == 0 {
            bail!("model.vocab is 0 and the data reports a vocabulary of 0");
        }
        if !m.channels.is_multiple_of(m.heads) {
            bail!(
                "model.channels = {} is not divisible by model.heads = {}",
                m.channels,
                m.heads
            );
        }
        let hs = m.channels / m.heads;
        if m.arch == Arch::Llama && !hs.is_multiple_of(2) {
            bail!("model.arch = \"llama\" needs an even head size for rotary embeddings; channels/heads = {hs}");
        }
        let f = Self::ffn_width(m.arch, m.channels);
        Ok(Dims {
            arch: m.arch,
            l: m.layers,
            h: m.heads,
            c: m.channels,
            t: m.context,
            v,
            b: cfg.batch,
            f,
        })
    }

    /// MLP hidden width F for width `c`: 4C (GPT-2) or 8C/3 rounded up to 16 (LLaMA).
    pub fn ffn_width(arch: Arch, c: usize) -> usize {
        match arch {
            Arch::Gpt2 => 4 * c,
            Arch::Llama => (8 * c / 3).div_ceil(16) * 16,
        }
    }

    /// Output width of the first MLP linear: 4C (GPT-2) or 2F (gate and up, LLaMA).
    pub fn fc_out(&self) -> usize {
        match self.arch {
            Arch::Gpt2 => self.f,
            Arch::Llama => 2 * self.f,
        }
    }
}

/// Tensor indices of one block's parameters (biases and LayerNorm shifts are absent in
/// LLaMA blocks).
#[derive(Clone, Copy, Debug)]
pub struct BlockParams {
    pub n1w: usize,
    pub n1b: Option<usize>,
    pub qkvw: usize,
    pub qkvb: Option<usize>,
    pub projw: usize,
    pub projb: Option<usize>,
    pub n2w: usize,
    pub n2b: Option<usize>,
    pub fcw: usize,
    pub fcb: Option<usize>,
    pub fprojw: usize,
    pub fprojb: Option<usize>,
}

/// Names, shapes and offsets of every tensor in the flat buffer.
#[derive(Clone, Debug)]
pub struct Layout {
    pub metas: Vec<ParamMeta>,
    pub offsets: Vec<usize>,
    pub total: usize,
    pub wte: usize,
    pub wpe: Option<usize>,
    pub blocks: Vec<BlockParams>,
    pub nfw: usize,
    pub nfb: Option<usize>,
    /// LM head weight `[V, C]`: `wte` itself when tied (GPT-2).
    pub head: usize,
}

impl Layout {
    pub fn new(d: &Dims) -> Layout {
        Self::with_attn_width(d, d.c)
    }

    /// The layout of a model whose attention is `ca` wide (`C`, or a tensor-parallel
    /// rank's `C / T` with `d` its local dims: `crate::tensor_parallel::TpShard`).
    pub fn with_attn_width(d: &Dims, ca: usize) -> Layout {
        let mut lay = Layout {
            metas: vec![],
            offsets: vec![],
            total: 0,
            wte: 0,
            wpe: None,
            blocks: vec![],
            nfw: 0,
            nfb: None,
            head: 0,
        };
        let gpt = d.arch == Arch::Gpt2;
        let (c, v) = (d.c, d.v);
        lay.wte = lay.push("wte", &[v, c]);
        lay.wpe = gpt.then(|| lay.push("wpe", &[d.t, c]));
        for l in 0..d.l {
            let n = |s: &str| format!("h.{l}.{s}");
            let n1w = lay.push(&n("ln1.w"), &[c]);
            let n1b = gpt.then(|| lay.push(&n("ln1.b"), &[c]));
            let qkvw = lay.push(&n("attn.qkv.w"), &[3 * ca, c]);
            let qkvb = gpt.then(|| lay.push(&n("attn.qkv.b"), &[3 * ca]));
            let projw = lay.push(&n("attn.proj.w"), &[c, ca]);
            let projb = gpt.then(|| lay.push(&n("attn.proj.b"), &[c]));
            let n2w = lay.push(&n("ln2.w"), &[c]);
            let n2b = gpt.then(|| lay.push(&n("ln2.b"), &[c]));
            let fcw = lay.push(&n("mlp.fc.w"), &[d.fc_out(), c]);
            let fcb = gpt.then(|| lay.push(&n("mlp.fc.b"), &[d.fc_out()]));
            let fprojw = lay.push(&n("mlp.proj.w"), &[c, d.f]);
            let fprojb = gpt.then(|| lay.push(&n("mlp.proj.b"), &[c]));
            lay.blocks.push(BlockParams {
                n1w,
                n1b,
                qkvw,
                qkvb,
                projw,
                projb,
                n2w,
                n2b,
                fcw,
                fcb,
                fprojw,
                fprojb,
            });
        }
        lay.nfw = lay.push("lnf.w", &[c]);
        lay.nfb = gpt.then(|| lay.push("lnf.b", &[c]));
        lay.head = if gpt {
            lay.wte
        } else {
            lay.push("lm_head.w", &[v, c])
        };
        lay
    }

    /// Matrices get weight decay; vectors (biases, norm gains) do not.
    fn push(&mut self, name: &str, shape: &[usize]) -> usize {
        let meta = ParamMeta {
            name: name.into(),
            shape: shape.to_vec(),
            weight_decay: shape.len() >= 2,
        };
        self.offsets.push(self.total);
        self.total += meta.numel();
        self.metas.push(meta);
        self.metas.len() - 1
    }

    pub fn range(&self, i: usize) -> Range<usize> {
        self.offsets[i]..self.offsets[i] + self.metas[i].numel()
    }

    pub fn index(&self, name: &str) -> Option<usize> {
        self.metas.iter().position(|m| m.name == name)
    }

    /// GPT-2 init: N(0, 0.02) for matrices, N(0, 0.02/sqrt(2L)) for the two residual
    /// projections, ones for norm gains, zeros for biases. Seeded; tensor order fixed.
    pub fn init(&self, d: &Dims, seed: u64) -> Vec<f32> {
        let mut p = vec![0f32; self.total];
        let mut rng = Rng::new(seed);
        for i in 0..self.metas.len() {
            let r = self.range(i);
            self.init_tensor(d, i, &mut p[r], &mut rng);
        }
        p
    }

    /// The init of tensor `i` into `dst` (its numel), drawing from `rng`: called for
    /// every tensor in order with one RNG, it gives exactly [`Layout::init`]'s values.
    pub fn init_tensor(&self, d: &Dims, i: usize, dst: &mut [f32], rng: &mut Rng) {
        let m = &self.metas[i];
        let resid_std = 0.02 / (2.0 * d.l as f32).sqrt();
        if m.shape.len() >= 2 {
            let std = if m.name.ends_with("proj.w") {
                resid_std
            } else {
                0.02
            };
            dst.iter_mut().for_each(|x| *x = std * rng.normal());
        } else if m.name.ends_with(".w") {
            dst.fill(1.0);
        } else {
            dst.fill(0.0);
        }
    }
}

/// Split a flat buffer into one mutable slice per tensor (tensors are contiguous and in
/// order, so this is a sequence of `split_at_mut`).
pub fn split_tensors_mut<'a>(buf: &'a mut [f32], lay: &Layout) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(lay.metas.len());
    let mut rest = buf;
    for m in &lay.metas {
        let (head, tail) = rest.split_at_mut(m.numel());
        out.push(head);
        rest = tail;
    }
    out
}
