//! Scaling recipes: how a per-tensor scale is chosen from amax values.
//!
//! `stored = cast(real * scale)`. The default scale is the power of two
//! `2^(floor(log2(fmt_max / amax)) - margin)` (MS-AMP): multiplying by it is exact, so
//! scaling adds no rounding error. The exact ratio (Transformer Engine) is an option.

use crate::format::{pow2, Fp8Format};

/// How the scale is derived from an amax.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ScaleRounding {
    /// `2^(floor(log2(fmt_max / amax)) - margin)`; exact multiplication.
    #[default]
    PowerOfTwo,
    /// `(fmt_max / amax) / 2^margin`.
    Exact,
}

/// Which amax a scale is computed from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScalingRecipe {
    /// Just-in-time: the amax of the very tensor being cast.
    Current,
    /// Max over a window of the last `history_len` amax values (one step stale).
    Delayed { history_len: usize },
}

/// Scale for `amax` so that `amax * scale` lands at or below `fmt_max`.
/// Returns `None` for amax 0 or non-finite (callers keep their previous scale).
pub fn scale_for_amax(
    fmt_max: f32,
    amax: f32,
    margin: i32,
    rounding: ScaleRounding,
) -> Option<f32> {
    if !(amax.is_finite() && amax > 0.0) {
        return None;
    }
    let s = match rounding {
        ScaleRounding::PowerOfTwo => {
            let ratio = fmt_max as f64 / amax as f64;
            let e = ratio.log2().floor() as i32 - margin;
            pow2(e.clamp(-126, 127))
        }
        ScaleRounding::Exact => {
            let s = (fmt_max as f64 / amax as f64 / 2f64.powi(margin)) as f32;
            if s.is_finite() {
                s
            } else {
                f32::MAX
            }
        }
    };
    Some(s)
}

/// Per-tensor scaling state: current scale, amax history, and counters of amax values
/// that could not produce a scale (zero or non-finite), readable for per-layer reports.
#[derive(Clone, Debug, PartialEq)]
pub struct ScaleState {
    pub format: Fp8Format,
    pub recipe: ScalingRecipe,
    pub rounding: ScaleRounding,
    pub margin: i32,
    pub scale: f32,
    /// Most recent amax values, oldest first (delayed recipe only).
    pub amax_history: Vec<f32>,
    /// amax values of exactly zero seen (scale kept).
    pub zero_amax_count: u64,
    /// Non-finite amax values seen (scale kept).
    pub nonfinite_amax_count: u64,
}

impl ScaleState {
    pub fn new(format: Fp8Format, recipe: ScalingRecipe) -> Self {
        ScaleState {
            format,
            recipe,
            rounding: ScaleRounding::PowerOfTwo,
            margin: 0,
            scale: 1.0,
            amax_history: Vec::new(),
            zero_amax_count: 0,
            nonfinite_amax_count: 0,
        }
    }

    /// Scale to cast a tensor with, given its own amax (used by the current recipe;
    /// the delayed recipe ignores it and uses the scale derived from history).
    pub fn scale_for_cast(&mut self, tensor_amax: f32) -> f32 {
        if let ScalingRecipe::Current = self.recipe {
            self.observe_scale(tensor_amax);
        }
        self.scale
    }

    fn observe_scale(&mut self, amax: f32) {
        if amax == 0.0 {
            self.zero_amax_count += 1;
        } else if !amax.is_finite() {
            self.nonfinite_amax_count += 1;
        }
        if let Some(s) = scale_for_amax(self.format.max(), amax, self.margin, self.rounding) {
            self.scale = s;
        }
    }

    /// Record the amax measured while casting (delayed recipe: push into the history and
    /// derive the next step's scale from the window's max).
    pub fn record_amax(&mut self, amax: f32) {
        if let ScalingRecipe::Delayed { history_len } = self.recipe {
            if !amax.is_finite() {
                self.nonfinite_amax_count += 1;
                return;
            }
            self.amax_history.push(amax);
            if self.amax_history.len() > history_len.max(1) {
                self.amax_history.remove(0);
            }
            let window_max = self.amax_history.iter().copied().fold(0f32, f32::max);
            self.observe_scale(window_max);
        }
    }
}
