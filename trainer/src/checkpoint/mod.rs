//! Checkpoints: safetensors tensor files plus one JSON metadata file, saved atomically.
//!
//! Layout of `<run_dir>/checkpoints/step_00000100/`:
//! - `<group>.safetensors` (e.g. `model`, `optimizer`): tensors with their real dtypes
//!   ([`format`](mod@format), written by streaming them from where they live, [`stream`]);
//! - for fp8-o3 under data parallelism, `optim.rank-RRRR-of-NNNN.safetensors` instead of
//!   `optimizer.safetensors`: each rank's own optimizer-state shard, written by that rank,
//!   with an index in `checkpoint.json` of which file holds which units ([`shard`]);
//! - for a tensor-parallel run, `tp.dp-0000-tp-TTTT-of-NNNN.safetensors` instead of
//!   `model.safetensors` and `optimizer.safetensors`: each shard's model and optimizer
//!   slices, written by that rank, with an index in `checkpoint.json` of the slice of
//!   each full tensor every file holds; resume re-shards them for any layout ([`tp`]);
//! - `checkpoint.json` ([`meta`]): config, step, RNG, data position, scaling state,
//!   extra state, the size and CRC-32 of every tensor file, the shard index.
//!
//! Why a directory renamed into place ([`fs`]): a save writes everything into a hidden
//! temporary directory, fsyncs every file and the directory, renames it to `step_N` and
//! fsyncs the parent. A crash (even `kill -9`) at any point leaves either no `step_N` or
//! a complete one; the previous checkpoints are only pruned after the new one is durable.

pub mod format;
pub mod fs;
pub mod lazy;
pub mod meta;
pub mod shard;
pub mod stream;
pub mod tp;
pub mod tp_reshard;

pub use format::{read_safetensors_file, CkptDtype, CkptTensor};
pub use fs::{list_checkpoints, resolve, step_dir_name, write_atomic};
pub use meta::{CheckpointMeta, FileSum, ShardEntry, ShardIndex, FORMAT, META_FILE};

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::RunConfig;
use format::parse_group;
use meta::{crc_hex, decode_meta, encode_meta};
use stream::{write_group, StreamTensor};

/// A checkpoint in memory: metadata plus tensor groups (one file per group).
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    pub groups: BTreeMap<String, Vec<CkptTensor>>,
    /// Directory it was loaded from (empty when built in memory).
    pub dir: PathBuf,
}

impl Checkpoint {
    pub fn new(meta: CheckpointMeta) -> Self {
        Checkpoint {
            meta,
            groups: BTreeMap::new(),
            dir: PathBuf::new(),
        }
    }

    /// Save under `root` as `step_N` (atomically; see module docs) and keep the newest
    /// `keep` checkpoints (0 keeps all). Returns the checkpoint directory.
    pub fn save(&self, root: &Path, keep: usize) -> Result<PathBuf> {
        self.save_with_hook(root, keep, &mut |_| Ok(()))
    }

