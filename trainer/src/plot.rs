//! The loss-curve plot (`loss.svg` in the run directory), redrawn at each evaluation.
//!
//! SVG via plotters' SVG backend, built without its font features: the backend writes
//! labels as `<text>` elements that the viewer renders, so no system font or font file is
//! needed at run time (plotters' bitmap backends would need one). The file is written
//! atomically, so a viewer refreshing it never sees half a plot.

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

use crate::metrics::MetricsRecord;

/// Draw training loss (line), validation loss (line with points) and, if known, the data's
/// entropy floor (dashed), in nats per token against the step.
pub fn plot_losses(
    path: &Path,
    records: &[MetricsRecord],
    entropy_floor: Option<f64>,
    title: &str,
) -> Result<()> {
    let train: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| {
            r.loss
                .filter(|l| l.is_finite())
                .map(|l| (r.step as f64, l as f64))
        })
        .collect();
    let val: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| {
            r.val_loss
                .filter(|l| l.is_finite())
                .map(|l| (r.step as f64, l as f64))
        })
        .collect();
    let ys = train.iter().chain(&val).map(|p| p.1).chain(entropy_floor);
    let (ymin, ymax) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
        (a.min(y), b.max(y))
    });
    let xmax = train.iter().chain(&val).map(|p| p.0).fold(1.0, f64::max);
    let (ymin, ymax) = if ymin.is_finite() {
        (ymin, ymax)
    } else {
        (0.0, 1.0)
    };
    let pad = ((ymax - ymin) * 0.05).max(1e-3);

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("plot: {e:?}"))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..xmax, (ymin - pad).max(0.0)..ymax + pad)
            .map_err(|e| anyhow!("plot: {e:?}"))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss (nats/token)")
            .draw()
            .map_err(|e| anyhow!("plot: {e:?}"))?;
        chart
            .draw_series(LineSeries::new(train.iter().copied(), BLUE.stroke_width(2)))
            .map_err(|e| anyhow!("plot: {e:?}"))?
            .label("train loss")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        if !val.is_empty() {
            chart
                .draw_series(LineSeries::new(val.iter().copied(), RED.stroke_width(2)))
                .map_err(|e| anyhow!("plot: {e:?}"))?
                .label("val loss")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
            chart
                .draw_series(val.iter().map(|&p| Circle::new(p, 3, RED.filled())))
                .map_err(|e| anyhow!("plot: {e:?}"))?;
        }
        if let Some(f) = entropy_floor {
            // Dashed: short segments along the floor.
            let n = 60;
            let segs = (0..n).step_by(2).map(move |i| {
                let (a, b) = (xmax * i as f64 / n as f64, xmax * (i + 1) as f64 / n as f64);
                PathElement::new(vec![(a, f), (b, f)], BLACK)
            });
            chart
                .draw_series(segs)
                .map_err(|e| anyhow!("plot: {e:?}"))?
                .label("entropy floor")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow!("plot: {e:?}"))?;
        root.present().map_err(|e| anyhow!("plot: {e:?}"))?;
    }
    crate::checkpoint::write_atomic(path, svg.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_svg_with_labels_without_fonts() {
        let recs: Vec<MetricsRecord> = (1..=50u64)
            .map(|s| MetricsRecord {
                step: s,
                loss: Some(5.0 / (s as f32).sqrt()),
                val_loss: (s % 10 == 0).then(|| 4.8 / (s as f32).sqrt()),
                ..Default::default()
            })
            .collect();
        let p = std::env::temp_dir().join(format!("fp8lm-plot-{}.svg", std::process::id()));
        plot_losses(&p, &recs, Some(0.9), "test run").unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        for label in [
            "train loss",
            "val loss",
            "entropy floor",
            "step",
            "test run",
        ] {
            assert!(svg.contains(label), "missing label {label}");
        }
        assert!(svg.matches("<polyline").count() >= 2);
        // Empty metrics still give a valid (empty) plot instead of an error.
        plot_losses(&p, &[], None, "empty").unwrap();
    }
}
