//! A parity harness that can tell recipes apart: K seeds of every precision/recipe on one
//! data set, the validation loss of each, and each variant's difference to the reference
//! (the first variant, normally fp32) with a 95% confidence interval.
//!
//! The difference is *paired* by seed: seed s gives every variant the same initial
//! weights and the same data order, so `d_s = loss_variant(s) - loss_ref(s)` removes the
//! seed-to-seed spread that the losses themselves share (a single seed swings by several
//! percent mid-transition; the paired differences by much less). The interval is
//! `mean(d) +- t_{0.975, K-1} sd(d) / sqrt(K)` (Student's t: the d_s are treated as
//! independent draws, which they are across seeds). A variant is *significantly worse*
//! when the whole interval lies above 0, *significantly better* when below, else
//! indistinguishable at this K and length.
//!
//! Variants are `precision[:recipe]` (`fp32`, `bf16`, `fp8-o1:delayed`, `fp8-o2:current`,
//! ...). One testing-only recipe exists to show the harness has teeth:
//! [`BROKEN_RECIPE`] (`"testing-binade-high"`): delayed scaling with every scale one
//! binade too large (margin -1), so the top binade of every FP8 cast saturates. Config
//! files cannot select it (`fp8.margin` must be >= 0); only code (this harness, tests).

use crate::config::{Precision, RunConfig};
use crate::data::open_dataset;
use crate::train::Trainer;
use anyhow::{bail, Context, Result};

/// The testing-only broken recipe (see the module docs).
pub const BROKEN_RECIPE: &str = "testing-binade-high";

/// One precision/recipe to train.
#[derive(Clone, Debug, PartialEq)]
pub struct Variant {
    pub label: String,
    pub precision: Precision,
    /// `fp8.recipe` (FP8 precisions), or [`BROKEN_RECIPE`].
    pub recipe: String,
}

impl Variant {
    /// `precision[:recipe]`, e.g. `fp32`, `fp8-o1:current`; the recipe defaults to the
    /// base config's.
    pub fn parse(spec: &str, base: &RunConfig) -> Result<Variant> {
        let (p, r) = match spec.split_once(':') {
            Some((p, r)) => (p, Some(r)),
            None => (spec, None),
        };
        let precision = match p {
            "fp32" => Precision::Fp32,
            "bf16" => Precision::Bf16,
            "fp8-o1" => Precision::Fp8O1,
            "fp8-o2" => Precision::Fp8O2,
            _ => bail!(
                "variant {spec:?}: precision {p:?} is not one of fp32, bf16, fp8-o1, fp8-o2 \
                 (fp8-o3 needs several ranks)"
            ),
        };
        let recipe = r.unwrap_or(&base.fp8.recipe).to_string();
        let known = ["delayed", "current", "block", BROKEN_RECIPE];
        if precision.is_fp8() && !known.contains(&recipe.as_str()) {
            bail!("variant {spec:?}: recipe {recipe:?} is not one of {known:?}");
        }
        if !precision.is_fp8() && r.is_some() {
            bail!("variant {spec:?}: {p} has no FP8 recipe");
        }
        let label = if precision.is_fp8() {
            format!("{p}:{recipe}")
        } else {
            p.to_string()
        };
        Ok(Variant {
            label,
            precision,
            recipe,
        })
    }

    /// `base` with this variant's precision and recipe, and `seed`.
    pub fn config(&self, base: &RunConfig, seed: u64) -> RunConfig {
        let mut c = base.clone();
        c.seed = seed;
        c.precision = self.precision;
        if self.recipe == BROKEN_RECIPE {
            c.fp8.recipe = "delayed".into();
            c.fp8.margin = -1;
        } else {
            c.fp8.recipe = self.recipe.clone();
        }
        c
    }
}

/// Train `cfg` for `cfg.max_steps` on its data and return the validation loss over
/// `cfg.eval_tokens` (the fixed set of [`crate::eval`]).
pub fn train_and_evaluate(cfg: &RunConfig) -> Result<f32> {
    let mut data = open_dataset(cfg)?;
    let mut tr = Trainer::new(cfg, data.vocab_size())?;
    for _ in 0..cfg.max_steps {
        tr.train_step(data.as_mut())?;
    }
    tr.evaluate_tokens(data.as_ref(), cfg.eval_tokens, None)
}

/// Two-sided 95% quantile of Student's t with `df` degrees of freedom (table to 30, then
/// the normal 1.96 with the first-order correction).
pub fn t975(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::INFINITY,
        1..=30 => T[df - 1],
        _ => 1.96 + 2.4 / df as f64,
    }
}

