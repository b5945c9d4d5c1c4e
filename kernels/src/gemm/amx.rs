//! AMX bf16 micro-kernel: a 32 x 32 f32 block of C from `tdpbf16ps` tiles.
//!
//! Tiles (palette 1, all 16 rows x 64 bytes):
//! ```text
//!   tmm0 tmm1   C rows  0..16, cols 0..16 | 16..32   (16 x 16 f32 each)
//!   tmm2 tmm3   C rows 16..32, cols 0..16 | 16..32
//!   tmm4 tmm5   A rows  0..16 | 16..32, 32 k steps    (16 x 32 bf16)
//!   tmm6 tmm7   B cols  0..16 | 16..32, 16 k pairs    (16 x 16 bf16 pairs, "VNNI")
//! ```
//! Per 32-step chunk of K: 4 tile loads, 4 `tdpbf16ps` (each 16 x 16 x 32 multiply-adds).
//! A comes packed in the `rows` layout (`[kcp/32][32][32]`: an A tile is 1 KiB
//! contiguous, stride 64), B in the `pairs` layout with 32 columns (`[kcp/2][32][2]`:
//! tile 6 at offset 0, tile 7 at 64 bytes, stride 128), see [`super::pack_bf16`].
//! The accumulators are stored once per K-block to a local 32 x 32 buffer and the
//! epilogue (`alpha`, `+ C`) runs in AVX-512.
//!
//! Numerics: `tdpbf16ps` forms the products of bf16 pairs exactly (8-bit significands)
//! and accumulates in f32 (round to nearest even, denormal inputs and outputs flushed to
//! zero; decoded FP8 values are never bf16 denormals, see `pack_bf16`).
//!
//! Operating system and threads: Linux gives a process the (large) tile state only on
//! request, `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`; the permission is
//! process-wide and requested once ([`permission`]) before any thread runs a tile
//! instruction. The tile configuration is per thread: every work item that runs tiles
//! holds a [`TileGuard`] (`ldtilecfg` on creation, `tilerelease` on drop), so each rayon
//! worker configures its own tiles and leaves none configured behind.

/// Rows of C per micro-kernel call (two A tiles).
pub(crate) const MR: usize = 32;
/// K steps per tile product.
pub(crate) const KCHUNK: usize = 32;

