//! The memory ledger against the process's resident memory at GPT-2 124M dimensions.
//!
//! Shared by `memory_rss_fp8.rs` and `memory_rss_fp32.rs`: one test per binary (so per
//! process), since freed memory the allocator keeps resident would hide the next
//! measurement's growth. Each
//! precision's buffers are allocated, then touched by a real optimizer step (a zeroed
//! allocation is not resident until written), and the growth of the resident set must
//! match the ledger within 5%.

use fp8lm_fp8::{Fp8Format, ScaledFp8};
use fp8lm_optim::zero::gpt2_124m_metas;
use fp8lm_optim::{AdamW, AdamWHyper, Fp8Adam, Fp8AdamConfig, Grad, Optimizer, ParamMeta};
use fp8lm_trainer::memory::{resident_bytes, Category, MemoryLedger};

fn filled(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as u32).wrapping_mul(2654435761) ^ seed) as f32 * 1e-12 - 0.002)
        .collect()
}

/// Allocate, step once, and return (ledger, measured resident growth).
pub fn measure(metas: &[ParamMeta], fp8: bool) -> (MemoryLedger, usize) {
    let n: usize = metas.iter().map(ParamMeta::numel).sum();
    let h = AdamWHyper::default();
    let before = resident_bytes().unwrap();
    let mut params: Vec<Vec<f32>> = metas.iter().map(|m| filled(m.numel(), 1)).collect();
    let mut ps: Vec<&mut [f32]> = params.iter_mut().map(|p| p.as_mut_slice()).collect();
    let mut ledger = MemoryLedger::new(n);
    if fp8 {
        let grads: Vec<ScaledFp8> = metas
            .iter()
            .map(|m| {
                ScaledFp8::quantize_current(&filled(m.numel(), 7), &m.shape, Fp8Format::E5M2, 0).0
            })
            .collect();
        let mut opt = Fp8Adam::new(metas, &mut ps, Fp8AdamConfig::fp8_lm(h)).unwrap();
        let gr: Vec<Grad> = grads.iter().map(Grad::Fp8).collect();
        opt.step(&mut ps, &gr, 1e-3, 1.0);
        let after = resident_bytes().unwrap();
        ledger.add(Category::ComputeWeights, "f32 view of the master", 4 * n);
        ledger.add(
            Category::Gradients,
            "E5M2 gradients",
            grads.iter().map(|g| g.data.len()).sum(),
        );
        ledger.add_optimizer(&opt, ["f16", "e4m3", "f16"]);
        (ledger, after.saturating_sub(before))
    } else {
        let grads: Vec<Vec<f32>> = metas.iter().map(|m| filled(m.numel(), 7)).collect();
        let mut opt = AdamW::new(metas, h);
        let gr: Vec<Grad> = grads.iter().map(|g| Grad::F32(g)).collect();
        opt.step(&mut ps, &gr, 1e-3, 1.0);
        let after = resident_bytes().unwrap();
        ledger.add(Category::MasterWeights, "f32 weights (the master)", 4 * n);
        ledger.add(Category::Gradients, "f32 gradients", 4 * n);
        ledger.add_optimizer(&opt, ["-", "f32", "f32"]);
        (ledger, after.saturating_sub(before))
    }
}

pub fn check(fp8: bool) {
    let metas = gpt2_124m_metas();
    let (ledger, grown) = measure(&metas, fp8);
    let name = if fp8 { "fp8-o2" } else { "fp32" };
    print!("{}", ledger.report(name));
    let total = ledger.total();
    println!(
        "  resident growth {:.1} MiB vs ledger {:.1} MiB ({:+.2}%)",
        grown as f64 / 1048576.0,
        total as f64 / 1048576.0,
        (grown as f64 / total as f64 - 1.0) * 100.0
    );
    assert!(
        (grown as f64 - total as f64).abs() <= 0.05 * total as f64,
        "{name}: resident growth {grown} B vs ledger {total} B"
    );
    let bpp = ledger.state_bytes_per_param();
    if fp8 {
        // 2 (f16 master) + 1 (E5M2 grad) + 1 (E4M3 m) + 2 (f16 v), + scalars.
        assert!((6.0..6.001).contains(&bpp), "fp8-o2 state {bpp} B/param");
    } else {
        assert_eq!(bpp, 16.0, "fp32 state");
    }
}

/// The whole trainer at GPT-2 124M dimensions (B=1, T=64, so one step takes seconds): build it, take one training
/// step (which writes every gradient, activation and optimizer buffer), and compare the
/// resident growth with [`MemoryLedger::for_trainer`].
pub fn check_trainer(precision: fp8lm_trainer::Precision) {
    use fp8lm_trainer::data::synthetic::MarkovCorpus;
    use fp8lm_trainer::data::Dataset;
    use fp8lm_trainer::{RunConfig, Trainer};
    let mut cfg = RunConfig {
        precision,
        batch: 1,
        ..RunConfig::default()
    };
    cfg.model.layers = 12;
    cfg.model.heads = 12;
    cfg.model.channels = 768;
    cfg.model.context = 64;
    cfg.model.vocab = 50257;
    let mut data = MarkovCorpus::new(cfg.seed);
    let before = resident_bytes().unwrap();
    let mut tr = Trainer::new(&cfg, data.vocab_size()).unwrap();
    tr.train_step(&mut data).unwrap();
    let grown = resident_bytes().unwrap().saturating_sub(before);
    let ledger = MemoryLedger::for_trainer(&tr);
    print!("{}", ledger.report(precision.name()));
    let total = ledger.total();
    println!(
        "  resident growth {:.1} MiB vs ledger {:.1} MiB ({:+.2}%)",
        grown as f64 / 1048576.0,
        total as f64 / 1048576.0,
        (grown as f64 / total as f64 - 1.0) * 100.0
    );
    let bpp = ledger.state_bytes_per_param();
    match precision {
        fp8lm_trainer::Precision::Fp32 => assert_eq!(bpp, 16.0),
        // 6 for the linears' weights (99.4% of the parameters), 16 for the rest.
        fp8lm_trainer::Precision::Fp8O2 => assert!((6.0..6.1).contains(&bpp), "{bpp}"),
        _ => {}
    }
    // GPT-2 124M, with the position table sized for T = 64 instead of 1024.
    assert_eq!(tr.model().num_params(), 124_439_808 - (1024 - 64) * 768);
    assert!(
        (grown as f64 - total as f64).abs() <= 0.05 * total as f64,
        "{}: resident growth {grown} B vs ledger {total} B",
        precision.name()
    );
}
