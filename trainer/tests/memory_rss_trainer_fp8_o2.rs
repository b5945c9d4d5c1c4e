//! The whole trainer's memory ledger vs resident memory at GPT-2 124M, fp8_o2 (see `rss_common`).

#[path = "rss_common/mod.rs"]
#[allow(dead_code)]
mod rss_common;

#[test]
fn trainer_ledger_matches_resident_memory_at_gpt2_124m_fp8_o2() {
    rss_common::check_trainer(fp8lm_trainer::Precision::Fp8O2);
}
