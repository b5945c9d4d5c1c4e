//! Token sources. Every source yields `(inputs, targets)` batches of `B x T` token ids
//! (targets are inputs shifted by one), in a seeded, reproducible order whose position
//! can be saved in a checkpoint and restored.

pub mod shards;
pub mod synthetic;
pub mod text;
pub mod tokens;

pub use tokens::{open_dataset, TokenDataset};

/// A source of training and validation batches.
pub trait Dataset: Send {
    fn vocab_size(&self) -> usize;
    /// Fill `inputs` and `targets` (each `b * t`) with the next training batch and advance.
    fn next_train_batch(&mut self, b: usize, t: usize, inputs: &mut [u32], targets: &mut [u32]);
    /// Fill validation batch number `index` (deterministic, independent of training position).
    fn val_batch(&self, index: usize, b: usize, t: usize, inputs: &mut [u32], targets: &mut [u32]);
    /// Opaque training position, restored by [`Dataset::set_position`] on resume.
    fn position(&self) -> u64;
    fn set_position(&mut self, pos: u64);
    /// Validation sequences of length `t` in the split (`None`: unbounded, e.g. the
    /// embedded corpus). Sequence `i` is what [`Dataset::val_rows`] gives for `i`.
    fn val_sequence_count(&self, t: usize) -> Option<u64> {
        let _ = t;
        None
    }
    /// Fill one row of `t` tokens per entry of `seqs` with validation sequence number
    /// `seqs[r]`, independent of how sequences are grouped into batches (what
    /// `Trainer::evaluate_tokens` relies on). Sequence `i` is `val_batch(i, 1, t)`.
    fn val_rows(&self, seqs: &[u64], t: usize, inputs: &mut [u32], targets: &mut [u32]) {
        for (r, &s) in seqs.iter().enumerate() {
            let rows = r * t..(r + 1) * t;
            self.val_batch(
                s as usize,
                1,
                t,
                &mut inputs[rows.clone()],
                &mut targets[rows],
            );
        }
    }
    /// Known entropy floor in nats per token, if the source is synthetic.
    fn entropy_floor(&self) -> Option<f64> {
        None
    }
}
