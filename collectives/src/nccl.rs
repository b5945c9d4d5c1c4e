//! NCCL collectives for the CUDA backend (feature `cuda`): communicators built over any
//! [`Communicator`] (MPI or in-process ranks) by broadcasting NCCL's 128-byte unique id,
//! data- and tensor-parallel sub-communicators, and the FP8-LM gradient all-reduce with
//! NCCL's native FP8 types.
//!
//! **Nothing here has run**: no machine of this project has a GPU. What is tested
//! without one: the grouping of ranks ([`crate::grid::Grid`]: which ranks form each DP and
//! TP group; [`NcclComm::groups`]: who creates each group's id), and that the FP8 newtypes map to NCCL's FP8 data types.
//!
//! ## The FP8-LM all-reduce on NCCL ([`NcclComm::fp8lm_all_reduce`])
//! As the CPU [`crate::GradAllReducer`]: (1) the shared scale is the minimum over ranks
//! of `mu * s_g`, an all-reduce(min) of a one-element device buffer (no host sync);
//! (2) each rank re-encodes its FP8 gradient to that scale (kernel `fp8_rescale`, the
//! same mapping as the CPU's `requant_table`); (3) an all-reduce(sum) in
//! `ncclFloat8e5m2`/`ncclFloat8e4m3`, which re-rounds to FP8 at every hop as the CPU
//! ring does; (4) the result's scale is `N * shared` (real = stored / scale). Differences
//! from the CPU path, stated plainly: NCCL picks its own algorithm (ring or tree) and
//! chunking, so the order of the per-hop roundings, hence the bits, may differ from the
//! CPU ring; NCCL's FP8 rounding/saturation inside a hop is NCCL's (not checked by us);
//! the automatic scaling factor `mu` is the caller's (the CPU version adapts it from
//! overflow counts it gathers in the same pass); FP8 reductions need sm_90 or newer and
//! NCCL >= 2.24. NaN or non-positive scales are not filtered: NCCL's min over a NaN is
//! unspecified, so callers check the reduced scale (as the optimizer's skip check does).

use crate::{CommError, Communicator, Result};
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use cudarc::nccl::{sys, Comm, Id, NcclType, ReduceOp};
use fp8lm_kernels::cuda::libs::{self, CudaLib};
use std::sync::Arc;

/// One E4M3 code as NCCL's `ncclFloat8e4m3` (a byte on the device).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct E4m3Byte(pub u8);
/// One E5M2 code as NCCL's `ncclFloat8e5m2`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct E5m2Byte(pub u8);

// SAFETY: repr(transparent) over u8: same layout as the device byte; all-zero bits is
// the code of +0.
unsafe impl DeviceRepr for E4m3Byte {}
unsafe impl ValidAsZeroBits for E4m3Byte {}
unsafe impl DeviceRepr for E5m2Byte {}
unsafe impl ValidAsZeroBits for E5m2Byte {}

impl NcclType for E4m3Byte {
    fn as_nccl_type() -> sys::ncclDataType_t {
        sys::ncclDataType_t::ncclFloat8e4m3
    }
}
impl NcclType for E5m2Byte {
    fn as_nccl_type() -> sys::ncclDataType_t {
        sys::ncclDataType_t::ncclFloat8e5m2
    }
}

fn nccl_err(rank: usize, op: &str, e: impl std::fmt::Debug) -> CommError {
    CommError::new(rank, op, format!("{e:?}"))
}

/// An NCCL communicator (one per rank and group) on a stream.
pub struct NcclComm {
    comm: Comm,
    rank: usize,
    size: usize,
}

impl NcclComm {
    /// NCCL's version (e.g. 22703 for 2.27.3), after checking the library is present.
    pub fn version() -> std::result::Result<i32, String> {
        libs::require(CudaLib::Nccl).map_err(|e| e.to_string())?;
        cudarc::nccl::result::get_nccl_version().map_err(|e| format!("ncclGetVersion: {e:?}"))
    }

    /// Every rank of `host` (MPI or in-process) calls this with its GPU stream: rank 0
    /// creates the unique id and broadcasts it through `host`.
    pub fn world(host: &dyn Communicator, stream: Arc<CudaStream>) -> Result<NcclComm> {
        let all: Vec<usize> = (0..host.size()).collect();
        Self::groups(host, stream, &[all])?
            .pop()
            .ok_or_else(|| CommError::new(host.rank(), "nccl init", "no group"))
    }

