//! The FP8-LM optimizer against the fp32 AdamW reference (`fp8lm_optim::AdamW`).

use fp8lm_fp8::{Fp8Format, ScaledF16, ScaledFp8};
use fp8lm_optim::experiment::{run_least_squares, GradPath, LeastSquares};
use fp8lm_optim::{
    AdamW, AdamWHyper, Fp8Adam, Fp8AdamConfig, Grad, Optimizer, ParamMeta, StateFormat, StateTensor,
};
use half::f16;

fn rng(seed: u64) -> impl FnMut() -> f32 {
    let mut s = seed | 1;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        // Roughly normal: sum of 4 uniforms, centred.
        let u = |x: u64| (x & 0xFFFF) as f32 / 65536.0;
        (u(s) + u(s >> 16) + u(s >> 32) + u(s >> 48) - 2.0) * 1.7
    }
}

fn metas() -> Vec<ParamMeta> {
    vec![
        // Several chunks, decayed.
        ParamMeta {
            name: "h.0.w".into(),
            shape: vec![50, 201],
            weight_decay: true,
        },
        // One short chunk, not decayed.
        ParamMeta {
            name: "h.0.b".into(),
            shape: vec![201],
            weight_decay: false,
        },
    ]
}

/// Half an ulp of `x` in a format with `mbits` mantissa bits and smallest normal
/// `min_normal`, for values stored as `x * scale`; the RNE error bound of one encode.
fn half_ulp(x: f32, scale: f32, mbits: i32, min_normal: f32) -> f32 {
    let y = (x * scale).abs().max(min_normal);
    let e = y.log2().floor();
    2f32.powf(e - mbits as f32 - 1.0) / scale
}

