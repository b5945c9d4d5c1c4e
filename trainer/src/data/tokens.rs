//! [`TokenDataset`]: training and validation batches from token streams (llm.c shards or
//! text), with a deterministic split and a seeded, resumable order.
//!
//! - Split: each source (a shard, or one text stream) keeps its first `1 - val_fraction`
//!   of tokens for training and the rest for validation. Fixed by the data alone, so it
//!   never changes with the seed, the batch size or a resume.
//! - Order: the training part is cut into non-overlapping chunks of `T` tokens (plus the
//!   next token as the last target). Each epoch visits every chunk once, in a permutation
//!   seeded by `(seed, epoch)`. The position is the number of sequences consumed, so a
//!   checkpoint stores one integer and a resume regenerates exactly the same stream.
//! - Validation batch `i` reads chunks `i*B .. i*B+B` of the validation part (wrapping),
//!   independent of the training position.

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use rayon::prelude::*;
use std::path::Path;

use super::shards::Shard;
use super::text;
use super::Dataset;
use crate::rng::Rng;
use crate::tokenizer::Tokenizer;

enum Store {
    Shard(Shard),
    /// Byte-tokenized text, read in place.
    Bytes(Option<Mmap>),
    /// Tokenized text (ids < 65536 for both shipped tokenizers).
    Owned(Vec<u16>),
}

struct Source {
    name: String,
    store: Store,
    len: usize,
    /// Tokens `[0, split)` are training data, `[split, len)` validation.
    split: usize,
}

impl Source {
    #[inline]
    fn get(&self, i: usize) -> u32 {
        match &self.store {
            Store::Shard(s) => s.get(i),
            Store::Bytes(m) => m.as_ref().map_or(0, |m| m[i] as u32),
            Store::Owned(v) => v[i] as u32,
        }
    }
    fn max_token(&self) -> (u32, usize) {
        (0..self.len)
            .into_par_iter()
            .with_min_len(1 << 16)
            .map(|i| (self.get(i), i))
            .reduce(|| (0, 0), |a, b| if b.0 > a.0 { b } else { a })
    }
    fn train_chunks(&self, t: usize) -> usize {
        self.split.saturating_sub(1) / t
    }
    fn val_chunks(&self, t: usize) -> usize {
        (self.len - self.split).saturating_sub(1) / t
    }
}

/// Batches from files; see the module docs for the split and order.
pub struct TokenDataset {
    sources: Vec<Source>,
    vocab: usize,
    t: usize,
    seed: u64,
    /// Cumulative chunk counts per source (len = sources + 1).
    train_prefix: Vec<u64>,
    val_prefix: Vec<u64>,
    position: u64,
    perm_epoch: Option<u64>,
    perm: Vec<u32>,
}

