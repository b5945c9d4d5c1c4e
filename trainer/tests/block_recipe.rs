//! `fp8.recipe = "block"` (one scale per 1x128 tile of activations and output gradients,
//! per 128x128 block of weights): the linear layer against fp32 within the format bound of
//! each element's own tile, ragged edges (200 inputs, 136 outputs: tiles of 128 and 72 /
//! 8), better than one scale per tensor when magnitudes vary across tiles, and training
//! in every FP8 level (o1, o2, o3 on in-process ranks) with per-tensor min/max scales.
//!
//! Bound (as in `linear_precision.rs`, with the tile's scale): a value v cast with scale
//! s comes back within `u|v| + d/(2s)` (E4M3: u = 2^-4, d/2 = 2^-10; E5M2: 2^-3, 2^-17),
//! a product of two cast values within `(u_a|a| + δ_a)((1+u_b)|b| + δ_b) + |a|(u_b|b| + δ_b)`,
//! summed over k, plus 1e-5 * sum |a||b| for the f32 accumulation.

use fp8lm_collectives::{run_ranks, LocalComm};
use fp8lm_fp8::block::{grid, ACT_BLOCK, WEIGHT_BLOCK};
use fp8lm_fp8::ScalingRecipe;
use fp8lm_trainer::data::synthetic::MarkovCorpus;
use fp8lm_trainer::data::Dataset;
use fp8lm_trainer::model::{Linear, LinearPrecision};
use fp8lm_trainer::rng::Rng;
use fp8lm_trainer::{Precision, RunConfig, Trainer};

const E4M3: (f64, f64) = (1.0 / 16.0, 1.0 / 1024.0);
const E5M2: (f64, f64) = (1.0 / 8.0, 1.0 / 131072.0);

struct Case {
    n: usize,
    c: usize,
    oc: usize,
    x: Vec<f32>,
    w: Vec<f32>,
    dy: Vec<f32>,
}

/// Rows of x whose magnitudes differ by up to 2^20 (more than E4M3's 18 binades: one
/// tensor scale must flush the smallest rows), dy rows by 2^10, weight blocks by 2^4.
fn case() -> Case {
    let (n, c, oc) = (24, 200, 136);
    let mut r = Rng::new(5);
    let row_mag = |i: usize| 2f32.powi((i % 11) as i32 - 5);
    let x = (0..n * c)
        .map(|i| r.normal() * row_mag(i / c) * row_mag(i / c))
        .collect();
    let w = (0..oc * c)
        .map(|i| 0.02 * r.normal() * if (i / c) >= 128 { 16.0 } else { 1.0 })
        .collect();
    let dy = (0..n * oc)
        .map(|i| 1e-3 * r.normal() * row_mag(i / oc + 3))
        .collect();
    Case { n, c, oc, x, w, dy }
}

/// Forward + backward; returns (out, dinp, dW f32 before its E5M2 cast, the layer).
fn run(cs: &Case, p: LinearPrecision) -> (Vec<f32>, Vec<f32>, Vec<f32>, Linear) {
    let mut lin = Linear::new("t".into(), cs.c, cs.oc, cs.n, p);
    let mut out = vec![0f32; cs.n * cs.oc];
    lin.forward(&mut out, &cs.x, &cs.w, None, cs.n, true);
    let (mut dinp, mut dw) = (vec![0f32; cs.n * cs.c], vec![0f32; cs.oc * cs.c]);
    lin.backward(&mut dinp, &mut dw, None, &cs.dy, &cs.x, &cs.w, cs.n);
    (out, dinp, dw, lin)
}

/// Tile scale of element (r, c) of a `cols`-wide matrix with `tile` tiles.
fn tile_scale(
    scales: &[f32],
    rows: usize,
    cols: usize,
    tile: (usize, usize),
    r: usize,
    c: usize,
) -> f64 {
    let (_, gc) = grid(rows, cols, tile);
    scales[(r / tile.0) * gc + c / tile.1] as f64
}

fn term(a: f64, sa: f64, fa: (f64, f64), b: f64, sb: f64, fb: (f64, f64)) -> f64 {
    let (a, b) = (a.abs(), b.abs());
    let (da, db) = (fa.1 / sa, fb.1 / sb);
    (fa.0 * a + da) * ((1.0 + fb.0) * b + db) + a * (fb.0 * b + db) + 1e-5 * a * b
}

fn rel_rms(got: &[f32], want: &[f32]) -> f64 {
    let e: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
        .sum();
    let r: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (e / r).sqrt()
}

/// Mean over rows of each row's relative RMS error (every token counts alike, however
/// small its activations).
fn row_rel_rms(got: &[f32], want: &[f32], cols: usize) -> f64 {
    let rows = got.len() / cols;
    (0..rows)
        .map(|r| rel_rms(&got[r * cols..][..cols], &want[r * cols..][..cols]))
        .sum::<f64>()
        / rows as f64
}