    /// [`Checkpoint::save`] with a hook called after each file is written into the
    /// temporary directory (tests use it to simulate a crash mid-save).
    pub fn save_with_hook(
        &self,
        root: &Path,
        keep: usize,
        hook: &mut dyn FnMut(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        let groups: Vec<(String, Vec<StreamTensor<'_>>)> = self
            .groups
            .iter()
            .map(|(g, ts)| (g.clone(), ts.iter().map(StreamTensor::from_ckpt).collect()))
            .collect();
        save_streamed(&self.meta, &groups, root, keep, hook)
    }
}

/// Save a checkpoint whose tensors are written straight from where they live (see
/// [`stream`]): `groups` are (file stem, tensors). Atomic as [`Checkpoint::save`]
/// (temporary directory, fsync, rename, fsync); keeps the newest `keep`; `hook` runs
/// after each file is written (crash tests).
pub fn save_streamed(
    meta: &CheckpointMeta,
    groups: &[(String, Vec<StreamTensor<'_>>)],
    root: &Path,
    keep: usize,
    hook: &mut dyn FnMut(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let tmp = fs::tmp_dir(root, meta.step, std::process::id());
    fs::create_tmp_dir(root, &tmp)?;
    let mut meta = meta.clone();
    meta.format = FORMAT.into();
    meta.files.clear();
    let st_meta = safetensors_metadata(meta.step);
    for (group, tensors) in groups {
        let fname = format!("{group}.safetensors");
        let path = tmp.join(&fname);
        let (bytes, crc32) = write_group(&path, tensors, &st_meta)
            .with_context(|| format!("checkpoint group {group}"))?;
        meta.files.insert(fname, FileSum { bytes, crc32 });
        hook(&path)?;
    }
    let mpath = tmp.join(META_FILE);
    fs::write_synced(&mpath, &encode_meta(&meta)?)?;
    hook(&mpath)?;
    fs::commit(root, &tmp, meta.step, keep)
}

/// The `__metadata__` of every tensor file of a checkpoint of step `step`.
pub(crate) fn safetensors_metadata(step: u64) -> BTreeMap<String, String> {
    [
        ("format".to_string(), "pt".to_string()),
        ("fp8lm.format".to_string(), FORMAT.to_string()),
        ("fp8lm.step".to_string(), step.to_string()),
    ]
    .into()
}

impl Checkpoint {
    /// Load and verify a checkpoint (every file's size and CRC-32; the tensors of every
    /// group except a sharded optimizer state's, which stay on disk, see [`shard`]). `path` may be a checkpoint directory, a folder of
    /// checkpoints (the newest is taken) or a run directory (its `checkpoints/`).
    pub fn load(path: &Path) -> Result<Checkpoint> {
        Self::load_leaving(path, &[])
    }

    /// [`Checkpoint::load`], leaving the groups named in `leave` on disk: their files are
    /// verified by streaming (size and CRC-32, never held whole) and their tensors read
    /// one at a time, by range, when asked for ([`Checkpoint::model_tensor`],
    /// [`lazy`]). fp8-o3 ranks resume so: no rank holds the model group's f32 weights.
    pub fn load_leaving(path: &Path, leave: &[&str]) -> Result<Checkpoint> {
        let dir = resolve(path)?;
        let mpath = dir.join(META_FILE);
        let mbytes =
            std::fs::read(&mpath).with_context(|| format!("{}: cannot read", mpath.display()))?;
        let meta = decode_meta(&mpath, &mbytes)?;
        let mut groups = BTreeMap::new();
        for (fname, sum) in &meta.files {
            let p = dir.join(fname);
            // Optimizer shards are verified by streaming and read by range later, by
            // the ranks that own their units (`shard::read_units`): never held whole.
            if let Some(idx) = &meta.optimizer_shards {
                if let Some(e) = idx.shards.iter().find(|e| &e.file == fname) {
                    shard::verify_file(&p, sum, &shard::shard_owner(e, idx))?;
                    continue;
                }
            }
            // Tensor-parallel shards likewise: each rank reads only its slices (`tp`).
            if let Some(idx) = &meta.tp_shards {
                if let Some(e) = idx.shards.iter().find(|e| &e.file == fname) {
                    let who = format!(
                        "tensor-parallel shard of rank {} (dp {}, tp {} of {})",
                        e.rank, e.dp_rank, e.tp_rank, idx.tp
                    );
                    shard::verify_file(&p, sum, &who)?;
                    continue;
                }
            }
            if leave.contains(&fname.trim_end_matches(".safetensors")) {
                shard::verify_file(&p, sum, "left on disk")?;
                continue;
            }
            let bytes = std::fs::read(&p)
                .with_context(|| format!("{}: missing or unreadable", p.display()))?;
            if bytes.len() as u64 != sum.bytes {
                bail!(
                    "{}: {}: {} bytes, expected {} (per {META_FILE})",
                    p.display(),
                    if (bytes.len() as u64) < sum.bytes {
                        "truncated"
                    } else {
                        "wrong size"
                    },
                    bytes.len(),
                    sum.bytes
                );
            }
            let crc = crc_hex(&bytes);
            if crc != sum.crc32 {
                bail!(
                    "{}: corrupted: CRC-32 is {crc}, expected {} (per {META_FILE})",
                    p.display(),
                    sum.crc32
                );
            }
            let group = fname.trim_end_matches(".safetensors").to_string();
            groups.insert(group, parse_group(&p, &bytes)?);
        }
        Ok(Checkpoint { meta, groups, dir })
    }

    /// Refuse a checkpoint whose model shape differs from `cfg`'s, naming the keys.
    pub fn check_model_shape(&self, cfg: &RunConfig) -> Result<()> {
        let (a, b) = (&self.meta.config.model, &cfg.model);
        let mut diffs = Vec::new();
        let mut cmp = |k: &str, x: String, y: String| {
            if x != y {
                diffs.push(format!(
                    "model.{k} is {x} in the checkpoint but {y} in the config"
                ));
            }
        };
        cmp("arch", format!("{:?}", a.arch), format!("{:?}", b.arch));
        cmp("layers", a.layers.to_string(), b.layers.to_string());
        cmp("heads", a.heads.to_string(), b.heads.to_string());
        cmp("channels", a.channels.to_string(), b.channels.to_string());
        cmp("context", a.context.to_string(), b.context.to_string());
        cmp(
            "vocab",
            self.meta.config.vocab().to_string(),
            cfg.vocab().to_string(),
        );
        if !diffs.is_empty() {
            bail!(
                "{}: model shape mismatch: {}",
                self.dir.display(),
                diffs.join("; ")
            );
        }
        Ok(())
    }

    /// A tensor by group and name, checking its shape.
    pub fn tensor(&self, group: &str, name: &str, shape: &[usize]) -> Result<&CkptTensor> {
        let g = self.groups.get(group).with_context(|| {
            format!(
                "{}: no {group}.safetensors in checkpoint",
                self.dir.display()
            )
        })?;
        let t = g.iter().find(|t| t.name == name).with_context(|| {
            format!(
                "{}/{group}.safetensors: no tensor {name}",
                self.dir.display()
            )
        })?;
        if t.shape != shape {
            bail!(
                "{}/{group}.safetensors: tensor {name} has shape {:?} but the model expects {shape:?}",
                self.dir.display(),
                t.shape
            );
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;
    use std::fs;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("fp8lm-ckpt-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn sorted(mut ck: Checkpoint) -> BTreeMap<String, Vec<CkptTensor>> {
        for g in ck.groups.values_mut() {
            g.sort_by(|a, b| a.name.cmp(&b.name));
        }
        ck.groups
    }

    pub(crate) fn sample_checkpoint(step: u64) -> Checkpoint {
        let mut meta = CheckpointMeta {
            format: FORMAT.into(),
            step,
            config: RunConfig::default(),
            rng_state: 0xDEAD_BEEF_0123_4567 ^ step,
            data_position: 17 * step,
            scaling: serde_json::json!({"h.0.attn.w": {"scale": 0.5, "amax_history": [1.0, 2.5, 0.125]}}),
            extra: serde_json::json!({"losses": [5.5, 4.25]}),
            files: BTreeMap::new(),
            optimizer_shards: None,
            tp_shards: None,
        };
        meta.config.max_steps = 1000;
        let mut ck = Checkpoint::new(meta);
        let w: Vec<f32> = (0..24).map(|i| i as f32 * 0.25 - 3.0).collect();
        let bits: Vec<u8> = (0..12).map(|i| i * 9).collect();
        let h: Vec<f16> = (0..6).map(|i| f16::from_f32(i as f32 * 1.5)).collect();
        ck.groups.insert(
            "model".into(),
            vec![
                CkptTensor::f32("wte", &[4, 6], &w),
                CkptTensor::fp8("h.0.attn.w", CkptDtype::F8E4M3, &[3, 4], &bits, 0.5),
                CkptTensor::fp8("h.0.attn.grad", CkptDtype::F8E5M2, &[12], &bits, 1024.0),
            ],
        );
        ck.groups.insert(
            "optimizer".into(),
            vec![CkptTensor::f16("m.wte", &[2, 3], &h, Some(8.0))],
        );
        ck
    }

    #[test]
    fn save_load_round_trip_is_exact() {
        let d = tmpdir("rt");
        let ck = sample_checkpoint(100);
        let dir = ck.save(&d, 3).unwrap();
        assert_eq!(dir.file_name().unwrap(), "step_00000100");
        let back = Checkpoint::load(&d).unwrap();
        assert_eq!(back.meta.step, 100);
        assert_eq!(back.meta.rng_state, ck.meta.rng_state);
        assert_eq!(back.meta.scaling, ck.meta.scaling);
        assert_eq!(back.meta.config, ck.meta.config);
        assert_eq!(back.groups, sorted(ck.clone()));
        let w = back.tensor("model", "h.0.attn.w", &[3, 4]).unwrap();
        assert_eq!(w.scale, Some(0.5));
        // stored / scale: E4M3 bit 9*1 = 0x09 = 2^-6 * (1 + 1/8) -> 0.017578125 / 0.5.
        assert_eq!(
            w.to_f32().unwrap()[1],
            fp8lm_fp8::Fp8Format::E4M3.decode(9) * 2.0
        );
        let e = back
            .tensor("model", "wte", &[6, 4])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("wte") && e.contains("[4, 6]") && e.contains("[6, 4]"),
            "{e}"
        );
    }

    #[test]
    fn keeps_last_k_and_resolves_newest() {
        let d = tmpdir("keep");
        for s in [10, 20, 30, 40] {
            sample_checkpoint(s).save(&d, 2).unwrap();
        }
        let steps: Vec<u64> = list_checkpoints(&d).unwrap().iter().map(|c| c.0).collect();
        assert_eq!(steps, vec![30, 40]);
        assert_eq!(Checkpoint::load(&d).unwrap().meta.step, 40);
        assert_eq!(
            Checkpoint::load(&d.join("step_00000030"))
                .unwrap()
                .meta
                .step,
            30
        );
    }

    #[test]
    fn crash_mid_save_leaves_previous_checkpoint_loadable() {
        let d = tmpdir("crash");
        sample_checkpoint(10).save(&d, 2).unwrap();
        // Simulate a kill after the first tensor file of step 20 is on disk.
        let r = sample_checkpoint(20).save_with_hook(&d, 2, &mut |p: &Path| {
            if p.ends_with("model.safetensors") {
                bail!("simulated crash")
            }
            Ok(())
        });
        assert!(r.is_err());
        let leftovers: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            leftovers
                .iter()
                .any(|n| n.to_string_lossy().contains(".tmp-")),
            "{leftovers:?}"
        );
        let back = Checkpoint::load(&d).unwrap();
        assert_eq!(back.meta.step, 10);
        assert_eq!(back.groups, sorted(sample_checkpoint(10)));
        // The next successful save cleans the partial directory up.
        sample_checkpoint(30).save(&d, 2).unwrap();
        let names: Vec<String> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
    }

    #[test]
    fn truncated_and_corrupted_files_are_refused_by_name() {
        let d = tmpdir("corrupt");
        let dir = sample_checkpoint(5).save(&d, 0).unwrap();
        let model = dir.join("model.safetensors");
        let good = std::fs::read(&model).unwrap();

        fs::write(&model, &good[..good.len() - 7]).unwrap();
        let e = format!("{:#}", Checkpoint::load(&dir).unwrap_err());
        assert!(
            e.contains("model.safetensors") && e.contains("truncated"),
            "{e}"
        );

        let mut flipped = good.clone();
        let n = flipped.len();
        flipped[n - 3] ^= 0x10;
        fs::write(&model, &flipped).unwrap();
        let e = format!("{:#}", Checkpoint::load(&dir).unwrap_err());
        assert!(
            e.contains("model.safetensors") && e.contains("corrupted"),
            "{e}"
        );
        fs::write(&model, &good).unwrap();

        let meta = dir.join(META_FILE);
        let text = fs::read_to_string(&meta).unwrap();
        fs::write(&meta, text.replace("\"step\": 5", "\"step\": 6")).unwrap();
        let e = format!("{:#}", Checkpoint::load(&dir).unwrap_err());
        assert!(e.contains(META_FILE) && e.contains("checksum"), "{e}");
        fs::write(&meta, &text[..text.len() / 2]).unwrap();
        let e = format!("{:#}", Checkpoint::load(&dir).unwrap_err());
        assert!(e.contains(META_FILE) && e.contains("truncated"), "{e}");
        fs::write(&meta, &text).unwrap();
        assert!(Checkpoint::load(&dir).is_ok());
    }

    #[test]
    fn other_model_shape_is_refused_naming_the_mismatch() {
        let ck = sample_checkpoint(1);
        let mut cfg = ck.meta.config.clone();
        assert!(ck.check_model_shape(&cfg).is_ok());
        cfg.model.channels = 128;
        cfg.model.layers = 3;
        let e = ck.check_model_shape(&cfg).unwrap_err().to_string();
        assert!(
            e.contains("model.channels is 64 in the checkpoint but 128"),
            "{e}"
        );
        assert!(
            e.contains("model.layers is 2 in the checkpoint but 3"),
            "{e}"
        );
    }
}