impl TokenDataset {
    /// Open `path`: an llm.c `.bin` shard, a folder of shards, a UTF-8 text file or a
    /// folder of text files. `t` is the sequence length the batches will use.
    pub fn open(
        path: &Path,
        tok: Tokenizer,
        val_fraction: f32,
        seed: u64,
        t: usize,
    ) -> Result<Self> {
        if !(val_fraction > 0.0 && val_fraction < 1.0) {
            bail!("data.val_fraction = {val_fraction}; allowed: strictly between 0 and 1");
        }
        if t == 0 {
            bail!("model.context = 0; allowed: >= 1");
        }
        let is_bin = |p: &Path| p.extension().is_some_and(|e| e == "bin");
        let mut raw: Vec<(String, Store, usize)> = Vec::new();
        if path.is_dir() {
            let files = text::list_files(path)?;
            let bins: Vec<_> = files.iter().filter(|f| is_bin(f)).collect();
            if !bins.is_empty() {
                if bins.len() != files.len() {
                    bail!(
                        "{}: folder mixes .bin shards and other files; allowed: only .bin shards, or only text files",
                        path.display()
                    );
                }
                for f in bins {
                    let s = Shard::open(f)?;
                    let n = s.len();
                    raw.push((f.display().to_string(), Store::Shard(s), n));
                }
            } else {
                let ids = text::tokenize_path(path, tok)?;
                let n = ids.len();
                raw.push((
                    path.display().to_string(),
                    Store::Owned(ids.into_iter().map(|i| i as u16).collect()),
                    n,
                ));
            }
        } else if is_bin(path) {
            let s = Shard::open(path)?;
            let n = s.len();
            raw.push((path.display().to_string(), Store::Shard(s), n));
        } else if matches!(tok, Tokenizer::Byte) {
            let m = text::map_text_bytes(path)?;
            let n = m.as_ref().map_or(0, |m| m.len());
            raw.push((path.display().to_string(), Store::Bytes(m), n));
        } else {
            let ids = text::tokenize_path(path, tok)?;
            let n = ids.len();
            raw.push((
                path.display().to_string(),
                Store::Owned(ids.into_iter().map(|i| i as u16).collect()),
                n,
            ));
        }

        let vocab = tok.vocab_size();
        let mut sources = Vec::new();
        for (name, store, len) in raw {
            // Rounded, so 10% of 10000 tokens is exactly 1000 despite 0.1's f32 error.
            let split = len - ((len as f64) * val_fraction as f64).round() as usize;
            let src = Source {
                name,
                store,
                len,
                split,
            };
            let (max, at) = src.max_token();
            if len > 0 && max as usize >= vocab {
                bail!(
                    "{}: token id {max} at index {at} is outside the vocabulary of tokenizer \"{}\" ({vocab} ids); \
                     set `tokenizer` to the one the data was prepared with",
                    src.name,
                    tok.name()
                );
            }
            sources.push(src);
        }
        let prefix = |f: &dyn Fn(&Source) -> usize| {
            let mut p = vec![0u64];
            for s in &sources {
                p.push(p.last().unwrap() + f(s) as u64);
            }
            p
        };
        let train_prefix = prefix(&|s| s.train_chunks(t));
        let val_prefix = prefix(&|s| s.val_chunks(t));
        let total: usize = sources.iter().map(|s| s.len).sum();
        let (ntrain, nval) = (*train_prefix.last().unwrap(), *val_prefix.last().unwrap());
        if ntrain == 0 || nval == 0 {
            bail!(
                "{}: too little data: {total} tokens give {ntrain} training and {nval} validation sequences of \
                 model.context + 1 = {} tokens (data.val_fraction = {val_fraction}); need at least one of each",
                path.display(),
                t + 1
            );
        }
        if ntrain > u32::MAX as u64 {
            bail!(
                "{}: {ntrain} training sequences; at most {} supported",
                path.display(),
                u32::MAX
            );
        }
        Ok(TokenDataset {
            sources,
            vocab,
            t,
            seed,
            train_prefix,
            val_prefix,
            position: 0,
            perm_epoch: None,
            perm: Vec::new(),
        })
    }

    pub fn train_sequences(&self) -> u64 {
        *self.train_prefix.last().unwrap()
    }
    pub fn val_sequences(&self) -> u64 {
        *self.val_prefix.last().unwrap()
    }
    pub fn total_tokens(&self) -> usize {
        self.sources.iter().map(|s| s.len).sum()
    }

    fn locate(prefix: &[u64], chunk: u64) -> (usize, usize) {
        let src = prefix.partition_point(|&p| p <= chunk) - 1;
        (src, (chunk - prefix[src]) as usize)
    }

    fn copy_seq(&self, src: usize, start: usize, inputs: &mut [u32], targets: &mut [u32]) {
        let s = &self.sources[src];
        for j in 0..self.t {
            inputs[j] = s.get(start + j);
            targets[j] = s.get(start + j + 1);
        }
    }

