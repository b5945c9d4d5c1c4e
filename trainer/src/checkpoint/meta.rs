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
    /// Tensor files and their checksums.
    pub files: BTreeMap<String, FileSum>,
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
