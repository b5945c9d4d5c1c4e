//! `Rows`, a dataset whose row r is a fixed function of r: 4 batches of B rows are
//! exactly one batch of 4B rows, and two trainers fed from position 0 see the same
//! tokens. Shared by the tests that compare runs (`backends.rs`, `grad_accum.rs`) and
//! the GPU suite (`examples/gpu_train_check.rs`).

use fp8lm_trainer::data::Dataset;

pub struct Rows {
    pub next: u64,
    pub vocab: u32,
}

impl Rows {
    fn fill(&self, first: u64, b: usize, t: usize, x: &mut [u32], y: &mut [u32]) {
        for r in 0..b {
            for j in 0..t {
                let v = ((first + r as u64) * 2654435761 + j as u64 * 40503) % 1_000_003;
                x[r * t + j] = (v % self.vocab as u64) as u32;
                y[r * t + j] = ((v / 7) % self.vocab as u64) as u32;
            }
        }
    }
}

impl Dataset for Rows {
    fn vocab_size(&self) -> usize {
        self.vocab as usize
    }
    fn next_train_batch(&mut self, b: usize, t: usize, x: &mut [u32], y: &mut [u32]) {
        self.fill(self.next, b, t, x, y);
        self.next += b as u64;
    }
    fn val_batch(&self, i: usize, b: usize, t: usize, x: &mut [u32], y: &mut [u32]) {
        self.fill(1 << 40 | i as u64, b, t, x, y);
    }
    fn position(&self) -> u64 {
        self.next
    }
    fn set_position(&mut self, p: u64) {
        self.next = p;
    }
}