/// Random initial states, given to both optimizers (the FP8 one holds them quantised,
/// the reference starts from the same quantised values).
#[test]
fn one_step_matches_fp32_within_format_bound() {
    let metas = metas();
    let h = AdamWHyper::default();
    let mut r = rng(7);
    let init: Vec<Vec<f32>> = metas
        .iter()
        .map(|m| (0..m.numel()).map(|_| 0.05 * r()).collect())
        .collect();
    let mut p8 = init.clone();
    let mut ps: Vec<&mut [f32]> = p8.iter_mut().map(|p| p.as_mut_slice()).collect();
    let mut opt = Fp8Adam::new(&metas, &mut ps, Fp8AdamConfig::fp8_lm(h)).unwrap();
    // Give it a non-trivial history: set moments through a checkpoint import.
    let mut st = opt.export_state();
    for (name, t) in st.iter_mut() {
        let n = metas
            .iter()
            .find(|m| name.starts_with(&m.name))
            .map(|m| m.numel());
        if name.ends_with(".exp_avg") {
            let m: Vec<f32> = (0..n.unwrap()).map(|_| 1e-3 * r()).collect();
            *t =
                StateTensor::Fp8(ScaledFp8::quantize_current(&m, &[m.len()], Fp8Format::E4M3, 0).0);
        } else if name.ends_with(".exp_avg_sq") {
            let v: Vec<f32> = (0..n.unwrap()).map(|_| 1e-6 * r().powi(2)).collect();
            let (q, _) = ScaledF16::quantize_current(&v, &[v.len()], 0);
            *t = StateTensor::F16 {
                data: q.data,
                scale: q.scale,
            };
        } else if name == "step" {
            *t = StateTensor::Scalar(10.0);
        }
    }
    opt.import_state(st).unwrap();

    let mut reference = AdamW::new(&metas, h);
    let mut p32: Vec<Vec<f32>> = Vec::new();
    let mut ref_state = vec![("adamw.t".to_string(), StateTensor::Scalar(10.0))];
    for i in 0..metas.len() {
        let [w, m, v] = opt.state_f32(i);
        assert_eq!(w, ps[i].to_vec(), "params are the master's f32 view");
        p32.push(w);
        ref_state.push((format!("adamw.m.{}", metas[i].name), StateTensor::F32(m)));
        ref_state.push((format!("adamw.v.{}", metas[i].name), StateTensor::F32(v)));
    }
    reference.import_state(ref_state).unwrap();
    drop(ps);
    // FP8 E5M2 gradients; the reference sees the same decoded values.
    let grads: Vec<ScaledFp8> = metas
        .iter()
        .map(|m| {
            let g: Vec<f32> = (0..m.numel()).map(|_| 2e-3 * r()).collect();
            ScaledFp8::quantize_current(&g, &[g.len()], Fp8Format::E5M2, 0).0
        })
        .collect();
    let gr: Vec<Grad> = grads.iter().map(Grad::Fp8).collect();
    let (lr, gs) = (1e-3, 0.5);
    let mut ps: Vec<&mut [f32]> = p8.iter_mut().map(|p| p.as_mut_slice()).collect();
    opt.step(&mut ps, &gr, lr, gs);
    let mut qs: Vec<&mut [f32]> = p32.iter_mut().map(|p| p.as_mut_slice()).collect();
    reference.step(&mut qs, &gr, lr, gs);

    // The f32 arithmetic is the same expression in both, so the only differences are
    // the encodes of the new states: half an ulp of f16 (11 significant bits) for the
    // master and the second moment, of E4M3 (4 bits) for the first moment, at the
    // scale each state now carries, in the normal range; subnormals: half the quantum.
    let mut checked = 0;
    let ref_state = reference.export_state();
    let ref_of = |name: String| match ref_state.iter().find(|(n, _)| *n == name) {
        Some((_, StateTensor::F32(v))) => v.clone(),
        _ => panic!("{name} missing"),
    };
    for i in 0..metas.len() {
        let [w, m, v] = opt.state_f32(i);
        let [sw, sm, sv] = opt.scales(i);
        let ref_m = ref_of(format!("adamw.m.{}", metas[i].name));
        let ref_v = ref_of(format!("adamw.v.{}", metas[i].name));
        assert_eq!(
            w,
            ps[i].to_vec(),
            "params are the master's f32 view after the step"
        );
        for j in 0..w.len() {
            let (wr, mr, vr) = (qs[i][j], ref_m[j], ref_v[j]);
            let bw = half_ulp(wr, sw, 10, 2f32.powi(-14));
            let bm = half_ulp(mr, sm, 3, 2f32.powi(-6));
            let bv = half_ulp(vr, sv, 10, 2f32.powi(-14));
            assert!(
                (w[j] - wr).abs() <= bw,
                "{} w[{j}]: {} vs {wr} (bound {bw})",
                metas[i].name,
                w[j]
            );
            assert!(
                (m[j] - mr).abs() <= bm,
                "{} m[{j}]: {} vs {mr} (bound {bm})",
                metas[i].name,
                m[j]
            );
            assert!(
                (v[j] - vr).abs() <= bv,
                "{} v[{j}]: {} vs {vr} (bound {bv})",
                metas[i].name,
                v[j]
            );
            checked += 1;
        }
        // The scales are the power of two of the new amax: amax * scale in (max/2, max].
        for (vals, s, mx) in [(&w, sw, 65504.0), (&m, sm, 448.0), (&v, sv, 65504.0)] {
            let a = vals.iter().fold(0f32, |a, x| a.max(x.abs()));
            assert!(
                a * s <= mx && a * s > mx / 2.0 * 0.99,
                "amax {a} scale {s} max {mx}"
            );
        }
    }
    assert_eq!(checked, 50 * 201 + 201);
}

/// Equal, except values in the format's subnormal range (stored magnitude below
/// `min_normal`), which may differ by one quantum (rounded on another grid first).
fn same_but_tail(a: &[f32], b: &[f32], scale: f32, min_normal: f32, quantum: f32) {
    for (j, (&x, &y)) in a.iter().zip(b).enumerate() {
        if x != y {
            assert!(
                (y * scale).abs() < min_normal && (x - y).abs() * scale <= quantum,
                "[{j}] {x} vs {y} at scale {scale}"
            );
        }
    }
}

