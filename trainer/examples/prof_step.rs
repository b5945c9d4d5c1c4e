//! Steady-state step loop for profiling one precision at GPT-2 124M dims:
//! `prof_step <fp32|bf16|fp8-o1|fp8-o2> [steps] [small]` (prints "READY" after the warm-up
//! step; `small`: the default small model instead).
use fp8lm_trainer::bench::default_cases;
use fp8lm_trainer::config::Precision;
use fp8lm_trainer::data::synthetic::MarkovCorpus;
use fp8lm_trainer::data::Dataset;
use fp8lm_trainer::train::Trainer;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let p = match args.first().map(String::as_str) {
        Some("fp32") => Precision::Fp32,
        Some("bf16") => Precision::Bf16,
        Some("fp8-o2") => Precision::Fp8O2,
        _ => Precision::Fp8O1,
    };
    let steps: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let small = args.get(2).is_some_and(|a| a == "small");
    let mut cfg = if small {
        default_cases(false).remove(0).1
    } else {
        default_cases(true).pop().expect("124M case").1
    };
    cfg.precision = p;
    cfg.max_steps = steps + 1;
    let mut data = MarkovCorpus::new(cfg.seed);
    let mut tr = Trainer::new(&cfg, data.vocab_size())?;
    tr.train_step(&mut data)?;
    eprintln!("READY");
    for _ in 0..steps {
        let st = tr.train_step(&mut data)?;
        println!(
            "fwd {:?} bwd {:?} opt {:?} gemm {:?}",
            st.forward, st.backward, st.optimizer, st.gemm
        );
    }
    Ok(())
}
