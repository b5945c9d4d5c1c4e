//! The parity harness (`fp8lm_trainer::compare`, `fp8lm compare`) can fail: a deliberately
//! broken recipe is reported as significantly worse than fp32, while a correct FP8 recipe
//! on the same seeds is not. Small model, 4 seeds x 3 variants x 150 steps (~10 s).

use fp8lm_trainer::compare::{compare, Variant, BROKEN_RECIPE};
use fp8lm_trainer::RunConfig;

fn base() -> RunConfig {
    let mut c = RunConfig {
        batch: 8,
        max_steps: 150,
        eval_tokens: 8192,
        ..RunConfig::default()
    };
    c.model.channels = 32;
    c
}

#[test]
fn harness_flags_a_broken_recipe_and_passes_a_correct_one() {
    let base = base();
    let variants: Vec<Variant> = ["fp32", "fp8-o1:delayed", &format!("fp8-o1:{BROKEN_RECIPE}")]
        .iter()
        .map(|s| Variant::parse(s, &base).unwrap())
        .collect();
    let cmp = compare(&base, &variants, &[1, 2, 3, 4], |v, s, l| {
        println!("{v} seed {s}: {l:.4}")
    })
    .unwrap();
    print!("{}", cmp.table());
    let broken = cmp.get(&variants[2].label).unwrap();
    assert!(broken.significantly_worse(), "{}", cmp.table());
    let good = cmp.get("fp8-o1:delayed").unwrap();
    assert!(!good.significantly_worse(), "{}", cmp.table());
}