    fn ensure_perm(&mut self, epoch: u64) {
        if self.perm_epoch == Some(epoch) {
            return;
        }
        let n = self.train_sequences() as usize;
        self.perm = (0..n as u32).collect();
        let mut rng = Rng::new(self.seed ^ 0xDA7A_5EED ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        for i in (1..n).rev() {
            let j = rng.below(i + 1);
            self.perm.swap(i, j);
        }
        self.perm_epoch = Some(epoch);
    }

    fn check_shape(&self, b: usize, t: usize, inputs: &[u32], targets: &[u32]) {
        assert_eq!(
            t, self.t,
            "TokenDataset opened for T = {} but asked for T = {t}",
            self.t
        );
        assert!(
            inputs.len() >= b * t && targets.len() >= b * t,
            "batch buffers shorter than B*T"
        );
    }
}

impl Dataset for TokenDataset {
    fn vocab_size(&self) -> usize {
        self.vocab
    }
    fn next_train_batch(&mut self, b: usize, t: usize, inputs: &mut [u32], targets: &mut [u32]) {
        self.check_shape(b, t, inputs, targets);
        let n = self.train_sequences();
        for row in 0..b {
            let k = self.position;
            self.ensure_perm(k / n);
            let chunk = self.perm[(k % n) as usize] as u64;
            let (src, c) = Self::locate(&self.train_prefix, chunk);
            let r = row * t..(row + 1) * t;
            self.copy_seq(src, c * t, &mut inputs[r.clone()], &mut targets[r]);
            self.position += 1;
        }
    }
    fn val_batch(&self, index: usize, b: usize, t: usize, inputs: &mut [u32], targets: &mut [u32]) {
        self.check_shape(b, t, inputs, targets);
        let n = self.val_sequences();
        for row in 0..b {
            let chunk = (index as u64 * b as u64 + row as u64) % n;
            let (src, c) = Self::locate(&self.val_prefix, chunk);
            let start = self.sources[src].split + c * t;
            let r = row * t..(row + 1) * t;
            self.copy_seq(src, start, &mut inputs[r.clone()], &mut targets[r]);
        }
    }
    fn position(&self) -> u64 {
        self.position
    }
    fn set_position(&mut self, pos: u64) {
        self.position = pos;
    }
    fn val_sequence_count(&self, t: usize) -> Option<u64> {
        (t == self.t).then(|| self.val_sequences())
    }
}

/// Open the data source a config names: the embedded corpus when `data.path` is empty.
pub fn open_dataset(cfg: &crate::RunConfig) -> Result<Box<dyn Dataset>> {
    if cfg.data.path.is_empty() {
        return Ok(Box::new(super::synthetic::MarkovCorpus::new(cfg.seed)));
    }
    let tok = Tokenizer::from_name(&cfg.tokenizer)?;
    let ds = TokenDataset::open(
        Path::new(&cfg.data.path),
        tok,
        cfg.data.val_fraction,
        cfg.seed,
        cfg.model.context,
    )
    .with_context(|| format!("data.path = {:?}", cfg.data.path))?;
    tracing::info!(
        "data: {} tokens, {} training / {} validation sequences of {} tokens",
        ds.total_tokens(),
        ds.train_sequences(),
        ds.val_sequences(),
        cfg.model.context
    );
    Ok(Box::new(ds))
}

#[cfg(test)]
mod tests {
    use super::super::shards::{tokenize_to_shards, write_shard};
    use super::*;
    use std::collections::HashSet;

    fn tmpdir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("fp8lm-data-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn batch(ds: &mut TokenDataset, b: usize, t: usize) -> (Vec<u32>, Vec<u32>) {
        let (mut i, mut o) = (vec![0; b * t], vec![0; b * t]);
        ds.next_train_batch(b, t, &mut i, &mut o);
        (i, o)
    }

    #[test]
    fn shard_round_trip_and_header_checks() {
        let d = tmpdir("shard");
        let toks: Vec<u32> = (0..5000).map(|i| (i * 7919 % 50257) as u32).collect();
        let p = d.join("x.bin");
        write_shard(&p, &toks).unwrap();
        let s = Shard::open(&p).unwrap();
        assert_eq!(s.len(), toks.len());
        assert!((0..toks.len()).all(|i| s.get(i) == toks[i]));

        // Truncated: the message names the file and the size mismatch.
        let bytes = std::fs::read(&p).unwrap();
        let cut = d.join("cut.bin");
        std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
        let e = format!("{:#}", Shard::open(&cut).err().unwrap());
        assert!(
            e.contains("cut.bin") && e.contains("truncated") && e.contains("5000 tokens"),
            "{e}"
        );
        let bad = d.join("bad.bin");
        let mut b2 = bytes.clone();
        b2[0] = 0;
        std::fs::write(&bad, &b2).unwrap();
        let e = format!("{:#}", Shard::open(&bad).err().unwrap());
        assert!(e.contains("bad.bin") && e.contains("magic"), "{e}");
        assert!(write_shard(&d.join("big.bin"), &[70000]).is_err());
    }

