//! `fp8lm train` under `mpirun` and `fp8lm bench train --dist`: data-parallel training
//! over the communicator (`fp8lm_trainer::distributed`). Kept apart from the single-process
//! run loop: every rank trains, only rank 0 prints; any error on any rank aborts the whole
//! job (MPI_Abort) with a message naming the rank and the cause, rather than leaving the
//! other ranks waiting in a collective.
//!
//! Not yet here (single-process `fp8lm train` has them): checkpoints, metrics files, plots,
//! evaluation and `--resume` under mpirun.

use anyhow::Result;
use fp8lm_collectives::{or_abort, run_ranks, Communicator};
use fp8lm_trainer::distributed::{bench_train_dist_table, train_data_parallel};
use std::path::Path;
use std::time::Instant;

use crate::ConfigArgs;

/// Data-parallel `fp8lm train` on this process's MPI rank.
pub fn train(args: &ConfigArgs, resume: Option<&Path>) -> Result<()> {
    let comm = fp8lm_collectives::init()?;
    let comm: &dyn Communicator = comm.as_ref();
    let rank = comm.rank();
    if resume.is_some() {
        or_abort(
            comm,
            Err::<(), _>("--resume under mpirun is not supported yet; resume on one process"),
        );
    }
    let cfg = or_abort(comm, crate::run::load(args).map_err(|e| format!("{e:#}")));
    let t0 = Instant::now();
    let max = cfg.max_steps;
    let every = (max / 20).max(1) as u64;
    let tr =
        or_abort(
            comm,
            train_data_parallel(&cfg, comm, max, |tr, st| {
                if tr.is_root() && (st.step % every == 0 || st.step + 1 == max as u64) {
                    println!(
                    "step {:>5}/{max}: loss {:.4}, grad norm {:.3}, lr {:.2e}, comm {:.0}% of step",
                    st.step + 1,
                    st.loss,
                    st.grad_norm,
                    st.lr,
                    100.0 * st.comm.as_secs_f64()
                        / (st.forward + st.backward + st.optimizer).as_secs_f64().max(1e-12)
                );
                }
            }),
        );
    if rank == 0 {
        println!(
            "{} data-parallel ranks ({}), precision {}, {} steps of {} x {} tokens per rank in {:.1}s; {} skipped; rank 0 optimizer state {} bytes",
            comm.size(),
            comm.backend(),
            cfg.precision.name(),
            max,
            cfg.batch,
            cfg.model.context,
            t0.elapsed().as_secs_f64(),
            tr.skipped_steps(),
            tr.optimizer().state_bytes()
        );
        if let Some(b) = tr.zero_rank_bytes() {
            let mean = b.iter().sum::<usize>() as f64 / b.len() as f64;
            let max = *b.iter().max().unwrap_or(&0) as f64;
            println!(
                "fp8-o3 optimizer state per rank (bytes): {b:?}; most loaded {:.3}x the mean",
                max / mean.max(1.0)
            );
        }
    }
    Ok(())
}

/// `fp8lm bench train --dist`: under mpirun over MPI, else `ranks` in-process ranks.
pub fn bench(args: &ConfigArgs, steps: usize, ranks: usize) -> Result<()> {
    let cfg = crate::run::load(args)?;
    if fp8lm_collectives::launched_by_mpi() {
        let comm = fp8lm_collectives::init()?;
        let table = or_abort(
            comm.as_ref(),
            bench_train_dist_table(&cfg, comm.as_ref(), steps),
        );
        if comm.rank() == 0 {
            print!("{table}");
        }
    } else {
        let tables = run_ranks(ranks, |c| bench_train_dist_table(&cfg, c, steps))?;
        print!("{}", tables[0]);
    }
    Ok(())
}
