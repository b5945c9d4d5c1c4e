//! Scaling recipes: how a per-tensor scale is chosen from amax values.
//!
//! `stored = cast(real * scale)`. The default scale is the power of two
//! `2^(floor(log2(fmt_max / amax)) - margin)` (MS-AMP): multiplying by it is exact, so
//! scaling adds no rounding error and `stored / scale` is exactly the FP8 value's real
//! counterpart. The exact ratio `(fmt_max / amax) / 2^margin` (Transformer Engine) is an
//! option; it uses more of the format's range but the multiply itself rounds.
//!
//! Both are computed so that `amax * scale <= fmt_max` holds exactly (not just up to a
//! rounding of `log2` or of the division), which is what makes the current recipe
//! overflow-free: every element of the tensor scales into range.

use crate::cast;
use crate::format::{pow2, Fp8Format};

/// How the scale is derived from an amax.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ScaleRounding {
    /// `2^(floor(log2(fmt_max / amax)) - margin)`; exact multiplication.
    #[default]
    PowerOfTwo,
    /// `(fmt_max / amax) / 2^margin`, rounded down where f32 rounding would overshoot.
    Exact,
}

/// Which amax a scale is computed from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScalingRecipe {
    /// Just-in-time: the amax of the very tensor being cast (one extra read pass).
    Current,
    /// Max over a window of the last `history_len` amax values (one step stale; the
    /// amax comes free from the cast itself). A length of 0 is treated as 1.
    Delayed { history_len: usize },
    /// One current scale per tile (1 x 128 activations and gradients, 128 x 128 weights;
    /// [`crate::block`]), power of two unless `exact`. A [`ScaleState`] with this recipe
    /// casts whole tensors like `Current` (it has one scale); tiles are cast by
    /// [`crate::block::quantize_blocks`].
    Block { exact: bool },
}

impl ScalingRecipe {
    /// Whether a cast computes the amax of the tensor (or tile) being cast.
    pub fn is_current(self) -> bool {
        matches!(self, ScalingRecipe::Current | ScalingRecipe::Block { .. })
    }
}

/// `(exponent, significand)` of a positive finite f64, significand in `[2^52, 2^53)`.
fn split(x: f64) -> (i32, u64) {
    debug_assert!(x.is_finite() && x > 0.0);
    let b = x.to_bits();
    let e = ((b >> 52) & 0x7FF) as i32;
    let m = b & ((1 << 52) - 1);
    if e == 0 {
        // f64 subnormal: cannot come from an f32, handled for completeness.
        let lz = m.leading_zeros() as i32 - 11;
        (-1022 - lz, m << lz)
    } else {
        (e - 1023, m | (1 << 52))
    }
}

/// The amax of two tensors (or of two parts of one) from theirs: the larger, NaN if
/// either is NaN (a tensor holding a NaN has a NaN amax, and merging must keep it, so
/// `f32::max`, which drops NaN, is not enough).
pub fn merge_amax(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        a.max(b)
    }
}

/// Scale for `amax` so that `amax * scale` lands at or below `fmt_max`.
/// Returns `None` for amax 0 or non-finite (callers keep their previous scale).
/// Scales are kept within f32's normal range `[2^-126, 2^127]`.
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
            // floor(log2(fmt_max / amax)) exactly, from the binary exponents: the
            // significand ratio lies in (1/2, 2), so it only decides a -1.
            let (ef, mf) = split(fmt_max as f64);
            let (ea, ma) = split(amax as f64);
            let k = ef - ea - i32::from(mf < ma);
            pow2(k.saturating_sub(margin).clamp(-126, 127))
        }
        ScaleRounding::Exact => {
            let target = fmt_max as f64 * 2f64.powi(-margin);
            let mut s = ((target / amax as f64) as f32).clamp(f32::MIN_POSITIVE, f32::MAX);
            // Rounding to f32 may have gone up; step down until the product fits. Both
            // factors have 24-bit significands, so the f64 product is exact.
            while amax as f64 * s as f64 > target && s > f32::MIN_POSITIVE {
                s = f32::from_bits(s.to_bits() - 1);
            }
            s
        }
    };
    Some(s)
}

/// What one [`ScaleState::quantize`] did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Quantized {
    /// The scale the values were cast with (`stored = fp8(real * scale)`).
    pub scale: f32,
    /// The input's amax (NaN if it held a NaN).
    pub amax: f32,
}

