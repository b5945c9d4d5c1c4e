//! The bf16 matrix-unit paths (AMX, AVX512-BF16) against the f64 reference of `tests.rs`.
//!
//! Bound, per element (as `tests.rs`): `(k + 3) u sum |a||b|` for f32 accumulation of
//! exact products (u = 2^-24; `tdpbf16ps`/`vdpbf16ps` round once per product added, like
//! FMA), plus one rounding of `c_old` per K-block and alpha, plus the units' flush of
//! f32 denormal partial sums: at most `2^-126` per step in the accumulator's (scaled)
//! units, `k * 2^-126 * alpha` in real units.
//!
//! Units tested: every path this CPU runs, and always the software model of the AMX
//! block (`Unit::AmxModel`), which runs the AMX path's packing, driver and epilogue on
//! any CPU (the tile instructions themselves only run where AMX exists).

use super::driver_bf16::{fuses_fp8_out, gemm_lowp, gemm_lowp_fp8_out, Unit, KC_MAX};
use super::tests::{reference, shape, Mat, Rng, Ty, LAYOUTS, U};
use super::*;

/// The units to check here: the model always, the real ones where available.
fn units() -> Vec<Unit> {
    let mut u = vec![Unit::AmxModel];
    if GemmPath::Amx.check().is_ok() {
        u.push(Unit::Amx);
    }
    if GemmPath::Avx512Bf16.check().is_ok() {
        u.push(Unit::Dp);
    }
    u
}

fn alpha_of(a: &Mat, b: &Mat) -> f64 {
    1.0 / (a.scale as f64 * b.scale as f64)
}

/// Check element `idx` of `got` against the reference at (i, j); returns its bound.
#[allow(clippy::too_many_arguments)]
fn check_at(
    label: &str,
    s: GemmShape,
    a: &Mat,
    b: &Mat,
    got: &[f32],
    i: usize,
    j: usize,
    old: f64,
) -> f64 {
    let (mut sum, mut abs) = (0f64, 0f64);
    for p in 0..s.k {
        let av = a.real[if s.trans_a { p * s.m + i } else { i * s.k + p }];
        let bv = b.real[if s.trans_b { j * s.k + p } else { p * s.n + j }];
        sum += av * bv;
        abs += (av * bv).abs();
    }
    let k_blocks = s.k.div_ceil(256) as f64; // no path has K-blocks under 256 steps
    let tol = (s.k + 3) as f64 * U * abs
        + (k_blocks + 2.0) * U * old.abs()
        + s.k as f64 * f32::MIN_POSITIVE as f64 * alpha_of(a, b)
        + f64::MIN_POSITIVE;
    let g = got[i * s.n + j] as f64;
    let err = (g - (sum + old)).abs();
    assert!(
        err <= tol,
        "{label}: C[{i},{j}] = {g}, want {} (err {err:e} > bound {tol:e})",
        sum + old
    );
    tol
}

/// Sampled elements: all four corners, the last row and column (edge tiles) and a
/// pseudo-random spread; the f64 reference per element costs k, not the whole GEMM.
fn sample(s: GemmShape, rng: &mut Rng, count: usize) -> Vec<(usize, usize)> {
    let (m, n) = (s.m, s.n);
    let mut v = vec![(0, 0), (0, n - 1), (m - 1, 0), (m - 1, n - 1)];
    for t in 0..count {
        v.push((m - 1, t % n));
        v.push((t % m, n - 1));
        v.push((
            (rng.next_u64() % m as u64) as usize,
            (rng.next_u64() % n as u64) as usize,
        ));
    }
    v
}

/// Shapes of the model's linear layers at GPT-2 124M (batch 4 x context 64 = 256 rows)
/// and at the tiny config (batch 32 x context 16 = 512 rows, width 64), with the
/// layout each GEMM uses: forward `(n, oc, c)` trans_b, dinp `(n, c, oc)` plain, dW
/// `(oc, c, n)` trans_a.
fn model_shapes() -> Vec<GemmShape> {
    let mut v = vec![];
    for (bt, c) in [(256usize, 768usize), (512, 64)] {
        for oc in [3 * c, c, 4 * c] {
            v.push(GemmShape::new(bt, oc, c).trans_b());
            v.push(GemmShape::new(bt, c, oc));
            v.push(GemmShape::new(oc, c, bt).trans_a());
        }
        // the MLP's second projection (4c -> c)
        v.push(GemmShape::new(bt, c, 4 * c).trans_b());
        v.push(GemmShape::new(bt, 4 * c, c));
        v.push(GemmShape::new(c, 4 * c, bt).trans_a());
    }
    v
}

