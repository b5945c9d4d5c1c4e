//! Helpers shared by the collectives' integration tests.

/// Small deterministic generator (xorshift) so tests need no rng crate: values spread
/// over several binades (2^-6 .. 2^5), both signs.
pub fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            let e = ((s >> 8) % 12) as i32 - 6;
            (u - 0.5) * 2f32.powi(e)
        })
        .collect()
}
