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
//! when not started by mpirun (default 2). Under MPI it also times MPI's own all-reduce
//! (f32 sum, and the FP8 sum as a user operation) as baselines for the ring.

use fp8lm_collectives::{bench, launched_by_mpi, run_ranks};

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
        #[cfg(feature = "mpi")]
        mpi_main(elements, reps);
        #[cfg(not(feature = "mpi"))]
        {
            let e = fp8lm_collectives::init()
                .err()
                .expect("init fails without `mpi`");
            eprintln!("allreduce_bench: {e}");
            std::process::exit(2)
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

#[cfg(feature = "mpi")]
fn mpi_main(elements: usize, reps: usize) {
    use fp8lm_collectives::{or_abort, Communicator, MpiComm, ReduceOp};
    use fp8lm_fp8::Fp8Format;
    let world = MpiComm::init().unwrap_or_else(|e| {
        eprintln!("allreduce_bench: {e}");
        std::process::exit(2)
    });
    let comm: &dyn Communicator = &world;
    let rows = or_abort(comm, bench::allreduce(comm, elements, reps));
    if comm.rank() == 0 {
        print!(
            "{}",
            bench::format_rows(&rows, comm.size(), comm.backend(), elements)
        );
    }
    // MPI's own all-reduce next to the ring: the measurement behind using the ring.
    let g = bench::bench_gradient(comm.rank(), elements);
    let g8: Vec<u8> = g
        .iter()
        .map(|&x| Fp8Format::E5M2.encode(x * 1e7, true))
        .collect();
    let time = |f: &mut dyn FnMut()| {
        let mut best = f64::INFINITY;
        for _ in 0..reps.max(1) {
            or_abort(comm, comm.barrier());
            let t = std::time::Instant::now();
            f();
            let dt = t.elapsed().as_secs_f32();
            best = best.min(or_abort(comm, comm.all_reduce_scalar(dt, ReduceOp::Max)) as f64);
        }
        best
    };
    let mut out = vec![0f32; elements];
    let t_f32 = time(&mut || world.native_all_reduce_f32_sum(&g, &mut out));
    drop(out);
    let mut out8 = vec![0u8; elements];
    let t_u8 = time(&mut || world.user_op_fp8_sum(&g8, &mut out8, Fp8Format::E5M2));
    if comm.rank() == 0 {
        let ring = rows[0].seconds;
        println!(
            "MPI_Allreduce f32 sum (native)  {:>9.1} ms  {:.3}x of ring f32",
            t_f32 * 1e3,
            t_f32 / ring
        );
        println!(
            "MPI_Allreduce FP8 user-op sum   {:>9.1} ms  {:.3}x of ring f32",
            t_u8 * 1e3,
            t_u8 / ring
        );
    }
}