#[test]
fn block_linear_within_tile_bounds_of_fp32_with_ragged_edges() {
    let cs = case();
    let (n, c, oc) = (cs.n, cs.c, cs.oc);
    let (o32, di32, dw32, _) = run(&cs, LinearPrecision::Fp32);
    for exact in [false, true] {
        let p = LinearPrecision::Fp8 {
            recipe: ScalingRecipe::Block { exact },
            margin: 0,
        };
        let (o, di, dw, lin) = run(&cs, p);
        let f = lin.fp8.as_ref().unwrap();
        // Grids of the ragged shapes: x [24, 200] in 1x128 -> 24 x 2; w [136, 200] in
        // 128x128 -> 2 x 2; dy [24, 136] in 1x128 -> 24 x 2.
        assert_eq!(f.x.block_scales().len(), 24 * 2);
        assert_eq!(f.w.block_scales().len(), 2 * 2);
        assert_eq!(f.dy.block_scales().len(), 24 * 2);
        let (smin, smax) = f.x.stats.block_scales.unwrap();
        assert!(
            smax / smin >= 512.0,
            "x tiles span 2^10 in magnitude: {smin}..{smax}"
        );
        assert_eq!(
            f.x.stats.overflow + f.w.stats.overflow + f.dy.stats.overflow,
            0
        );
        let sx = |r, k| tile_scale(f.x.block_scales(), n, c, ACT_BLOCK, r, k);
        let sw = |r, k| tile_scale(f.w.block_scales(), oc, c, WEIGHT_BLOCK, r, k);
        let sdy = |r, k| tile_scale(f.dy.block_scales(), n, oc, ACT_BLOCK, r, k);
        let (x, w, dy) = (&cs.x, &cs.w, &cs.dy);
        for i in 0..n {
            for j in 0..oc {
                let bound: f64 = (0..c)
                    .map(|k| {
                        term(
                            x[i * c + k] as f64,
                            sx(i, k),
                            E4M3,
                            w[j * c + k] as f64,
                            sw(j, k),
                            E4M3,
                        )
                    })
                    .sum();
                let err = (o[i * oc + j] as f64 - o32[i * oc + j] as f64).abs();
                assert!(
                    err <= bound,
                    "exact {exact} out[{i},{j}]: {err:e} > {bound:e}"
                );
            }
            for k in 0..c {
                let bound: f64 = (0..oc)
                    .map(|j| {
                        term(
                            dy[i * oc + j] as f64,
                            sdy(i, j),
                            E5M2,
                            w[j * c + k] as f64,
                            sw(j, k),
                            E4M3,
                        )
                    })
                    .sum();
                let err = (di[i * c + k] as f64 - di32[i * c + k] as f64).abs();
                assert!(
                    err <= bound,
                    "exact {exact} dinp[{i},{k}]: {err:e} > {bound:e}"
                );
            }
        }
        for j in 0..oc {
            for k in 0..c {
                let bound: f64 = (0..n)
                    .map(|i| {
                        term(
                            dy[i * oc + j] as f64,
                            sdy(i, j),
                            E5M2,
                            x[i * c + k] as f64,
                            sx(i, k),
                            E4M3,
                        )
                    })
                    .sum();
                let err = (dw[j * c + k] as f64 - dw32[j * c + k] as f64).abs();
                assert!(
                    err <= bound,
                    "exact {exact} dW[{j},{k}]: {err:e} > {bound:e}"
                );
            }
        }
        // One scale per tensor flushes the small rows; tiles keep them.
        let cur = LinearPrecision::Fp8 {
            recipe: ScalingRecipe::Current,
            margin: 0,
        };
        let (oc_, dic, dwc, _) = run(&cs, cur);
        let (eb, ec) = (
            [
                row_rel_rms(&o, &o32, oc),
                rel_rms(&di, &di32),
                rel_rms(&dw, &dw32),
            ],
            [
                row_rel_rms(&oc_, &o32, oc),
                rel_rms(&dic, &di32),
                rel_rms(&dwc, &dw32),
            ],
        );
        println!(
            "block (exact {exact}) relative RMS error out (mean over rows)/dinp/dW {eb:.4?}; \
             per-tensor current {ec:.4?}"
        );
        // The forward's small rows: flushed by one scale, kept by tiles.
        assert!(eb[0] < 0.5 * ec[0], "block {eb:?} vs current {ec:?}");
        for (b, c) in eb.iter().zip(&ec) {
            assert!(*b > 0.0 && *b <= c * 1.05, "block {eb:?} vs current {ec:?}");
        }
    }
}