/// CPUID says AMX-TILE and AMX-BF16 (leaf 7, EDX bits 24 and 22).
pub(crate) fn cpu_has_amx() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__cpuid, __cpuid_count};
        if __cpuid(0).eax < 7 {
            return false; // no leaf 7
        }
        let edx = __cpuid_count(7, 0).edx;
        (edx >> 24) & 1 == 1 && (edx >> 22) & 1 == 1
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Ask the kernel, once per process, for the AMX tile state. `Err` says why not (no
/// AMX in CPUID, or the kernel refused), for the start-up log.
pub(crate) fn permission() -> Result<(), String> {
    use std::sync::OnceLock;
    static PERM: OnceLock<Result<(), String>> = OnceLock::new();
    PERM.get_or_init(|| {
        if !cpu_has_amx() {
            return Err("the CPU does not report amx_tile + amx_bf16".into());
        }
        if !super::pack_bf16::simd_ok() {
            return Err("AMX present but AVX-512F/BW/VL missing (needed for packing)".into());
        }
        request_xtiledata()
    })
    .clone()
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_xtiledata() -> Result<(), String> {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes this process's xstate
    // permission; it reads no memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(format!(
            "arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) refused: {}",
            std::io::Error::last_os_error()
        ))
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn request_xtiledata() -> Result<(), String> {
    Err("AMX tile state is only requested on Linux x86_64".into())
}

/// The 64-byte tile configuration described in the module docs.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

fn tile_config() -> TileConfig {
    let mut c = [0u8; 64];
    c[0] = 1; // palette 1
    for t in 0..8 {
        // colsb[t] (u16 at 16 + 2t) = 64 bytes, rows[t] (u8 at 48 + t) = 16
        c[16 + 2 * t] = 64;
        c[48 + t] = 16;
    }
    TileConfig(c)
}

/// This thread's tiles, configured while the guard lives.
pub(crate) struct TileGuard(());

impl TileGuard {
    /// # Safety
    /// [`permission`] must have returned `Ok` (the CPU has AMX, the process may use it).
    #[cfg(target_arch = "x86_64")]
    pub(crate) unsafe fn new() -> TileGuard {
        let cfg = tile_config();
        std::arch::asm!("ldtilecfg [{}]", in(reg) &cfg as *const TileConfig, options(nostack));
        TileGuard(())
    }
}

#[cfg(target_arch = "x86_64")]
impl Drop for TileGuard {
    fn drop(&mut self) {
        // SAFETY: a guard exists only after ldtilecfg succeeded on this thread (the
        // guard is not Send: it holds no data, but is created and dropped in one scope).
        unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// One 32 x 32 block: `c = alpha * A·B` (or `c += ...` with `beta_one`), `kcp` steps
/// (a multiple of 32). `a`: `kcp * 32` values in the rows layout; `b`: `kcp * 32` in
/// the 32-column pairs layout. `c` points at the block's top-left, row stride `ldc`.
///
/// # Safety
/// This thread holds a [`TileGuard`]; `c` is valid for a 32 x 32 block at stride `ldc`;
/// the CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn tile_amx(
    kcp: usize,
    a: *const u16,
    b: *const u16,
    c: *mut f32,
    ldc: usize,
    alpha: f32,
    beta_one: bool,
) {
    use std::arch::asm;
    // Every element is written by the tile stores below before the epilogue reads it.
    let mut acc = std::mem::MaybeUninit::<[f32; MR * 32]>::uninit();
    let accp = acc.as_mut_ptr() as *mut f32;
    // Ask for this block's C lines (for writing) now: the tile products below take far
    // longer than the misses, so the epilogue finds C in cache.
    for r in 0..MR {
        let row = c.add(r * ldc) as *const i8;
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_ET0 }>(row);
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_ET0 }>(row.add(64));
    }
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        options(nostack, nomem)
    );
    for ch in 0..kcp / KCHUNK {
        let ap = a.add(ch * KCHUNK * MR);
        let bp = b.add(ch * KCHUNK * 32);
        asm!(
            "tileloadd tmm4, [{a0} + {s64}*1]",
            "tileloadd tmm5, [{a1} + {s64}*1]",
            "tileloadd tmm6, [{b0} + {s128}*1]",
            "tileloadd tmm7, [{b1} + {s128}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) ap,
            a1 = in(reg) ap.add(16 * 32),
            b0 = in(reg) bp,
            b1 = in(reg) bp.add(32),
            s64 = in(reg) 64usize,
            s128 = in(reg) 128usize,
            options(nostack, readonly)
        );
    }
    asm!(
        "tilestored [{c0} + {s}*1], tmm0",
        "tilestored [{c1} + {s}*1], tmm1",
        "tilestored [{c2} + {s}*1], tmm2",
        "tilestored [{c3} + {s}*1], tmm3",
        c0 = in(reg) accp,
        c1 = in(reg) accp.add(16),
        c2 = in(reg) accp.add(16 * 32),
        c3 = in(reg) accp.add(16 * 32 + 16),
        s = in(reg) 128usize,
        options(nostack)
    );
    epilogue_avx512(acc.assume_init_ref(), c, ldc, alpha, beta_one);
}

/// `C = alpha * acc (+ C)` for a 32 x 32 block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn epilogue_avx512(
    acc: &[f32; MR * 32],
    c: *mut f32,
    ldc: usize,
    alpha: f32,
    beta_one: bool,
) {
    use std::arch::x86_64::*;
    let al = _mm512_set1_ps(alpha);
    for r in 0..MR {
        for h in 0..2 {
            let v = _mm512_loadu_ps(acc.as_ptr().add(r * 32 + 16 * h));
            let d = c.add(r * ldc + 16 * h);
            let y = if beta_one {
                _mm512_fmadd_ps(al, v, _mm512_loadu_ps(d))
            } else {
                _mm512_mul_ps(al, v)
            };
            _mm512_storeu_ps(d, y);
        }
    }
}

