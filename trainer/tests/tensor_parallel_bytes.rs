//! Bytes moved per training step by each collective kind under tensor and sequence
//! parallelism (`fp8lm_collectives::CountingComm`, per rank, payload sent), and the
//! FP8 converter's saving: sequence parallelism's all-gathers move E4M3 / E5M2 bytes in
//! the FP8 precisions, one byte per element against f32's four.
//!
//! Expected (a ring over T ranks sends (T - 1) / T of a gathered tensor per rank; n = B x
//! context tokens, C channels, L blocks), per step with SP:
//! - g forward: 2L + 1 gathers of the norm outputs `[n, C]` (two per block, the final
//!   norm): E4M3 (FP8), bf16 (bf16: the shard rounded before the gather, which the GEMM
//!   would have done to the gathered input, element by element), f32 (fp32);
//! - ḡ backward: 2L gathers of the output gradient `[n, C]` (the two row-parallel layers);
//! - the embedding's backward: 1 f32 gather of `[n, C]` (its vocabulary shard sees every
//!   token), in every precision;
//! - g backward: 2L + 1 re-gathers of the column-parallel layers' inputs (each rank keeps
//!   only its shard of them), in the format kept: E4M3 (FP8), f32 (fp32), bf16 (bf16);
//!
//! so fp32 gathers (6L + 3) n C 4 (T - 1) / T bytes of f32, bf16 (2L + 1) n C 4 (T - 1) / T
//! of f32 and 2 (2L + 1) n C 2 (T - 1) / T of bf16, and FP8 (6L + 2) n C (T - 1) / T bytes of
//! FP8 plus the embedding's n C 4 (T - 1) / T of f32.

use fp8lm_collectives::{run_ranks, CollectiveBytes, Communicator, CountingComm};
use fp8lm_trainer::data::synthetic::MarkovCorpus;
use fp8lm_trainer::data::Dataset;
use fp8lm_trainer::{Precision, RunConfig, Trainer};

/// Rank 0's bytes (all ranks send the same of every kind but the all-reduce, whose
/// 1-element amax agreements split unevenly: 4 bytes over T ranks), with the all-reduce
/// replaced by its sum over the ranks / T, and the config.
fn step_bytes(precision: Precision, tp: usize, sp: bool) -> (CollectiveBytes, RunConfig) {
    let mut c = RunConfig {
        batch: 4,
        precision,
        ..RunConfig::default()
    };
    c.model.context = 32;
    c.dist.tensor_parallel = tp;
    c.dist.sequence_parallel = sp;
    let per_rank = run_ranks(tp, |comm| {
        let mut data = MarkovCorpus::new(3);
        let mut tr = Trainer::new_tp(&c, data.vocab_size(), comm.rank())?;
        let counting = CountingComm::new(comm);
        tr.train_step_tp(&mut data, &counting)?;
        anyhow::Ok(counting.bytes())
    })
    .unwrap();
    let total_ar: u64 = per_rank.iter().map(|b| b.all_reduce).sum();
    for b in &per_rank {
        let same = CollectiveBytes {
            all_reduce: per_rank[0].all_reduce,
            ..*b
        };
        assert_eq!(same, per_rank[0], "ranks of a ring send the same bytes");
    }
    assert_eq!(total_ar % tp as u64, 0);
    let mut b = per_rank[0];
    b.all_reduce = total_ar / tp as u64;
    (b, c)
}

#[test]
fn fp8_sequence_parallel_gathers_move_a_quarter_of_f32() {
    for tp in [2, 4] {
        let (f32b, c) = step_bytes(Precision::Fp32, tp, true);
        let (fp8b, _) = step_bytes(Precision::Fp8O1, tp, true);
        let (bf16b, _) = step_bytes(Precision::Bf16, tp, true);
        let (n, ch, l) = (
            (c.batch * c.model.context) as u64,
            c.model.channels as u64,
            c.model.layers as u64,
        );
        let frac = |bytes: u64| bytes * (tp as u64 - 1) / tp as u64;
        println!(
            "T = {tp} SP fp32: {f32b:?}\nT = {tp} SP bf16: {bf16b:?}\nT = {tp} SP fp8-o1: {fp8b:?}"
        );
        // The backward's re-gathers of the 2L + 1 column-parallel inputs (each rank keeps
        // only its shard), one element per row and channel, in the format kept.
        let regather = frac((2 * l + 1) * n * ch);
        assert_eq!(
            f32b.all_gather,
            frac((4 * l + 2) * n * ch * 4) + 4 * regather
        );
        assert_eq!(f32b.all_gather_fp8, 0);
        assert_eq!(
            bf16b.all_gather,
            frac((2 * l + 1) * n * ch * 4) + 2 * regather + 2 * regather,
            "bf16 gathers its norm outputs (g) and re-gathers its input shards as bf16"
        );
        // g itself: bf16 moves half of fp32's bytes.
        assert_eq!(
            2 * (bf16b.all_gather - frac((2 * l + 1) * n * ch * 4) - 2 * regather),
            f32b.all_gather - frac((2 * l + 1) * n * ch * 4) - 4 * regather
        );
        assert_eq!(bf16b.all_gather_fp8, 0);
        // The converters' 4L + 1 gathers (2L + 1 norm outputs, 2L output gradients), and
        // the re-gathers of the E4M3 inputs.
        assert_eq!(fp8b.all_gather_fp8, frac((4 * l + 1) * n * ch) + regather);
        assert_eq!(
            fp8b.all_gather,
            frac(n * ch * 4),
            "only the embedding's gather is f32"
        );
        // The converters' gathers: FP8 moves exactly a quarter of the f32 bytes.
        assert_eq!(
            4 * (fp8b.all_gather_fp8 - regather),
            f32b.all_gather - 4 * regather - fp8b.all_gather
        );
        // Reductions stay f32 in every precision (sums of partial products); FP8 adds one
        // MAX all-reduce of an f32 amax per FP8 gather (4L + 1), for the shared scale: a
        // 4-byte all-reduce sends 2 (T - 1) x 4 bytes over the group, per rank / T.
        assert_eq!(fp8b.reduce_scatter, f32b.reduce_scatter);
        let amax_bytes = (4 * l + 1) * 2 * (tp as u64 - 1) * 4;
        assert_eq!(
            fp8b.all_reduce * tp as u64,
            f32b.all_reduce * tp as u64 + amax_bytes
        );
        assert!(f32b.reduce_scatter > 0 && f32b.all_reduce > 0);
    }
}

#[test]
fn tensor_parallel_without_sp_all_reduces_and_gathers_nothing_in_fp8() {
    for tp in [2, 4] {
        let (b, c) = step_bytes(Precision::Fp8O1, tp, false);
        println!("T = {tp} no SP fp8-o1: {b:?}");
        let (n, ch, l) = (
            (c.batch * c.model.context) as u64,
            c.model.channels as u64,
            c.model.layers as u64,
        );
        let frac = |bytes: u64| bytes * (tp as u64 - 1) / tp as u64;
        // f̄ forward (embedding, 2 per block), f backward (2 per block, the head's input)
        // of [n, C] f32, plus the cross-entropy's row max [n] and [sum | target] [2n]; an
        // all-reduce sends twice a reduce-scatter's share.
        let per = |k: u64| 2 * frac(k * 4);
        assert_eq!(
            b.all_reduce,
            per((4 * l + 2) * n * ch) + per(n) + per(2 * n)
        );
        assert_eq!(
            (b.reduce_scatter, b.all_gather, b.all_gather_fp8),
            (0, 0, 0)
        );
    }
}
