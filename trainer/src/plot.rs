//! The loss-curve plot (`loss.svg` in the run directory), redrawn at each evaluation.
//!
//! What the plot needs is kept in a [`LossHistory`] of bounded size (at most
//! [`LossHistory::CAP`] points per curve; older points are merged pairwise into means as a
//! run grows), so a days-long run neither grows its memory per step nor takes longer to
//! redraw: the plot of a million-step run has the same number of points as a 4096-step one.
//!
//! SVG via plotters' SVG backend, built without its font features: the backend writes
//! labels as `<text>` elements that the viewer renders, so no system font or font file is
//! needed at run time (plotters' bitmap backends would need one). The file is written
//! atomically, so a viewer refreshing it never sees half a plot.

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

use crate::metrics::MetricsRecord;

/// One curve, downsampled as it grows: points are means of `stride` consecutive
/// inputs; when [`LossHistory::CAP`] points are held, neighbours are merged pairwise and
/// the stride doubles. Memory is bounded by `CAP` whatever the run length.
#[derive(Clone, Debug, Default)]
struct Series {
    points: Vec<(f64, f64)>,
    stride: usize,
    /// Sums of the bucket being filled: (step, value, count).
    pending: (f64, f64, usize),
}

impl Series {
    fn push(&mut self, x: f64, y: f64) {
        if self.stride == 0 {
            self.stride = 1;
        }
        let p = &mut self.pending;
        (p.0, p.1, p.2) = (p.0 + x, p.1 + y, p.2 + 1);
        if p.2 < self.stride {
            return;
        }
        let n = p.2 as f64;
        self.points.push((p.0 / n, p.1 / n));
        self.pending = (0.0, 0.0, 0);
        if self.points.len() >= LossHistory::CAP {
            self.points = self
                .points
                .chunks(2)
                .map(|c| {
                    let k = c.len() as f64;
                    (
                        c.iter().map(|p| p.0).sum::<f64>() / k,
                        c.iter().map(|p| p.1).sum::<f64>() / k,
                    )
                })
                .collect();
            self.stride *= 2;
        }
    }

    /// The points, with a partly filled bucket as one more point.
    fn all(&self) -> Vec<(f64, f64)> {
        let mut v = self.points.clone();
        let p = self.pending;
        if p.2 > 0 {
            v.push((p.0 / p.2 as f64, p.1 / p.2 as f64));
        }
        v
    }
}

/// Training and validation losses for the plot, bounded in size (module docs).
#[derive(Clone, Debug, Default)]
pub struct LossHistory {
    train: Series,
    val: Series,
}

impl LossHistory {
    /// Most points kept per curve (more than the 800-pixel-wide plot can show).
    pub const CAP: usize = 4096;

    /// Add one step's record (non-finite losses are not plotted).
    pub fn push(&mut self, r: &MetricsRecord) {
        if let Some(l) = r.loss.filter(|l| l.is_finite()) {
            self.train.push(r.step as f64, l as f64);
        }
        if let Some(l) = r.val_loss.filter(|l| l.is_finite()) {
            self.val.push(r.step as f64, l as f64);
        }
    }

    pub fn from_records(records: &[MetricsRecord]) -> Self {
        let mut h = LossHistory::default();
        records.iter().for_each(|r| h.push(r));
        h
    }

    /// Points held (train, val): at most `CAP` each.
    pub fn len(&self) -> (usize, usize) {
        (self.train.points.len(), self.val.points.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == (0, 0) && self.train.pending.2 == 0 && self.val.pending.2 == 0
    }
}

/// Draw training loss (line), validation loss (line with points) and, if known, the data's
/// entropy floor (dashed), in nats per token against the step.
pub fn plot_losses(
    path: &Path,
    records: &[MetricsRecord],
    entropy_floor: Option<f64>,
    title: &str,
) -> Result<()> {
    plot_history(
        path,
        &LossHistory::from_records(records),
        entropy_floor,
        title,
    )
}

/// [`plot_losses`] from a [`LossHistory`] (what the run loop keeps).
pub fn plot_history(
    path: &Path,
    history: &LossHistory,
    entropy_floor: Option<f64>,
    title: &str,
) -> Result<()> {
    let train = history.train.all();
    let val = history.val.all();
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

    #[test]
    fn history_stays_bounded_and_keeps_the_curve() {
        let mut h = LossHistory::default();
        let n = 100_000u64;
        for s in 1..=n {
            h.push(&MetricsRecord {
                step: s,
                loss: Some(10.0 - 9.0 * s as f32 / n as f32),
                val_loss: (s % 10 == 0).then_some(1.0),
                ..Default::default()
            });
        }
        let (t, v) = h.len();
        assert!(
            (LossHistory::CAP / 2..=LossHistory::CAP).contains(&t),
            "{t}"
        );
        assert!(v <= LossHistory::CAP, "{v}");
        // Means of a linear ramp lie on the ramp: the first and last points stay within
        // one bucket (stride <= n / (CAP/2) steps) of the ends.
        let pts = h.train.all();
        let stride = (2 * n as usize / LossHistory::CAP) as f64;
        assert!(pts[0].0 <= stride && pts.last().unwrap().0 >= n as f64 - stride);
        for (x, y) in pts {
            let want = 10.0 - 9.0 * x / n as f64;
            assert!((y - want).abs() < 1e-3, "{x} {y} {want}");
        }
    }
}
