//! The model under tensor parallelism: which part of each tensor a rank holds, and the
//! model-level operations at the region boundaries that [`crate::model::Model`] calls.
//!
//! A rank of a T-way group holds (Megatron layout):
//! - `attn.qkv.{w,b}`: its `H/T` heads' rows of each of the q, k, v blocks (column-parallel);
//! - `attn.proj.w`: the matching `C/T` input columns (row-parallel; bias whole);
//! - `mlp.fc.{w,b}`: `F/T` rows (LLaMA: `F/T` rows of the gate block and of the up block,
//!   so SwiGLU pairs stay on one rank); `mlp.proj.w`: the matching `F/T` columns;
//! - `wte` (and LLaMA's `lm_head.w`): `V/T` vocabulary rows;
//! - everything else (norms, `wpe`, row-parallel biases) whole, computed identically on
//!   every rank (their inputs and gradients are replicated after f / f̄), so without
//!   sequence parallelism no gradient of theirs needs a reduction.
//!
//! Each shard is the slice of the unsharded model's initial values ([`TpShard::shard`]),
//! so a T-rank model starts exactly where the 1-rank model does.

use super::{even_part, qkv_rows};
use crate::config::Arch;
use crate::model::{Dims, Layout};
use fp8lm_collectives::mappings::{reduce_from_tp, reduce_scatter_to_sp};
use fp8lm_collectives::{Communicator, Result};
use fp8lm_optim::Grad;
use std::ops::Range;

/// This rank's place in its tensor-parallel group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TpShard {
    pub rank: usize,
    pub size: usize,
    /// Sequence parallelism: norms and residuals on `1 / size` of the token rows
    /// ([`super::sp`]).
    pub sp: bool,
}

/// How a rank's tensor is cut from the full one (row-major `[rows, width]`). Also the
/// slice a tensor-parallel checkpoint's index records for each shard
/// (`checkpoint::tp`), hence serializable.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Replicated.
    Full,
    /// These rows (of `width` elements each), concatenated.
    Rows {
        rows: Vec<Range<usize>>,
        width: usize,
    },
    /// These columns of every row of a `width`-wide tensor.
    Cols { cols: Range<usize>, width: usize },
}

impl TpShard {
    /// Rank `rank` of `size`; errors (naming the values) when a split dimension of `d`
    /// does not divide by `size` (`config` refuses such shapes first).
    pub fn new(d: &Dims, rank: usize, size: usize) -> std::result::Result<TpShard, String> {
        even_part("model.heads", d.h, size, rank)?;
        even_part("the MLP width", d.f, size, rank)?;
        even_part("the vocabulary (model.vocab)", d.v, size, rank)?;
        Ok(TpShard {
            rank,
            size,
            sp: false,
        })
    }

    /// The sizes this rank computes with: `h`, `f`, `v` divided by T (`c`, `t`, `b` whole).
    pub fn local_dims(&self, d: &Dims) -> Dims {
        Dims {
            h: d.h / self.size,
            f: d.f / self.size,
            v: d.v / self.size,
            ..*d
        }
    }

    /// Width of this rank's attention (its heads x head size): `C / T`.
    pub fn attn_width(&self, d: &Dims) -> usize {
        d.c / self.size
    }

    /// This rank's vocabulary rows.
    pub fn vocab(&self, d: &Dims) -> Range<usize> {
        let k = d.v / self.size;
        self.rank * k..(self.rank + 1) * k
    }