#[test]
fn stale_predictions_defer_and_rescale_without_saturating() {
    // Corrupt the remembered amaxes so the predicted scales are far too large (values
    // would overflow) for some chunks: they must be deferred and recomputed, the others
    // re-scaled, and the outcome must equal a fresh optimizer's up to subnormal tails.
    let metas = metas();
    let h = AdamWHyper::default();
    let mut r = rng(11);
    let init: Vec<Vec<f32>> = metas
        .iter()
        .map(|m| {
            (0..m.numel())
                .map(|j| if j < 3000 { 0.5 * r() } else { 0.01 * r() })
                .collect()
        })
        .collect();
    let grads: Vec<Vec<f32>> = metas
        .iter()
        .map(|m| (0..m.numel()).map(|_| 1e-2 * r()).collect())
        .collect();
    let run = |corrupt: bool| {
        let mut p = init.clone();
        let mut ps: Vec<&mut [f32]> = p.iter_mut().map(|p| p.as_mut_slice()).collect();
        let mut opt = Fp8Adam::new(&metas, &mut ps, Fp8AdamConfig::fp8_lm(h)).unwrap();
        let gr: Vec<Grad> = grads.iter().map(|g| Grad::F32(g)).collect();
        opt.step(&mut ps, &gr, 1e-3, 1.0);
        if corrupt {
            let st = opt
                .export_state()
                .into_iter()
                .map(|(n, t)| match t {
                    StateTensor::Scalar(a) if n.ends_with(".amax") => {
                        (n, StateTensor::Scalar(a / 64.0))
                    }
                    other => (n, other),
                })
                .collect();
            opt.import_state(st).unwrap();
        }
        opt.step(&mut ps, &gr, 1e-3, 1.0);
        drop(ps);
        (opt, p)
    };
    let (good, pg) = run(false);
    let (bad, pb) = run(true);
    assert!(bad.stats().deferred_chunks > 0, "{:?}", bad.stats());
    for i in 0..metas.len() {
        assert_eq!(
            good.scales(i),
            bad.scales(i),
            "final scales come from the true amax"
        );
        let [w, m, v] = bad.state_f32(i);
        let [wg, mg, vg] = good.state_f32(i);
        assert_eq!(w, pb[i], "params are the master's f32 view");
        assert_eq!(pg[i], pg[i]);
        let [sw, sm, sv] = good.scales(i);
        same_but_tail(&w, &wg, sw, 2f32.powi(-14), 2f32.powi(-24));
        same_but_tail(&m, &mg, sm, 2f32.powi(-6), 2f32.powi(-9));
        same_but_tail(&v, &vg, sv, 2f32.powi(-14), 2f32.powi(-24));
    }
}

#[test]
fn state_is_6_bytes_per_param_vs_16_for_fp32() {
    let metas = metas();
    let numel: usize = metas.iter().map(ParamMeta::numel).sum();
    let mut p: Vec<Vec<f32>> = metas.iter().map(|m| vec![0.01; m.numel()]).collect();
    let mut ps: Vec<&mut [f32]> = p.iter_mut().map(|p| p.as_mut_slice()).collect();
    let h = AdamWHyper::default();
    let opt = Fp8Adam::new(&metas, &mut ps, Fp8AdamConfig::fp8_lm(h)).unwrap();
    // Optimizer state: master 2 + m 1 + v 2; the FP8 gradient (1 B, the model's) makes 6.
    assert_eq!(opt.state_data_bytes(), 5 * numel);
    let grad_fp8 = 1;
    assert_eq!(opt.state_data_bytes() / numel + grad_fp8, 6);
    let scalars = opt.state_bytes() - opt.state_data_bytes();
    assert!(scalars <= 64 * metas.len(), "{scalars} scalar bytes");
    // fp32: master 4 (the f32 weights) + grad 4 + m 4 + v 4.
    let f32opt = Fp8Adam::new(&metas, &mut ps, Fp8AdamConfig::all_f32(h)).unwrap();
    assert_eq!(f32opt.state_data_bytes() / numel + 4, 16);
}

