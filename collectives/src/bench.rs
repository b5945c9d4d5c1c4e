//! `fp8lm bench allreduce`: bytes sent per rank and time of a gradient all-reduce in f32,
//! bf16 and FP8 (FP8-LM), on whatever communicator the caller has (MPI under `mpirun`,
//! or in-process ranks).
//!
//! Every variant runs the same ring algorithm, so the figures compare what moves and what
//! each hop costs, not two different algorithms. Rows:
//! - `f32`: f32 gradients, f32 sum.
//! - `bf16`: bf16 gradients, bf16 sum with per-hop rounding.
//! - `fp8-sum`: the bare FP8 (E5M2) sum of the bytes, per-hop rounded (no scales).
//! - `fp8lm`: FP8 (E5M2) gradients with their own scales, as FP8-LM's weight-gradient
//!   GEMMs produce them: scale agreement (one small all-gather), table re-quantisation
//!   and counts fused into the FP8 sum's ring, one small gather of the counts,
//!   result scale `N * mu * s_g` ([`GradAllReducer::all_reduce_scaled_fp8`]),
//!   with mu = 1/2 (steady state: at mu = 1 the re-quantisation would be skipped).
//! - `fp8lm-from-f32`: the same starting from f32 gradients, including the amax pass and
//!   the f32 -> FP8 cast ([`GradAllReducer::all_reduce_fp8`]).
//!
//! Time is the slowest rank's, best of `reps` repetitions (each preceded by a barrier).

use crate::buf::{BufMut, ReduceOp};
use crate::comm::Communicator;
use crate::error::Result;
use crate::grad::{GradAllReduceConfig, GradAllReducer, GradMethod};
use fp8lm_fp8::{Fp8Format, ScaledFp8};
use half::bf16;
use std::time::Instant;

/// One row of the benchmark.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchRow {
    pub name: &'static str,
    pub bytes_per_elem: usize,
    /// Payload bytes this rank sent in one all-reduce.
    pub bytes_sent: u64,
    /// Best time over the repetitions, slowest rank, seconds.
    pub seconds: f64,
}

/// Deterministic gradient-like values for rank `rank` (no rng dependency): roughly
/// normal, magnitudes spread over a few binades.
pub fn bench_gradient(rank: usize, len: usize) -> Vec<f32> {
    let mut s = (rank as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let a = (s & 0xFFFF) as f32 + ((s >> 16) & 0xFFFF) as f32 + ((s >> 32) & 0xFFFF) as f32;
            (a / 65536.0 - 1.5) * 1e-3
        })
        .collect()
}

/// Best time (slowest rank) over `reps` runs of `f` (each after an untimed `prep` that
/// restores the input), and the bytes one run sent.
fn timed(
    comm: &dyn Communicator,
    reps: usize,
    mut prep: impl FnMut(),
    mut f: impl FnMut() -> Result<()>,
) -> Result<(f64, u64)> {
    let (mut best, mut sent) = (f64::INFINITY, 0);
    for _ in 0..reps.max(1) {
        prep();
        comm.barrier()?;
        let s0 = comm.bytes_sent();
        let t = Instant::now();
        f()?;
        let dt = t.elapsed().as_secs_f32();
        sent = comm.bytes_sent() - s0;
        best = best.min(comm.all_reduce_scalar(dt, ReduceOp::Max)? as f64);
    }
    Ok((best, sent))
}

