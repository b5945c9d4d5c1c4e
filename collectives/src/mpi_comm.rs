//! MPI backend (cargo feature `mpi`): OpenMPI through the `mpi` crate (rsmpi 0.8).
//!
//! Only three MPI calls carry data: `MPI_Sendrecv` (the ring steps of every reduction, so
//! results are bit-identical to the in-process backend), `MPI_Bcast` and `MPI_Barrier`.
//!
//! Failure policy: abort the job. A rank that panics (hook installed by [`MpiComm::init`])
//! or hits an error passed to [`Communicator::abort`] prints `rank R: <cause>` to stderr and
//! calls `MPI_Abort(MPI_COMM_WORLD, 1)`, which makes `mpirun` kill every rank and exit
//! non-zero within a second or so, instead of leaving the peers blocked forever in a
//! collective the failed rank will never join.

use crate::comm::Communicator;
use crate::error::{CommError, Result};
use mpi::point_to_point as p2p;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator as _, CommunicatorCollectives as _, Equivalence as _, Root as _};
use std::cell::Cell;

/// One rank of `MPI_COMM_WORLD`. Create it once per process, on the main thread.
pub struct MpiComm {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    sent: Cell<u64>,
    // Dropped last: finalises MPI.
    _universe: mpi::environment::Universe,
}

impl MpiComm {
    /// Initialise MPI and install the abort-on-panic hook. Requests
    /// `MPI_THREAD_FUNNELED`: the process has other threads (rayon's pool, the trainer's
    /// overlapped backward) but only the thread that called this makes MPI calls.
    pub fn init() -> Result<MpiComm> {
        let universe = mpi::initialize_with_threading(mpi::Threading::Funneled).map(|(u, _)| u);
        let universe = universe.ok_or_else(|| {
            CommError::new(0, "mpi init", "MPI was already initialised in this process")
        })?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            prev(info);
            eprintln!("fp8lm: rank {rank}: panicked: {info}; aborting all {size} ranks");
            SimpleCommunicator::world().abort(1);
        }));
        Ok(MpiComm {
            world,
            rank,
            size,
            sent: Cell::new(0),
            _universe: universe,
        })
    }

    fn process(&self, op: &str, r: usize) -> Result<mpi::topology::Process<'_>> {
        if r >= self.size {
            return Err(CommError::new(
                self.rank,
                op,
                format!("peer rank {r} out of range for {} ranks", self.size),
            ));
        }
        Ok(self.world.process_at_rank(r as i32))
    }

    fn check_count(&self, op: &str, n: usize) -> Result<()> {
        if n > i32::MAX as usize {
            return Err(CommError::new(
                self.rank,
                op,
                format!("message of {n} bytes exceeds MPI's 2^31-1 element count"),
            ));
        }
        Ok(())
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn backend(&self) -> &'static str {
        "mpi"
    }

    fn sendrecv_bytes(
        &self,
        op: &str,
        to: usize,
        send: &[u8],
        from: usize,
        recv: &mut [u8],
    ) -> Result<()> {
        self.check_count(op, send.len().max(recv.len()))?;
        let (dst, src) = (self.process(op, to)?, self.process(op, from)?);
        // A longer incoming message is MPI_ERR_TRUNCATE, fatal under the default error
        // handler (the job aborts with MPI's message); a shorter one is caught here.
        let status = p2p::send_receive_into_with_tags(send, &dst, 0, recv, &src, 0);
        let got = status.count(u8::equivalent_datatype()) as usize;
        if got != recv.len() {
            return Err(CommError::new(
                self.rank,
                op,
                format!(
                    "received {got} bytes from rank {from}, expected {} (buffers of different \
                     lengths on different ranks?)",
                    recv.len()
                ),
            ));
        }
        self.sent.set(self.sent.get() + send.len() as u64);
        Ok(())
    }

    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        self.check_count("broadcast", buf.len())?;
        self.process("broadcast", root)?.broadcast_into(buf);
        if self.rank == root {
            // What a binomial tree sends from the root is implementation-defined; count
            // the payload once per peer as an upper bound.
            self.sent
                .set(self.sent.get() + (buf.len() * (self.size - 1)) as u64);
        }
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }

    fn bytes_sent(&self) -> u64 {
        self.sent.get()
    }

    fn abort(&self, reason: &str) -> ! {
        eprintln!(
            "fp8lm: rank {}: {reason}; aborting all {} ranks",
            self.rank, self.size
        );
        self.world.abort(1)
    }
}

/// Baselines for the benchmark only, not used by the library: MPI's own all-reduce, with
/// MPI choosing the algorithm and the reduction order. The FP8 sum with per-hop
/// re-rounding is not associative, so declaring it an MPI operation gives results that
/// depend on MPI's internal choices; this is why the library uses its ring instead.
impl MpiComm {
    /// `MPI_Allreduce(MPI_SUM)` on f32.
    pub fn native_all_reduce_f32_sum(&self, send: &[f32], recv: &mut [f32]) {
        self.world
            .all_reduce_into(send, recv, mpi::collective::SystemOperation::sum());
    }

    /// `MPI_Allreduce` on FP8 bytes with the per-hop FP8 sum as a user operation.
    pub fn user_op_fp8_sum(&self, send: &[u8], recv: &mut [u8], fmt: fp8lm_fp8::Fp8Format) {
        let op = mpi::collective::UserOperation::commutative(move |x, y| {
            let x: &[u8] = x.downcast().expect("fp8 user op on u8 buffers");
            let y: &mut [u8] = y.downcast().expect("fp8 user op on u8 buffers");
            crate::buf::combine_fp8(fmt, crate::ReduceOp::Sum, y, x);
        });
        self.world.all_reduce_into(send, recv, &op);
    }
}
