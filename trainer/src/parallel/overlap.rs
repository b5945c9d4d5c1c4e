//! Overlap of the gradient reduction with the backward: the backward on a scoped
//! thread hands each finished group of gradients over a channel to the thread that owns
//! the communicator; and `dist.overlap = "auto"`'s decision for this host.

use crate::config::Overlap;
use crate::model::{FinalGrads, Model};
use anyhow::{anyhow, Result};
use fp8lm_collectives::{panic_message, Communicator};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// MPI processes on this host: the launcher's local size (OpenMPI, MPICH), else
/// `default`.
pub fn mpi_local_ranks(default: usize) -> usize {
    ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(default)
}

/// The cores one of `local_ranks` processes on this host may use: its CPU affinity
/// (launchers often bind each rank to its cores) capped at its share of the host.
pub fn rank_cores(local_ranks: usize) -> usize {
    let affinity = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: sysconf has no preconditions.
    let host = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let host = if host > 0 { host as usize } else { affinity };
    affinity.min(host / local_ranks.max(1)).max(1)
}

/// `dist.overlap` for this communicator and host, logged by rank 0 when `auto` decides.
/// Each rank decides for itself (hosts may differ); that is safe because on and off make
/// the same communication calls in the same order on the same bytes.
pub(super) fn resolve_overlap(o: Overlap, comm: &dyn Communicator) -> bool {
    // In-process ranks share one process (and its thread pool): count it once.
    let local = if comm.backend() == "mpi" {
        mpi_local_ranks(comm.size())
    } else {
        1
    };
    let cores = rank_cores(local);
    let threads = rayon::current_num_threads();
    let on = o.resolve(comm.backend(), cores, threads);
    if o == Overlap::Auto && comm.rank() == 0 {
        tracing::info!(
            overlap = on,
            backend = comm.backend(),
            local_ranks = local,
            compute_threads = threads,
            rank_cores = cores,
            "dist.overlap = auto: {}",
            if on {
                "reductions overlap the backward"
            } else {
                "no core to spare for MPI's busy-waiting reductions: they run after the backward (set dist.overlap = \"on\" to force)"
            }
        );
    }
    on
}

/// Run the backward of `model` and call `handle` on each group of final gradients, in
/// the order the backward finishes them ([`Model::grad_groups`]). Returns when the
/// backward's compute ended, the time spent in `handle`, and the part of it after the
/// backward ended (what the step waited for).
///
/// With `overlap`, the backward runs on a scoped thread and hands each finished group
/// (disjoint `&mut` borrows of the gradient buffer and of the group's linears) over a
/// channel to this thread, which owns the communicator and runs `handle` while the
/// backward goes on. MPI calls stay on the thread that initialised MPI
/// (`MPI_THREAD_FUNNELED`), and the in-process communicator (not `Sync`) never leaves
/// its thread. Without overlap the same groups are handled in the same order after the
/// backward: the same calls on the same data, so the same bits.
///
/// A panic in the backward closes the channel (its sender is dropped while unwinding);
/// the loop ends, the join reports the panic, and this returns an error naming the
/// rank, so the job aborts as for any rank error. After `handle` fails, the remaining
/// groups are drained unhandled (the backward finishes on its own) and its error is
/// returned. `panic_after` is the test hook of [`Trainer::inject_backward_panic`].
///
/// On a tensor-parallel rank (`tp`: its group) the backward calls the group's
/// collectives itself, so it runs on this thread (the communicator's) and each group is
/// handled the moment it is handed out, between those collectives: no overlap thread.
/// A failed TP collective ends the backward and is returned (before `handle`'s error).
pub(super) fn run_backward(
    model: &mut Model,
    rank: usize,
    overlap: bool,
    panic_after: Option<usize>,
    tp: Option<&dyn Communicator>,
    handle: &mut dyn FnMut(FinalGrads<'_>) -> Result<()>,
) -> Result<(Instant, Duration, Duration)> {
    let mut spent = Duration::ZERO;
    let mut failed: Option<anyhow::Error> = None;
    let mut step = |g: FinalGrads<'_>| {
        if failed.is_none() {
            let tc = Instant::now();
            if let Err(e) = handle(g) {
                failed = Some(e);
            }
            spent += tc.elapsed();
        }
    };
    let mut done = 0usize;
    let mut fault = move |g: &FinalGrads<'_>| {
        if panic_after == Some(done) {
            panic!(
                "injected failure in the backward before group {:?}",
                g.group
            );
        }
        done += 1;
    };
    let overlap = overlap && tp.is_none();
    let backward_end = if let Some(tp) = tp {
        model
            .backward_tp(Some(tp), &mut |g| {
                fault(&g);
                step(g);
            })
            .map_err(super::comm_err)?;
        Instant::now()
    } else if overlap {
        let joined = std::thread::scope(|s| {
            let (tx, rx) = mpsc::channel();
            let h = s.spawn(move || {
                model.backward_with(&mut |g| {
                    fault(&g);
                    // The receiver drains the channel to the end, so a send cannot fail;
                    // if it did, the backward would still run to its end.
                    let _ = tx.send(g);
                });
                Instant::now()
            });
            for g in rx {
                step(g);
            }
            h.join()
        });
        joined.map_err(|p| {
            anyhow!(
                "rank {rank}: the backward pass panicked: {}",
                panic_message(&*p)
            )
        })?
    } else {
        let mut finished = Vec::new();
        model.backward_with(&mut |g| {
            fault(&g);
            finished.push(g);
        });
        let end = Instant::now();
        for g in finished {
            step(g);
        }
        end
    };
    if let Some(e) = failed {
        return Err(e);
    }
    // Overlapped: what remained to handle when the backward ended (bounded by the
    // handling's own time: the rest is channel and loop bookkeeping).
    let exposed = if overlap {
        backward_end.elapsed().min(spent)
    } else {
        spent
    };
    Ok((backward_end, spent, exposed))
}
