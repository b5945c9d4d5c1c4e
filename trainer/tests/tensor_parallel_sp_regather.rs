//! Sequence parallelism's input shards (`model/linear_sp.rs`): a column-parallel linear
//! that keeps only its rank's rows of the input (E4M3, f32 or bf16) and all-gathers them
//! again for the backward computes, on every rank of T = 2 and 4, exactly (bit for bit)
//! what the same layer computes on the whole input on one rank: the forward output, the
//! input gradient and the weight gradient. The re-gathered input is the forward's: the
//! same f32 values (fp32), the same bf16 roundings, the same E4M3 bytes with the same
//! scale (the group amax is the whole tensor's). Also: each rank keeps 1/T of the input's
//! bytes in its own format, and the re-gather moves (T - 1) / T of `n x c` elements of it.

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
                lin.forward_sp(&mut out, shard, &mut full, &w, None, N, true, c)?;
                let (mut dinp, mut dw) = (vec![0f32; N * C], vec![0f32; OC * C]);
                let counting = CountingComm::new(c);
                // `inp` is not read by a layer keeping a shard: hand it garbage.
                let junk = vec![f32::NAN; N * C];
                lin.with_input_gathered(N, Some(&counting), &junk, |li, inp| {
                    li.backward(&mut dinp, &mut dw, None, &dy, inp, &w, N)
                })?;
                let b = counting.bytes();
                anyhow::Ok(([out, dinp, dw], kept, b.all_gather + b.all_gather_fp8))
            })
            .unwrap();
            for (r, (g, kept, moved)) in got.iter().enumerate() {
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
            }
        }
    }
}
