//! llm.c token shards: a 256 x int32 little-endian header (magic 20240520, version 1,
//! token count, zeros), then the tokens as little-endian uint16. Shards prepared for
//! llm.c (e.g. its FineWeb / TinyShakespeare scripts) load unchanged, and `fp8lm tokenize`
//! writes files llm.c can read.

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::tokenizer::Tokenizer;

pub const MAGIC: i32 = 20240520;
pub const VERSION: i32 = 1;
pub const HEADER_BYTES: usize = 256 * 4;

/// A memory-mapped shard; tokens are read in place.
pub struct Shard {
    pub path: PathBuf,
    map: Mmap,
    len: usize,
}

impl Shard {
    /// Map a shard and check its header and size against each other.
    pub fn open(path: &Path) -> Result<Shard> {
        let file =
            File::open(path).with_context(|| format!("{}: cannot open shard", path.display()))?;
        // SAFETY: the file is only read; a concurrent writer truncating it is the one case
        // mmap cannot protect against, and shards are written once by atomic rename.
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("{}: cannot memory-map shard", path.display()))?;
        if map.len() < HEADER_BYTES {
            bail!(
                "{}: truncated llm.c shard: {} bytes, shorter than the {HEADER_BYTES}-byte header",
                path.display(),
                map.len()
            );
        }
        let word = |i: usize| i32::from_le_bytes(map[i * 4..i * 4 + 4].try_into().unwrap());
        if word(0) != MAGIC {
            bail!(
                "{}: not an llm.c token shard: magic is {} (expected {MAGIC})",
                path.display(),
                word(0)
            );
        }
        if word(1) != VERSION {
            bail!(
                "{}: unsupported llm.c shard version {} (expected {VERSION}: uint16 tokens)",
                path.display(),
                word(1)
            );
        }
        let n = word(2);
        if n < 0 {
            bail!(
                "{}: corrupt llm.c shard header: token count {n}",
                path.display()
            );
        }
        let len = n as usize;
        let want = HEADER_BYTES + 2 * len;
        if map.len() != want {
            bail!(
                "{}: {} llm.c shard: header says {len} tokens ({want} bytes) but the file has {} bytes",
                path.display(),
                if map.len() < want { "truncated" } else { "oversized" },
                map.len()
            );
        }
        Ok(Shard {
            path: path.to_path_buf(),
            map,
            len,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    #[inline]
    pub fn get(&self, i: usize) -> u32 {
        let o = HEADER_BYTES + 2 * i;
        u16::from_le_bytes([self.map[o], self.map[o + 1]]) as u32
    }
}

/// Write one shard atomically (temp file, fsync, rename). Tokens must fit in uint16.
pub fn write_shard(path: &Path, tokens: &[u32]) -> Result<()> {
    if tokens.len() > i32::MAX as usize {
        bail!(
            "{}: {} tokens do not fit an llm.c shard (max {})",
            path.display(),
            tokens.len(),
            i32::MAX
        );
    }
    let mut buf = Vec::with_capacity(HEADER_BYTES + 2 * tokens.len());
    let mut header = [0i32; 256];
    header[0] = MAGIC;
    header[1] = VERSION;
    header[2] = tokens.len() as i32;
    for w in header {
        buf.extend_from_slice(&w.to_le_bytes());
    }
    for (i, &t) in tokens.iter().enumerate() {
        let t16 = u16::try_from(t).map_err(|_| {
            anyhow::anyhow!(
                "{}: token {t} at index {i} does not fit uint16",
                path.display()
            )
        })?;
        buf.extend_from_slice(&t16.to_le_bytes());
    }
    crate::checkpoint::write_atomic(path, &buf)
}

/// Tokenize a text file or a folder of text files into shards of at most `shard_tokens`
/// tokens, named `<prefix>_000000.bin`, ... in `out_dir`. Files are joined with the
/// tokenizer's separator (GPT-2: `<|endoftext|>`). Returns the shard paths.
pub fn tokenize_to_shards(
    input: &Path,
    out_dir: &Path,
    prefix: &str,
    tok: Tokenizer,
    shard_tokens: usize,
) -> Result<Vec<PathBuf>> {
    if shard_tokens == 0 {
        bail!("--shard-tokens: 0; allowed: an integer >= 1");
    }
    let tokens = super::text::tokenize_path(input, tok)?;
    if tokens.is_empty() {
        bail!("{}: no text to tokenize", input.display());
    }
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("{}: cannot create output folder", out_dir.display()))?;
    let mut out = Vec::new();
    for (i, chunk) in tokens.chunks(shard_tokens).enumerate() {
        let p = out_dir.join(format!("{prefix}_{i:06}.bin"));
        write_shard(&p, chunk)?;
        out.push(p);
    }
    Ok(out)
}

/// Helper for tests and tools: write text to a file and flush it.
pub fn write_text(path: &Path, text: &str) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("{}: cannot create", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}
