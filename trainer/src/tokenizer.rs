//! Tokenizers: byte-level (vocab 256) and GPT-2 BPE (vocab 50257).
//!
//! GPT-2 BPE comes from `tiktoken-rs`'s `r50k_base`, whose merge ranks are compiled into
//! the crate (`include_str!`), so tokenizing never touches the network. `r50k_base` is
//! exactly GPT-2's encoding, with `<|endoftext|>` = 50256 as the document separator, the
//! same ids llm.c's `.bin` shards use.

use anyhow::{bail, Result};
use tiktoken_rs::CoreBPE;

/// GPT-2's end-of-text token, used to separate documents.
pub const GPT2_EOT: u32 = 50256;

#[derive(Clone, Copy)]
pub enum Tokenizer {
    /// Token id = byte value.
    Byte,
    /// GPT-2 BPE (tiktoken r50k_base).
    Gpt2(&'static CoreBPE),
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Tokenizer {
    /// `"byte"` or `"gpt2"` (the `tokenizer` config key).
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "byte" => Ok(Tokenizer::Byte),
            "gpt2" => Ok(Tokenizer::Gpt2(tiktoken_rs::r50k_base_singleton())),
            other => bail!("unknown tokenizer {other:?}; allowed: \"byte\", \"gpt2\""),
        }
    }
    pub fn name(&self) -> &'static str {
        match self {
            Tokenizer::Byte => "byte",
            Tokenizer::Gpt2(_) => "gpt2",
        }
    }
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Byte => 256,
            Tokenizer::Gpt2(_) => 50257,
        }
    }
    /// Document separator inserted between files.
    pub fn separator(&self) -> u32 {
        match self {
            Tokenizer::Byte => b'\n' as u32,
            Tokenizer::Gpt2(_) => GPT2_EOT,
        }
    }
    /// Encode text; special-token strings are treated as plain text.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        match self {
            Tokenizer::Byte => text.bytes().map(u32::from).collect(),
            Tokenizer::Gpt2(bpe) => bpe.encode_ordinary(text),
        }
    }
    /// Decode ids to text; invalid UTF-8 (a multi-byte character cut by sampling) and ids
    /// outside the vocabulary become U+FFFD instead of failing.
    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Tokenizer::Byte => {
                let bytes: Vec<u8> = ids
                    .iter()
                    .map(|&i| if i < 256 { i as u8 } else { b'?' })
                    .collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Tokenizer::Gpt2(bpe) => {
                let mut bytes = Vec::new();
                for &id in ids {
                    match bpe.decode_bytes(&[id]) {
                        Ok(b) => bytes.extend_from_slice(&b),
                        Err(_) => bytes.extend_from_slice("\u{FFFD}".as_bytes()),
                    }
                }
                String::from_utf8_lossy(&bytes).into_owned()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_round_trip() {
        let t = Tokenizer::from_name("byte").unwrap();
        let s = "héllo, wörld\n";
        let ids = t.encode(s);
        assert_eq!(ids.len(), s.len());
        assert_eq!(t.decode(&ids), s);
    }

    #[test]
    fn gpt2_matches_reference_ids_offline() {
        let t = Tokenizer::from_name("gpt2").unwrap();
        // Reference ids from OpenAI's GPT-2 encoder (tiktoken "gpt2" / r50k_base).
        assert_eq!(t.encode("Hello world"), vec![15496, 995]);
        assert_eq!(t.encode(" the"), vec![262]);
        let s = "FP8 training, in Rust: 1025.0 + 0.4 == 1025.0?\n";
        assert_eq!(t.decode(&t.encode(s)), s);
        assert_eq!(t.decode(&[GPT2_EOT]), "<|endoftext|>");
        assert_eq!(t.vocab_size(), 50257);
    }

    #[test]
    fn unknown_name_is_refused() {
        let e = Tokenizer::from_name("sp").unwrap_err().to_string();
        assert!(e.contains("\"sp\"") && e.contains("gpt2"), "{e}");
    }
}
