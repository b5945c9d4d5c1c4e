//! The optimizer updates on both backends ([`UpdateOps`]): `Cpu` (the fused SIMD host
//! kernels of `fp8lm-optim`) against `Reference` (scalar loops over the `fp8` crate's
//! scalar casts and `half`).
//!
//! Bound: none, bit equality. The update rule is defined as f32 expressions in a fixed
//! order without FMA (`UpdateOps`'s docs); every decode is exact, every multiply by a
//! power-of-two scale is exact outside the subnormal range and otherwise one IEEE
//! rounding, which both compute the same way; and every encode is a single
//! round-to-nearest-even of the same f32 value (f16: IEEE RNE, overflow to inf; FP8:
//! RNE, saturating). So both must produce the same bits: stored states, compute
//! weights, amaxes (NaN: both NaN), deferral. Inputs cover ragged lengths (SIMD tails),
//! zeros of both signs, E4M3 / E5M2 / f16 subnormals, the formats' largest values,
//! saturation (moments pushed past 448 with no deferral limit), f16 overflow, NaN
//! gradients, and provisional scales large enough that chunks are deferred.

use fp8lm_fp8::{Fp8Format, ScaleRounding, ScaledFp8};
use fp8lm_kernels::reference::update_calls;
use fp8lm_kernels::{Cpu, Reference};
use fp8lm_optim::update::{AdamWGrad, ChunkMut, ChunkOut, Fp8AdamChunk, GradChunk, StepConsts};
use fp8lm_optim::{
    AdamW, AdamWHyper, Fp8Adam, Fp8AdamConfig, Fp8Out, Grad, Optimizer, ParamMeta, ParamOut,
    UpdateOps,
};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
}

/// Lengths around the SIMD widths (8, 16, 64-element prefetch blocks) and a full chunk.
const LENS: [usize; 10] = [1, 7, 8, 15, 16, 17, 63, 100, 2047, 2048];

/// FP8 codes: mostly random finite ones, with zeros (+-0), subnormals (exponent field
/// 0), the largest finite magnitude, and (when `nan`) one NaN code.
fn fp8_codes(rng: &mut Rng, f: Fp8Format, n: usize, nan: bool) -> Vec<u8> {
    let max = f.max_bits();
    let sub_top = (1u8 << f.mantissa_bits()) - 1;
    let mut c: Vec<u8> = (0..n)
        .map(|i| {
            let s = (rng.next() as u8) & 0x80;
            let mag = match i % 6 {
                0 => 0,
                1 => 1 + (rng.next() as u8) % sub_top,
                2 => max,
                _ => (rng.next() as u8 & 0x7F).min(max),
            };
            s | mag
        })
        .collect();
    if nan {
        c[n / 2] = 0x7F; // NaN in both formats
    }
    c
}

/// f16 bits of non-negative (`signed` false) or any sign values: zeros, subnormals,
/// the largest finite value, random finite ones.
fn f16_bits(rng: &mut Rng, n: usize, signed: bool) -> Vec<u16> {
    (0..n)
        .map(|i| {
            let s = if signed {
                (rng.next() as u16) & 0x8000
            } else {
                0
            };
            let mag = match i % 5 {
                0 => 0,
                1 => 1 + (rng.next() as u16) % 0x3FF,
                2 => 0x7BFF,
                _ => (rng.next() as u16 & 0x7FFF).min(0x7BFF),
            };
            s | mag
        })
        .collect()
}

fn consts(t: i32, lr: f32, wd: f32) -> StepConsts {
    StepConsts {
        b1: 0.9,
        b2: 0.95,
        one_minus_b1: 1.0 - 0.9,
        one_minus_b2: 1.0 - 0.95,
        inv_bc1: (1.0 / (1.0 - 0.9f64.powi(t))) as f32,
        inv_bc2: (1.0 / (1.0 - 0.95f64.powi(t))) as f32,
        eps: 1e-8,
        lr,
        wd,
    }
}

