//! Block recipe in checkpoints: `fp8_scales.safetensors` holds, for every FP8 linear
//! weight, `<weight name>.scale`, the f32 grid of its 128 x 128 tile scales
//! (`[ceil(out / 128), ceil(in / 128)]`, row-major: tile `(i, j)` covers rows
//! `128i..128(i+1)` and columns `128j..128(j+1)`), computed from the saved weights as the
//! next forward's cast will (E4M3, `fp8.block_rounding`). Any safetensors reader opens it;
//! `real = e4m3(w * scale[i, j]) / scale[i, j]` reproduces the FP8 weights. Recomputed,
//! not restored, on resume (the scales are a function of the weights).

use crate::checkpoint::CkptTensor;
use crate::train::Trainer;
use fp8lm_fp8::block::{grid, quantize_blocks, WEIGHT_BLOCK};
use fp8lm_fp8::{Fp8Format, ScaleRounding, ScalingRecipe};

/// Checkpoint group of the tile scales.
pub const GROUP: &str = "fp8_scales";

/// The `<name>.scale` tensors of `tr`'s block-scaled linear weights (empty for other
/// recipes).
pub fn weight_scale_tensors(tr: &Trainer) -> Vec<CkptTensor> {
    let model = tr.model();
    let mut out = Vec::new();
    for (t, (meta, w)) in model.named_params().enumerate() {
        let Some(li) = model.linear_of_tensor[t] else {
            continue;
        };
        let lin = &model.linears[li];
        let Some(f) = lin.fp8.as_ref() else {
            continue;
        };
        let ScalingRecipe::Block { exact } = f.w.state.recipe else {
            continue;
        };
        let (rows, cols) = (lin.oc, lin.c);
        if w.len() != rows * cols {
            continue;
        }
        let (gr, gc) = grid(rows, cols, WEIGHT_BLOCK);
        let mut scales = vec![0f32; gr * gc];
        let mut codes = vec![0u8; w.len()];
        let rounding = if exact {
            ScaleRounding::Exact
        } else {
            ScaleRounding::PowerOfTwo
        };
        quantize_blocks(
            Fp8Format::E4M3,
            w,
            rows,
            cols,
            WEIGHT_BLOCK,
            rounding,
            f.w.state.margin,
            &mut codes,
            &mut scales,
        );
        out.push(CkptTensor::f32(
            &format!("{}.scale", meta.name),
            &[gr, gc],
            &scales,
        ));
    }
    out
}