/// A software model of [`tile_amx`] reading the same panels with the tile
/// instructions' semantics (bf16 products exact, f32 accumulation per `tdpbf16ps`
/// element as the SDM's pseudo-code: pair by pair, denormal bf16 inputs read as zero).
/// Used by tests on CPUs without AMX, so that packing, driver and epilogue of the AMX
/// path are checked everywhere; the real tile instructions only where AMX exists.
///
/// # Safety
/// As [`tile_amx`], without the tile and AVX-512 requirements.
pub(crate) unsafe fn tile_amx_model(
    kcp: usize,
    a: *const u16,
    b: *const u16,
    c: *mut f32,
    ldc: usize,
    alpha: f32,
    beta_one: bool,
) {
    let daz = |bits: u16| {
        let f = f32::from_bits((bits as u32) << 16);
        if f.is_subnormal() {
            0.0
        } else {
            f
        }
    };
    let mut acc = [0f32; MR * 32];
    for ch in 0..kcp / KCHUNK {
        // A tile t (rows 16t..), B tile u (cols 16u..), as tileloadd reads them.
        let ap = a.add(ch * KCHUNK * MR);
        let bp = b.add(ch * KCHUNK * 32);
        for r in 0..MR {
            for n in 0..32 {
                let mut s = acc[r * 32 + n];
                for j in 0..KCHUNK / 2 {
                    for h in 0..2 {
                        let av = daz(*ap.add(r * 32 + 2 * j + h));
                        let bv = daz(*bp.add((j * 32 + n) * 2 + h));
                        s += av * bv;
                    }
                }
                acc[r * 32 + n] = s;
            }
        }
    }
    for r in 0..MR {
        for n in 0..32 {
            let d = c.add(r * ldc + n);
            let v = alpha * acc[r * 32 + n];
            *d = if beta_one { *d + v } else { v };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The configuration bytes: palette 1, 8 tiles of 16 rows x 64 bytes.
    #[test]
    fn tile_config_layout() {
        let c = tile_config().0;
        assert_eq!(c[0], 1);
        assert_eq!(c[1], 0);
        for t in 0..8 {
            assert_eq!(u16::from_le_bytes([c[16 + 2 * t], c[17 + 2 * t]]), 64);
            assert_eq!(c[48 + t], 16);
        }
        assert!(c[2..16].iter().all(|&x| x == 0) && c[56..].iter().all(|&x| x == 0));
    }

    /// Where the CPU has AMX, the tile kernel agrees with the software model bit for bit
    /// on a block of small integers (all sums exact in f32, so no ordering freedom), from
    /// several rayon threads at once (each configures its own tiles).
    #[test]
    fn tile_kernel_matches_model_where_amx_exists() {
        match permission() {
            Err(why) => eprintln!("AMX not usable here ({why}): the tile kernel is not run"),
            Ok(()) => {
                use rayon::prelude::*;
                let kcp = 96;
                let a: Vec<u16> = (0..kcp * MR)
                    .map(|i| half::bf16::from_f32((i % 7) as f32 - 3.0).to_bits())
                    .collect();
                let b: Vec<u16> = (0..kcp * 32)
                    .map(|i| half::bf16::from_f32((i % 5) as f32 - 2.0).to_bits())
                    .collect();
                let mut want = vec![1f32; MR * 32];
                // SAFETY: buffers sized for one block.
                unsafe {
                    tile_amx_model(
                        kcp,
                        a.as_ptr(),
                        b.as_ptr(),
                        want.as_mut_ptr(),
                        32,
                        0.5,
                        true,
                    )
                };
                (0..8).into_par_iter().for_each(|_| {
                    let mut got = vec![1f32; MR * 32];
                    // SAFETY: permission granted; guard held; buffers sized for one block.
                    unsafe {
                        let _g = TileGuard::new();
                        tile_amx(kcp, a.as_ptr(), b.as_ptr(), got.as_mut_ptr(), 32, 0.5, true);
                    }
                    assert_eq!(got, want);
                });
            }
        }
    }
}
