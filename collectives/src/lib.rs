//! # fp8lm-collectives: moving tensors between ranks
//!
//! - [`Communicator`]: all-reduce (sum, max, min), reduce-scatter, all-gather, broadcast,
//!   barrier on typed buffers ([`BufMut`]: f32, bf16, f16, FP8 bytes), scalar all-reduces
//!   for amax/scale agreement and a u64 agreement check for config hashes.
//! - Backends: [`LocalComm`] (threads of one process, [`run_ranks`]) and, behind the
//!   cargo feature `mpi`, `MpiComm` (OpenMPI through the `mpi` crate). [`init`] picks MPI
//!   when the process was started by `mpirun`.
//! - [`grad`]: the FP8-LM gradient all-reduce (automatic scaling factor, shared minimum
//!   scale, FP8 sum, result scale `N * s_g`) and the variants it is compared with.
//!
//! Why reductions are written here rather than delegated to `MPI_Allreduce`: the FP8 sum
//! must re-round at every hop in a documented, deterministic order, and the in-process
//! backend must give bit-identical results. So every reduction is one ring algorithm over
//! point-to-point exchange ([`comm`]), shared by all backends; the per-hop arithmetic of
//! each element type is defined in [`buf`]. NCCL (not buildable here) would slot in as
//! another backend of the same trait.

pub mod buf;
pub mod comm;
pub mod error;
pub mod local;

pub use buf::{BufMut, Dtype, ReduceOp};
pub use comm::{chunk_range, Communicator};
pub use error::{CommError, Result};
pub use local::{run_ranks, LocalComm};