    /// How tensor `i` of the full layout `full` (for dims `d`) is split.
    pub fn split(&self, d: &Dims, full: &Layout, i: usize) -> Split {
        let (c, r, t) = (d.c, self.rank, self.size);
        let part = |n: usize| n / t * r..n / t * (r + 1);
        let fc_rows = match d.arch {
            Arch::Gpt2 => vec![part(d.f)],
            Arch::Llama => {
                let p = part(d.f);
                vec![p.clone(), d.f + p.start..d.f + p.end]
            }
        };
        if i == full.wte || i == full.head {
            return Split::Rows {
                rows: vec![self.vocab(d)],
                width: c,
            };
        }
        for bp in &full.blocks {
            let qkv = qkv_rows(c, d.h, t, r).expect("TpShard::new checked the heads");
            if i == bp.qkvw {
                return Split::Rows {
                    rows: qkv,
                    width: c,
                };
            } else if Some(i) == bp.qkvb {
                return Split::Rows {
                    rows: qkv,
                    width: 1,
                };
            } else if i == bp.projw {
                return Split::Cols {
                    cols: part(c),
                    width: c,
                };
            } else if i == bp.fcw {
                return Split::Rows {
                    rows: fc_rows,
                    width: c,
                };
            } else if Some(i) == bp.fcb {
                return Split::Rows {
                    rows: fc_rows,
                    width: 1,
                };
            } else if i == bp.fprojw {
                return Split::Cols {
                    cols: part(d.f),
                    width: d.f,
                };
            }
        }
        Split::Full
    }

    /// Whether tensor `i` is split over the group (else replicated).
    pub fn is_sharded(&self, d: &Dims, full: &Layout, i: usize) -> bool {
        self.split(d, full, i) != Split::Full
    }

    /// This rank's part of the full tensor `i` (`full_values`: its values).
    pub fn shard(&self, d: &Dims, full: &Layout, i: usize, full_values: &[f32]) -> Vec<f32> {
        match self.split(d, full, i) {
            Split::Full => full_values.to_vec(),
            Split::Rows { rows, width } => rows
                .iter()
                .flat_map(|r| full_values[r.start * width..r.end * width].iter().copied())
                .collect(),
            Split::Cols { cols, width } => full_values
                .chunks_exact(width)
                .flat_map(|row| row[cols.clone()].iter().copied())
                .collect(),
        }
    }
}

/// The token embedding under vocabulary parallelism: `out[r] = wte[tok] + wpe[pos]`.
/// Each rank looks up the tokens of its vocabulary range (`row(i, dst)` writes local row
/// `i`: an f32 copy, or fp8-o2's FP16 master decoded), zeros elsewhere, and f̄ sums the
/// group's partial lookups: exactly one rank contributes each row and the others add
/// zeros, so the sum is exact. `wpe` is added after the reduction, on every rank, in the
/// same order as the unsharded `encoder_forward` (`wte[tok] + wpe[pos]`): the result is
/// bit-identical to the 1-rank embedding. With sequence parallelism (`sp_full`: room for
/// the `[n, c]` partial lookups) the sum is reduce-scattered instead and `out` receives
/// this rank's `n / T` rows.
#[allow(clippy::too_many_arguments)]
pub fn embed_forward(
    comm: &dyn Communicator,
    out: &mut [f32],
    tokens: &[u32],
    vocab: Range<usize>,
    row: &(dyn Fn(usize, &mut [f32]) + Sync),
    wpe: Option<&[f32]>,
    t: usize,
    c: usize,
    sp_full: Option<&mut [f32]>,
) -> Result<()> {
    use rayon::prelude::*;
    let n = tokens.len();
    let lookup = |dst: &mut [f32]| {
        dst.par_chunks_mut(c).enumerate().for_each(|(r, o)| {
            let tok = tokens[r] as usize;
            if vocab.contains(&tok) {
                row(tok - vocab.start, o);
            } else {
                o.fill(0.0);
            }
        })
    };
    // With SP, ḡ instead of f̄: the rank keeps its rows `first_row..` of the sum.
    let (out, first_row) = match sp_full {
        Some(full) => {
            let full = &mut full[..n * c];
            lookup(full);
            let ns = n / comm.size();
            reduce_scatter_to_sp(comm, full, &mut out[..ns * c])?;
            (&mut out[..ns * c], comm.rank() * ns)
        }
        None => {
            let out = &mut out[..n * c];
            lookup(out);
            reduce_from_tp(comm, out)?;
            (out, 0)
        }
    };
    if let Some(wpe) = wpe {
        out.par_chunks_mut(c).enumerate().for_each(|(r, o)| {
            let pos = (first_row + r) % t;
            for (o, &p) in o.iter_mut().zip(&wpe[pos * c..(pos + 1) * c]) {
                *o += p;
            }
        });
    }
    Ok(())
}

