//! Validation loss over a fixed set of validation tokens, the same figure whatever the
//! batch size, the number of data-parallel ranks (and, later, of tensor-parallel ones).
//!
//! The set is defined in sequences of the model's context T, by index into the data's
//! validation split ([`Dataset::val_rows`]): `eval_tokens / T` of them, the whole split
//! when it has fewer, spread evenly over it when it has more (the split's files are
//! concatenated, so the first sequences alone would be one file). Each data-parallel
//! rank evaluates a contiguous share of the set, in batches of at most B sequences, and
//! the ranks' loss sums are added (one all-reduce): the mean over every token of the set.
//!
//! Why not `eval_batches x B` sequences per rank, as before: that covers a number of
//! sequences that grows with B, and with N ranks every rank evaluated the same ones; a
//! run on 1 rank x B = 64 and one on 2 ranks x 32 that trained identically reported
//! validation losses 1.2% apart.
//!
//! Exactness: the per-sequence losses do not depend on which batch a sequence is in
//! (every op is row- or sequence-wise; the GEMMs accumulate along k in an order that does
//! not depend on the number of rows), except under FP8 *current* scaling, where the
//! activation scale is the batch's amax. What differs between layouts is the f32
//! rounding of the batch means and of the sum (see the test in `tests/tests/eval.rs`).

use crate::data::Dataset;
use crate::train::Trainer;
use anyhow::{bail, Result};
use fp8lm_collectives::{chunk_range, BufMut, Communicator, ReduceOp};

/// Default evaluation size (`eval_tokens = 0`): the whole validation split up to this
/// many tokens (32 Ki: the old default of 8 batches x 32 x 16 was 4 Ki, whose standard
/// error on a 2.3-nat loss was ~1%; 8x the tokens is ~3x less noise).
pub const AUTO_EVAL_TOKENS: usize = 1 << 15;

/// The validation sequence indices `eval_tokens` (0: [`AUTO_EVAL_TOKENS`]) tokens cover
/// at context `t`: `0..S` when the split has at least `S = eval_tokens / t` sequences
/// (or is unbounded, `split = None`), else the whole split; evenly spread when S is
/// smaller than the split. Always at least one sequence.
pub fn eval_sequences(eval_tokens: usize, t: usize, split: Option<u64>) -> Vec<u64> {
    let tokens = if eval_tokens == 0 {
        AUTO_EVAL_TOKENS
    } else {
        eval_tokens
    };
    let want = (tokens / t.max(1)).max(1) as u64;
    match split {
        None => (0..want).collect(),
        Some(n) if n <= want => (0..n).collect(),
        Some(n) => (0..want).map(|i| i * n / want).collect(),
    }
}

impl Trainer {
    /// Mean validation loss (nats/token) over the fixed set [`eval_sequences`] gives
    /// for `eval_tokens`, shared out over `comm`'s ranks (every rank must call it; the
    /// result is the same on all). `comm = None`: this process evaluates all of it.
    pub fn evaluate_tokens(
        &mut self,
        data: &dyn Dataset,
        eval_tokens: usize,
        comm: Option<&dyn Communicator>,
    ) -> Result<f32> {
        self.evaluate_tokens_with(data, eval_tokens, comm, &mut |_, _| {})
    }

    /// [`Trainer::evaluate_tokens`] calling `progress(batches done, mean loss so far)`
    /// after each of this rank's batches (for a progress display).
    pub fn evaluate_tokens_with(
        &mut self,
        data: &dyn Dataset,
        eval_tokens: usize,
        comm: Option<&dyn Communicator>,
        progress: &mut dyn FnMut(usize, f64),
    ) -> Result<f32> {
        let d = self.model().dims;
        let (b, t) = (d.b, d.t);
        let seqs = eval_sequences(eval_tokens, t, data.val_sequence_count(t));
        if seqs.is_empty() {
            bail!("evaluation: the validation split holds no sequence of {t} tokens");
        }
        let (rank, ranks) = comm.map_or((0, 1), |c| (c.rank(), c.size()));
        let mine = &seqs[chunk_range(seqs.len(), ranks, rank)];
        let (mut inputs, mut targets) = (vec![0u32; b * t], vec![0u32; b * t]);
        let mut sum = 0f64;
        let mut tokens = 0usize;
        for (i, batch) in mine.chunks(b).enumerate() {
            let n = batch.len() * t;
            data.val_rows(batch, t, &mut inputs[..n], &mut targets[..n]);
            let mean = self.loss_on(&inputs[..n], &targets[..n], batch.len(), t)?;
            sum += mean as f64 * n as f64;
            tokens += n;
            progress(i + 1, sum / tokens as f64);
        }
        self.model_mut().take_gemm_time();
        if let Some(c) = comm.filter(|c| c.size() > 1) {
            // The f64 sum as two f32 (high part, remainder): the all-reduce is f32.
            let hi = sum as f32;
            let mut v = [hi, (sum - hi as f64) as f32];
            c.all_reduce(BufMut::F32(&mut v), ReduceOp::Sum)
                .map_err(|e| anyhow::anyhow!("evaluation: {e}"))?;
            sum = v[0] as f64 + v[1] as f64;
        }
        Ok((sum / (seqs.len() * t) as f64) as f32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_set_depends_only_on_tokens_context_and_split() {
        assert_eq!(eval_sequences(64, 16, None), vec![0, 1, 2, 3]);
        assert_eq!(eval_sequences(64, 16, Some(2)), vec![0, 1]);
        assert_eq!(eval_sequences(64, 16, Some(8)), vec![0, 2, 4, 6]);
        assert_eq!(eval_sequences(0, 16, None).len(), AUTO_EVAL_TOKENS / 16);
        assert_eq!(eval_sequences(5, 16, None), vec![0]);
        assert_eq!(eval_sequences(0, 16, Some(10)).len(), 10);
    }
}
