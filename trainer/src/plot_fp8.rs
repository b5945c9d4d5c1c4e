//! FP8 health plots of a run directory, redrawn at each evaluation beside `loss.svg`:
//!
//! - `fp8.svg`: one heat map per quantity (log2 amax, log2 scale, overflow fraction,
//!   underflow fraction), a row per FP8 tensor (`<linear>.x|w|dy`), a column per logged
//!   step. A heat map rather than small multiples because a 12-layer model has 144 FP8
//!   tensors: one row each stays readable where 144 line charts would not.
//! - `allreduce.svg` (data-parallel FP8 runs): the gradient all-reduce's mu (min, mean,
//!   max over tensors) and its overflow/underflow fractions against the step.
//!
//! Same SVG backend as [`crate::plot`] (no fonts needed), written atomically.

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

use crate::metrics::{AllReduceStats, Fp8TensorStats, MetricsRecord};

fn perr<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plot: {e:?}")
}

/// Colour of `t` in [0, 1]: dark blue -> green -> yellow (a viridis-like ramp).
fn ramp(t: f64) -> RGBColor {
    let t = t.clamp(0.0, 1.0);
    let stops = [
        (68.0, 1.0, 84.0),
        (59.0, 82.0, 139.0),
        (33.0, 145.0, 140.0),
        (94.0, 201.0, 98.0),
        (253.0, 231.0, 37.0),
    ];
    let x = t * (stops.len() - 1) as f64;
    let i = (x.floor() as usize).min(stops.len() - 2);
    let f = x - i as f64;
    let (a, b) = (stops[i], stops[i + 1]);
    let mix = |p: f64, q: f64| (p + (q - p) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// One heat-map quantity of a tensor's stats at one step (`None`: not shown).
type Quantity = fn(&Fp8TensorStats) -> Option<f64>;

fn fraction(count: u64, numel: u64) -> Option<f64> {
    (numel > 0).then(|| count as f64 / numel as f64)
}

const QUANTITIES: [(&str, Quantity); 4] = [
    ("log2 amax", |s| {
        (s.amax.is_finite() && s.amax > 0.0).then(|| (s.amax as f64).log2())
    }),
    ("log2 scale", |s| {
        (s.scale.is_finite() && s.scale > 0.0).then(|| (s.scale as f64).log2())
    }),
    ("overflow fraction (log10, >= 1e-7)", |s| {
        fraction(s.overflow, s.numel).map(|f| f.max(1e-7).log10())
    }),
    ("underflow fraction (log10, >= 1e-7)", |s| {
        fraction(s.underflow, s.numel).map(|f| f.max(1e-7).log10())
    }),
];

/// `fp8.svg`: heat maps of every FP8 tensor's amax, scale and overflow/underflow over the
/// logged steps. Records without FP8 stats are skipped; no FP8 stats at all draws
/// nothing and returns `Ok(false)`.
pub fn plot_fp8(path: &Path, records: &[MetricsRecord], title: &str) -> Result<bool> {
    let recs: Vec<&MetricsRecord> = records.iter().filter(|r| !r.fp8.is_empty()).collect();
    let Some(last) = recs.last() else {
        return Ok(false);
    };
    let names: Vec<&str> = last.fp8.iter().map(|s| s.name.as_str()).collect();
    // At most ~400 columns: longer runs are subsampled evenly (the SVG stays small).
    let stride = recs.len().div_ceil(400).max(1);
    let cols: Vec<&MetricsRecord> = recs.iter().step_by(stride).copied().collect();
    let xmax = cols.last().map_or(1, |r| r.step) as f64;
    let xmin = cols.first().map_or(0, |r| r.step) as f64;
    let rows = names.len();
    let row_px = (600 / rows.max(1)).clamp(3, 14) as u32;
    let panel_h = rows as u32 * row_px + 70;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1000, panel_h * 4 + 40)).into_drawing_area();
        root.fill(&WHITE).map_err(perr)?;
        let root = root.titled(title, ("sans-serif", 20)).map_err(perr)?;
        let panels = root.split_evenly((4, 1));
        let names = &names;
        for (panel, (label, q)) in panels.iter().zip(QUANTITIES) {
            let cells: Vec<(usize, usize, f64)> = cols
                .iter()
                .enumerate()
                .flat_map(|(c, r)| {
                    r.fp8.iter().filter_map(move |s| {
                        let row = names.iter().position(|n| *n == s.name)?;
                        q(s).filter(|v| v.is_finite()).map(|v| (c, row, v))
                    })
                })
                .collect();
            let (lo, hi) = cells
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), c| {
                    (a.min(c.2), b.max(c.2))
                });
            let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
            let span = (hi - lo).max(1e-9);
            let caption = format!("{label}: {lo:.2} (dark) .. {hi:.2} (light)");
            let mut chart = ChartBuilder::on(panel)
                .caption(caption, ("sans-serif", 14))
                .margin(8)
                .x_label_area_size(25)
                .y_label_area_size(150)
                .build_cartesian_2d(xmin..xmax.max(xmin + 1.0), 0f64..rows as f64)
                .map_err(perr)?;
            let label_every = rows.div_ceil(24).max(1);
            chart
                .configure_mesh()
                .disable_mesh()
                .x_desc("step")
                .y_labels(rows.min(24))
                .y_label_formatter(&|y| {
                    let i = y.floor() as usize;
                    if i < rows && i.is_multiple_of(label_every) {
                        names[rows - 1 - i].to_string()
                    } else {
                        String::new()
                    }
                })
                .draw()
                .map_err(perr)?;
            let dx = if cols.len() > 1 {
                (xmax - xmin) / (cols.len() - 1) as f64
            } else {
                1.0
            };
            chart
                .draw_series(cells.iter().map(|&(c, row, v)| {
                    let x = cols[c].step as f64;
                    let y = (rows - 1 - row) as f64;
                    Rectangle::new(
                        [(x - dx / 2.0, y), (x + dx / 2.0, y + 1.0)],
                        ramp((v - lo) / span).filled(),
                    )
                }))
                .map_err(perr)?;
        }
        root.present().map_err(perr)?;
    }
    crate::checkpoint::write_atomic(path, svg.as_bytes())?;
    Ok(true)
}

