//! The one error type of the crate: every failure names the rank and the operation.

/// A collective or point-to-point operation failed on `rank` while doing `op`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("rank {rank}: {op}: {msg}")]
pub struct CommError {
    pub rank: usize,
    pub op: String,
    pub msg: String,
}

impl CommError {
    pub fn new(rank: usize, op: impl Into<String>, msg: impl Into<String>) -> Self {
        CommError {
            rank,
            op: op.into(),
            msg: msg.into(),
        }
    }
}

pub type Result<T, E = CommError> = std::result::Result<T, E>;