fn small(precision: Precision) -> RunConfig {
    let mut c = RunConfig {
        precision,
        batch: 4,
        ..RunConfig::default()
    };
    c.fp8.recipe = "block".into();
    c.model.channels = 32;
    c
}

#[test]
fn block_recipe_trains_in_every_fp8_level() {
    for p in [Precision::Fp8O1, Precision::Fp8O2] {
        let cfg = small(p);
        let mut data = MarkovCorpus::new(1);
        let mut tr = Trainer::new(&cfg, data.vocab_size()).unwrap();
        let first = tr.train_step(&mut data).unwrap().loss;
        let mut last = first;
        for _ in 0..30 {
            let st = tr.train_step(&mut data).unwrap();
            assert!(!st.skipped, "{p:?} step {} skipped", st.step);
            last = st.loss;
        }
        assert!(last < first - 0.3, "{p:?}: {first} -> {last}");
        for v in tr.fp8_tensors() {
            let (lo, hi) = v
                .stats
                .block_scales
                .unwrap_or_else(|| panic!("{}: no block stats", v.name));
            assert!(
                lo > 0.0 && lo <= hi && lo == v.stats.scale,
                "{}: {lo}..{hi}",
                v.name
            );
        }
    }
    // fp8-o3 on two in-process ranks: replicas agree and the loss falls.
    let cfg = small(Precision::Fp8O3);
    let losses = run_ranks(2, |c: &LocalComm| -> anyhow::Result<Vec<f32>> {
        let mut data = MarkovCorpus::new(1);
        let mut tr = Trainer::new(&cfg, data.vocab_size())?;
        tr.enable_data_parallel(c)?;
        (0..20)
            .map(|_| Ok(tr.train_step_dist(&mut data, c)?.loss))
            .collect()
    })
    .unwrap();
    assert_eq!(losses[0], losses[1]);
    assert!(losses[0][19] < losses[0][0] - 0.3, "{:?}", losses[0]);
}

#[test]
fn checkpoints_store_each_weights_tile_scales_as_name_scale() {
    let mut cfg = small(Precision::Fp8O2);
    cfg.model.channels = 160; // ragged: 160 = 128 + 32 inputs; qkv 480 = 3 x 128 + 96 rows
    cfg.model.heads = 4;
    let mut data = MarkovCorpus::new(1);
    let mut tr = Trainer::new(&cfg, data.vocab_size()).unwrap();
    tr.train_step(&mut data).unwrap();
    let ck = fp8lm_trainer::snapshot::capture(&tr, &data, serde_json::json!({}));
    let root = std::env::temp_dir().join(format!("fp8lm-blockck-{}", std::process::id()));
    let dir = ck.save(&root, 0).unwrap();
    let file = dir.join("fp8_scales.safetensors");
    let stored = fp8lm_trainer::checkpoint::read_safetensors_file(&file).unwrap();
    let m = tr.model();
    let fp8_weights = m.linears.iter().filter(|l| l.fp8.is_some()).count();
    assert_eq!(
        stored.len(),
        fp8_weights,
        "one .scale per FP8 linear weight"
    );
    let qkv = stored
        .iter()
        .find(|t| t.name == "h.0.attn.qkv.w.scale")
        .unwrap_or_else(|| panic!("{:?}", stored.iter().map(|t| &t.name).collect::<Vec<_>>()));
    assert_eq!(qkv.shape, vec![4, 2], "[ceil(480/128), ceil(160/128)]");
    // The scales are those of the saved weights: recompute tile (3, 1) (96 x 32, ragged).
    let t = m
        .layout
        .metas
        .iter()
        .position(|x| x.name == "h.0.attn.qkv.w")
        .unwrap();
    let w = &m.params[m.layout.range(t)];
    let amax = (384..480)
        .flat_map(|r| (128..160).map(move |c| (r, c)))
        .map(|(r, c)| w[r * 160 + c].abs())
        .fold(0f32, f32::max);
    let want = fp8lm_fp8::scale_for_amax(448.0, amax, 0, Default::default()).unwrap();
    assert_eq!(qkv.to_f32().unwrap()[3 * 2 + 1], want);
    // A plain safetensors file: 8-byte header length, JSON header naming F32 and the shape.
    let bytes = std::fs::read(&file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header["h.0.attn.qkv.w.scale"]["dtype"], "F32");
    assert_eq!(
        header["h.0.attn.qkv.w.scale"]["shape"],
        serde_json::json!([4, 2])
    );
    // And the checkpoint still resumes.
    let back = fp8lm_trainer::checkpoint::Checkpoint::load(&dir).unwrap();
    let mut tr2 = Trainer::new(&cfg, 256).unwrap();
    fp8lm_trainer::snapshot::restore(&mut tr2, &mut data, &back).unwrap();
    assert_eq!(tr2.model().params, tr.model().params);
    std::fs::remove_dir_all(&root).ok();
}