    #[test]
    fn split_is_deterministic_and_disjoint_and_order_is_seeded() {
        let d = tmpdir("split");
        let toks: Vec<u32> = (0..10_000u32)
            .collect::<Vec<_>>()
            .iter()
            .map(|i| i % 50000)
            .collect();
        write_shard(&d.join("a.bin"), &toks).unwrap();
        let open = |seed| {
            TokenDataset::open(
                &d.join("a.bin"),
                Tokenizer::from_name("gpt2").unwrap(),
                0.1,
                seed,
                16,
            )
            .unwrap()
        };
        let (mut a, mut b, mut c) = (open(1), open(1), open(2));
        assert_eq!(a.train_sequences(), 8999 / 16);
        assert_eq!(a.val_sequences(), 999 / 16);
        let (ta, tb, tc) = (
            batch(&mut a, 4, 16),
            batch(&mut b, 4, 16),
            batch(&mut c, 4, 16),
        );
        assert_eq!(ta, tb, "same seed, same order");
        assert_ne!(ta, tc, "different seed, different order");
        // Targets are inputs shifted by one.
        assert_eq!(ta.0[1..16], ta.1[..15]);
        // One epoch visits every training chunk once, and never touches validation tokens.
        let mut e = open(3);
        let n = e.train_sequences() as usize;
        let mut starts = HashSet::new();
        for _ in 0..n {
            let (i, o) = batch(&mut e, 1, 16);
            assert!(o[15] < 9000, "training read validation token {}", o[15]);
            assert!(starts.insert(i[0]));
        }
        assert_eq!(starts.len(), n);
        // Validation batches are fixed and come from the held-out tail.
        let (mut vi, mut vo) = (vec![0; 32], vec![0; 32]);
        e.val_batch(0, 2, 16, &mut vi, &mut vo);
        assert!(vi.iter().all(|&x| x >= 9000));
        let (mut wi, mut wo) = (vec![0; 32], vec![0; 32]);
        a.val_batch(0, 2, 16, &mut wi, &mut wo);
        assert_eq!((vi, vo), (wi, wo));
    }

    #[test]
    fn resume_position_continues_the_same_stream() {
        let d = tmpdir("resume");
        let text: String = (0..3000).map(|i| format!("line {i} of text\n")).collect();
        let p = d.join("t.txt");
        std::fs::write(&p, &text).unwrap();
        let tok = Tokenizer::Byte;
        let mut a = TokenDataset::open(&p, tok, 0.05, 9, 32).unwrap();
        let n = a.train_sequences();
        let mut straight = Vec::new();
        // Cross an epoch boundary to exercise the per-epoch permutation.
        let steps = (n / 3 + 2) as usize;
        for _ in 0..steps {
            straight.push(batch(&mut a, 3, 32));
        }
        let mut b = TokenDataset::open(&p, tok, 0.05, 9, 32).unwrap();
        for _ in 0..steps / 2 {
            batch(&mut b, 3, 32);
        }
        let pos = b.position();
        let mut c = TokenDataset::open(&p, tok, 0.05, 9, 32).unwrap();
        c.set_position(pos);
        for s in straight.iter().skip(steps / 2) {
            assert_eq!(&batch(&mut c, 3, 32), s);
        }
    }

    #[test]
    fn text_folder_gpt2_and_tokenize_command_agree() {
        let d = tmpdir("folder");
        let src = d.join("src");
        std::fs::create_dir_all(&src).unwrap();
        for k in 0..3 {
            let body: String = (0..200)
                .map(|i| format!("Document {k}, sentence {i}. "))
                .collect();
            std::fs::write(src.join(format!("{k}.txt")), body).unwrap();
        }
        let tok = Tokenizer::from_name("gpt2").unwrap();
        let shards = tokenize_to_shards(&src, &d.join("out"), "corpus", tok, 1000).unwrap();
        assert!(shards.len() >= 2);
        let from_text = TokenDataset::open(&src, tok, 0.1, 5, 8).unwrap();
        let tokens: usize = shards.iter().map(|p| Shard::open(p).unwrap().len()).sum();
        assert_eq!(tokens, from_text.total_tokens());
        let from_bins = TokenDataset::open(&d.join("out"), tok, 0.1, 5, 8).unwrap();
        assert_eq!(from_bins.total_tokens(), tokens);
        // The byte tokenizer cannot read GPT-2 shards: the message names the fix.
        let e = format!(
            "{:#}",
            TokenDataset::open(&shards[0], Tokenizer::Byte, 0.1, 5, 8)
                .err()
                .unwrap()
        );
        assert!(
            e.contains("outside the vocabulary") && e.contains("tokenizer"),
            "{e}"
        );
    }

    #[test]
    fn bad_inputs_are_refused_with_names() {
        let d = tmpdir("bad");
        let p = d.join("tiny.txt");
        std::fs::write(&p, "abc").unwrap();
        let e = format!(
            "{:#}",
            TokenDataset::open(&p, Tokenizer::Byte, 0.1, 1, 8)
                .err()
                .unwrap()
        );
        assert!(
            e.contains("tiny.txt") && e.contains("too little data"),
            "{e}"
        );
        let p = d.join("bin.txt");
        std::fs::write(&p, [0xffu8, 0xfe, 0x00, 0x41].repeat(100)).unwrap();
        let e = format!(
            "{:#}",
            TokenDataset::open(&p, Tokenizer::Byte, 0.1, 1, 8)
                .err()
                .unwrap()
        );
        assert!(
            e.contains("bin.txt") && e.contains("not UTF-8") && e.contains("offset 0"),
            "{e}"
        );
    }
}
