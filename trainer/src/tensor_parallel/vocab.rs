//! The vocabulary split over the tensor-parallel group: token embedding and the LM head's
//! cross-entropy (Megatron's `VocabParallelEmbedding`, `vocab_parallel_cross_entropy`).
//! GPT-2 124M spends 31% of its parameters on `wte`; without this split TP saves little.
//!
//! ```text
//!   embedding:  out[n, c] = wte_t[tok - v0] if v0 <= tok < v1 else 0      then f̄ (all-reduce)
//!   head:       logits_t[n, V/T] = x[n, c] @ wte_t^T                    (column-parallel)
//!   loss[n]   = log sum_v exp(l_v) - l_target
//!             = ln(S) + M - l_target,  M = max over the group, S = sum over the group of
//!               sum exp(l - M), l_target from the rank that holds it
//!   dlogits_t = (softmax_t - onehot_t) * dloss
//! ```
//! Three reductions of `n` floats per step (max, then sum-exp and target logit together):
//! the logits themselves never move.

use fp8lm_collectives::{BufMut, Communicator, ReduceOp, Result};
use std::ops::Range;

/// This rank's rows `vocab` of the token embedding `wte[V, c]`.
#[derive(Clone, Debug)]
pub struct VocabParallelEmbedding {
    pub vocab: Range<usize>,
    pub c: usize,
    /// `[vocab.len(), c]`.
    pub weight: Vec<f32>,
    pub dweight: Vec<f32>,
}

impl VocabParallelEmbedding {
    pub fn from_full(full: &[f32], c: usize, vocab: Range<usize>) -> Self {
        let weight = full[vocab.start * c..vocab.end * c].to_vec();
        VocabParallelEmbedding {
            dweight: vec![0.0; weight.len()],
            vocab,
            c,
            weight,
        }
    }

    /// `out[n, c]`: this rank's partial lookup (rows of tokens outside its range are 0);
    /// the caller all-reduces it over the group (f̄).
    pub fn forward(&self, out: &mut [f32], tokens: &[u32]) {
        let c = self.c;
        for (row, &tok) in out.chunks_exact_mut(c).zip(tokens) {
            let tok = tok as usize;
            if self.vocab.contains(&tok) {
                let i = tok - self.vocab.start;
                row.copy_from_slice(&self.weight[i * c..(i + 1) * c]);
            } else {
                row.fill(0.0);
            }
        }
    }

    /// `dwte_t[tok - v0] += dout[n]` for this rank's tokens (`dout` is the full gradient,
    /// identical on every rank: f̄'s backward is the identity).
    pub fn backward(&mut self, dout: &[f32], tokens: &[u32]) {
        let c = self.c;
        for (row, &tok) in dout.chunks_exact(c).zip(tokens) {
            let tok = tok as usize;
            if self.vocab.contains(&tok) {
                let i = tok - self.vocab.start;
                for (d, &g) in self.dweight[i * c..(i + 1) * c].iter_mut().zip(row) {
                    *d += g;
                }
            }
        }
    }
}

/// Cross-entropy over logits sharded by vocabulary. In place, `logits[n, v_local]` (this
/// rank's columns `vocab`) become `dlogits = (p - onehot) * dloss`; `losses[n]` receive
/// `-ln p[target]` (the same on every rank). f32 throughout, sums of exponentials in f64
/// per row before the reduction (as exact as the unsharded softmax's f32 sum, or more).
pub fn vocab_parallel_cross_entropy(
    comm: &dyn Communicator,
    logits: &mut [f32],
    vocab: Range<usize>,
    targets: &[u32],
    losses: &mut [f32],
    dloss: f32,
) -> Result<()> {
    let n = targets.len();
    let v = vocab.len();
    assert_eq!(
        logits.len(),
        n * v,
        "vocab_parallel_cross_entropy: logits shape"
    );
    assert_eq!(
        losses.len(),
        n,
        "vocab_parallel_cross_entropy: losses shape"
    );
    // 1. Row max over the whole vocabulary.
    let mut max: Vec<f32> = logits
        .chunks_exact(v)
        .map(|r| r.iter().copied().fold(f32::NEG_INFINITY, f32::max))
        .collect();
    comm.all_reduce(BufMut::F32(&mut max), ReduceOp::Max)?;
    // 2. Sum of exp(l - M) and the target's logit, reduced together: [sum | target].
    let mut st = vec![0f32; 2 * n];
    for (i, row) in logits.chunks_exact(v).enumerate() {
        st[i] = row
            .iter()
            .map(|&l| ((l - max[i]) as f64).exp())
            .sum::<f64>() as f32;
        let t = targets[i] as usize;
        if vocab.contains(&t) {
            st[n + i] = row[t - vocab.start];
        }
    }
    comm.all_reduce(BufMut::F32(&mut st), ReduceOp::Sum)?;
    // 3. Loss and gradient.
    for (i, row) in logits.chunks_exact_mut(v).enumerate() {
        let (m, s, lt) = (max[i], st[i], st[n + i]);
        losses[i] = s.ln() + m - lt;
        let inv = 1.0 / s;
        let t = targets[i] as usize;
        for (j, l) in row.iter_mut().enumerate() {
            let p = ((*l - m) as f64).exp() as f32 * inv;
            let onehot = if vocab.start + j == t { 1.0 } else { 0.0 };
            *l = (p - onehot) * dloss;
        }
    }
    Ok(())
}
