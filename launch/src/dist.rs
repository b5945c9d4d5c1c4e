//! `fp8lm bench train --dist`: data-parallel step time over the communicator
//! (`fp8lm_trainer::distributed`). (`fp8lm train` under `mpirun` is the ordinary run loop
//! in `run.rs`, rank-aware.) Any error on any rank aborts the whole job (MPI_Abort) with
//! a message naming the rank and the cause, rather than leaving the other ranks waiting
//! in a collective.

use anyhow::Result;
use fp8lm_collectives::{or_abort, run_ranks};
use fp8lm_trainer::distributed::bench_train_dist_table;

use crate::ConfigArgs;

/// `fp8lm bench train --dist`: under mpirun over MPI, else `ranks` in-process ranks.
pub fn bench(args: &ConfigArgs, steps: usize, ranks: usize, tps: &[usize]) -> Result<()> {
    let cfg = crate::run::load(args)?;
    use fp8lm_trainer::Precision;
    let precisions = [
        Precision::Fp32,
        Precision::Bf16,
        Precision::Fp8O1,
        Precision::Fp8O3,
    ];
    let table = |c: &dyn fp8lm_collectives::Communicator| {
        if tps.is_empty() {
            bench_train_dist_table(&cfg, c, steps)
        } else {
            fp8lm_trainer::distributed::bench_train_grid_table(&cfg, c, tps, &precisions, steps)
        }
    };
    if fp8lm_collectives::launched_by_mpi() {
        let comm = fp8lm_collectives::init()?;
        let table = or_abort(comm.as_ref(), table(comm.as_ref()));
        if comm.rank() == 0 {
            print!("{table}");
        }
    } else {
        let tables = run_ranks(ranks, |c| table(c))?;
        print!("{}", tables[0]);
    }
    Ok(())
}
