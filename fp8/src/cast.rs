//! Bulk casts over slices, returning the input's amax from the same pass.
//!
//! Semantics (every backend, every input, bit for bit): `dst[i] = fp8(src[i] * scale)`
//! where the product is one f32 multiply (the input widened exactly to f32 first) and
//! the cast is [`Fp8Format::encode_mode`] — by default [`CastMode::SatFinite`], i.e.
//! exactly `E4M3::from_f32` / `E5M2::from_f32`. The returned amax is `max |src[i]|` of
//! the *unscaled* input (what scaling recipes track), or NaN if any input is NaN.
//!
//! Backends: the portable loop ([`Backend::Portable`]), AVX2 (+F16C) on x86-64
//! ([`Backend::Avx2`]) and AVX-512 F+BW+VL ([`Backend::Avx512`], the encodes to FP8; the
//! other casts run their AVX2 code under it), picked at run time with
//! `is_x86_feature_detected!`. The plain
//! functions are single-threaded; the `par_*` variants split large slices over the rayon
//! pool (chunks of [`PAR_CHUNK`] elements). Callers that already run one tensor per
//! thread should use the plain ones.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod portable;
mod to_bf16;
pub use to_bf16::f32_to_bf16;

use crate::format::{CastMode, EncodeConsts, Fp8Format};
use half::{bf16, f16};
use portable::amax_from_bits;
use rayon::prelude::*;

/// Which implementation a bulk cast runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// Plain Rust loop over the branch-free scalar encoder; runs everywhere.
    Portable,
    /// x86-64 AVX2 with F16C (every AVX2 CPU has F16C), 32 elements per iteration.
    Avx2,
    /// x86-64 AVX-512 F+BW+VL: the encodes to FP8 (16 lanes, statistics counted in the
    /// same pass); every other cast runs the AVX2 code (AVX-512 CPUs have AVX2).
    Avx512,
}

impl Backend {
    /// The fastest backend this CPU supports.
    pub fn detect() -> Backend {
        if Backend::Avx512.is_available() {
            Backend::Avx512
        } else if Backend::Avx2.is_available() {
            Backend::Avx2
        } else {
            Backend::Portable
        }
    }

