use fp8lm_trainer::data::synthetic::MarkovCorpus;
use fp8lm_trainer::data::Dataset;
use fp8lm_trainer::*;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut cfg = RunConfig::default();
    cfg.precision = match args.get(1).map(|s| s.as_str()) {
        Some("bf16") => Precision::Bf16,
        Some("fp8") => Precision::Fp8O1,
        _ => Precision::Fp32,
    };
    if args.get(2).map(|s| s.as_str()) == Some("llama") {
        cfg.model.arch = Arch::Llama;
    }
    if let Ok(v) = std::env::var("T") {
        cfg.model.context = v.parse().unwrap();
    }
    if let Ok(v) = std::env::var("B") {
        cfg.batch = v.parse().unwrap();
    }
    if let Ok(v) = std::env::var("C") {
        cfg.model.channels = v.parse().unwrap();
    }
    if let Ok(v) = std::env::var("WU") {
        cfg.optim.warmup_steps = v.parse().unwrap();
    }
    if let Ok(v) = std::env::var("H") {
        cfg.model.heads = v.parse().unwrap();
    }
    if let Ok(v) = std::env::var("L") {
        cfg.model.layers = v.parse().unwrap();
    }
    if let Ok(v) = std::env::var("WD") {
        cfg.optim.weight_decay = v.parse().unwrap();
    }
    if let Ok(v) = std::env::var("B2") {
        cfg.optim.beta2 = v.parse().unwrap();
    }
    let steps: usize = args
        .get(3)
        .map(|s| s.parse().unwrap())
        .unwrap_or(cfg.max_steps);
    cfg.max_steps = steps;
    if let Ok(lr) = std::env::var("LR") {
        cfg.optim.lr = lr.parse().unwrap();
        cfg.optim.min_lr = cfg.optim.lr / 10.0;
    }
    {
        let mut d = MarkovCorpus::new(cfg.seed);
        let (mut i, mut t) = (vec![0u32; 64], vec![0u32; 64]);
        d.next_train_batch(1, 64, &mut i, &mut t);
        println!("{:?}\n{:?}", &i[..20], &t[..20]);
    }
    let mut data = MarkovCorpus::new(cfg.seed);
    let mut tr = Trainer::new(&cfg, data.vocab_size()).unwrap();
    let t0 = std::time::Instant::now();
    let mut gemm = 0.0;
    for s in 0..steps {
        let st = tr.train_step(&mut data).unwrap();
        gemm += st.gemm.as_secs_f64();
        if s % 50 == 0 || s + 1 == steps {
            println!(
                "{s} loss {:.4} gn {:.3} lr {:.5} skip {} f {:?} b {:?} o {:?} g {:?}",
                st.loss,
                st.grad_norm,
                st.lr,
                st.skipped,
                st.forward,
                st.backward,
                st.optimizer,
                st.gemm
            );
        }
    }
    let el = t0.elapsed().as_secs_f64();
    println!(
        "val {:.4} floor {:.4} time {:.2}s gemm {:.2}s",
        tr.evaluate(&data, 8).unwrap(),
        data.entropy_floor().unwrap(),
        el,
        gemm
    );
}
