//! Which unit runs the low-precision GEMMs (both operands bf16 or FP8): AMX tiles,
//! AVX512-BF16 dot products, or the f32 FMA kernel ([`super::Isa`]). f32 x f32 GEMMs
//! (and any GEMM with an f32 operand: rounding it to bf16 would change the numbers)
//! always run on f32 FMA, the reference path.
//!
//! Chosen once per process: the best the CPU (and, for AMX, the kernel) allows, or the
//! one named by `FP8LM_GEMM=amx|avx512bf16|fma`; forcing a path that is not available is
//! an error naming the reason. AMX counts as available only after a start-up self-check
//! ([`self_check`]: bit-exact against the FMA kernel on integer data, every layout,
//! ragged edges) passes; a failure is logged and the next path is used. The choice is logged (tracing, info) when first made —
//! at start-up when the binary calls [`GemmPath::init`].
//!
//! Every GEMM through [`super::GemmOps`] is counted per path ([`path_calls`]), so tests
//! can assert that a training step ran the matrix units, not silently the FMA fallback.

use super::amx;
use super::dpbf16;
use super::driver_bf16::{gemm_lowp, Unit};
use super::{driver, GemmShape, Isa, MatRef};
use half::bf16;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The unit for low-precision GEMMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmPath {
    /// AMX `tdpbf16ps` tiles (FP8/bf16 decoded to bf16 while packing).
    Amx,
    /// AVX512-BF16 `vdpbf16ps` (for CPUs with BF16 but no AMX).
    Avx512Bf16,
    /// The f32 FMA kernel (operands decoded to f32 while packing).
    Fma,
}

/// The environment variable that forces a path.
pub const GEMM_ENV: &str = "FP8LM_GEMM";

impl GemmPath {
    pub const ALL: [GemmPath; 3] = [GemmPath::Amx, GemmPath::Avx512Bf16, GemmPath::Fma];

    pub fn name(self) -> &'static str {
        match self {
            GemmPath::Amx => "amx",
            GemmPath::Avx512Bf16 => "avx512bf16",
            GemmPath::Fma => "fma",
        }
    }

    /// `Ok` if this CPU (and OS) can run the path, else why not.
    pub fn check(self) -> Result<(), String> {
        match self {
            GemmPath::Amx => amx::permission().and_then(|()| self_check_once(Unit::Amx)),
            GemmPath::Avx512Bf16 if dpbf16::available() => Ok(()),
            GemmPath::Avx512Bf16 => {
                Err("the CPU does not report avx512_bf16 with avx512f/bw/vl".into())
            }
            GemmPath::Fma => Ok(()),
        }
    }

    /// Every path this machine runs, fastest first.
    pub fn available() -> Vec<GemmPath> {
        GemmPath::ALL
            .into_iter()
            .filter(|p| p.check().is_ok())
            .collect()
    }

    /// The fastest available path.
    pub fn best() -> GemmPath {
        GemmPath::available()[0]
    }

    /// The path for this process from `FP8LM_GEMM`'s value `env` (unset or empty: the
    /// best), with the reasons the faster paths were passed over.
    pub(crate) fn resolve_from(env: Option<&str>) -> Result<(GemmPath, Vec<String>), String> {
        let skipped = |upto: GemmPath| {
            GemmPath::ALL
                .into_iter()
                .take_while(|p| *p != upto)
                .filter_map(|p| p.check().err().map(|e| format!("{}: {e}", p.name())))
                .collect::<Vec<_>>()
        };
        match env {
            Some(v) if !v.is_empty() => {
                let Some(p) = GemmPath::ALL.into_iter().find(|p| p.name() == v) else {
                    return Err(format!(
                        "{GEMM_ENV}={v:?}: not a GEMM path (one of amx, avx512bf16, fma)"
                    ));
                };
                p.check()
                    .map_err(|why| format!("{GEMM_ENV}={v}: not available here: {why}"))?;
                Ok((p, vec![]))
            }
            _ => {
                let best = GemmPath::best();
                Ok((best, skipped(best)))
            }
        }
    }

    fn chosen() -> &'static Result<GemmPath, String> {
        static PATH: OnceLock<Result<GemmPath, String>> = OnceLock::new();
        PATH.get_or_init(|| {
            let env = std::env::var(GEMM_ENV).ok();
            let r = GemmPath::resolve_from(env.as_deref());
            match &r {
                Ok((p, skipped)) => tracing::info!(
                    gemm = p.name(),
                    fma_kernel = super::Isa::detect().name(),
                    passed_over = %skipped.join("; "),
                    "low-precision GEMM path"
                ),
                Err(e) => tracing::error!("{e}"),
            }
            r.map(|(p, _)| p)
        })
    }

    /// Decide (once) and log the path; `Err` when `FP8LM_GEMM` names an unknown or
    /// unavailable path. Binaries call this at start-up so the error comes first.
    pub fn init() -> Result<GemmPath, String> {
        GemmPath::chosen().clone()
    }

    /// The path of this process ([`GemmPath::init`]); panics with the reason when
    /// `FP8LM_GEMM` forces a path this machine does not have (binaries report it at
    /// start-up instead, through `init`).
    pub fn detect() -> GemmPath {
        match GemmPath::chosen() {
            Ok(p) => *p,
            Err(e) => panic!("gemm: {e}"),
        }
    }
}

/// AMX passes its start-up self-check (once per process; see [`self_check`]).
fn self_check_once(unit: Unit) -> Result<(), String> {
    static AMX: OnceLock<Result<(), String>> = OnceLock::new();
    AMX.get_or_init(|| {
        let r = self_check(unit);
        if let Err(e) = &r {
            tracing::warn!("{e}; AMX will not be used");
        }
        r
    })
    .clone()
}

