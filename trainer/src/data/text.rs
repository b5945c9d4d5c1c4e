//! UTF-8 text, tokenized when the run opens it (no preparation step).
//!
//! Files are memory-mapped. With the byte tokenizer the mapping *is* the token stream
//! (zero copy, any size). With GPT-2 BPE the text is encoded once at open time, in
//! line-aligned pieces of about 1 MiB on all cores; BPE never merges across the cut
//! because GPT-2's pre-tokenizer already splits at the newline it sits on (a run of
//! several blank lines may split into different but equally valid tokens).

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use rayon::prelude::*;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::tokenizer::Tokenizer;

/// Memory-map a file (empty files give an empty slice; mmap refuses length 0).
pub fn map_file(path: &Path) -> Result<Option<Mmap>> {
    let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let len = file
        .metadata()
        .with_context(|| format!("{}: cannot stat", path.display()))?
        .len();
    if len == 0 {
        return Ok(None);
    }
    // SAFETY: read-only mapping of a file we do not modify.
    let map = unsafe { Mmap::map(&file) }
        .with_context(|| format!("{}: cannot memory-map", path.display()))?;
    Ok(Some(map))
}

/// The regular, non-hidden files of a folder, sorted by name (a fixed order makes the
/// token stream, the split and the sample order reproducible).
pub fn list_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for e in
        std::fs::read_dir(dir).with_context(|| format!("{}: cannot list folder", dir.display()))?
    {
        let e = e?;
        let name = e.file_name();
        if name.to_string_lossy().starts_with('.') || !e.file_type()?.is_file() {
            continue;
        }
        files.push(e.path());
    }
    files.sort();
    if files.is_empty() {
        bail!("{}: folder has no files", dir.display());
    }
    Ok(files)
}

fn check_utf8<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a str> {
    std::str::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: not UTF-8 text: invalid byte at offset {}",
            path.display(),
            e.valid_up_to()
        )
    })
}

/// Encode one text with BPE in parallel, line-aligned pieces.
fn encode_parallel(tok: Tokenizer, text: &str) -> Vec<u32> {
    const PIECE: usize = 1 << 20;
    let mut cuts = vec![0];
    let bytes = text.as_bytes();
    let mut at = 0;
    while at + PIECE < bytes.len() {
        let probe = at + PIECE;
        match bytes[probe..].iter().position(|&b| b == b'\n') {
            Some(nl) => {
                at = probe + nl + 1;
                if at < bytes.len() {
                    cuts.push(at);
                }
            }
            None => break,
        }
    }
    cuts.push(bytes.len());
    let parts: Vec<Vec<u32>> = cuts
        .par_windows(2)
        .map(|w| tok.encode(&text[w[0]..w[1]]))
        .collect();
    parts.concat()
}

/// Tokenize a file, or a folder of files joined by the tokenizer's separator.
pub fn tokenize_path(path: &Path, tok: Tokenizer) -> Result<Vec<u32>> {
    let files = if path.is_dir() {
        list_files(path)?
    } else {
        vec![path.to_path_buf()]
    };
    let mut out = Vec::new();
    for (i, f) in files.iter().enumerate() {
        if i > 0 {
            out.push(tok.separator());
        }
        if let Some(map) = map_file(f)? {
            let text = check_utf8(f, &map)?;
            out.extend(encode_parallel(tok, text));
        }
    }
    Ok(out)
}

/// Check a byte-tokenized file is UTF-8 text (so it is not a mistaken binary).
pub fn map_text_bytes(path: &Path) -> Result<Option<Mmap>> {
    let map = map_file(path)?;
    if let Some(m) = &map {
        check_utf8(path, m)?;
    }
    Ok(map)
}
