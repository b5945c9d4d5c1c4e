//! The gradient all-reduce benchmark (`fp8lm bench allreduce` logic) as a standalone binary.
//!
//! ```text
//! # in-process ranks (threads), no MPI needed:
//! cargo run --release -p fp8lm-collectives --example allreduce_bench -- 67108864 3 2
//! # MPI (as root add --allow-run-as-root or the OMPI_ALLOW_RUN_AS_ROOT* variables):
//! cargo build --release -p fp8lm-collectives --features mpi --example allreduce_bench
//! mpirun -n 4 --oversubscribe target/release/examples/allreduce_bench 67108864 3
//! ```
//! Arguments: elements per rank (default 64M), repetitions (default 3), in-process ranks
//! when not started by mpirun (default 2).

use fp8lm_collectives::{bench, init, launched_by_mpi, or_abort, run_ranks};

fn arg(i: usize, default: usize) -> usize {
    match std::env::args().nth(i) {
        None => default,
        Some(s) => s.parse().unwrap_or_else(|_| {
            eprintln!("allreduce_bench: argument {i} must be a non-negative integer, got {s:?}");
            std::process::exit(2)
        }),
    }
}

fn main() {
    let elements = arg(1, 64 << 20);
    let reps = arg(2, 3);
    if launched_by_mpi() {
        let comm = init().unwrap_or_else(|e| {
            eprintln!("allreduce_bench: {e}");
            std::process::exit(2)
        });
        let rows = or_abort(&*comm, bench::allreduce(&*comm, elements, reps));
        if comm.rank() == 0 {
            print!(
                "{}",
                bench::format_rows(&rows, comm.size(), comm.backend(), elements)
            );
        }
    } else {
        let ranks = arg(3, 2).max(1);
        match run_ranks(ranks, |c| bench::allreduce(c, elements, reps)) {
            Ok(rows) => print!("{}", bench::format_rows(&rows[0], ranks, "local", elements)),
            Err(e) => {
                eprintln!("allreduce_bench: {e}");
                std::process::exit(1)
            }
        }
    }
}
