//! Memory ledger vs resident memory at GPT-2 124M, fp32 (see `rss_common`).

#[path = "rss_common/mod.rs"]
#[allow(dead_code)]
mod rss_common;

#[test]
fn ledger_matches_resident_memory_at_gpt2_124m_fp32() {
    rss_common::check(false);
}