/// A line of `allreduce.svg`: label, colour, value of a step's stats.
type ArSeries = (&'static str, RGBColor, fn(&AllReduceStats) -> f64);

/// `allreduce.svg`: the FP8 gradient all-reduce per step, mu (min, mean, max) on top and
/// the overflow/underflow fractions (log10, floored at 1e-9) below. `Ok(false)` and no
/// file when no record has all-reduce stats (single rank, or no FP8 gradients).
pub fn plot_allreduce(path: &Path, records: &[MetricsRecord], title: &str) -> Result<bool> {
    let pts: Vec<(f64, &AllReduceStats)> = records
        .iter()
        .filter_map(|r| r.allreduce.as_ref().map(|a| (r.step as f64, a)))
        .collect();
    if pts.is_empty() {
        return Ok(false);
    }
    let xmax = pts.iter().map(|p| p.0).fold(1.0, f64::max);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 600)).into_drawing_area();
        root.fill(&WHITE).map_err(perr)?;
        let root = root.titled(title, ("sans-serif", 20)).map_err(perr)?;
        let (top, bottom) = root.split_vertically(280);
        let mu_hi = pts.iter().map(|p| p.1.mu_max as f64).fold(0.0, f64::max);
        let mu_lo = pts.iter().map(|p| p.1.mu_min as f64).fold(mu_hi, f64::min);
        let pad = ((mu_hi - mu_lo) * 0.1).max(0.05);
        let mut chart = ChartBuilder::on(&top)
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..xmax, (mu_lo - pad).max(0.0)..mu_hi + pad)
            .map_err(perr)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("mu")
            .draw()
            .map_err(perr)?;
        let series: [ArSeries; 3] = [
            ("mu max", RED, |a| a.mu_max as f64),
            ("mu mean", BLACK, |a| a.mu_mean as f64),
            ("mu min", BLUE, |a| a.mu_min as f64),
        ];
        for (label, color, f) in series {
            chart
                .draw_series(LineSeries::new(
                    pts.iter().map(|p| (p.0, f(p.1))),
                    color.stroke_width(2),
                ))
                .map_err(perr)?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(perr)?;
        let lg = |f: f64| f.max(1e-9).log10();
        let mut chart = ChartBuilder::on(&bottom)
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..xmax, -9.5f64..0.0)
            .map_err(perr)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("log10 fraction")
            .draw()
            .map_err(perr)?;
        let series: [ArSeries; 2] = [
            ("overflow (saturated sums)", RED, |a| a.overflow),
            ("underflow (flushed to zero)", BLUE, |a| a.underflow),
        ];
        for (label, color, f) in series {
            chart
                .draw_series(LineSeries::new(
                    pts.iter().map(|p| (p.0, lg(f(p.1)))),
                    color.stroke_width(2),
                ))
                .map_err(perr)?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(perr)?;
        root.present().map_err(perr)?;
    }
    crate::checkpoint::write_atomic(path, svg.as_bytes())?;
    Ok(true)
}

/// (step, loss) points of one curve.
type Curve = Vec<(f64, f64)>;

/// Distinct line colours for overlaid runs (cycled).
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
    RGBColor(140, 86, 75),
    RGBColor(127, 127, 127),
];