/// Run the benchmark on `elements` gradient values per rank, `reps` repetitions each.
/// Collective: call on every rank. Returns the same rows on every rank.
pub fn allreduce(comm: &dyn Communicator, elements: usize, reps: usize) -> Result<Vec<BenchRow>> {
    let g = bench_gradient(comm.rank(), elements);
    let mut rows = Vec::new();
    let mut row = |name, bytes_per_elem, (seconds, bytes_sent): (f64, u64)| {
        rows.push(BenchRow {
            name,
            bytes_per_elem,
            bytes_sent,
            seconds,
        })
    };

    let buf = std::cell::RefCell::new(g.clone());
    let t = timed(
        comm,
        reps,
        || buf.borrow_mut().copy_from_slice(&g),
        || comm.all_reduce(BufMut::F32(&mut buf.borrow_mut()), ReduceOp::Sum),
    )?;
    row("f32", 4, t);
    drop(buf);

    let gb: Vec<bf16> = g.iter().map(|&x| bf16::from_f32(x)).collect();
    let buf = std::cell::RefCell::new(gb.clone());
    let t = timed(
        comm,
        reps,
        || buf.borrow_mut().copy_from_slice(&gb),
        || comm.all_reduce(BufMut::Bf16(&mut buf.borrow_mut()), ReduceOp::Sum),
    )?;
    row("bf16", 2, t);
    drop((buf, gb));

    let g8 = ScaledFp8::quantize_current(&g, &[elements], Fp8Format::E5M2, 0).0;
    let buf = std::cell::RefCell::new(g8.data.clone());
    let t = timed(
        comm,
        reps,
        || buf.borrow_mut().copy_from_slice(&g8.data),
        || {
            comm.all_reduce(
                BufMut::Fp8(&mut buf.borrow_mut(), Fp8Format::E5M2),
                ReduceOp::Sum,
            )
        },
    )?;
    row("fp8-sum", 1, t);
    drop(buf);

    let cfg = GradAllReduceConfig {
        method: GradMethod::Fp8Lm,
        format: Fp8Format::E5M2,
        bucket_bytes: usize::MAX,
        // Steady state: mu has halved at least once (mu = 1 would make the
        // re-quantisation table the identity, which is skipped).
        initial_mu: 0.5,
        ..Default::default()
    };
    let t8 = std::cell::RefCell::new(vec![g8.clone()]);
    let mut red = GradAllReducer::new(cfg.clone());
    let t = timed(
        comm,
        reps,
        || {
            let mut t8 = t8.borrow_mut();
            t8[0].data.copy_from_slice(&g8.data);
            t8[0].scale = g8.scale;
        },
        || {
            red.all_reduce_scaled_fp8(comm, &mut t8.borrow_mut())
                .map(|_| ())
        },
    )?;
    row("fp8lm", 1, t);
    drop((t8, g8));

    let mut red = GradAllReducer::new(cfg);
    let mut out = Vec::new();
    let t = timed(
        comm,
        reps,
        || {},
        || red.all_reduce_fp8_into(comm, &[&g], &mut out).map(|_| ()),
    )?;
    row("fp8lm-from-f32", 1, t);
    Ok(rows)
}

/// Whole `fp8lm bench allreduce` subcommand: on MPI's world when started by `mpirun`
/// (needs the `mpi` feature), else on `local_ranks` in-process ranks. Returns the table
/// on rank 0 (print it), `None` on the other MPI ranks.
pub fn run(elements: usize, reps: usize, local_ranks: usize) -> Result<Option<String>> {
    if crate::launched_by_mpi() {
        let comm = crate::init()?;
        let rows = allreduce(&*comm, elements, reps)?;
        Ok((comm.rank() == 0).then(|| format_rows(&rows, comm.size(), comm.backend(), elements)))
    } else {
        let n = local_ranks.max(1);
        let rows = crate::run_ranks(n, |c| allreduce(c, elements, reps))?;
        Ok(Some(format_rows(&rows[0], n, "local", elements)))
    }
}

/// The benchmark table, with bytes and time relative to the f32 row.
pub fn format_rows(rows: &[BenchRow], ranks: usize, backend: &str, elements: usize) -> String {
    let base = rows.iter().find(|r| r.name == "f32");
    let mut s = format!(
        "all-reduce of {elements} gradient elements, {ranks} ranks ({backend} backend, \
         FP8 sum kernel {})\n\
         {:<16} {:>6} {:>14} {:>9} {:>11} {:>9}\n",
        crate::fp8sum::kernel_name(),
        "method",
        "B/elem",
        "sent/rank [B]",
        "vs f32",
        "time [ms]",
        "vs f32"
    );
    for r in rows {
        let (bx, tx) = base.map_or((f64::NAN, f64::NAN), |b| {
            (
                r.bytes_sent as f64 / b.bytes_sent.max(1) as f64,
                r.seconds / b.seconds,
            )
        });
        s += &format!(
            "{:<16} {:>6} {:>14} {:>8.3}x {:>11.1} {:>8.3}x\n",
            r.name,
            r.bytes_per_elem,
            r.bytes_sent,
            bx,
            r.seconds * 1e3,
            tx
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run_ranks;

    #[test]
    fn bench_runs_and_fp8_moves_a_quarter_of_f32_bytes() {
        let rows = run_ranks(2, |c| allreduce(c, 10_000, 1)).unwrap();
        let r = &rows[0];
        assert_eq!(r.len(), 5);
        let f32b = r[0].bytes_sent;
        // Ring all-reduce: 2 (N-1)/N * len * 4 bytes = 40_000 for N = 2.
        assert_eq!(f32b, 40_000);
        assert_eq!(r[1].bytes_sent, f32b / 2);
        // FP8: a quarter, plus the 4-byte scale agreement.
        assert_eq!(r[2].bytes_sent, f32b / 4);
        // FP8-LM: plus the 4-byte scale gather and the 16-byte count gather.
        assert_eq!(r[3].bytes_sent, f32b / 4 + 4 + 16);
        assert!(format_rows(r, 2, "local", 10_000).contains("fp8lm"));
        let table = run(1000, 1, 3).unwrap().unwrap();
        assert!(table.contains("3 ranks (local backend,"), "{table}");
    }
}
