//! Memory ledger vs resident memory at GPT-2 124M, fp8 (see `rss_common`).

#[path = "rss_common/mod.rs"]
#[allow(dead_code)]
mod rss_common;

#[test]
fn ledger_matches_resident_memory_at_gpt2_124m_fp8() {
    rss_common::check(true);
}
