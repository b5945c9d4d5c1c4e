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
//! `data.path` that does not exist). Any error on any rank aborts the whole job
//! (`MPI_Abort`) with a message naming the rank and the cause.

use fp8lm_collectives::{or_abort, Communicator};
use fp8lm_trainer::config_file::load_config;
use fp8lm_trainer::distributed::{bench_train_dist, train_data_parallel};
use fp8lm_trainer::Precision;

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
    if fault_rank.as_deref() == Some(rank.to_string().as_str()) {
        if let Ok(s) = std::env::var("FP8LM_FAULT_SET") {
            sets.push(s);
        }
    }
    let cfg = or_abort(
        comm,
        load_config(None, &sets).map_err(|e| format!("rank {rank}: config: {e}")),
    );
    match mode.as_str() {
        "train" => {
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
            if rank == 0 {
                println!(
                    "bench train --dist: {} ranks ({} backend), {} layers x {} channels, B={} T={} per rank; \
                     figures are noisy on a shared machine",
                    comm.size(),
                    comm.backend(),
                    cfg.model.layers,
                    cfg.model.channels,
                    cfg.batch,
                    cfg.model.context
                );
                println!(
                    "{:<8} {:>10} {:>10} {:>7} {:>14} {:>12}",
                    "mode", "step ms", "comm ms", "comm %", "sent B/step", "state B"
                );
            }
            let mut base = None;
            for p in [Precision::Fp32, Precision::Fp8O3] {
                let mut c = cfg.clone();
                c.precision = p;
                let b = or_abort(comm, bench_train_dist(&c, comm, 2, steps));
                if rank == 0 {
                    let rel = base.map_or(1.0, |s: f64| b.step_s / s);
                    base.get_or_insert(b.step_s);
                    println!(
                        "{:<8} {:>10.2} {:>10.2} {:>6.1}% {:>14.0} {:>12}  ({rel:.2}x fp32 step time)",
                        p.name(),
                        b.step_s * 1e3,
                        b.comm_s * 1e3,
                        100.0 * b.comm_share(),
                        b.bytes_sent_per_step,
                        b.state_bytes
                    );
                }
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