/// One state chunk, owned, in one of the formats.
#[derive(Clone, Debug, PartialEq)]
enum St {
    F32(Vec<f32>),
    F16(Vec<u16>),
    Fp8(Vec<u8>, Fp8Format),
}
impl St {
    fn view(&mut self) -> ChunkMut<'_> {
        match self {
            St::F32(v) => ChunkMut::F32(v),
            St::F16(v) => ChunkMut::F16(v),
            St::Fp8(v, f) => ChunkMut::Fp8(v, *f),
        }
    }
    /// Bits, so values compare exactly. f32 NaNs are canonicalised: a NaN gradient
    /// decodes to a NaN whose payload depends on the decode (SIMD table vs scalar), and
    /// an f32 state stores it as is; payloads carry no number. (f16 / FP8 encodes
    /// write their format's canonical NaN, so those bytes compare as stored.)
    fn bits(&self) -> Vec<u32> {
        match self {
            St::F32(v) => v.iter().map(|x| canon(*x)).collect(),
            St::F16(v) => v.iter().map(|&x| x as u32).collect(),
            St::Fp8(v, _) => v.iter().map(|&x| x as u32).collect(),
        }
    }
}

fn canon(x: f32) -> u32 {
    if x.is_nan() {
        f32::NAN.to_bits()
    } else {
        x.to_bits()
    }
}