#[test]
fn checkpoint_resume_is_bit_exact() {
    let metas = metas();
    let h = AdamWHyper::default();
    let mut r = rng(3);
    let mut p: Vec<Vec<f32>> = metas
        .iter()
        .map(|m| (0..m.numel()).map(|_| 0.1 * r()).collect())
        .collect();
    let gseq: Vec<Vec<ScaledFp8>> = (0..6)
        .map(|_| {
            metas
                .iter()
                .map(|m| {
                    let g: Vec<f32> = (0..m.numel()).map(|_| 1e-2 * r()).collect();
                    ScaledFp8::quantize_current(&g, &[g.len()], Fp8Format::E5M2, 0).0
                })
                .collect()
        })
        .collect();
    let mut ps: Vec<&mut [f32]> = p.iter_mut().map(|p| p.as_mut_slice()).collect();
    let mut a = Fp8Adam::new(&metas, &mut ps, Fp8AdamConfig::fp8_lm(h)).unwrap();
    for g in &gseq[..3] {
        let gr: Vec<Grad> = g.iter().map(Grad::Fp8).collect();
        a.step(&mut ps, &gr, 2e-3, 1.0);
    }
    let saved = a.export_state();
    let saved_params: Vec<Vec<f32>> = ps.iter().map(|p| p.to_vec()).collect();
    // A fresh optimizer (different init) restored from the checkpoint.
    let mut q: Vec<Vec<f32>> = metas.iter().map(|m| vec![0.3; m.numel()]).collect();
    let mut qs: Vec<&mut [f32]> = q.iter_mut().map(|p| p.as_mut_slice()).collect();
    let mut b = Fp8Adam::new(&metas, &mut qs, Fp8AdamConfig::fp8_lm(h)).unwrap();
    b.import_state(saved.clone()).unwrap();
    assert_eq!(b.export_state(), saved);
    for (d, s) in qs.iter_mut().zip(&saved_params) {
        d.copy_from_slice(s);
    }
    for g in &gseq[3..] {
        let gr: Vec<Grad> = g.iter().map(Grad::Fp8).collect();
        a.step(&mut ps, &gr, 2e-3, 1.0);
        b.step(&mut qs, &gr, 2e-3, 1.0);
    }
    assert_eq!(a.export_state(), b.export_state());
    for (x, y) in ps.iter().zip(qs.iter()) {
        assert!(x
            .iter()
            .zip(y.iter())
            .all(|(u, v)| u.to_bits() == v.to_bits()));
    }
}

#[test]
fn bad_checkpoints_are_refused_with_named_errors() {
    let metas = metas();
    let h = AdamWHyper::default();
    let mut p: Vec<Vec<f32>> = metas.iter().map(|m| vec![0.01; m.numel()]).collect();
    let mut ps: Vec<&mut [f32]> = p.iter_mut().map(|p| p.as_mut_slice()).collect();
    let mut opt = Fp8Adam::new(&metas, &mut ps, Fp8AdamConfig::fp8_lm(h)).unwrap();
    let good = opt.export_state();
    let before = opt.export_state();

    let mut st = good.clone();
    st[1].1 = StateTensor::F32(vec![0.0; 50 * 201]);
    let e = opt.import_state(st).unwrap_err();
    assert!(
        e.contains("h.0.w.master") && e.contains("f32") && e.contains("f16"),
        "{e}"
    );

    let mut st = good.clone();
    if let StateTensor::Fp8(q) = &mut st[2].1 {
        q.data.pop();
    }
    let e = opt.import_state(st).unwrap_err();
    assert!(e.contains("h.0.w.exp_avg") && e.contains("10049"), "{e}");

    let mut st = good.clone();
    st.pop();
    assert!(opt.import_state(st).unwrap_err().contains("entries"));

    let mut st = good.clone();
    st.swap(1, 2);
    let e = opt.import_state(st).unwrap_err();
    assert!(e.contains("expected entry \"h.0.w.master\""), "{e}");

    // An E5M2 first moment cannot be loaded into an E4M3 one.
    let mut st = good.clone();
    if let StateTensor::Fp8(q) = &mut st[2].1 {
        q.format = Fp8Format::E5M2;
    }
    assert!(opt.import_state(st).unwrap_err().contains("e5m2"));
    assert_eq!(
        opt.export_state(),
        before,
        "failed imports leave the state untouched"
    );

    let e = Fp8Adam::new(&metas[..1], &mut ps, Fp8AdamConfig::fp8_lm(h)).unwrap_err();
    assert!(e.contains("1 parameter descriptions but 2"), "{e}");
    let _ = f16::ZERO;
}

