//! Ablation of the FP8 optimizer's state formats on least squares whose gradients span
//! several decades (the regime where a low-precision second moment breaks).
//!
//! `cargo run --release -p fp8lm-optim --example ablate_states`

use fp8lm_fp8::Fp8Format;
use fp8lm_optim::experiment::{run_least_squares, GradPath, LeastSquares};
use fp8lm_optim::{AdamWHyper, Fp8Adam, Fp8AdamConfig, Optimizer, ParamMeta, StateFormat};

fn main() {
    let h = AdamWHyper {
        weight_decay: 0.0,
        ..AdamWHyper::default()
    };
    let (e4m3, e5m2) = (
        StateFormat::Fp8(Fp8Format::E4M3),
        StateFormat::Fp8(Fp8Format::E5M2),
    );
    let base = Fp8AdamConfig::fp8_lm(h);
    let variants = [
        ("all f32 (fp32 AdamW)", Fp8AdamConfig::all_f32(h)),
        ("FP8-LM: master f16, m e4m3, v f16", base),
        (
            "m f16",
            Fp8AdamConfig {
                exp_avg: StateFormat::F16,
                ..base
            },
        ),
        (
            "m e5m2",
            Fp8AdamConfig {
                exp_avg: e5m2,
                ..base
            },
        ),
        (
            "v e4m3",
            Fp8AdamConfig {
                exp_avg_sq: e4m3,
                ..base
            },
        ),
        (
            "v e5m2",
            Fp8AdamConfig {
                exp_avg_sq: e5m2,
                ..base
            },
        ),
        (
            "master f32",
            Fp8AdamConfig {
                master: StateFormat::F32,
                ..base
            },
        ),
    ];
    let steps = 1500;
    let lr = 1e-2;
    println!(
        "least squares 512x128, noise floor 0.00377, {steps} steps, cosine lr {lr} -> {}",
        lr / 100.0
    );
    print!("{:<36}", "states \\ gradient decades");
    let decades = [0.0, 1.0, 2.0, 3.0, 4.0];
    for d in decades {
        print!("{d:>10}");
    }
    println!();
    let probs: Vec<LeastSquares> = decades
        .iter()
        .map(|&d| LeastSquares::new(512, 128, d, 0.1, 42))
        .collect();
    for (name, cfg) in variants {
        print!("{name:<36}");
        for prob in &probs {
            let mk = move |m: &[ParamMeta], p: &mut [&mut [f32]]| -> Box<dyn Optimizer> {
                Box::new(Fp8Adam::new(m, p, cfg).unwrap())
            };
            let loss = run_least_squares(prob, &mk, steps, lr, GradPath::Fp8(Fp8Format::E5M2));
            print!("{loss:>10.5}");
        }
        println!();
    }
    println!("(gradients reach the optimizer as E5M2 with current scaling in every row)");
}