/// Mean and sample standard deviation (0 for one value).
pub fn mean_sd(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let m = x.iter().sum::<f64>() / n;
    let v = if x.len() > 1 {
        x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (m, v.sqrt())
}

/// One variant's results.
#[derive(Clone, Debug)]
pub struct VariantResult {
    pub variant: Variant,
    /// Validation loss per seed (in `Comparison::seeds` order).
    pub losses: Vec<f64>,
    pub mean: f64,
    pub sd: f64,
    /// Paired difference to the reference: mean and 95% half-width (0 for the reference).
    pub diff: f64,
    pub half_width: f64,
}

impl VariantResult {
    /// The 95% interval of the difference lies entirely above 0.
    pub fn significantly_worse(&self) -> bool {
        self.diff - self.half_width > 0.0
    }
    pub fn significantly_better(&self) -> bool {
        self.diff + self.half_width < 0.0
    }
}

/// Every variant over every seed.
#[derive(Clone, Debug)]
pub struct Comparison {
    pub seeds: Vec<u64>,
    pub steps: usize,
    pub results: Vec<VariantResult>,
}

/// Train every variant for every seed (reference = `variants[0]`). `progress` is called
/// after each run with (variant label, seed, val loss).
pub fn compare(
    base: &RunConfig,
    variants: &[Variant],
    seeds: &[u64],
    mut progress: impl FnMut(&str, u64, f32),
) -> Result<Comparison> {
    if variants.is_empty() || seeds.is_empty() {
        bail!("compare: give at least one variant and one seed");
    }
    let mut losses = vec![Vec::new(); variants.len()];
    for &seed in seeds {
        for (v, out) in variants.iter().zip(losses.iter_mut()) {
            let l = train_and_evaluate(&v.config(base, seed))
                .with_context(|| format!("compare: {} seed {seed}", v.label))?;
            progress(&v.label, seed, l);
            out.push(l as f64);
        }
    }
    let t = t975(seeds.len() - 1);
    let results = variants
        .iter()
        .zip(&losses)
        .map(|(v, l)| {
            let (mean, sd) = mean_sd(l);
            let d: Vec<f64> = l.iter().zip(&losses[0]).map(|(a, b)| a - b).collect();
            let (diff, sd_d) = mean_sd(&d);
            VariantResult {
                variant: v.clone(),
                losses: l.clone(),
                mean,
                sd,
                diff,
                half_width: t * sd_d / (seeds.len() as f64).sqrt(),
            }
        })
        .collect();
    Ok(Comparison {
        seeds: seeds.to_vec(),
        steps: base.max_steps,
        results,
    })
}

impl Comparison {
    /// The table `fp8lm compare` prints.
    pub fn table(&self) -> String {
        let w = self
            .results
            .iter()
            .map(|r| r.variant.label.len())
            .max()
            .unwrap_or(4)
            .max(7);
        let reference = &self.results[0];
        let mut s = format!(
            "val loss after {} steps, {} seeds {:?} (mean +- sd); difference to {} paired by seed, 95% interval (Student t, {} df)\n",
            self.steps,
            self.seeds.len(),
            self.seeds,
            reference.variant.label,
            self.seeds.len().saturating_sub(1)
        );
        s += &format!(
            "{:<w$}  {:>17}  {:>28}  {:>8}  verdict\n",
            "variant", "val loss", "diff to reference", "rel"
        );
        for r in &self.results {
            let verdict = if std::ptr::eq(r, reference) {
                "reference"
            } else if r.significantly_worse() {
                "significantly worse"
            } else if r.significantly_better() {
                "significantly better"
            } else {
                "indistinguishable"
            };
            s += &format!(
                "{:<w$}  {:>8.4} +- {:<6.4}  {:>+9.4} [{:>+8.4}, {:>+8.4}]  {:>+7.2}%  {verdict}\n",
                r.variant.label,
                r.mean,
                r.sd,
                r.diff,
                r.diff - r.half_width,
                r.diff + r.half_width,
                100.0 * r.diff / reference.mean
            );
        }
        s
    }

    pub fn get(&self, label: &str) -> Option<&VariantResult> {
        self.results.iter().find(|r| r.variant.label == label)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_match_hand_computed_values() {
        let (m, sd) = mean_sd(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(m, 2.5);
        assert!((sd - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(t975(3), 3.182);
        assert!(t975(1000) > 1.96 && t975(1000) < 1.97);
        assert!(t975(0).is_infinite());
    }

    #[test]
    fn variants_parse_and_reject_with_reasons() {
        let base = RunConfig::default();
        let v = Variant::parse("fp8-o1:current", &base).unwrap();
        assert_eq!(
            (v.precision, v.recipe.as_str()),
            (Precision::Fp8O1, "current")
        );
        assert_eq!(
            Variant::parse("fp8-o2", &base).unwrap().label,
            "fp8-o2:delayed"
        );
        assert_eq!(Variant::parse("fp32", &base).unwrap().label, "fp32");
        let b = Variant::parse(&format!("fp8-o1:{BROKEN_RECIPE}"), &base).unwrap();
        assert_eq!(b.config(&base, 7).fp8.margin, -1);
        assert_eq!(b.config(&base, 7).seed, 7);
        for bad in ["fp9", "fp8-o3", "fp8-o1:fast", "fp32:current"] {
            assert!(Variant::parse(bad, &base).is_err(), "{bad}");
        }
    }
}