    pub fn is_available(self) -> bool {
        match self {
            Backend::Portable => true,
            Backend::Avx2 => avx2_available(),
            Backend::Avx512 => avx512_available(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Portable => "portable",
            Backend::Avx2 => "avx2",
            Backend::Avx512 => "avx512",
        }
    }

    /// Whether the AVX2 code runs for this backend's non-encode casts.
    fn runs_avx2(self) -> bool {
        self != Backend::Portable && avx2_available()
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2_available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c")
}
#[cfg(not(target_arch = "x86_64"))]
fn avx2_available() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn avx512_available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("popcnt")
        && avx2_available()
}
#[cfg(not(target_arch = "x86_64"))]
fn avx512_available() -> bool {
    false
}

/// Slices are split into chunks of this many elements by the `par_*` casts (256 KiB of
/// f32 input: big enough that rayon's overhead is noise, small enough to balance).
pub const PAR_CHUNK: usize = 1 << 16;

macro_rules! to_fp8 {
    ($(#[$doc:meta])* $name:ident, $with:ident, $par:ident, $t:ty, $avx2:ident, $portable:ident) => {
        $(#[$doc])*
        pub fn $name(fmt: Fp8Format, src: &[$t], scale: f32, dst: &mut [u8]) -> f32 {
            $with(fmt, CastMode::SatFinite, Backend::detect(), src, scale, dst)
        }

        /// As the function without `_with`, under an explicit cast mode and backend (an
        /// unavailable backend falls back to [`Backend::Portable`]; results are identical).
        pub fn $with(
            fmt: Fp8Format,
            mode: CastMode,
            backend: Backend,
            src: &[$t],
            scale: f32,
            dst: &mut [u8],
        ) -> f32 {
            assert_eq!(
                src.len(),
                dst.len(),
                concat!(stringify!($name), ": src and dst lengths differ")
            );
            let k = EncodeConsts::new(fmt, mode);
            #[cfg(target_arch = "x86_64")]
            if backend == Backend::Avx512 && avx512_available() {
                // SAFETY: the required CPU features were detected just above.
                return amax_from_bits(unsafe { avx512::$avx2(&k, fmt.max(), src, scale, dst) }.0);
            }
            #[cfg(target_arch = "x86_64")]
            if backend == Backend::Avx2 && avx2_available() {
                // SAFETY: the required CPU features were detected just above.
                return amax_from_bits(unsafe { avx2::$avx2(&k, src, scale, dst) });
            }
            let _ = backend;
            amax_from_bits(portable::$portable(&k, src, scale, dst))
        }

        /// Rayon-parallel variant (same result, bit for bit, as the single-threaded one).
        pub fn $par(fmt: Fp8Format, src: &[$t], scale: f32, dst: &mut [u8]) -> f32 {
            assert_eq!(
                src.len(),
                dst.len(),
                concat!(stringify!($par), ": src and dst lengths differ")
            );
            let backend = Backend::detect();
            let acc = src
                .par_chunks(PAR_CHUNK)
                .zip(dst.par_chunks_mut(PAR_CHUNK))
                .map(|(s, d)| $with(fmt, CastMode::SatFinite, backend, s, scale, d).to_bits() & 0x7FFF_FFFF)
                .max()
                .unwrap_or(0);
            amax_from_bits(acc)
        }
    };
}

to_fp8!(
    /// `dst[i] = fp8(src[i] * scale)` (round to nearest even, saturating like
    /// `from_f32`). Returns `max |src[i]|` (unscaled), NaN if any input is NaN.
    f32_to_fp8_amax,
    f32_to_fp8_amax_with,
    par_f32_to_fp8_amax,
    f32,
    f32_to_fp8,
    f32_to_fp8
);
to_fp8!(
    /// bf16 input variant of [`f32_to_fp8_amax`] (the input is widened exactly to f32).
    bf16_to_fp8_amax,
    bf16_to_fp8_amax_with,
    par_bf16_to_fp8_amax,
    bf16,
    bf16_to_fp8,
    bf16_to_fp8
);
to_fp8!(
    /// f16 input variant of [`f32_to_fp8_amax`] (the input is widened exactly to f32).
    f16_to_fp8_amax,
    f16_to_fp8_amax_with,
    par_f16_to_fp8_amax,
    f16,
    f16_to_fp8,
    f16_to_fp8
);

/// What a cast did besides its output: how many values saturated and how many were
/// flushed to zero.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CastCounts {
    /// Inputs with `|x * scale|` above the format's max (clamped to +-max; inf counts,
    /// NaN does not).
    pub saturated: u64,
    /// Nonzero inputs whose code has zero magnitude (underflow).
    pub flushed: u64,
}

impl std::ops::Add for CastCounts {
    type Output = CastCounts;
    fn add(self, o: CastCounts) -> CastCounts {
        CastCounts {
            saturated: self.saturated + o.saturated,
            flushed: self.flushed + o.flushed,
        }
    }
}

/// [`f32_to_fp8_amax`] that also counts saturated and flushed values ([`CastCounts`]).
/// On AVX-512 the counts come from the same pass; elsewhere from a second pass over
/// the slice (the same definition, tested against each other).
pub fn f32_to_fp8_counted(
    fmt: Fp8Format,
    src: &[f32],
    scale: f32,
    dst: &mut [u8],
) -> (f32, CastCounts) {
    f32_to_fp8_counted_with(fmt, Backend::detect(), src, scale, dst)
}

/// [`f32_to_fp8_counted`] on an explicit backend (unavailable falls back to portable).
pub fn f32_to_fp8_counted_with(
    fmt: Fp8Format,
    backend: Backend,
    src: &[f32],
    scale: f32,
    dst: &mut [u8],
) -> (f32, CastCounts) {
    assert_eq!(
        src.len(),
        dst.len(),
        "f32_to_fp8_counted: src and dst lengths differ"
    );
    #[cfg(target_arch = "x86_64")]
    if backend == Backend::Avx512 && avx512_available() {
        let k = EncodeConsts::new(fmt, CastMode::SatFinite);
        // SAFETY: the required CPU features were detected just above.
        let (bits, counts) = unsafe { avx512::f32_to_fp8(&k, fmt.max(), src, scale, dst) };
        return (amax_from_bits(bits), counts);
    }
    let amax = f32_to_fp8_amax_with(fmt, CastMode::SatFinite, backend, src, scale, dst);
    // Each count only when it can be nonzero: the amax tells whether anything saturated.
    let may_saturate = amax * scale > fmt.max() || amax.is_nan();
    (amax, cast_counts(fmt, src, scale, dst, may_saturate))
}

/// The [`CastCounts`] of a cast already done (`dst = fp8(src * scale)`, saturating),
/// recomputed from its input and output codes: what a backend whose cast kernel does not
/// count (the CUDA staging adapter) reports. `may_saturate = false` skips the saturation
/// pass (the caller knows from the amax that nothing saturated).
pub fn cast_counts(
    fmt: Fp8Format,
    src: &[f32],
    scale: f32,
    dst: &[u8],
    may_saturate: bool,
) -> CastCounts {
    let max = fmt.max();
    let saturated = if may_saturate {
        src.iter().filter(|x| (**x * scale).abs() > max).count() as u64
    } else {
        0
    };
    // u32 sums vectorise 8 lanes per AVX2 vector (`filter().count()` widens to u64).
    // Zero-magnitude codes are rare outside zeros in the input, so count those first.
    let zeros_out = dst.iter().map(|&b| (b & 0x7F == 0) as u32).sum::<u32>();
    let flushed = if zeros_out == 0 {
        0
    } else {
        zeros_out - src.iter().map(|&x| (x == 0.0) as u32).sum::<u32>()
    };
    CastCounts {
        saturated,
        flushed: flushed as u64,
    }
}

/// Rayon-parallel [`f32_to_fp8_counted`] (same bytes, amax and counts).
pub fn par_f32_to_fp8_counted(
    fmt: Fp8Format,
    src: &[f32],
    scale: f32,
    dst: &mut [u8],
) -> (f32, CastCounts) {
    assert_eq!(
        src.len(),
        dst.len(),
        "par_f32_to_fp8_counted: src and dst lengths differ"
    );
    let backend = Backend::detect();
    let (bits, counts) = src
        .par_chunks(PAR_CHUNK)
        .zip(dst.par_chunks_mut(PAR_CHUNK))
        .map(|(s, d)| {
            let (a, c) = f32_to_fp8_counted_with(fmt, backend, s, scale, d);
            (a.to_bits() & 0x7FFF_FFFF, c)
        })
        .reduce(
            || (0, CastCounts::default()),
            |(a, c), (b, d)| (a.max(b), c + d),
        );
    (amax_from_bits(bits), counts)
}

/// `dst[i] = decode(src[i]) * inv_scale` (pass `1.0 / scale` to dequantise; for a
/// power-of-two scale that reciprocal and the product are exact). Returns the amax of
/// the decoded, unscaled FP8 values (NaN if any code is NaN).
pub fn fp8_to_f32_amax(fmt: Fp8Format, src: &[u8], inv_scale: f32, dst: &mut [f32]) -> f32 {
    fp8_to_f32_amax_with(fmt, Backend::detect(), src, inv_scale, dst)
}

/// [`fp8_to_f32_amax`] on an explicit backend (unavailable falls back to portable).
pub fn fp8_to_f32_amax_with(
    fmt: Fp8Format,
    backend: Backend,
    src: &[u8],
    inv_scale: f32,
    dst: &mut [f32],
) -> f32 {
    assert_eq!(
        src.len(),
        dst.len(),
        "fp8_to_f32_amax: src and dst lengths differ"
    );
    let table = decode_table(fmt);
    #[cfg(target_arch = "x86_64")]
    if backend.runs_avx2() {
        // SAFETY: the required CPU features were detected just above.
        return amax_from_bits(unsafe { avx2::fp8_to_f32(table, src, inv_scale, dst) });
    }
    let _ = backend;
    amax_from_bits(portable::fp8_to_f32(table, src, inv_scale, dst))
}

/// Rayon-parallel [`fp8_to_f32_amax`].
pub fn par_fp8_to_f32_amax(fmt: Fp8Format, src: &[u8], inv_scale: f32, dst: &mut [f32]) -> f32 {
    assert_eq!(
        src.len(),
        dst.len(),
        "par_fp8_to_f32_amax: src and dst lengths differ"
    );
    let backend = Backend::detect();
    let acc = src
        .par_chunks(PAR_CHUNK)
        .zip(dst.par_chunks_mut(PAR_CHUNK))
        .map(|(s, d)| fp8_to_f32_amax_with(fmt, backend, s, inv_scale, d).to_bits() & 0x7FFF_FFFF)
        .max()
        .unwrap_or(0);
    amax_from_bits(acc)
}

/// `dst[i] = f16(src[i] * scale)`, round to nearest even, IEEE overflow to +-inf (the
/// FP16 casts of master weights and second moments, whose scales keep values in
/// range). Returns the unscaled input amax, NaN if any input is NaN. Bit-identical to
/// `half::f16::from_f32(x * scale)` on every backend, NaN payloads included.
pub fn f32_to_f16_amax(src: &[f32], scale: f32, dst: &mut [f16]) -> f32 {
    f32_to_f16_amax_with(Backend::detect(), src, scale, dst)
}

/// [`f32_to_f16_amax`] on an explicit backend (unavailable falls back to portable).
pub fn f32_to_f16_amax_with(backend: Backend, src: &[f32], scale: f32, dst: &mut [f16]) -> f32 {
    assert_eq!(
        src.len(),
        dst.len(),
        "f32_to_f16_amax: src and dst lengths differ"
    );
    #[cfg(target_arch = "x86_64")]
    if backend.runs_avx2() {
        // SAFETY: the required CPU features were detected just above.
        return amax_from_bits(unsafe { avx2::f32_to_f16(src, scale, dst) });
    }
    let _ = backend;
    amax_from_bits(portable::f32_to_f16(src, scale, dst))
}

/// `dst[i] = f32(src[i]) * inv_scale`; returns the amax of the unscaled f16 values.
pub fn f16_to_f32_amax(src: &[f16], inv_scale: f32, dst: &mut [f32]) -> f32 {
    f16_to_f32_amax_with(Backend::detect(), src, inv_scale, dst)
}

/// [`f16_to_f32_amax`] on an explicit backend (unavailable falls back to portable).
pub fn f16_to_f32_amax_with(backend: Backend, src: &[f16], inv_scale: f32, dst: &mut [f32]) -> f32 {
    assert_eq!(
        src.len(),
        dst.len(),
        "f16_to_f32_amax: src and dst lengths differ"
    );
    #[cfg(target_arch = "x86_64")]
    if backend.runs_avx2() {
        // SAFETY: the required CPU features were detected just above.
        return amax_from_bits(unsafe { avx2::f16_to_f32(src, inv_scale, dst) });
    }
    let _ = backend;
    amax_from_bits(portable::f16_to_f32(src, inv_scale, dst))
}

/// `max |x|` over a slice; NaN if any element is NaN; 0 for an empty slice.
pub fn amax_f32(src: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2_available() {
        // SAFETY: the required CPU features were detected just above.
        return amax_from_bits(unsafe { avx2::amax_f32(src) });
    }
    amax_from_bits(portable::amax_f32(src))
}

static E4M3_TABLE: [f32; 256] = build_table(Fp8Format::E4M3);
static E5M2_TABLE: [f32; 256] = build_table(Fp8Format::E5M2);

const fn build_table(fmt: Fp8Format) -> [f32; 256] {
    let mut t = [0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = fmt.decode(i as u8);
        i += 1;
    }
    t
}

/// The 256-entry decode table of a format (exact f32 values, NaN/inf included).
pub fn decode_table(fmt: Fp8Format) -> &'static [f32; 256] {
    match fmt {
        Fp8Format::E4M3 => &E4M3_TABLE,
        Fp8Format::E5M2 => &E5M2_TABLE,
    }
}
