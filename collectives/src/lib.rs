//! # fp8lm-collectives: moving tensors between ranks
//!
//! - [`Communicator`]: all-reduce (sum, max, min), reduce-scatter, all-gather, broadcast,
//!   barrier on typed buffers ([`BufMut`]: f32, bf16, f16, FP8 bytes), scalar all-reduces
//!   for amax/scale agreement and a u64 agreement check for config hashes.
//! - Backends: [`LocalComm`] (threads of one process, [`run_ranks`]) and, behind the
//!   cargo feature `mpi`, `MpiComm` (OpenMPI through the `mpi` crate). [`init`] picks MPI
//!   when the process was started by `mpirun`.
//! - [`watchdog`]: a communicator wrapper that ends a job whose peer stopped answering
//!   (`dist.timeout_s`), naming the peer and the collective.
//! - [`dp`]: config agreement across ranks (hash all-gather) and batch sharding.
//! - [`bench`](mod@bench): the `fp8lm bench allreduce` measurement (also `examples/allreduce_bench`).
//! - [`grid`]: the D x T process grid (tensor-parallel ranks innermost) and its
//!   sub-communicators ([`grid::GroupComm`], a view of any communicator);
//!   [`mappings`]: the four tensor-parallel region operators (f, f̄, g, ḡ), with g's
//!   all-gather in FP8 after a MAX agreement of the amax over the group.
//! - [`grad`]: the FP8-LM gradient all-reduce (automatic scaling factor, shared minimum
//!   scale, FP8 sum, result scale `N * s_g`) and the variants it is compared with.
//! - [`fp8sum`]: the FP8 sum hop (AVX-512 FP16 / AVX-512 / table kernels, bit-identical),
//!   with FP8-LM's re-quantisation and saturation/underflow counts fused in, so the
//!   FP8-LM all-reduce makes no pass over the data beyond the ring's own
//!   ([`comm::fp8_all_reduce_fused`]).
//!
//! Why reductions are written here rather than delegated to `MPI_Allreduce`: the FP8 sum
//! must re-round at every hop in a documented, deterministic order, and the in-process
//! backend must give bit-identical results. So every reduction is one ring algorithm over
//! point-to-point exchange ([`comm`]), shared by all backends; the per-hop arithmetic of
//! each element type is defined in [`buf`]. An FP8 sum declared to MPI as a user
//! operation is not associative, so its result would depend on the algorithm OpenMPI
//! picks; measured side by side (`examples/allreduce_bench` under `mpirun`), the ring and
//! the user operation took about the same time on one host, so the ring, which also
//! fixes the order, is what the library uses. NCCL (module `nccl`, feature `cuda`, never run:
//! no GPU here) works on device buffers beside the trait, not as a backend of it.
//!
//! Thread use: a communicator is used by one thread (the MPI backend initialises MPI
//! single-threaded); in-process ranks each own their [`LocalComm`].

pub mod bench;
pub mod buf;
pub mod comm;
pub mod count;
pub mod dp;
pub mod error;
pub mod fp8sum;
pub mod grad;
pub mod grid;
pub mod local;
pub mod lut;
pub mod mappings;
pub mod mpirun;
pub mod watchdog;

pub use buf::{BufMut, Dtype, ReduceOp};
pub use comm::{chunk_range, Communicator};
pub use count::{CollectiveBytes, CountingComm};
pub use dp::{agree_config, config_hash, shard_range};
pub use error::{CommError, Result};
pub use grad::{
    fixed_mu, next_mu, GradAllReduceConfig, GradAllReducer, GradMethod, GradReport, GradTally,
    SCALED_FP8_METHODS,
};
pub use local::{panic_message, run_ranks, LocalComm};
pub use watchdog::Watchdog;
#[cfg(feature = "mpi")]
pub mod mpi_comm;
#[cfg(feature = "cuda")]
pub mod nccl;
#[cfg(feature = "mpi")]
pub use mpi_comm::MpiComm;

/// True when this process was started by an MPI launcher (OpenMPI's `mpirun`, or a
/// PMI/PMIx launcher such as `srun`/`mpiexec.hydra`), judged by the environment.
pub fn launched_by_mpi() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

/// The communicator for this process: MPI's world when started by an MPI launcher, else
/// a single in-process rank (use [`run_ranks`] for several in-process ranks). Started by
/// `mpirun` but built without the `mpi` feature is an error, not a silent 1-rank run.
pub fn init() -> Result<Box<dyn Communicator>> {
    if launched_by_mpi() {
        #[cfg(feature = "mpi")]
        {
            return Ok(Box::new(MpiComm::init()?));
        }
        #[cfg(not(feature = "mpi"))]
        {
            return Err(CommError::new(
                0,
                "init",
                "started by an MPI launcher (OMPI_COMM_WORLD_SIZE/PMI_* set) but built \
                 without the `mpi` feature; rebuild with `--features mpi`",
            ));
        }
    }
    Ok(Box::new(LocalComm::group(1).pop().expect("one rank")))
}

/// Unwrap `r`, or tear the whole job down through `comm.abort` with a message naming this
/// rank and the cause (MPI: every rank exits non-zero promptly).
pub fn or_abort<T, E: std::fmt::Display>(
    comm: &dyn Communicator,
    r: std::result::Result<T, E>,
) -> T {
    match r {
        Ok(v) => v,
        Err(e) => comm.abort(&format!("error: {e}")),
    }
}
