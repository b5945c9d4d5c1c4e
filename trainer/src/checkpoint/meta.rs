//! `checkpoint.json`: config, step, RNG state, data position, scaling state (amax
//! histories), free-form extra state, the size and CRC-32 of every tensor file, and (for
//! sharded optimizer state) the shard index. The JSON body is itself covered by a CRC-32
//! in the first line, so a flipped byte anywhere is caught.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

use crate::config::RunConfig;

pub const FORMAT: &str = "fp8lm-checkpoint-v1";
pub const META_FILE: &str = "checkpoint.json";

/// Size and CRC-32 of one file of a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileSum {
    pub bytes: u64,
    pub crc32: String,
}

/// Everything in `checkpoint.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format: String,
    /// Optimizer steps completed.
    pub step: u64,
    pub config: RunConfig,
    /// Trainer RNG state (dropout, sampling), restored verbatim.
    pub rng_state: u64,
    /// `Dataset::position()` after `step` steps.
    pub data_position: u64,
    /// FP8 scaling state (scales, amax histories, auto-scaling factors); trainer-defined.
    pub scaling: serde_json::Value,
    /// Any other state the trainer needs (e.g. loss history for the plot).
    pub extra: serde_json::Value,
    /// Tensor files and their checksums (shard files included).
    pub files: BTreeMap<String, FileSum>,
    /// The index of a sharded optimizer state (fp8-o3 under data parallelism: one file
    /// per rank, see [`super::shard`]); `None` when the state is in
    /// `optimizer.safetensors` (replicated precisions, and fp8-o3 checkpoints written
    /// before sharding, whose units are in `extra.zero_units`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer_shards: Option<ShardIndex>,
    /// The index of a tensor-parallel checkpoint (one model + optimizer shard file per
    /// tensor-parallel rank, see [`super::tp`]); `None` when the model is in
    /// `model.safetensors`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tp_shards: Option<super::tp::TpIndex>,
}

/// Which file holds which part of a sharded optimizer state, in `checkpoint.json`.
///
/// Ranks are identified by their coordinates in the process grid, `(dp, tp)`, as well
/// as their global rank: today `tp` is always 0 of 1 (data parallelism only). A
/// tensor-parallel model's slices are indexed by [`super::tp::TpIndex`]; fp8-o3 over
/// tensor-parallel replicas would list here one file per (dp, tp) rank, its units in
/// that shard's local element coordinates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardIndex {
    /// Ranks that wrote the checkpoint (`dp * tp`).
    pub world_size: usize,
    /// Data-parallel and tensor-parallel extents of the grid.
    pub dp: usize,
    pub tp: usize,
    /// `dist.zero_partition` the units were cut by (`row-blocks`, `whole-tensor`).
    pub partition: String,
    /// One entry per rank, in rank order.
    pub shards: Vec<ShardEntry>,
}

/// One rank's shard file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// File name inside the checkpoint directory (also listed in `files`).
    pub file: String,
    pub rank: usize,
    pub dp_rank: usize,
    pub tp_rank: usize,
    /// The units (tensors or row blocks) whose optimizer state the file holds: entries
    /// `<unit>.master`, `.exp_avg`, `.exp_avg_sq` (with their `.scale` where scaled),
    /// their `.amax` scalars and `<unit>.update_amax`; plus the optimizer's `step`.
    pub units: Vec<crate::repartition::UnitSpan>,
}

pub(crate) fn crc_hex(bytes: &[u8]) -> String {
    format!("{:08x}", crc32fast::hash(bytes))
}

/// Serialize the metadata with a CRC of its body in the first line. The file stays valid
/// JSON: `{"crc32": "...", "meta":` newline, body, newline `}`.
pub(crate) fn encode_meta(meta: &CheckpointMeta) -> Result<Vec<u8>> {
    let body = serde_json::to_string_pretty(meta)?;
    Ok(format!(
        "{{\"crc32\": \"{}\", \"meta\":\n{body}\n}}\n",
        crc_hex(body.as_bytes())
    )
    .into_bytes())
}

pub(crate) fn decode_meta(file: &Path, bytes: &[u8]) -> Result<CheckpointMeta> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| anyhow::anyhow!("{}: corrupted: not UTF-8", file.display()))?;
    let (head, rest) = text
        .split_once('\n')
        .with_context(|| format!("{}: truncated: no header line", file.display()))?;
    let want = head
        .strip_prefix("{\"crc32\": \"")
        .and_then(|h| h.strip_suffix("\", \"meta\":"))
        .with_context(|| format!("{}: corrupted: bad header line {head:?}", file.display()))?;
    let body = rest
        .strip_suffix("\n}\n")
        .with_context(|| format!("{}: truncated: missing the closing brace", file.display()))?;
    let got = crc_hex(body.as_bytes());
    if got != want {
        bail!(
            "{}: corrupted: checksum of the metadata is {got}, expected {want}",
            file.display()
        );
    }
    let meta: CheckpointMeta = serde_json::from_str(body)
        .with_context(|| format!("{}: metadata does not parse", file.display()))?;
    if meta.format != FORMAT {
        bail!(
            "{}: format {:?}, this build reads {FORMAT:?}",
            file.display(),
            meta.format
        );
    }
    Ok(meta)
}