fn ref_maker(h: AdamWHyper) -> impl Fn(&[ParamMeta], &mut [&mut [f32]]) -> Box<dyn Optimizer> {
    move |m, _| Box::new(AdamW::new(m, h))
}

fn fp8_maker(cfg: Fp8AdamConfig) -> impl Fn(&[ParamMeta], &mut [&mut [f32]]) -> Box<dyn Optimizer> {
    move |m, p| Box::new(Fp8Adam::new(m, p, cfg).unwrap())
}

#[test]
fn least_squares_converges_to_fp32_loss_within_1_percent() {
    let h = AdamWHyper {
        weight_decay: 0.0,
        ..AdamWHyper::default()
    };
    let prob = LeastSquares::new(512, 128, 1.0, 0.1, 42);
    let steps = 3000;
    let lr = 3e-2;
    let l32 = run_least_squares(&prob, &ref_maker(h), steps, lr, GradPath::F32);
    let l8 = run_least_squares(
        &prob,
        &fp8_maker(Fp8AdamConfig::fp8_lm(h)),
        steps,
        lr,
        GradPath::F32,
    );
    let l8g = run_least_squares(
        &prob,
        &fp8_maker(Fp8AdamConfig::fp8_lm(h)),
        steps,
        lr,
        GradPath::Fp8(Fp8Format::E5M2),
    );
    println!("least squares after {steps} steps: fp32 AdamW {l32:.6}, FP8-LM (f32 grads) {l8:.6}, FP8-LM (E5M2 grads) {l8g:.6}");
    // The noise floor is 0.5 * 0.01 * (1 - 128/512) = 0.00375; both must be near it.
    assert!(l32 < 0.0045, "fp32 did not converge: {l32}");
    assert!((l8 - l32).abs() <= 0.01 * l32, "fp8-lm {l8} vs fp32 {l32}");
    assert!(
        (l8g - l32).abs() <= 0.01 * l32,
        "fp8-lm with E5M2 grads {l8g} vs fp32 {l32}"
    );
}

#[test]
fn all_f32_formats_are_bit_identical_to_adamw() {
    let h = AdamWHyper::default();
    let prob = LeastSquares::new(256, 64, 1.0, 0.1, 5);
    for path in [GradPath::F32, GradPath::Fp8(Fp8Format::E5M2)] {
        let a = run_least_squares(&prob, &ref_maker(h), 300, 1e-2, path);
        let b = run_least_squares(
            &prob,
            &fp8_maker(Fp8AdamConfig::all_f32(h)),
            300,
            1e-2,
            path,
        );
        assert_eq!(
            a.to_bits(),
            b.to_bits(),
            "{path:?}: same f32 expression, same result"
        );
    }
    // Weight decay on decayed tensors only, and grad_scale, exactly as AdamW.
    let metas = metas();
    let mut r = rng(5);
    let mut pa: Vec<Vec<f32>> = metas
        .iter()
        .map(|m| (0..m.numel()).map(|_| r()).collect())
        .collect();
    let mut pb = pa.clone();
    let g: Vec<Vec<f32>> = metas
        .iter()
        .map(|m| (0..m.numel()).map(|_| r()).collect())
        .collect();
    let gr: Vec<Grad> = g.iter().map(|g| Grad::F32(g)).collect();
    let mut a = AdamW::new(&metas, h);
    let mut sa: Vec<&mut [f32]> = pa.iter_mut().map(|p| p.as_mut_slice()).collect();
    let mut sb: Vec<&mut [f32]> = pb.iter_mut().map(|p| p.as_mut_slice()).collect();
    let mut b = Fp8Adam::new(&metas, &mut sb, Fp8AdamConfig::all_f32(h)).unwrap();
    for _ in 0..3 {
        a.step(&mut sa, &gr, 0.1, 0.37);
        b.step(&mut sb, &gr, 0.1, 0.37);
    }
    assert_eq!(sa, sb);
}