/// The recipe's operand pairs and the bf16 precision's.
const PAIRS: [(Ty, Ty); 4] = [
    (Ty::E4M3, Ty::E4M3), // forward
    (Ty::E5M2, Ty::E4M3), // dinp, dW
    (Ty::Bf16, Ty::Bf16), // bf16 precision
    (Ty::E5M2, Ty::Bf16), // a mix: both exact in bf16
];

/// Every unit on every model shape and layout, sampled against f64; and the unit
/// against the f32 FMA path element by element, within the sum of both bounds.
#[test]
fn every_unit_on_the_model_shapes() {
    let mut rng = Rng(21);
    for s in model_shapes() {
        let (ta, tb) = PAIRS[rng.next_u64() as usize % 2]; // one FP8 pair per shape, cheap
        for (ta, tb) in [(ta, tb), (Ty::Bf16, Ty::Bf16)] {
            let a = Mat::random(&mut rng, s.m * s.k, ta, 4.0);
            let b = Mat::random(&mut rng, s.k * s.n, tb, 256.0);
            let mut fma = vec![0f32; s.m * s.n];
            Cpu.gemm_with_isa(Isa::detect(), s, a.as_ref(), b.as_ref(), &mut fma, false);
            let pts = sample(s, &mut rng, 40);
            for unit in units() {
                // The software model is slow (scalar): only the small shapes and one
                // big one of each layout run it fully.
                if unit == Unit::AmxModel && s.m * s.n * s.k > 256 * 768 * 768 {
                    continue;
                }
                let mut c = vec![f32::NAN; s.m * s.n];
                gemm_lowp(unit, s, a.as_ref(), b.as_ref(), &mut c, false, 2);
                let label = format!("{unit:?} {s:?} {ta:?} x {tb:?}");
                for &(i, j) in &pts {
                    let tol = check_at(&label, s, &a, &b, &c, i, j, 0.0);
                    let d = (c[i * s.n + j] as f64 - fma[i * s.n + j] as f64).abs();
                    assert!(
                        d <= 2.0 * tol,
                        "{label}: C[{i},{j}] vs FMA: {d:e} > {:e}",
                        2.0 * tol
                    );
                }
                assert!(c.iter().all(|x| x.is_finite()), "{label}: unwritten output");
            }
        }
    }
}

/// Ragged edges in every dimension (m, n not multiples of the tiles, k not of 32 nor
/// of the K-block, one K-block and several), all layouts, all pairs, with accumulation,
/// checked on every element.
#[test]
fn ragged_edges_every_layout() {
    let mut rng = Rng(22);
    let shapes = [
        (1, 1, 1),
        (7, 9, 3),
        (33, 47, 65),
        (31, 33, 31),
        (40, 70, 600),
        (65, 31, 1100),
        (1201, 37, 130), // tall: the driver splits rows, not columns (grid_lowp)
        (17, 40, 0),
    ];
    for unit in units() {
        for &(m, n, k) in &shapes {
            for (ta, tb) in LAYOUTS {
                for (ta_ty, tb_ty) in PAIRS {
                    let s = shape(m, n, k, ta, tb);
                    let a = Mat::random(&mut rng, m * k, ta_ty, 3.0);
                    let b = Mat::random(&mut rng, k * n, tb_ty, 600.0);
                    let label = format!("{unit:?} {s:?} {ta_ty:?} x {tb_ty:?}");
                    let mut c = vec![f32::NAN; m * n];
                    gemm_lowp(unit, s, a.as_ref(), b.as_ref(), &mut c, false, 2);
                    if k == 0 {
                        assert!(c.iter().all(|&x| x == 0.0), "{label}: k = 0 gives 0");
                        continue;
                    }
                    let c_old: Vec<f32> = (0..m * n).map(|_| rng.sym() * 10.0).collect();
                    let mut c2 = c_old.clone();
                    gemm_lowp(unit, s, a.as_ref(), b.as_ref(), &mut c2, true, 2);
                    for i in 0..m {
                        for j in 0..n {
                            check_at(&label, s, &a, &b, &c, i, j, 0.0);
                            let old = c_old[i * n + j] as f64;
                            check_at(&format!("{label} acc"), s, &a, &b, &c2, i, j, old);
                        }
                    }
                }
            }
        }
    }
}

