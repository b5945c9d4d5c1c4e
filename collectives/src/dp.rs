//! Small pieces data-parallel training needs from the communicator: refusing a config
//! that differs between ranks, and each rank's shard of a batch.

use crate::comm::{chunk_range, Communicator};
use crate::error::Result;
use std::ops::Range;

/// FNV-1a 64-bit hash of `bytes` (stable across runs, hosts and Rust versions, unlike
/// `std`'s `DefaultHasher`).
pub fn config_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Refuse to start when `what` (e.g. the serialised training config) differs between
/// ranks: one 8-byte all-gather; the error, on every rank, names the ranks that differ.
pub fn agree_config(comm: &dyn Communicator, what: &str, bytes: &[u8]) -> Result<()> {
    comm.agree_u64(what, config_hash(bytes))
}

/// This rank's rows of a global batch of `total` rows (contiguous, sizes differ by at
/// most one; every row belongs to exactly one rank).
pub fn shard_range(total: usize, rank: usize, size: usize) -> Range<usize> {
    chunk_range(total, size, rank)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run_ranks;

    #[test]
    fn differing_configs_are_refused_on_every_rank() {
        let ok = run_ranks(3, |c| agree_config(c, "config", b"lr = 1e-3\n")).unwrap();
        assert_eq!(ok.len(), 3);
        let err = run_ranks(3, |c| {
            let cfg: &[u8] = if c.rank() == 2 {
                b"lr = 2e-3\n"
            } else {
                b"lr = 1e-3\n"
            };
            agree_config(c, "training config", cfg)
        })
        .unwrap_err();
        assert!(err.to_string().contains("training config differs"), "{err}");
        assert!(err.to_string().contains("rank 2 has"), "{err}");
        assert_ne!(config_hash(b"a"), config_hash(b"b"));
        assert_eq!(config_hash(b""), 0xcbf2_9ce4_8422_2325);
    }

    #[test]
    fn shards_cover_the_batch_exactly_once() {
        for total in [0, 1, 7, 64] {
            for size in 1..=5 {
                let mut seen = vec![0; total];
                for r in 0..size {
                    for i in shard_range(total, r, size) {
                        seen[i] += 1;
                    }
                }
                assert!(seen.iter().all(|&s| s == 1), "{total} {size}");
            }
        }
    }
}