    /// Build one communicator per group in `groups` (disjoint lists of world ranks that
    /// together cover every rank; e.g. [`crate::grid::Grid::dp_members`] of each TP position). Each group's
    /// first rank creates its id; every rank takes part in every id's broadcast (in group
    /// order, so all ranks agree), then joins its own group. Returns this rank's
    /// communicator(s) (one per group it belongs to).
    pub fn groups(
        host: &dyn Communicator,
        stream: Arc<CudaStream>,
        groups: &[Vec<usize>],
    ) -> Result<Vec<NcclComm>> {
        let me = host.rank();
        libs::require(CudaLib::Nccl).map_err(|e| CommError::new(me, "nccl init", e.to_string()))?;
        let mut mine = Vec::new();
        for g in groups {
            let leader = *g
                .first()
                .ok_or_else(|| CommError::new(me, "nccl init", "empty group"))?;
            let mut bytes = [0u8; 128];
            if me == leader {
                let id = Id::new().map_err(|e| nccl_err(me, "ncclGetUniqueId", e))?;
                for (b, c) in bytes.iter_mut().zip(id.internal()) {
                    *b = *c as u8;
                }
            }
            host.broadcast_bytes(&mut bytes, leader)?;
            if let Some(pos) = g.iter().position(|&r| r == me) {
                let mut internal = [0 as std::ffi::c_char; 128];
                for (c, b) in internal.iter_mut().zip(bytes) {
                    *c = b as std::ffi::c_char;
                }
                let comm = Comm::from_rank(stream.clone(), pos, g.len(), Id::uninit(internal))
                    .map_err(|e| nccl_err(me, "ncclCommInitRank", e))?;
                mine.push(NcclComm {
                    comm,
                    rank: pos,
                    size: g.len(),
                });
            }
        }
        Ok(mine)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn size(&self) -> usize {
        self.size
    }

    /// In-place sum of FP8 codes in NCCL's native E5M2 type (per-hop FP8 rounding).
    pub fn all_reduce_sum_e5m2(&self, buf: &mut CudaSlice<E5m2Byte>) -> Result<()> {
        self.comm
            .all_reduce_in_place(buf, &ReduceOp::Sum)
            .map_err(|e| nccl_err(self.rank, "all_reduce e5m2", e))?;
        Ok(())
    }
    /// In-place sum of FP8 codes in NCCL's native E4M3 type.
    pub fn all_reduce_sum_e4m3(&self, buf: &mut CudaSlice<E4m3Byte>) -> Result<()> {
        self.comm
            .all_reduce_in_place(buf, &ReduceOp::Sum)
            .map_err(|e| nccl_err(self.rank, "all_reduce e4m3", e))?;
        Ok(())
    }
    /// In-place all-reduce of f32 (sum for unscaled gradients, max for amaxes, min for the
    /// shared scale), e.g. a one-element device scalar: no host synchronisation.
    pub fn all_reduce_f32(&self, buf: &mut CudaSlice<f32>, op: ReduceOp) -> Result<()> {
        self.comm
            .all_reduce_in_place(buf, &op)
            .map_err(|e| nccl_err(self.rank, "all_reduce f32", e))?;
        Ok(())
    }
    /// `recv[size * n] = concat over ranks of send[n]` (ZeRO parameter gather, TP/SP
    /// gathers of FP8 activations: any NCCL type, FP8 bytes included).
    pub fn all_gather<T: NcclType + DeviceRepr>(
        &self,
        send: &CudaSlice<T>,
        recv: &mut CudaSlice<T>,
    ) -> Result<()> {
        if recv.len() != send.len() * self.size {
            return Err(CommError::new(
                self.rank,
                "all_gather",
                format!(
                    "recv has {} elements, need {} x {}",
                    recv.len(),
                    self.size,
                    send.len()
                ),
            ));
        }
        self.comm
            .all_gather(send, recv)
            .map_err(|e| nccl_err(self.rank, "all_gather", e))?;
        Ok(())
    }
    /// `recv[n] = sum over ranks of send[rank * n .. (rank + 1) * n]` (ZeRO gradient
    /// sharding, SP reduce-scatter).
    pub fn reduce_scatter<T: NcclType + DeviceRepr>(
        &self,
        send: &CudaSlice<T>,
        recv: &mut CudaSlice<T>,
    ) -> Result<()> {
        if send.len() != recv.len() * self.size {
            return Err(CommError::new(
                self.rank,
                "reduce_scatter",
                format!(
                    "send has {} elements, need {} x {}",
                    send.len(),
                    self.size,
                    recv.len()
                ),
            ));
        }
        self.comm
            .reduce_scatter(send, recv, &ReduceOp::Sum)
            .map_err(|e| nccl_err(self.rank, "reduce_scatter", e))?;
        Ok(())
    }

    /// The FP8-LM gradient all-reduce of one E5M2 gradient (see the module docs).
    /// `grad` holds the codes, `own_scale` its scale (`real = stored / scale`); on return
    /// `grad` holds the FP8 sum and `own_scale` its scale `N * min_r(mu * s_r)`. `be` runs
    /// the rescale kernel on the backend's compute stream; call
    /// [`fp8lm_kernels::cuda::CudaBackend::compute_to_comm`] before if this
    /// communicator's stream is the comm stream.
    pub fn fp8lm_all_reduce(
        &self,
        be: &fp8lm_kernels::cuda::CudaBackend,
        grad: &mut CudaSlice<E5m2Byte>,
        own_scale: &mut CudaSlice<f32>,
        mu: f32,
    ) -> Result<()> {
        let err = |op: &str, e: fp8lm_kernels::cuda::CudaError| {
            CommError::new(self.rank, op, e.to_string())
        };
        let s = &be.compute;
        // shared = min over ranks of mu * s_r, on the device.
        let mut shared = s
            .alloc_zeros::<f32>(1)
            .map_err(|e| nccl_err(self.rank, "alloc", e))?;
        be.scale_copy(own_scale, &mut shared, mu)
            .map_err(|e| err("scale", e))?;
        be.compute_to_comm().map_err(|e| err("event", e))?;
        self.all_reduce_f32(&mut shared, ReduceOp::Min)?;
        be.comm_to_compute().map_err(|e| err("event", e))?;
        // Re-encode to the shared scale, sum in FP8, scale the result by N.
        be.fp8_rescale_bytes(grad, fp8lm_fp8::Fp8Format::E5M2, own_scale, &shared)
            .map_err(|e| err("fp8_rescale", e))?;
        be.compute_to_comm().map_err(|e| err("event", e))?;
        self.all_reduce_sum_e5m2(grad)?;
        be.comm_to_compute().map_err(|e| err("event", e))?;
        be.scale_copy(&shared, own_scale, self.size as f32)
            .map_err(|e| err("scale", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_newtypes_are_nccls_fp8_types() {
        assert_eq!(
            E4m3Byte::as_nccl_type(),
            sys::ncclDataType_t::ncclFloat8e4m3
        );
        assert_eq!(
            E5m2Byte::as_nccl_type(),
            sys::ncclDataType_t::ncclFloat8e5m2
        );
        assert_eq!(sys::ncclDataType_t::ncclFloat8e4m3 as u32, 10);
        assert_eq!(sys::ncclDataType_t::ncclFloat8e5m2 as u32, 11);
        assert_eq!(std::mem::size_of::<E5m2Byte>(), 1);
    }

    /// Without NCCL (this machine), asking for it is an error naming the library, not a
    /// panic inside cudarc; with NCCL, the version is a 2.x release with FP8 (>= 2.24).
    #[test]
    fn nccl_presence_is_reported_not_panicked() {
        match NcclComm::version() {
            Err(e) => {
                assert!(!libs::is_present(CudaLib::Nccl));
                // Not installed ("... comes with `pip install nvidia-nccl-cu13`"), or
                // installed under a name cudarc does not try (says how to fix it).
                assert!(
                    e.contains("NCCL") && (e.contains("nvidia-nccl") || e.contains("libnccl.so")),
                    "{e}"
                );
            }
            Ok(v) => assert!(v >= 22400, "NCCL {v}: FP8 all-reduce needs >= 2.24"),
        }
    }
}