/// Results do not depend on the thread count, and, on one thread, each operand element
/// is decoded once per GEMM (the decode is fused into packing: O(mk + kn)).
#[test]
fn thread_independent_and_decoded_once() {
    let mut rng = Rng(23);
    for (m, n, k, ta, tb) in [
        (100, 300, 700, false, true),
        (64, 200, 1100, true, false),
        (1100, 50, 300, true, false), // tall: row ranges
    ] {
        let s = shape(m, n, k, ta, tb);
        let a = Mat::random(&mut rng, m * k, Ty::E5M2, 8.0);
        let b = Mat::random(&mut rng, k * n, Ty::E4M3, 8.0);
        for unit in units() {
            let mut c1 = vec![0f32; m * n];
            super::pack_bf16::DECODED_BF16.set(0);
            gemm_lowp(unit, s, a.as_ref(), b.as_ref(), &mut c1, false, 1);
            assert_eq!(
                super::pack_bf16::DECODED_BF16.get(),
                m * k + k * n,
                "{unit:?} {s:?}"
            );
            for t in [2, 3] {
                let mut ct = vec![0f32; m * n];
                gemm_lowp(unit, s, a.as_ref(), b.as_ref(), &mut ct, false, t);
                assert_eq!(c1, ct, "{unit:?} {s:?}: {t} threads differ from 1");
            }
        }
    }
}

/// FP8 subnormals and zeros through the whole GEMM: a 1-step product of every code
/// with 1.0 must give back the code's exact value (a unit that read the decoded value
/// as a bf16 denormal would return 0 for the subnormal codes).
#[test]
fn every_fp8_code_survives_the_units() {
    for fmt in [Fp8Format::E4M3, Fp8Format::E5M2] {
        let table = fp8lm_fp8::cast::decode_table(fmt);
        let codes: Vec<u8> = (0..=255u8)
            .filter(|&c| table[c as usize].is_finite())
            .collect();
        let one = fp8lm_fp8::E4M3::from_f32(1.0).to_bits();
        let (m, n, k) = (codes.len(), 1, 1);
        let s = GemmShape::new(m, n, k);
        let a = MatRef::Fp8 {
            data: &codes,
            format: fmt,
            scale: 1.0,
        };
        let b = MatRef::Fp8 {
            data: &[one],
            format: Fp8Format::E4M3,
            scale: 1.0,
        };
        for unit in units() {
            let mut c = vec![f32::NAN; m];
            gemm_lowp(unit, s, a, b, &mut c, false, 1);
            for (&code, &got) in codes.iter().zip(&c) {
                let want = table[code as usize];
                assert!(
                    got.to_bits() == want.to_bits() || (got == 0.0 && want == 0.0),
                    "{unit:?} {fmt:?} code {code:#04x}: got {got}, want {want}"
                );
            }
        }
    }
}

/// Every path through the public entry point agrees with the reference on a mixed case,
/// and a path that is not available here is refused with its reason.
#[test]
fn public_paths() {
    let mut rng = Rng(24);
    let s = shape(45, 70, 300, true, false);
    let a = Mat::random(&mut rng, s.m * s.k, Ty::E5M2, 4.0);
    let b = Mat::random(&mut rng, s.k * s.n, Ty::E4M3, 4.0);
    let want = reference(s, &a, &b);
    for p in GemmPath::ALL {
        match p.check() {
            Ok(()) => {
                let mut c = vec![0f32; s.m * s.n];
                Cpu.gemm_with_path(p, s, a.as_ref(), b.as_ref(), &mut c, false);
                super::tests::check(&format!("{p:?}"), s.k, &c, &want, None);
            }
            Err(why) => {
                assert!(!why.is_empty());
                let r = std::panic::catch_unwind(|| {
                    let mut c = vec![0f32; s.m * s.n];
                    Cpu.gemm_with_path(p, s, a.as_ref(), b.as_ref(), &mut c, false);
                });
                let msg = r.expect_err("an unavailable path must be refused");
                let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
                assert!(msg.contains(p.name()) && msg.contains(&why), "{msg}");
            }
        }
    }
    assert_eq!(GemmPath::available().last(), Some(&GemmPath::Fma));
    // the best path is the first available one, in the order amx > avx512bf16 > fma
    let best = GemmPath::best();
    for p in GemmPath::ALL.iter().take_while(|p| **p != best) {
        assert!(
            p.check().is_err(),
            "{p:?} is available but {best:?} was chosen"
        );
    }
}

