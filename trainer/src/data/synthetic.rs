//! The embedded default corpus: a seeded second-order Markov source over a small alphabet
//! of printable bytes, with a known entropy rate. `fp8lm train` with no arguments trains
//! on it offline, and the report compares the model's loss with the floor.
//!
//! Each context (previous two symbols) has `FANOUT` possible successors with fixed random
//! probabilities, so a model must use attention (two tokens back) to reach the floor.
//! Sequences are drawn fresh from the chain (after a burn-in, so they start near the
//! stationary distribution): the training stream never repeats and cannot be memorised.

use super::Dataset;
use crate::rng::Rng;

const ALPHABET: &[u8] = b"etaoinshrdlucmfw ,.";
const FANOUT: usize = 4;
const BURN_IN: usize = 16;

/// Second-order Markov source; token ids are the bytes of [`ALPHABET`].
#[derive(Clone, Debug)]
pub struct MarkovCorpus {
    seed: u64,
    /// `succ[a * A + b]` = (successor symbol index, cumulative probability) x FANOUT.
    succ: Vec<[(usize, f64); FANOUT]>,
    entropy_rate: f64,
    position: u64,
}

impl MarkovCorpus {
    pub fn new(seed: u64) -> Self {
        let a = ALPHABET.len();
        let mut rng = Rng::new(seed ^ 0xC0FF_EE00);
        let mut succ = Vec::with_capacity(a * a);
        for _ in 0..a * a {
            let mut row = [(0usize, 0f64); FANOUT];
            let mut picked: Vec<usize> = Vec::new();
            while picked.len() < FANOUT {
                let s = rng.below(a);
                if !picked.contains(&s) {
                    picked.push(s);
                }
            }
            // Skewed weights so the conditional entropy is well below log(FANOUT).
            let w: Vec<f64> = (0..FANOUT).map(|_| 0.05 + rng.next_f64().powi(2)).collect();
            let total: f64 = w.iter().sum();
            let mut cum = 0.0;
            for i in 0..FANOUT {
                cum += w[i] / total;
                row[i] = (picked[i], cum);
            }
            row[FANOUT - 1].1 = 1.0;
            succ.push(row);
        }
        let entropy_rate = Self::compute_entropy_rate(&succ, a);
        MarkovCorpus {
            seed,
            succ,
            entropy_rate,
            position: 0,
        }
    }

    /// Entropy rate in nats/token: sum over pair states of pi(state) * H(next | state),
    /// with pi the stationary distribution (power iteration).
    fn compute_entropy_rate(succ: &[[(usize, f64); FANOUT]], a: usize) -> f64 {
        let n = a * a;
        let mut pi = vec![1.0 / n as f64; n];
        for _ in 0..2000 {
            let mut next = vec![0f64; n];
            for (state, row) in succ.iter().enumerate() {
                let b = state % a;
                let mut prev = 0.0;
                for &(c, cum) in row {
                    next[b * a + c] += pi[state] * (cum - prev);
                    prev = cum;
                }
            }
            pi = next;
        }
        succ.iter()
            .zip(&pi)
            .map(|(row, p)| {
                let mut prev = 0.0;
                let mut h = 0.0;
                for &(_, cum) in row {
                    let q = cum - prev;
                    prev = cum;
                    if q > 0.0 {
                        h -= q * q.ln();
                    }
                }
                p * h
            })
            .sum()
    }

    fn step(&self, rng: &mut Rng, a: usize, b: usize) -> usize {
        let row = &self.succ[a * ALPHABET.len() + b];
        let u = rng.next_f64();
        row.iter()
            .find(|&&(_, cum)| u < cum)
            .unwrap_or(&row[FANOUT - 1])
            .0
    }

    /// Fill one sequence of `t + 1` tokens from a stream seeded by `stream_seed`.
    fn sequence(&self, stream_seed: u64, out: &mut [u32]) {
        let mut rng = Rng::new(stream_seed);
        let n = ALPHABET.len();
        let (mut a, mut b) = (rng.below(n), rng.below(n));
        for _ in 0..BURN_IN {
            let c = self.step(&mut rng, a, b);
            (a, b) = (b, c);
        }
        for slot in out.iter_mut() {
            let c = self.step(&mut rng, a, b);
            *slot = ALPHABET[c] as u32;
            (a, b) = (b, c);
        }
    }

    fn fill(&self, stream: u64, b: usize, t: usize, inputs: &mut [u32], targets: &mut [u32]) {
        let mut seq = vec![0u32; t + 1];
        for row in 0..b {
            let s = stream.wrapping_mul(0x100_0000).wrapping_add(row as u64);
            self.sequence(self.seed ^ s.wrapping_mul(0x2545_F491_4F6C_DD1D), &mut seq);
            inputs[row * t..(row + 1) * t].copy_from_slice(&seq[..t]);
            targets[row * t..(row + 1) * t].copy_from_slice(&seq[1..]);
        }
    }

    /// A plain-text sample of the source (for docs, tokenizer tests, demos).
    pub fn sample_text(&self, len: usize) -> String {
        let mut seq = vec![0u32; len];
        self.sequence(self.seed ^ 0x7E57, &mut seq);
        seq.iter().map(|&c| c as u8 as char).collect()
    }
}

impl Dataset for MarkovCorpus {
    fn vocab_size(&self) -> usize {
        256
    }
    fn next_train_batch(&mut self, b: usize, t: usize, inputs: &mut [u32], targets: &mut [u32]) {
        self.fill(self.position * 2, b, t, inputs, targets);
        self.position += 1;
    }
    fn val_batch(&self, index: usize, b: usize, t: usize, inputs: &mut [u32], targets: &mut [u32]) {
        // Odd streams are validation, even ones training: the two never overlap.
        self.fill(index as u64 * 2 + 1, b, t, inputs, targets);
    }
    fn position(&self) -> u64 {
        self.position
    }
    fn set_position(&mut self, pos: u64) {
        self.position = pos;
    }
    fn entropy_floor(&self) -> Option<f64> {
        Some(self.entropy_rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_resumable() {
        let mut a = MarkovCorpus::new(1);
        let mut b = MarkovCorpus::new(1);
        let (mut i1, mut t1, mut i2, mut t2) = (vec![0; 64], vec![0; 64], vec![0; 64], vec![0; 64]);
        a.next_train_batch(2, 32, &mut i1, &mut t1);
        a.next_train_batch(2, 32, &mut i1, &mut t1);
        b.set_position(1);
        b.next_train_batch(2, 32, &mut i2, &mut t2);
        assert_eq!((i1, t1), (i2, t2));
    }

    #[test]
    fn empirical_entropy_matches_rate() {
        // Estimate -log p(x_t | x_{t-2}, x_{t-1}) from the true model over a long sample.
        let c = MarkovCorpus::new(7);
        let mut seq = vec![0u32; 200_000];
        c.sequence(99, &mut seq);
        let idx = |x: u32| ALPHABET.iter().position(|&a| a as u32 == x).unwrap();
        let mut nll = 0.0;
        for w in seq.windows(3) {
            let row = &c.succ[idx(w[0]) * ALPHABET.len() + idx(w[1])];
            let mut prev = 0.0;
            for &(s, cum) in row {
                if s == idx(w[2]) {
                    nll -= (cum - prev).ln();
                    break;
                }
                prev = cum;
            }
        }
        let est = nll / (seq.len() - 2) as f64;
        let rate = c.entropy_floor().unwrap();
        assert!(rate > 0.3 && rate < (FANOUT as f64).ln(), "rate {rate}");
        assert!((est - rate).abs() < 0.02, "empirical {est} vs rate {rate}");
    }
}