fn same_f32(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

#[allow(clippy::too_many_arguments)] // the chunk's fields, as Fp8AdamChunk has them
fn run_chunk(
    ops: &dyn UpdateOps,
    st: &mut [St; 3],
    p: &mut [f32],
    g: GradChunk,
    k: &StepConsts,
    old: [f32; 3],
    scale: [f32; 3],
    limits: Option<[f32; 3]>,
) -> ChunkOut {
    let [a, b, c] = st;
    let (mut w, mut m, mut v) = (a.view(), b.view(), c.view());
    ops.fp8_adam_chunk(Fp8AdamChunk {
        w: &mut w,
        m: &mut m,
        v: &mut v,
        p,
        g,
        k,
        old_scale: old,
        scale,
        limits,
    })
}

#[test]
fn fp8_adam_chunk_is_bit_identical_on_cpu_and_reference() {
    let mut rng = Rng(0x5EED_0F0F_1234_9876);
    let (mut deferred, mut saturated, mut nans, mut cases) = (0, 0, 0, 0);
    for (li, &n) in LENS.iter().enumerate() {
        for case in 0..12 {
            // State formats: FP8-LM's (the fused SIMD path for FP8 gradients), an E5M2
            // first moment, all f32 (the generic path).
            let fmts = case % 3;
            let gkind = case / 3 % 3; // E5M2, E4M3, f32 gradient
            let nan = case % 4 == 3 && gkind < 2;
            let w0 = match fmts {
                2 => St::F32((0..n).map(|_| rng.unit()).collect()),
                _ => St::F16(f16_bits(&mut rng, n, true)),
            };
            let m0 = match fmts {
                0 => St::Fp8(
                    fp8_codes(&mut rng, Fp8Format::E4M3, n, false),
                    Fp8Format::E4M3,
                ),
                1 => St::Fp8(
                    fp8_codes(&mut rng, Fp8Format::E5M2, n, false),
                    Fp8Format::E5M2,
                ),
                _ => St::F32((0..n).map(|_| 1e-3 * rng.unit()).collect()),
            };
            let v0 = match fmts {
                2 => St::F32((0..n).map(|_| 1e-6 * rng.unit().abs()).collect()),
                _ => St::F16(f16_bits(&mut rng, n, false)),
            };
            let gf = [Fp8Format::E5M2, Fp8Format::E4M3][gkind % 2];
            let codes = fp8_codes(&mut rng, gf, n, nan);
            let g32: Vec<f32> = (0..n).map(|_| 1e-2 * rng.unit()).collect();
            let gs = [1.0, 0.5, 0.3][case % 3];
            let g = if gkind < 2 {
                GradChunk::Fp8(&codes, gf, 2f32.powi(-3), gs)
            } else {
                GradChunk::F32(&g32, gs)
            };
            let k = consts(
                1 + (case + li) as i32,
                [1e-3, 0.3][case % 2],
                [0.0, 0.1][li % 2],
            );
            let f32s = fmts == 2;
            let old = if f32s {
                [1.0; 3]
            } else {
                [2f32.powi(-2), 2f32.powi(-6), 2f32.powi(10)]
            };
            // Provisional scales: the old ones, or far too large (the moments saturate
            // without limits, and the chunk is deferred with them).
            let scale = if case % 2 == 0 || f32s {
                old
            } else {
                [old[0], old[1] * 2f32.powi(20), old[2] * 2f32.powi(8)]
            };
            for limits in [Some([65504.0, [448.0, 57344.0, 0.0][fmts], 65504.0]), None] {
                let limits = if f32s { None } else { limits };
                let mut sc = [w0.clone(), m0.clone(), v0.clone()];
                let mut sr = sc.clone();
                let (mut pc, mut pr) = (vec![0f32; n], vec![0f32; n]);
                let before = update_calls();
                let oc = run_chunk(&Cpu, &mut sc, &mut pc, g, &k, old, scale, limits);
                let or = run_chunk(&Reference, &mut sr, &mut pr, g, &k, old, scale, limits);
                assert!(update_calls() > before, "the reference update did not run");
                let at = format!("n {n} case {case} limits {limits:?}");
                assert_eq!(oc.deferred, or.deferred, "{at}");
                assert_eq!(oc.saw_nan, or.saw_nan, "{at}");
                for s in 0..3 {
                    assert!(
                        same_f32(oc.amax[s], or.amax[s]),
                        "{at}: amax {s} {oc:?} {or:?}"
                    );
                    assert_eq!(sc[s].bits(), sr[s].bits(), "{at}: state {s}");
                }
                assert!(same_f32(oc.ratio, or.ratio), "{at}: ratio");
                if oc.deferred {
                    deferred += 1;
                    assert_eq!(sc, [w0.clone(), m0.clone(), v0.clone()], "{at}: deferred");
                } else {
                    let bits = |p: &[f32]| p.iter().map(|&x| canon(x)).collect::<Vec<_>>();
                    assert_eq!(bits(&pc), bits(&pr), "{at}: compute weights");
                    if let St::Fp8(m, f) = &sc[1] {
                        saturated += m.iter().any(|&c| c & 0x7F == f.max_bits()) as usize;
                    }
                }
                nans += oc.saw_nan as usize;
                cases += 1;
            }
        }
    }
    eprintln!(
        "{cases} chunks: {deferred} deferred, {saturated} with a saturated moment, {nans} NaN"
    );
    assert!(
        deferred > 0 && saturated > 0 && nans > 0,
        "an edge case was not exercised"
    );
}

#[test]
fn adamw_chunk_is_bit_identical_on_cpu_and_reference() {
    let mut rng = Rng(0xADA3_0000_0000_0001);
    for &n in &LENS {
        for case in 0..6 {
            let p0: Vec<f32> = (0..n).map(|_| rng.unit()).collect();
            let m0: Vec<f32> = (0..n).map(|_| 1e-3 * rng.unit()).collect();
            let v0: Vec<f32> = (0..n).map(|_| 1e-6 * rng.unit().abs()).collect();
            let f = [Fp8Format::E5M2, Fp8Format::E4M3][case % 2];
            let codes = fp8_codes(&mut rng, f, n, case == 5);
            let g32: Vec<f32> = (0..n).map(|_| 1e-2 * rng.unit()).collect();
            // A scale that is not a power of two: the division by it rounds, the same
            // way on both.
            let g = if case < 4 {
                AdamWGrad::Fp8 {
                    codes: &codes,
                    format: f,
                    scale: [3.0, 0.75][case / 2 % 2],
                }
            } else {
                AdamWGrad::F32(&g32)
            };
            let k = consts(1 + case as i32, 1e-3, [0.0, 0.1][case % 2]);
            let gs = [1.0, 0.7][case % 2];
            let (mut pc, mut mc, mut vc) = (p0.clone(), m0.clone(), v0.clone());
            let (mut pr, mut mr, mut vr) = (p0.clone(), m0.clone(), v0.clone());
            Cpu.adamw_chunk(&mut pc, &mut mc, &mut vc, g, &k, gs);
            Reference.adamw_chunk(&mut pr, &mut mr, &mut vr, g, &k, gs);
            let bits = |p: &[f32]| p.iter().map(|&x| canon(x)).collect::<Vec<_>>();
            let at = format!("n {n} case {case}");
            assert_eq!(bits(&pc), bits(&pr), "{at}: weights");
            assert_eq!(bits(&mc), bits(&mr), "{at}: m");
            assert_eq!(bits(&vc), bits(&vr), "{at}: v");
            assert_ne!(bits(&pc), bits(&p0), "{at}: the update changed nothing");
        }
    }
}

#[test]
fn weight_cast_is_bit_identical_on_cpu_and_reference() {
    let mut rng = Rng(0xCA57_0000_0000_0003);
    for &n in &LENS {
        for f in [Fp8Format::E4M3, Fp8Format::E5M2] {
            let mut x: Vec<f32> = (0..n).map(|_| 4.0 * rng.unit()).collect();
            // zeros, a subnormal after scaling, beyond max, infinity
            let edge = [0.0, -0.0, 1e-6, 1e4, f32::INFINITY, -3e5];
            for (i, e) in edge.iter().enumerate() {
                if i < n {
                    x[(i * 7) % n] = *e;
                }
            }
            let (mut dc, mut dr) = (vec![0u8; n], vec![0u8; n]);
            let (ac, cc) = Cpu.cast_weights_fp8(f, &x, 16.0, &mut dc);
            let (ar, cr) = Reference.cast_weights_fp8(f, &x, 16.0, &mut dr);
            assert_eq!(dc, dr, "n {n} {f:?}");
            assert!(same_f32(ac, ar), "n {n} {f:?}: amax {ac} {ar}");
            assert_eq!(cc, cr, "n {n} {f:?}: counts");
        }
    }
}

fn metas() -> Vec<ParamMeta> {
    vec![
        ParamMeta {
            name: "w".into(),
            shape: vec![3, 1500],
            weight_decay: true,
        },
        ParamMeta {
            name: "b".into(),
            shape: vec![37],
            weight_decay: false,
        },
    ]
}

/// Whole optimizers on each backend: 30 steps of Fp8Adam (an E4M3 compute-weight target
/// with its scale from its own amax, the fix-up passes: re-scales, deferrals) and of
/// AdamW, with growing gradients so the states cross binades. Bit-identical state,
/// compute weights and fix-up counts.
#[test]
fn optimizers_step_identically_on_cpu_and_reference() {
    let ms = metas();
    let mut rng = Rng(0x0B71_0000_0000_0007);
    let init: Vec<Vec<f32>> = ms
        .iter()
        .map(|m| (0..m.numel()).map(|_| 0.1 * rng.unit()).collect())
        .collect();
    let grads: Vec<Vec<ScaledFp8>> = (0..30)
        .map(|t| {
            ms.iter()
                .map(|m| {
                    let a = 1e-3 * 2f32.powi(t / 6);
                    let g: Vec<f32> = (0..m.numel()).map(|_| a * rng.unit()).collect();
                    ScaledFp8::quantize_current(&g, &m.shape, Fp8Format::E5M2, 0).0
                })
                .collect()
        })
        .collect();
    let h = AdamWHyper::default();
    let run = |ops: &dyn UpdateOps| {
        let mut p = init.clone();
        let mut ps: Vec<&mut [f32]> = p.iter_mut().map(|p| p.as_mut_slice()).collect();
        let mut opt = Fp8Adam::new(&ms, &mut ps, Fp8AdamConfig::fp8_lm(h)).unwrap();
        let mut adamw = AdamW::new(&ms, h);
        let mut p32 = init.clone();
        let mut w8 = vec![0u8; ms[0].numel()];
        let mut scale8 = 1.0;
        let mut written = Vec::new();
        for g in &grads {
            let gr: Vec<Grad> = g.iter().map(Grad::Fp8).collect();
            let (p0, p1) = p.split_at_mut(1);
            let mut outs = vec![
                ParamOut::Fp8(Fp8Out {
                    data: &mut w8,
                    format: Fp8Format::E4M3,
                    scale: None,
                    margin: 0,
                    rounding: ScaleRounding::PowerOfTwo,
                    fallback: scale8,
                    written: None,
                }),
                ParamOut::F32(&mut p1[0]),
            ];
            let _ = p0;
            opt.step_on(ops, &mut outs, &gr, 1e-2, 1.0);
            if let ParamOut::Fp8(o) = &outs[0] {
                let wr = o.written.expect("an FP8 target reports its cast");
                scale8 = wr.scale;
                written.push(wr);
            }
            let mut outs32: Vec<ParamOut> = p32
                .iter_mut()
                .map(|p| ParamOut::F32(p.as_mut_slice()))
                .collect();
            adamw.step_on(ops, &mut outs32, &gr, 1e-2, 0.5);
        }
        (
            opt.export_state(),
            opt.stats(),
            w8,
            p[1].clone(),
            written,
            adamw.export_state(),
            p32,
        )
    };
    let before = update_calls();
    let c = run(&Cpu);
    let mid = update_calls();
    let r = run(&Reference);
    // 30 steps x (2 Fp8Adam tensors + 2 AdamW tensors) x at least one chunk each
    assert!(
        update_calls() - mid >= 120,
        "the reference update did not run"
    );
    let _ = before;
    assert_eq!(c.0, r.0, "Fp8Adam state");
    assert_eq!(c.1, r.1, "Fp8Adam fix-up counts");
    assert!(c.1.rescales > 0, "no re-scale was exercised: {:?}", c.1);
    assert_eq!(c.2, r.2, "E4M3 compute weights");
    assert_eq!(c.3, r.3, "f32 compute weights");
    assert_eq!(c.4, r.4, "FP8 casts' scale, amax and counts");
    assert_eq!(c.5, r.5, "AdamW state");
    assert_eq!(c.6, r.6, "AdamW weights");
}

/// The re-scale pass and the master's f32 view on both backends, bit for bit: factors
/// up and down by binades (exact except where values enter or leave the subnormal
/// range, rounded there the same way: one RNE of the same f32), saturation of FP8 when
/// scaled past max (f16: overflow to inf).
#[test]
fn rescale_and_decode_are_bit_identical_on_cpu_and_reference() {
    let mut rng = Rng(0x7E5C_0000_0000_0009);
    for &n in &LENS {
        for factor in [2f32.powi(-9), 0.5, 2.0, 2f32.powi(12)] {
            let states = [
                St::F16(f16_bits(&mut rng, n, true)),
                St::Fp8(
                    fp8_codes(&mut rng, Fp8Format::E4M3, n, false),
                    Fp8Format::E4M3,
                ),
                St::Fp8(
                    fp8_codes(&mut rng, Fp8Format::E5M2, n, false),
                    Fp8Format::E5M2,
                ),
                St::F32((0..n).map(|_| rng.unit()).collect()),
            ];
            for s0 in states {
                let (mut sc, mut sr) = (s0.clone(), s0.clone());
                Cpu.rescale_state(&mut sc.view(), factor);
                Reference.rescale_state(&mut sr.view(), factor);
                assert_eq!(sc.bits(), sr.bits(), "n {n} x{factor} {s0:?}");
                if factor != 1.0 && !matches!(s0, St::F32(_)) && n > 2 {
                    assert_ne!(sc, s0, "n {n} x{factor}: the re-scale changed nothing");
                }
                let (mut dc, mut dr) = (vec![0f32; n], vec![0f32; n]);
                Cpu.decode_state(&sc.view(), 0.125, &mut dc);
                Reference.decode_state(&sr.view(), 0.125, &mut dr);
                let bits = |p: &[f32]| p.iter().map(|&x| canon(x)).collect::<Vec<_>>();
                assert_eq!(bits(&dc), bits(&dr), "n {n} x{factor}: decode");
            }
        }
    }
}