/// `fp8lm report`: several runs' loss curves on one chart, training loss thin, validation
/// loss thick with points, one colour per run (labelled). The y range covers every curve.
pub fn plot_overlay(path: &Path, runs: &[(String, Vec<MetricsRecord>)], title: &str) -> Result<()> {
    let pick = |r: &[MetricsRecord], val: bool| -> Vec<(f64, f64)> {
        r.iter()
            .filter_map(|m| {
                let l = if val { m.val_loss } else { m.loss };
                l.filter(|l| l.is_finite())
                    .map(|l| (m.step as f64, l as f64))
            })
            .collect()
    };
    let curves: Vec<(Curve, Curve)> = runs
        .iter()
        .map(|(_, r)| (pick(r, false), pick(r, true)))
        .collect();
    let all = curves.iter().flat_map(|(a, b)| a.iter().chain(b));
    let (mut ymin, mut ymax, mut xmax) = (f64::INFINITY, f64::NEG_INFINITY, 1f64);
    for &(x, y) in all {
        ymin = ymin.min(y);
        ymax = ymax.max(y);
        xmax = xmax.max(x);
    }
    if !ymin.is_finite() {
        (ymin, ymax) = (0.0, 1.0);
    }
    let pad = ((ymax - ymin) * 0.05).max(1e-3);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(perr)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..xmax, (ymin - pad).max(0.0)..ymax + pad)
            .map_err(perr)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss (nats/token)")
            .draw()
            .map_err(perr)?;
        for (i, ((label, _), (train, val))) in runs.iter().zip(&curves).enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(LineSeries::new(train.iter().copied(), color.mix(0.45)))
                .map_err(perr)?;
            let series = if val.is_empty() { train } else { val };
            chart
                .draw_series(LineSeries::new(
                    series.iter().copied(),
                    color.stroke_width(3),
                ))
                .map_err(perr)?
                .label(format!(
                    "{label} ({})",
                    if val.is_empty() { "train" } else { "val" }
                ))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            chart
                .draw_series(val.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(perr)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(perr)?;
        root.present().map_err(perr)?;
    }
    crate::checkpoint::write_atomic(path, svg.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use AllReduceStats;

    fn recs() -> Vec<MetricsRecord> {
        (1..=30u64)
            .map(|s| MetricsRecord {
                step: s,
                loss: Some(3.0),
                fp8: ["h.0.fc.x", "h.0.fc.w", "h.0.fc.dy"]
                    .iter()
                    .enumerate()
                    .map(|(i, n)| Fp8TensorStats {
                        name: n.to_string(),
                        amax: (i + 1) as f32 * s as f32,
                        scale: 448.0 / ((i + 1) as f32 * s as f32),
                        overflow: s % 3,
                        underflow: 10 * s,
                        numel: 1000,
                        ..Default::default()
                    })
                    .collect(),
                allreduce: Some(AllReduceStats {
                    mu_min: 0.5,
                    mu_mean: 0.75,
                    mu_max: 1.0,
                    overflow: 1e-6 * s as f64,
                    underflow: 1e-3,
                }),
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn fp8_heat_map_has_a_cell_per_tensor_and_step_and_its_labels() {
        let d = std::env::temp_dir().join(format!("fp8lm-plotfp8-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("fp8.svg");
        assert!(plot_fp8(&p, &recs(), "fp8 test").unwrap());
        let svg = std::fs::read_to_string(&p).unwrap();
        for label in [
            "log2 amax",
            "log2 scale",
            "overflow",
            "underflow",
            "h.0.fc.dy",
        ] {
            assert!(svg.contains(label), "missing {label}");
        }
        // 4 panels x 3 tensors x 30 steps cells (plus the background rectangle(s)).
        assert!(
            svg.matches("<rect").count() >= 4 * 3 * 30,
            "{}",
            svg.matches("<rect").count()
        );
        assert!(!plot_fp8(&d.join("none.svg"), &[], "x").unwrap());
        assert!(!d.join("none.svg").exists());

        let a = d.join("allreduce.svg");
        assert!(plot_allreduce(&a, &recs(), "ar test").unwrap());
        let svg = std::fs::read_to_string(&a).unwrap();
        for label in ["mu max", "mu min", "overflow", "underflow"] {
            assert!(svg.contains(label), "missing {label}");
        }
        assert!(svg.matches("<polyline").count() >= 5);
        let no_ar: Vec<MetricsRecord> = recs()
            .into_iter()
            .map(|r| MetricsRecord {
                allreduce: None,
                ..r
            })
            .collect();
        assert!(!plot_allreduce(&d.join("no.svg"), &no_ar, "x").unwrap());
    }

    #[test]
    fn ramp_runs_dark_to_light() {
        let lum = |c: RGBColor| c.0 as u32 + c.1 as u32 + c.2 as u32;
        let mut prev = 0;
        for i in 0..=10 {
            let l = lum(ramp(i as f64 / 10.0));
            assert!(l >= prev, "{i}");
            prev = l;
        }
        assert_eq!(ramp(-1.0), ramp(0.0));
        assert_eq!(ramp(2.0), ramp(1.0));
    }
}
