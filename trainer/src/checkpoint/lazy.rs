//! Tensors of a group [`Checkpoint::load_leaving`] left on disk, read one at a time by
//! positioned reads (the file was verified when the checkpoint was loaded): fp8-o3
//! ranks read only the model tensors they keep in f32 (`parallel::zero_start`).

use super::shard::ShardFile;
use super::{Checkpoint, CkptTensor};
use anyhow::{bail, Result};
use std::borrow::Cow;

/// The group the lazy reads here are of.
const MODEL: &str = "model";

impl Checkpoint {
    /// The model group's tensor `name`, checked to have `shape`: the one in memory, or,
    /// when [`Checkpoint::load_leaving`] left the group on disk, read from its file.
    pub fn model_tensor(&self, name: &str, shape: &[usize]) -> Result<Cow<'_, CkptTensor>> {
        if self.groups.contains_key(MODEL) {
            return self.tensor(MODEL, name, shape).map(Cow::Borrowed);
        }
        let f = self.open_left(MODEL)?;
        let (dtype, numel) = self.entry(&f, name, shape)?;
        let (_, bytes) = f.bytes(name, 0, numel)?;
        Ok(Cow::Owned(CkptTensor {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
            bytes,
            scale: f.scale(name)?,
        }))
    }

    /// Check that the model group holds tensor `name` with `shape`, reading no data.
    pub fn check_model_tensor(&self, name: &str, shape: &[usize]) -> Result<()> {
        if self.groups.contains_key(MODEL) {
            return self.tensor(MODEL, name, shape).map(|_| ());
        }
        let f = self.open_left(MODEL)?;
        self.entry(&f, name, shape).map(|_| ())
    }

    /// Read group `group` into memory if [`Checkpoint::load_leaving`] left it on disk
    /// (its size and CRC-32 checked again); a no-op for a group held or absent.
    pub fn load_left(&mut self, group: &str) -> Result<()> {
        let fname = format!("{group}.safetensors");
        let Some(sum) = self.meta.files.get(&fname) else {
            return Ok(());
        };
        if self.groups.contains_key(group) || self.is_shard_file(&fname) {
            return Ok(());
        }
        let p = self.dir.join(&fname);
        let bytes = std::fs::read(&p)
            .map_err(|e| anyhow::anyhow!("{}: missing or unreadable ({e})", p.display()))?;
        let crc = super::meta::crc_hex(&bytes);
        if bytes.len() as u64 != sum.bytes || crc != sum.crc32 {
            bail!(
                "{}: changed since the checkpoint was loaded: {} bytes, CRC-32 {crc}; \
                 expected {} bytes, {} (per {})",
                p.display(),
                bytes.len(),
                sum.bytes,
                sum.crc32,
                super::META_FILE
            );
        }
        let tensors = super::format::parse_group(&p, &bytes)?;
        self.groups.insert(group.to_string(), tensors);
        Ok(())
    }

    /// Whether `fname` is an optimizer or tensor-parallel shard (read by range anyway).
    fn is_shard_file(&self, fname: &str) -> bool {
        let m = &self.meta;
        m.optimizer_shards
            .as_ref()
            .is_some_and(|i| i.shards.iter().any(|e| e.file == fname))
            || m.tp_shards
                .as_ref()
                .is_some_and(|i| i.shards.iter().any(|e| e.file == fname))
    }

    fn open_left(&self, group: &str) -> Result<ShardFile> {
        let fname = format!("{group}.safetensors");
        if !self.meta.files.contains_key(&fname) {
            bail!("{}: no {fname} in checkpoint", self.dir.display());
        }
        ShardFile::open(self.dir.join(&fname), format!("{group} group"))
    }

    /// `name`'s dtype and element count, refusing another shape.
    fn entry(
        &self,
        f: &ShardFile,
        name: &str,
        shape: &[usize],
    ) -> Result<(super::CkptDtype, usize)> {
        let (Some(stored), Some(&(dtype, numel, _, _))) = (f.shapes.get(name), f.tensors.get(name))
        else {
            bail!(
                "{}/{MODEL}.safetensors: no tensor {name}",
                self.dir.display()
            );
        };
        if stored != shape {
            bail!(
                "{}/{MODEL}.safetensors: tensor {name} has shape {stored:?} but the model \
                 expects {shape:?}",
                self.dir.display()
            );
        }
        Ok((dtype, numel))
    }
}
