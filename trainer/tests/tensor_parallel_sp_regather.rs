//! Sequence parallelism's input shards (`model/linear_sp.rs`): a column-parallel linear
//! that keeps only its rank's rows of the input (E4M3, f32 or bf16) and all-gathers them
//! again for the backward computes, on every rank of T = 2 and 4, exactly (bit for bit)
//! what the same layer computes on the whole input on one rank: the forward output, the
//! input gradient and the weight gradient. The re-gathered input is the forward's: the
//! same f32 values (fp32), the same bf16 roundings, the same E4M3 bytes with the same
//! scale (the group amax is the whole tensor's). Also: each rank keeps 1/T of the input's
//! bytes in its own format, and the forward's gather (g) and the re-gather each move
//! (T - 1) / T of `n x c` elements in it (bf16: 2 bytes, half of fp32's).
//!
//! bf16's forward gather moves the shard rounded to bf16: the GEMM rounds its input to
//! bf16 element by element anyway (`cast_bf16`: `half`'s bits on the SIMD body and on the
//! scalar tail alike), so gather(bf16(shard)) == bf16(gather(x)) byte for byte; tested on
//! its own on rounding edge cases (ties, carries, subnormals, NaN payloads, overflow)
//! with shards whose length is not a multiple of the SIMD width, and through the layer.

use fp8lm_collectives::{run_ranks, Communicator, CountingComm};
use fp8lm_fp8::ScalingRecipe;
use fp8lm_trainer::model::{Linear, LinearPrecision};

const N: usize = 32;
const C: usize = 48;
const OC: usize = 40;

fn values(seed: u32, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let x = (i as u32)
                .wrapping_mul(2654435761)
                .wrapping_add(seed.wrapping_mul(40503));
            ((x >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 2.0
        })
        .collect()
}

/// (forward output, dinp, dW) of one layer on the whole input.
fn whole(p: LinearPrecision, x: &[f32], w: &[f32], dy: &[f32]) -> [Vec<f32>; 3] {
    let mut lin = Linear::new("fc".into(), C, OC, N, p);
    let mut out = vec![0f32; N * OC];
    lin.forward(&mut out, x, w, None, N, true);
    let (mut dinp, mut dw) = (vec![0f32; N * C], vec![0f32; OC * C]);
    lin.backward(&mut dinp, &mut dw, None, dy, x, w, N);
    [out, dinp, dw]
}

#[test]
fn column_parallel_input_shards_regather_bit_identically() {
    let (x, w, dy) = (values(1, N * C), values(2, OC * C), values(3, N * OC));
    for (p, elem) in [
        (LinearPrecision::Fp32, 4),
        (LinearPrecision::Bf16, 2),
        (
            LinearPrecision::Fp8 {
                recipe: ScalingRecipe::Current,
                margin: 0,
            },
            1,
        ),
    ] {
        let want = whole(p, &x, &w, &dy);
        for t in [2, 4] {
            let got = run_ranks(t, |c| {
                let mut lin = Linear::new("fc".into(), C, OC, N, p);
                lin.keep_input_shard(t, N);
                let kept = match p {
                    LinearPrecision::Fp32 => lin.f32_input_shard_bytes(),
                    LinearPrecision::Bf16 => lin.memory().bf16_cache,
                    LinearPrecision::Fp8 { .. } => lin.memory().fp8_activations,
                };
                let rows = N / t * C;
                let shard = &x[c.rank() * rows..(c.rank() + 1) * rows];
                let mut out = vec![0f32; N * OC];
                let mut full = vec![0f32; N * C];
                let fwd = CountingComm::new(c);
                lin.forward_sp(&mut out, shard, &mut full, &w, None, N, true, &fwd)?;
                let fb = fwd.bytes();
                let (mut dinp, mut dw) = (vec![0f32; N * C], vec![0f32; OC * C]);
                let counting = CountingComm::new(c);
                // `inp` is not read by a layer keeping a shard: hand it garbage.
                let junk = vec![f32::NAN; N * C];
                lin.with_input_gathered(N, Some(&counting), &junk, |li, inp| {
                    li.backward(&mut dinp, &mut dw, None, &dy, inp, &w, N)
                })?;
                let b = counting.bytes();
                let moved = (
                    fb.all_gather + fb.all_gather_fp8,
                    b.all_gather + b.all_gather_fp8,
                );
                anyhow::Ok(([out, dinp, dw], kept, moved))
            })
            .unwrap();
            for (r, (g, kept, (g_fwd, moved))) in got.iter().enumerate() {
                let what = format!("{p:?} T = {t} rank {r}");
                for (k, name) in ["forward output", "dinp", "dW"].iter().enumerate() {
                    let same = g[k]
                        .iter()
                        .zip(&want[k])
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{what}: {name} differs from the whole-input layer");
                }
                assert_eq!(*kept, elem * N * C / t, "{what}: bytes of the input kept");
                assert_eq!(
                    *moved as usize,
                    elem * N * C * (t - 1) / t,
                    "{what}: bytes the re-gather sent"
                );
                assert_eq!(
                    *g_fwd as usize,
                    elem * N * C * (t - 1) / t,
                    "{what}: bytes the forward's gather (g) sent"
                );
            }
        }
    }
}

/// gather(bf16(shard)) == bf16(gather(x)), byte for byte (module docs): shards of 24 and
/// 12 elements (SIMD body + scalar tail, or tail only) against the whole 48 (SIMD only).
#[test]
fn bf16_of_the_shards_gathered_is_bf16_of_the_gathered_input() {
    use fp8lm_collectives::BufMut;
    use half::bf16;
    let edge: [u32; 16] = [
        0x3F80_8000, // tie, rounds to even (down)
        0x3F81_8000, // tie, rounds to even (up)
        0x3F80_8001,
        0x3FFF_FFFF, // carry into the exponent
        0x7F7F_FFFF, // past bf16's range: infinity
        0xFF7F_FFFF,
        0x0040_0000, // f32 subnormal (hardware conversion would flush it)
        0x8000_0001,
        0x7F80_0001, // signalling NaN with a payload: quiet, payload kept
        0xFFC1_2345,
        0x7F80_0000,
        0x8000_0000,
        0x0000_0000,
        0x3EAA_AAAB,
        0xC2F6_E979,
        0x0080_0000, // smallest normal
    ];
    let x: Vec<f32> = (0..48)
        .map(|i| f32::from_bits(edge[(i * 7) % 16] ^ ((i as u32 / 16) << 1)))
        .collect();
    let be = fp8lm_kernels::default_backend();
    let mut want = vec![bf16::ZERO; x.len()];
    be.cast_bf16(&x, &mut want);
    for t in [2, 4] {
        let got = run_ranks(t, |c| {
            let k = x.len() / t;
            let mut g = vec![bf16::ZERO; x.len()];
            be.cast_bf16(&x[c.rank() * k..][..k], &mut g[c.rank() * k..][..k]);
            c.all_gather(BufMut::Bf16(&mut g))?;
            anyhow::Ok(g)
        })
        .unwrap();
        for (r, g) in got.iter().enumerate() {
            let same = g.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "T = {t} rank {r}: {g:?} vs {want:?}");
        }
    }
}
