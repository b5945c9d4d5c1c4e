//! The file-system side of checkpoints: everything is written into a hidden temporary
//! directory, every file and the directory fsynced, the directory renamed to `step_N`
//! and the parent fsynced. A crash (even `kill -9`) at any point leaves either no
//! `step_N` or a complete one; earlier checkpoints are only pruned after the new one is
//! durable, and leftovers of interrupted saves (`.step_N.tmp-*`, `.step_N.old-*`) are
//! removed by the next save.

use anyhow::{bail, Context, Result};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::meta::META_FILE;

pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    // Directory fsync makes a rename durable; not all platforms allow opening a dir.
    if let Ok(d) = File::open(dir) {
        d.sync_all().ok();
    }
    Ok(())
}

/// Write a file atomically: `<path>.tmp-<pid>`, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file path", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mut f = File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("{}: write failed", tmp.display()))?;
    f.sync_all()
        .with_context(|| format!("{}: fsync failed", tmp.display()))?;
    drop(f);
    fs::rename(&tmp, path)
        .with_context(|| format!("{}: rename from {} failed", path.display(), tmp.display()))?;
    fsync_dir(dir)
}

/// Directory name of the checkpoint after `step` steps.
pub fn step_dir_name(step: u64) -> String {
    format!("step_{step:08}")
}

/// Complete checkpoints under `root`, oldest first: `(step, dir)`.
pub fn list_checkpoints(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    if !root.exists() {
        return Ok(out);
    }
    for e in fs::read_dir(root).with_context(|| format!("{}: cannot list", root.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(n) = name
            .strip_prefix("step_")
            .and_then(|n| n.parse::<u64>().ok())
        {
            if e.path().join(META_FILE).is_file() {
                out.push((n, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The temporary directory a save of step `step` writes into: `.step_N.tmp-<token>`
/// (the token is the writing process's id; for a sharded save, rank 0's, so every rank
/// writes into the same one).
pub fn tmp_dir(root: &Path, step: u64, token: u32) -> PathBuf {
    root.join(format!(".{}.tmp-{token}", step_dir_name(step)))
}

/// Create `root` and a fresh, empty `tmp` under it (a leftover of the same name is
/// removed first).
pub fn create_tmp_dir(root: &Path, tmp: &Path) -> Result<()> {
    fs::create_dir_all(root)
        .with_context(|| format!("{}: cannot create checkpoint folder", root.display()))?;
    if tmp.exists() {
        fs::remove_dir_all(tmp)
            .with_context(|| format!("{}: cannot remove a stale temporary", tmp.display()))?;
    }
    fs::create_dir_all(tmp).with_context(|| format!("{}: cannot create", tmp.display()))
}

/// Write `bytes` to `path` and fsync it (inside a temporary directory: no rename).
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("{}: cannot create", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("{}: write failed", path.display()))?;
    f.sync_all()
        .with_context(|| format!("{}: fsync failed", path.display()))
}

/// Make the complete temporary directory `tmp` the checkpoint `root/step_N` (replacing
/// an earlier save of the same step), durably, then keep the newest `keep` checkpoints
/// (0 keeps all). Returns the checkpoint directory.
pub fn commit(root: &Path, tmp: &Path, step: u64, keep: usize) -> Result<PathBuf> {
    fsync_dir(tmp)?;
    let name = step_dir_name(step);
    let final_dir = root.join(&name);
    // Re-saving a step (e.g. after a resume) replaces the old directory: move it aside
    // first, since rename cannot replace a non-empty directory.
    let old = root.join(format!(".{name}.old-{}", std::process::id()));
    if final_dir.exists() {
        fs::rename(&final_dir, &old)
            .with_context(|| format!("{}: cannot move aside", final_dir.display()))?;
    }
    fs::rename(tmp, &final_dir)
        .with_context(|| format!("{}: rename into place failed", final_dir.display()))?;
    fsync_dir(root)?;
    if old.exists() {
        fs::remove_dir_all(&old).ok();
    }
    prune(root, keep)?;
    Ok(final_dir)
}

fn prune(root: &Path, keep: usize) -> Result<()> {
    // Leftovers of interrupted saves are never loadable; drop them.
    for e in fs::read_dir(root)? {
        let e = e?;
        let n = e.file_name().to_string_lossy().to_string();
        if n.starts_with(".step_") && (n.contains(".tmp-") || n.contains(".old-")) {
            fs::remove_dir_all(e.path()).ok();
        }
    }
    if keep > 0 {
        let all = list_checkpoints(root)?;
        if all.len() > keep {
            for (_, dir) in &all[..all.len() - keep] {
                fs::remove_dir_all(dir)
                    .with_context(|| format!("{}: cannot remove old checkpoint", dir.display()))?;
            }
        }
    }
    Ok(())
}

/// Find the checkpoint directory `path` refers to (see [`Checkpoint::load`](super::Checkpoint::load)).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join(META_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    if !path.exists() {
        bail!("{}: no such checkpoint or run directory", path.display());
    }
    for root in [path.join("checkpoints"), path.to_path_buf()] {
        if let Some((_, dir)) = list_checkpoints(&root)?.pop() {
            return Ok(dir);
        }
    }
    bail!(
        "{}: no complete checkpoint found (looked for {META_FILE} in it, in step_* folders, and in checkpoints/step_*)",
        path.display()
    )
}