#[test]
fn second_moment_in_fp8_hurts() {
    // Gradients spanning 2 decades: their squares span 4 and more as coordinates
    // converge, against E4M3's ~5 decades (448 down to 2^-9): small second moments lose
    // their precision or flush to zero and those coordinates take huge steps.
    // (`cargo run --release -p fp8lm-optim --example ablate_states` prints the full table.)
    let h = AdamWHyper {
        weight_decay: 0.0,
        ..AdamWHyper::default()
    };
    let prob = LeastSquares::new(512, 128, 2.0, 0.1, 42);
    let steps = 1500;
    let lr = 1e-2;
    let base = Fp8AdamConfig::fp8_lm(h);
    let v8 = Fp8AdamConfig {
        exp_avg_sq: StateFormat::Fp8(Fp8Format::E4M3),
        ..base
    };
    let l32 = run_least_squares(&prob, &ref_maker(h), steps, lr, GradPath::F32);
    let lb = run_least_squares(&prob, &fp8_maker(base), steps, lr, GradPath::F32);
    let lv = run_least_squares(&prob, &fp8_maker(v8), steps, lr, GradPath::F32);
    println!("wide-range least squares: fp32 {l32:.5}, FP8-LM (v f16) {lb:.5}, v in E4M3 {lv:.5}");
    assert!((lb - l32).abs() <= 0.01 * l32, "{lb} vs {l32}");
    assert!(
        lv.is_nan() || lv > 2.0 * l32,
        "an E4M3 second moment should visibly hurt: {lv} vs {l32}"
    );
}

#[test]
fn f32_tensors_in_a_mixed_optimizer_update_exactly_as_adamw() {
    let metas = metas();
    let h = AdamWHyper::default();
    let mut r = rng(21);
    let mut pa: Vec<Vec<f32>> = metas
        .iter()
        .map(|m| (0..m.numel()).map(|_| r()).collect())
        .collect();
    let mut pb = pa.clone();
    let g: Vec<Vec<f32>> = metas
        .iter()
        .map(|m| (0..m.numel()).map(|_| 1e-2 * r()).collect())
        .collect();
    let gr: Vec<Grad> = g.iter().map(|g| Grad::F32(g)).collect();
    let mut sa: Vec<&mut [f32]> = pa.iter_mut().map(|p| p.as_mut_slice()).collect();
    let mut sb: Vec<&mut [f32]> = pb.iter_mut().map(|p| p.as_mut_slice()).collect();
    let mut a = AdamW::new(&metas, h);
    let mut b =
        Fp8Adam::with_low_precision(&metas, &mut sb, Fp8AdamConfig::fp8_lm(h), &[true, false])
            .unwrap();
    let w0 = sb[0].to_vec();
    assert_ne!(
        w0,
        sa[0].to_vec(),
        "the low-precision tensor was rounded to its f16 master"
    );
    assert_eq!(sb[1].to_vec(), sa[1].to_vec(), "the f32 tensor was not");
    for _ in 0..4 {
        a.step(&mut sa, &gr, 1e-2, 1.0);
        b.step(&mut sb, &gr, 1e-2, 1.0);
    }
    assert_eq!(sa[1], sb[1]);
    assert_eq!(
        b.state_data_bytes(),
        5 * metas[0].numel() + 12 * metas[1].numel()
    );
}