/// Run `unit` on small GEMMs in every layout the model uses, with ragged edges in all
/// three dimensions, and compare with the f32 FMA kernel **bit for bit**: the operands
/// are small integers (|a|, |b| <= 3, k < 200), so every product and every partial sum
/// is an integer below 2^24, exact in f32 whatever the order of summation. A tile kernel
/// that packs, indexes, accumulates or stores wrongly cannot pass; one that passes may
/// still differ from FMA on real data only by f32 summation order.
///
/// Why at start-up: the AMX path runs on CPUs the project's CI may not have (its tests
/// compare the tile kernel with a software model and run only where AMX exists), so a
/// process never uses the tiles for training before they reproduced the reference here.
pub(crate) fn self_check(unit: Unit) -> Result<(), String> {
    let ints = |n: usize, seed: usize| -> Vec<bf16> {
        (0..n)
            .map(|i| bf16::from_f32(((i * 7 + seed * 13) % 7) as f32 - 3.0))
            .collect()
    };
    let (m, n, k) = (37, 45, 70);
    for (name, shape) in [
        ("forward (B transposed)", GemmShape::new(m, n, k).trans_b()),
        ("dinp (plain)", GemmShape::new(m, n, k)),
        ("dW (A transposed)", GemmShape::new(m, n, k).trans_a()),
    ] {
        let (a, b) = (ints(m * k, 1), ints(k * n, 2));
        let init: Vec<f32> = (0..m * n).map(|i| (i % 5) as f32).collect();
        let (mut got, mut want) = (init.clone(), init);
        for acc in [false, true] {
            gemm_lowp(
                unit,
                shape,
                MatRef::Bf16(&a),
                MatRef::Bf16(&b),
                &mut got,
                acc,
                1,
            );
            driver::gemm_f32(
                Isa::detect(),
                shape,
                MatRef::Bf16(&a),
                MatRef::Bf16(&b),
                &mut want,
                acc,
                1,
            );
        }
        if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
            return Err(format!(
                "the {unit:?} GEMM failed its start-up self-check on the {name} layout \
                 ({m}x{n}x{k}): C[{}, {}] = {}, the f32 FMA kernel gives {} (exact)",
                i / n,
                i % n,
                got[i],
                want[i]
            ));
        }
    }
    Ok(())
}

/// 0: no override; else 1 + index in [`GemmPath::ALL`].
static OVERRIDE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Make every following low-precision GEMM of the process run on `path` (`None`: back
/// to [`GemmPath::detect`]'s choice) — for benchmarks that time the same model on two
/// paths in one run (e.g. the FMA path before the matrix units). Process-wide; panics
/// if `path` is not available here.
pub fn set_path_override(path: Option<GemmPath>) {
    let v = match path {
        None => 0,
        Some(p) => {
            if let Err(why) = p.check() {
                panic!("gemm: path {} is not available: {why}", p.name());
            }
            1 + GemmPath::ALL.iter().position(|q| *q == p).expect("in ALL") as u8
        }
    };
    OVERRIDE.store(v, Ordering::Relaxed);
}

/// The path the next low-precision GEMM takes: the override, else the process's choice.
pub(crate) fn current() -> GemmPath {
    match OVERRIDE.load(Ordering::Relaxed) {
        0 => GemmPath::detect(),
        v => GemmPath::ALL[v as usize - 1],
    }
}

/// GEMM calls through [`super::GemmOps`] per path since the process started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathCalls {
    /// Low-precision GEMMs on AMX tiles.
    pub amx: u64,
    /// Low-precision GEMMs on AVX512-BF16.
    pub avx512bf16: u64,
    /// Low-precision GEMMs on the f32 FMA kernel (the fallback).
    pub fma_lowp: u64,
    /// GEMMs with an f32 operand (always f32 FMA).
    pub fma_f32: u64,
}

impl PathCalls {
    /// Calls of `self` since `before`.
    pub fn since(self, before: PathCalls) -> PathCalls {
        PathCalls {
            amx: self.amx - before.amx,
            avx512bf16: self.avx512bf16 - before.avx512bf16,
            fma_lowp: self.fma_lowp - before.fma_lowp,
            fma_f32: self.fma_f32 - before.fma_f32,
        }
    }
    /// Low-precision calls on `path`.
    pub fn lowp_on(self, path: GemmPath) -> u64 {
        match path {
            GemmPath::Amx => self.amx,
            GemmPath::Avx512Bf16 => self.avx512bf16,
            GemmPath::Fma => self.fma_lowp,
        }
    }
}

static CALLS: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

/// Which counter a call lands in.
#[derive(Clone, Copy)]
pub(crate) enum Counted {
    Lowp(GemmPath),
    F32,
}

pub(crate) fn count(c: Counted) {
    let i = match c {
        Counted::Lowp(GemmPath::Amx) => 0,
        Counted::Lowp(GemmPath::Avx512Bf16) => 1,
        Counted::Lowp(GemmPath::Fma) => 2,
        Counted::F32 => 3,
    };
    CALLS[i].fetch_add(1, Ordering::Relaxed);
}

/// The per-path GEMM call counters.
pub fn path_calls() -> PathCalls {
    let g = |i: usize| CALLS[i].load(Ordering::Relaxed);
    PathCalls {
        amx: g(0),
        avx512bf16: g(1),
        fma_lowp: g(2),
        fma_f32: g(3),
    }
}
