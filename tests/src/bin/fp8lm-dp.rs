//! `fp8lm-dp`: data-parallel training under `mpirun` (feature `mpi`), for the MPI
//! integration tests (tests/mpi_dp.rs) and the distributed training bench, until the
//! `fp8lm train` run loop calls the same `fp8lm_trainer::distributed` functions.
//!
//! ```text
//! mpirun -n 2 fp8lm-dp train --steps 4 [--set KEY=VALUE]...
//!     rank 0 prints `step S loss L bits XXXXXXXX` per step (L: the global mean loss)
//! mpirun -n 2 fp8lm-dp bench --steps 5 [--set KEY=VALUE]...
//!     fp32 vs fp8-o3: step time, share of it in communication, bytes sent, state bytes
//! ```
//!
//! Fault injection for the failure test: with `FP8LM_FAULT_RANK=R` and
//! `FP8LM_FAULT_SET=KEY=VALUE`, rank R alone applies that extra override (e.g. a
//! `data.path` that does not exist). With `FP8LM_FAULT_RANK=R` and
//! `FP8LM_FAULT_BACKWARD=K`, rank R's backward pass panics from the second step on, after
//! handing out K gradient groups (mid-backward, with the reduction of earlier groups
//! overlapped). Any error on any rank aborts the whole job (`MPI_Abort`) with a message
//! naming the rank and the cause.

use fp8lm_collectives::{or_abort, Communicator};
use fp8lm_trainer::config_file::load_config;
use fp8lm_trainer::distributed::{bench_train_dist_table, train_data_parallel};

fn usage() -> ! {
    eprintln!("usage: fp8lm-dp train|bench [--steps N] [--set KEY=VALUE]...");
    std::process::exit(2)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| usage());
    let (mut steps, mut sets) = (4usize, Vec::new());
    while let Some(a) = args.next() {
        match a.as_str() {
            "--steps" => {
                steps = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            "--set" => sets.push(args.next().unwrap_or_else(|| usage())),
            _ => usage(),
        }
    }
    let comm = or_abort_init();
    let comm: &dyn Communicator = comm.as_ref();
    let rank = comm.rank();
    let fault_rank = std::env::var("FP8LM_FAULT_RANK").ok();
    let mut fault_backward = None;
    if fault_rank.as_deref() == Some(rank.to_string().as_str()) {
        if let Ok(s) = std::env::var("FP8LM_FAULT_SET") {
            sets.push(s);
        }
        if let Ok(k) = std::env::var("FP8LM_FAULT_BACKWARD") {
            let k: usize = k.parse().unwrap_or_else(|_| usage());
            fault_backward = Some(k);
        }
    }
    let cfg = or_abort(
        comm,
        load_config(None, &sets).map_err(|e| format!("rank {rank}: config: {e}")),
    );
    match mode.as_str() {
        "train" => {
            if let Some(k) = fault_backward {
                or_abort(comm, train_with_backward_fault(&cfg, comm, steps, k));
            }
            or_abort(
                comm,
                train_data_parallel(&cfg, comm, steps, |tr, st| {
                    if tr.is_root() {
                        println!(
                            "step {} loss {:.7} bits {:08x}",
                            st.step,
                            st.loss,
                            st.loss.to_bits()
                        );
                    }
                }),
            );
            println!("rank {rank} done");
        }
        "bench" => {
            let table = or_abort(comm, bench_train_dist_table(&cfg, comm, steps));
            if rank == 0 {
                print!("{table}");
            }
        }
        _ => usage(),
    }
}

fn or_abort_init() -> Box<dyn Communicator> {
    match fp8lm_collectives::init() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fp8lm-dp: {e}");
            std::process::exit(1)
        }
    }
}

/// Like `train_data_parallel`, with this rank's backward panicking from the second step
/// on after `k` gradient groups. Never returns `Ok` (the panic aborts the job).
fn train_with_backward_fault(
    cfg: &fp8lm_trainer::RunConfig,
    comm: &dyn Communicator,
    steps: usize,
    k: usize,
) -> Result<(), String> {
    let rank = comm.rank();
    let mut data =
        fp8lm_trainer::data::open_dataset(cfg).map_err(|x| format!("rank {rank}: {x:#}"))?;
    let mut tr = fp8lm_trainer::Trainer::new(cfg, data.vocab_size())
        .map_err(|x| format!("rank {rank}: {x:#}"))?;
    tr.enable_data_parallel(comm)
        .map_err(|x| format!("rank {rank}: {x:#}"))?;
    for s in 0..steps {
        if s == 1 {
            tr.inject_backward_panic(Some(k));
        }
        tr.train_step_dist(data.as_mut(), comm)
            .map_err(|x| format!("rank {rank}: {x:#}"))?;
    }
    Err(format!(
        "rank {rank}: the injected backward failure did not happen"
    ))
}