/// Per-tensor scaling state: current scale, amax history, and counters of amax values
/// that could not produce a scale (zero or non-finite), readable for per-layer reports.
///
/// Use [`ScaleState::quantize`] to run the recipe around a bulk cast, or the two halves
/// by hand: `let s = st.scale_for_cast(amax_if_current); let a = cast(.., s); st.record_amax(a)`.
#[derive(Clone, Debug, PartialEq)]
pub struct ScaleState {
    pub format: Fp8Format,
    pub recipe: ScalingRecipe,
    pub rounding: ScaleRounding,
    /// Head-room in binades (`scale` is divided by `2^margin`).
    pub margin: i32,
    /// The scale the next cast uses (`stored = cast(real * scale)`).
    pub scale: f32,
    /// Most recent finite amax values, oldest first (delayed recipe only).
    pub amax_history: Vec<f32>,
    /// Tensor amax values of exactly zero seen (the scale was kept).
    pub zero_amax_count: u64,
    /// Non-finite tensor amax values seen (the scale was kept; not put in the history).
    pub nonfinite_amax_count: u64,
    /// The last tensor amax observed (any value, NaN included), for reports.
    pub last_amax: f32,
}

impl ScaleState {
    /// Power-of-two scales, margin 0, initial scale 1.
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
            last_amax: 0.0,
        }
    }

    pub fn with_margin(mut self, margin: i32) -> Self {
        self.margin = margin;
        self
    }

    pub fn with_rounding(mut self, rounding: ScaleRounding) -> Self {
        self.rounding = rounding;
        self
    }

    /// Scale to cast a tensor with. The current recipe derives it from `tensor_amax`
    /// (counting a zero or non-finite one and keeping the previous scale); the delayed
    /// recipe ignores the argument and returns the scale derived from the history.
    pub fn scale_for_cast(&mut self, tensor_amax: f32) -> f32 {
        if self.recipe.is_current() {
            self.observe(tensor_amax);
            self.update_scale(tensor_amax);
        }
        self.scale
    }

    /// Record the amax measured while casting. Delayed recipe: count it if unusable,
    /// push it into the history if finite, and derive the next cast's scale from the
    /// window's max. The current recipe has already used its amax; this is a no-op.
    pub fn record_amax(&mut self, amax: f32) {
        if let ScalingRecipe::Delayed { history_len } = self.recipe {
            self.observe(amax);
            if !amax.is_finite() {
                return;
            }
            self.amax_history.push(amax);
            let keep = history_len.max(1);
            if self.amax_history.len() > keep {
                let extra = self.amax_history.len() - keep;
                self.amax_history.drain(..extra);
            }
            self.update_scale(self.window_amax());
        }
    }

    /// Max over the amax history (0 if empty).
    pub fn window_amax(&self) -> f32 {
        self.amax_history.iter().copied().fold(0f32, f32::max)
    }

    /// Run the recipe around a bulk f32 -> FP8 cast of `src` into `dst` (saturating,
    /// like `from_f32`). Returns the scale the cast used (for the delayed recipe
    /// `self.scale` has already moved on to the next step's) and the tensor's amax.
    /// The current recipe reads `src`
    /// twice (amax, then cast); the delayed recipe once. A delayed state with an empty
    /// history bootstraps from this tensor's own amax rather than casting with the
    /// arbitrary initial scale.
    pub fn quantize(&mut self, src: &[f32], dst: &mut [u8]) -> Quantized {
        let delayed_bootstrap =
            matches!(self.recipe, ScalingRecipe::Delayed { .. }) && self.amax_history.is_empty();
        if self.recipe.is_current() || delayed_bootstrap {
            let amax = cast::amax_f32(src);
            if delayed_bootstrap {
                self.update_scale(amax);
            } else {
                self.scale_for_cast(amax);
            }
        }
        let scale = self.scale;
        let amax = cast::f32_to_fp8_amax(self.format, src, scale, dst);
        match self.recipe {
            ScalingRecipe::Current | ScalingRecipe::Block { .. } => {}
            ScalingRecipe::Delayed { .. } => self.record_amax(amax),
        }
        Quantized { scale, amax }
    }

    fn observe(&mut self, amax: f32) {
        self.last_amax = amax;
        if amax == 0.0 {
            self.zero_amax_count += 1;
        } else if !amax.is_finite() {
            self.nonfinite_amax_count += 1;
        }
    }

    fn update_scale(&mut self, amax: f32) {
        if let Some(s) = scale_for_amax(self.format.max(), amax, self.margin, self.rounding) {
            self.scale = s;
        }
    }
}