/// `FP8LM_GEMM` parsing: names, an unknown name, an unavailable one.
#[test]
fn env_forcing() {
    let resolve_from = GemmPath::resolve_from;
    assert_eq!(resolve_from(None).unwrap().0, GemmPath::best());
    assert_eq!(resolve_from(Some("")).unwrap().0, GemmPath::best());
    assert_eq!(resolve_from(Some("fma")).unwrap().0, GemmPath::Fma);
    let e = resolve_from(Some("tpu")).unwrap_err();
    assert!(e.contains("FP8LM_GEMM") && e.contains("tpu"), "{e}");
    for p in GemmPath::ALL {
        match p.check() {
            Ok(()) => assert_eq!(resolve_from(Some(p.name())).unwrap().0, p),
            Err(why) => {
                let e = resolve_from(Some(p.name())).unwrap_err();
                assert!(e.contains("not available") && e.contains(&why), "{e}");
            }
        }
    }
}

/// The start-up self-check that guards the AMX path passes for every unit this machine
/// runs (and the software model), so it rejects only a kernel that is really wrong.
#[test]
fn start_up_self_check_passes_on_every_unit_here() {
    for unit in units() {
        super::path::self_check(unit).unwrap_or_else(|e| panic!("{unit:?}: {e}"));
    }
}

/// The FP8 store fused into the tiles equals the f32 GEMM followed by the bulk cast, bit
/// for bit: codes, amax (NaN included) and saturation / underflow counts, on every unit,
/// every layout, full and ragged tiles, tall (row-range) grids, K up to one whole
/// K-block, and 1-3 threads. Scales are picked to make some values saturate and some
/// flush, so the counts are exercised (and asserted nonzero).
#[test]
fn fused_fp8_store_equals_gemm_then_cast() {
    let mut rng = Rng(41);
    assert!(fuses_fp8_out(&shape(1, 1, KC_MAX, false, false)));
    assert!(!fuses_fp8_out(&shape(1, 1, KC_MAX + 1, false, false)));
    for (m, n, k) in [
        (64, 96, 256),
        (37, 45, 19),
        (1100, 40, 64),
        (9, 200, KC_MAX),
    ] {
        for (ta, tb) in LAYOUTS {
            let s = shape(m, n, k, ta, tb);
            let mut a = Mat::random(&mut rng, m * k, Ty::E5M2, 8.0);
            let b = Mat::random(&mut rng, k * n, Ty::E4M3, 16.0);
            for unit in units() {
                let mut c = vec![0f32; m * n];
                gemm_lowp(unit, s, a.as_ref(), b.as_ref(), &mut c, false, 2);
                let amax = c.iter().fold(0f32, |x, v| x.max(v.abs()));
                let mut mags: Vec<f32> = c.iter().map(|v| v.abs()).collect();
                mags.sort_by(f32::total_cmp);
                let median = mags[mags.len() / 2];
                for fmt in [Fp8Format::E4M3, Fp8Format::E5M2] {
                    // 2x over the range: the largest values saturate; then a scale that
                    // puts the median a quarter of the smallest subnormal: half flush.
                    let tiny = fmt.decode(1) / 4.0;
                    for (scale, saturating) in
                        [(2.0 * fmt.max() / amax, true), (tiny / median, false)]
                    {
                        let mut want = vec![0u8; m * n];
                        let (amax_want, counts_want) =
                            fp8lm_fp8::cast::f32_to_fp8_counted(fmt, &c, scale, &mut want);
                        let exercised = match saturating {
                            true => counts_want.saturated,
                            false => counts_want.flushed,
                        };
                        assert!(
                            exercised > 0,
                            "{unit:?} {s:?} {fmt:?} scale {scale}: count not exercised"
                        );
                        for t in [1, 2, 3] {
                            let mut got = vec![0xAAu8; m * n];
                            let (amax_got, counts_got) = gemm_lowp_fp8_out(
                                unit,
                                s,
                                a.as_ref(),
                                b.as_ref(),
                                &mut got,
                                fmt,
                                scale,
                                t,
                            );
                            let label = format!("{unit:?} {s:?} {fmt:?} {t} threads");
                            assert_eq!(got, want, "{label}: codes");
                            assert_eq!(amax_got.to_bits(), amax_want.to_bits(), "{label}: amax");
                            assert_eq!(counts_got, counts_want, "{label}: counts");
                        }
                    }
                }
            }
            // A NaN operand code reaches the amax through the fused store.
            a.set_code(m * k / 2, 0x7F);
            for unit in units() {
                let mut got = vec![0u8; m * n];
                let (amax, _) = gemm_lowp_fp8_out(
                    unit,
                    s,
                    a.as_ref(),
                    b.as_ref(),
                    &mut got,
                    Fp8Format::E5M2,
                    1.0,
                    2,
                );
                assert!(amax.is_nan(), "{unit:?} {s:?}: NaN lost in the fused store");
            }
        }
    }
}