/// Backward of [`embed_forward`]: `dwte_t[tok - v0] += dout` for this rank's tokens and
/// `dwpe[pos] += dout` (whole on every rank: `dout` is replicated, f̄'s backward being
/// the identity). Serial in a fixed order, as `encoder_backward`.
pub fn embed_backward(
    dwte: &mut [f32],
    mut dwpe: Option<&mut [f32]>,
    dout: &[f32],
    tokens: &[u32],
    vocab: Range<usize>,
    t: usize,
    c: usize,
) {
    for (r, dy) in dout.chunks(c).enumerate() {
        let tok = tokens[r] as usize;
        if vocab.contains(&tok) {
            let i = tok - vocab.start;
            for (d, &g) in dwte[i * c..(i + 1) * c].iter_mut().zip(dy) {
                *d += g;
            }
        }
        if let Some(dwpe) = dwpe.as_deref_mut() {
            let pos = r % t;
            for (d, &g) in dwpe[pos * c..(pos + 1) * c].iter_mut().zip(dy) {
                *d += g;
            }
        }
    }
}

/// [`embed_forward`] from the model's storage: the f32 shard `wte` or, when the model
/// keeps none (fp8-o2's tied embedding), the optimizer's FP16 master shard and its
/// scale, decoded row by row (`f16 / scale`, exact for a power-of-two scale).
#[allow(clippy::too_many_arguments)]
pub fn embed_forward_model(
    comm: &dyn Communicator,
    out: &mut [f32],
    tokens: &[u32],
    vocab: Range<usize>,
    wte: Option<&[f32]>,
    wte_f16: Option<(&[half::f16], f32)>,
    wpe: Option<&[f32]>,
    t: usize,
    c: usize,
    sp_full: Option<&mut [f32]>,
) -> Result<()> {
    match (wte, wte_f16) {
        (Some(w), _) => {
            let row = |i: usize, o: &mut [f32]| o.copy_from_slice(&w[i * c..(i + 1) * c]);
            embed_forward(comm, out, tokens, vocab, &row, wpe, t, c, sp_full)
        }
        (None, Some((w, scale))) => {
            let inv = 1.0 / scale;
            let row = |i: usize, o: &mut [f32]| {
                fp8lm_fp8::cast::f16_to_f32_amax(&w[i * c..(i + 1) * c], inv, o);
            };
            embed_forward(comm, out, tokens, vocab, &row, wpe, t, c, sp_full)
        }
        (None, None) => panic!(
            "forward: this model's token embedding is the optimizer's FP16 master; call \
             forward_tp with it (Trainer does)"
        ),
    }
}

/// The global gradient norm of a tensor-parallel model: sums of squares (f64) of the
/// sharded tensors added over the group, the replicated ones counted once. Every rank
/// gathers the group's partial sums and adds them in rank order, so all get the same
/// f32 result. `sum_squares(grads)` is the trainer's f64 sum of squares.
pub fn grad_norm(
    comm: &dyn Communicator,
    grads: &[Grad<'_>],
    sharded: &[bool],
    sum_squares: impl Fn(&[Grad<'_>]) -> f64,
) -> Result<f32> {
    let (mut sh, mut rep) = (Vec::new(), Vec::new());
    for (&g, &s) in grads.iter().zip(sharded) {
        if s {
            sh.push(g)
        } else {
            rep.push(g)
        }
    }
    let mine = sum_squares(&sh);
    let all = comm.all_gather_bytes(&mine.to_le_bytes())?;
    let shared: f64 = all
        .chunks_exact(8)
        .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
        .sum();
    Ok((shared + sum_squares(&rep)).sqrt() as f32)
}
