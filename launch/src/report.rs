//! FP8 health of runs: the plots redrawn beside `loss.svg` during training.

use fp8lm_trainer::metrics::MetricsRecord;
use std::path::Path;

/// Redraw `fp8.svg` and `allreduce.svg` in `run_dir` (each only when the records hold
/// its statistics). A failed plot is logged, never fatal: plots must not stop a run.
pub fn plot_health(run_dir: &Path, records: &[MetricsRecord], title: &str) {
    let fp8 = run_dir.join("fp8.svg");
    if let Err(e) = fp8lm_trainer::plot_fp8::plot_fp8(&fp8, records, title) {
        tracing::warn!("plot {}: {e:#}", fp8.display());
    }
    let ar = run_dir.join("allreduce.svg");
    if let Err(e) = fp8lm_trainer::plot_fp8::plot_allreduce(&ar, records, title) {
        tracing::warn!("plot {}: {e:#}", ar.display());
    }
}
