//! In-process backend: every collective against the serial reference of the documented
//! ring order (bit for bit), and failure propagation without hangs.

mod common;
use common::values;
use fp8lm_collectives::buf::{combine_bf16, combine_f32, combine_fp8};
use fp8lm_collectives::comm::reference_all_reduce;
use fp8lm_collectives::{chunk_range, run_ranks, BufMut, Communicator, ReduceOp};
use fp8lm_fp8::Fp8Format;
use half::bf16;
use std::time::{Duration, Instant};

#[test]
fn f32_all_reduce_matches_reference_order_bit_for_bit() {
    for n in 1..=5 {
        for len in [0, 1, 3, 7, 64, 1001] {
            let inputs: Vec<Vec<f32>> = (0..n)
                .map(|r| values(r as u64 * 31 + len as u64, len))
                .collect();
            for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Min] {
                let want = reference_all_reduce(&inputs, |a, x| combine_f32(op, a, x));
                let got = run_ranks(n, |c| {
                    let mut b = inputs[c.rank()].clone();
                    c.all_reduce(BufMut::F32(&mut b), op).map(|_| b)
                })
                .unwrap();
                for g in &got {
                    let gb: Vec<u32> = g.iter().map(|x| x.to_bits()).collect();
                    let wb: Vec<u32> = want.iter().map(|x| x.to_bits()).collect();
                    assert_eq!(gb, wb, "n={n} len={len} op={op:?}");
                }
                if op == ReduceOp::Sum && len > 0 {
                    // And the order really is a sum: within f32 round-off of an f64 sum.
                    for (i, w) in want.iter().enumerate() {
                        let exact: f64 = inputs.iter().map(|v| v[i] as f64).sum();
                        let mag: f64 = inputs.iter().map(|v| (v[i] as f64).abs()).sum();
                        assert!((*w as f64 - exact).abs() <= mag * 1e-6, "{w} vs {exact}");
                    }
                }
                if op == ReduceOp::Max && len > 0 {
                    let m = (0..n).map(|r| inputs[r][0]).fold(f32::MIN, f32::max);
                    assert_eq!(want[0], m);
                }
            }
        }
    }
}

#[test]
fn fp8_and_bf16_sums_rerounded_per_hop_match_reference() {
    for fmt in [Fp8Format::E4M3, Fp8Format::E5M2] {
        for n in [2, 3, 4, 8] {
            let len = 4099;
            let inputs: Vec<Vec<u8>> = (0..n)
                .map(|r| {
                    values(r as u64 + 7, len)
                        .iter()
                        .map(|&x| fmt.encode(x * fmt.max() / (16.0 * n as f32), true))
                        .collect()
                })
                .collect();
            let want = reference_all_reduce(&inputs, |a, x| combine_fp8(fmt, ReduceOp::Sum, a, x));
            let got = run_ranks(n, |c| {
                let mut b = inputs[c.rank()].clone();
                c.all_reduce(BufMut::Fp8(&mut b, fmt), ReduceOp::Sum)
                    .map(|_| b)
            })
            .unwrap();
            assert!(got.iter().all(|g| *g == want), "{fmt:?} n={n}");
            // Per-hop rounding: each hop's relative error is at most half an ulp, so the
            // FP8 sum stays within (1 + 2^-(m+1))^(n-1) - 1 of the exact sum of its
            // inputs, plus one subnormal quantum per hop, unless it saturated.
            let m = fmt.mantissa_bits() as i32;
            let rel = (1.0 + 2f64.powi(-(m + 1))).powi(n as i32 - 1) - 1.0;
            let mut sat = 0;
            for i in 0..len {
                let exact: f64 = inputs.iter().map(|v| fmt.decode(v[i]) as f64).sum();
                let mag: f64 = inputs.iter().map(|v| (fmt.decode(v[i]) as f64).abs()).sum();
                let w = fmt.decode(want[i]) as f64;
                if w.abs() == fmt.max() as f64 {
                    sat += 1;
                    continue;
                }
                let tol = mag * rel + (n as f64) * fmt.min_subnormal() as f64;
                assert!(
                    (w - exact).abs() <= tol,
                    "{fmt:?} n={n} i={i}: {w} vs {exact}"
                );
            }
            assert!(sat < len / 100, "too many saturated sums: {sat}");
        }
    }
    let n = 4;
    let inputs: Vec<Vec<bf16>> = (0..n)
        .map(|r| {
            values(r as u64 + 99, 333)
                .iter()
                .map(|&x| bf16::from_f32(x))
                .collect()
        })
        .collect();
    let want = reference_all_reduce(&inputs, |a, x| combine_bf16(ReduceOp::Sum, a, x));
    let got = run_ranks(n, |c| {
        let mut b = inputs[c.rank()].clone();
        c.all_reduce(BufMut::Bf16(&mut b), ReduceOp::Sum).map(|_| b)
    })
    .unwrap();
    assert!(got.iter().all(|g| *g == want));
}

#[test]
fn reduce_scatter_all_gather_broadcast_barrier() {
    let n = 3;
    let len = 10;
    let out = run_ranks(n, |c| {
        let r = c.rank();
        let mut b: Vec<f32> = (0..len).map(|i| (i * 10 + r) as f32).collect();
        let own = c.reduce_scatter(BufMut::F32(&mut b), ReduceOp::Sum)?;
        assert_eq!(own, chunk_range(len, n, r));
        let mine: Vec<f32> = b[own.clone()].to_vec();
        for (k, i) in own.clone().enumerate() {
            assert_eq!(mine[k], (3 * i * 10 + 3) as f32);
        }
        let mut g = vec![0f32; len];
        g[own.clone()].copy_from_slice(&mine);
        c.all_gather(BufMut::F32(&mut g))?;
        let mut bc = if r == 2 {
            vec![5u8, 6, 7]
        } else {
            vec![0u8; 3]
        };
        c.broadcast(BufMut::Fp8(&mut bc, Fp8Format::E4M3), 2)?;
        c.barrier()?;
        let amax = c.all_reduce_scalar(r as f32 - 5.0, ReduceOp::Min)?;
        c.agree_u64("config hash", 0xABCD)?;
        Ok::<_, fp8lm_collectives::CommError>((g, bc, amax))
    })
    .unwrap();
    for (g, bc, amax) in out {
        let want: Vec<f32> = (0..len).map(|i| (3 * i * 10 + 3) as f32).collect();
        assert_eq!(g, want);
        assert_eq!(bc, vec![5, 6, 7]);
        assert_eq!(amax, -5.0);
    }
}

#[test]
fn config_hash_disagreement_names_the_ranks() {
    let err = run_ranks(3, |c| {
        let h = if c.rank() == 1 { 2u64 } else { 1 };
        c.agree_u64("config hash", h)
    })
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("config hash differs"), "{msg}");
    assert!(msg.contains("rank 1 has 0x0000000000000002"), "{msg}");
}

#[test]
fn a_failing_or_panicking_rank_fails_the_group_without_hanging() {
    for panic in [false, true] {
        let t = Instant::now();
        let err = run_ranks(4, |c| {
            if c.rank() == 2 {
                std::thread::sleep(Duration::from_millis(50));
                if panic {
                    panic!("injected panic");
                }
                return Err("bad data file shard-2.bin".to_string());
            }
            let mut b = vec![1f32; 100];
            c.all_reduce(BufMut::F32(&mut b), ReduceOp::Sum)
                .map_err(|e| e.to_string())?;
            c.barrier().map_err(|e| e.to_string())
        })
        .unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert_eq!(err.rank, 2, "{err}");
        let want = if panic {
            "injected panic"
        } else {
            "bad data file shard-2.bin"
        };
        assert!(err.to_string().contains(want), "{err}");
    }
}

#[test]
fn mismatched_lengths_are_an_error_not_a_hang() {
    let err = run_ranks(2, |c| {
        let mut b = vec![0f32; if c.rank() == 0 { 8 } else { 6 }];
        c.all_reduce(BufMut::F32(&mut b), ReduceOp::Sum)
    })
    .unwrap_err();
    assert!(err.to_string().contains("expected"), "{err}");
}

#[test]
fn fused_fp8lm_ring_equals_requantise_then_sum_then_count() {
    use fp8lm_collectives::comm::{fp8_all_reduce_fused, Fp8Segment};
    use fp8lm_collectives::fp8sum::{HopCounts, Requant};
    use fp8lm_collectives::lut::{apply_lut_scalar, requant_table};
    // Segments of uneven lengths (one empty) so that chunk boundaries cut through them;
    // per-rank tables with different ratios, one segment without re-quantisation.
    for fmt in [Fp8Format::E4M3, Fp8Format::E5M2] {
        // (table, largest magnitude code it flushes to zero)
        type Table = ([u8; 256], u8);
        let table = |ratio: f32| -> Table { requant_table(fmt, ratio) };
        let seg_lens = [777usize, 0, 5000, 1, 3333];
        let len: usize = seg_lens.iter().sum();
        for n in 1..=4usize {
            let inputs: Vec<Vec<u8>> = (0..n)
                .map(|r| {
                    values(r as u64 * 5 + 3, len)
                        .iter()
                        .map(|&x| fmt.encode(x * fmt.max() / 4.0, true))
                        .collect()
                })
                .collect();
            // Rank r's table for segment i (segment 2 is sent as it is); steep enough ratios
            // that some codes flush to zero even in E5M2's wide range.
            let step = if fmt == Fp8Format::E5M2 { 10 } else { 3 };
            let tables: Vec<Vec<Option<Table>>> = (0..n)
                .map(|r| {
                    (0..seg_lens.len())
                        .map(|i| {
                            (i != 2)
                                .then(|| table(2f32.powi(-(r as i32) - step * (1 + i as i32 / 3))))
                        })
                        .collect()
                })
                .collect();
            // Unfused: re-quantise everything, ring sum, count on the result.
            let requantised: Vec<Vec<u8>> = (0..n)
                .map(|r| {
                    let mut v = inputs[r].clone();
                    let mut off = 0;
                    for (i, &l) in seg_lens.iter().enumerate() {
                        if let Some((lut, _)) = &tables[r][i] {
                            apply_lut_scalar(&mut v[off..off + l], lut);
                        }
                        off += l;
                    }
                    v
                })
                .collect();
            let want =
                reference_all_reduce(&requantised, |a, x| combine_fp8(fmt, ReduceOp::Sum, a, x));
            let got = run_ranks(n, |c| {
                let r = c.rank();
                fn rq(t: &Option<([u8; 256], u8)>) -> Option<Requant<'_>> {
                    t.as_ref().map(|(lut, flush_hi)| Requant {
                        lut,
                        flush_hi: *flush_hi,
                    })
                }
                let prev = (r + n - 1) % n;
                let segs: Vec<Fp8Segment> = (0..seg_lens.len())
                    .map(|i| Fp8Segment {
                        len: seg_lens[i],
                        requant: rq(&tables[r][i]),
                        prev_requant: rq(&tables[prev][i]),
                    })
                    .collect();
                let mut b = inputs[r].clone();
                let mut counts = vec![HopCounts::default(); segs.len()];
                fp8_all_reduce_fused(c, &mut b, fmt, &segs, &mut counts).map(|_| (b, counts))
            })
            .unwrap();
            let mut off = 0;
            let mut sat_total = vec![0u64; seg_lens.len()];
            for (i, &l) in seg_lens.iter().enumerate() {
                let m = fmt.max_bits();
                let want_sat = want[off..off + l]
                    .iter()
                    .filter(|&&b| b & 0x7F == m)
                    .count();
                for r in 0..n {
                    let counts = &got[r].1;
                    sat_total[i] += counts[i].saturated;
                    let flushed = inputs[r][off..off + l]
                        .iter()
                        .zip(&requantised[r][off..off + l])
                        .filter(|(&a, &b)| a & 0x7F != 0 && b & 0x7F == 0)
                        .count() as u64;
                    // Counted by this rank, plus by the next one on the chunk sent raw.
                    let next = &got[(r + 1) % n].1;
                    let by_next = if n > 1 { next[i].flushed_incoming } else { 0 };
                    assert_eq!(
                        counts[i].flushed + by_next,
                        flushed,
                        "{fmt:?} n={n} rank {r} seg {i}"
                    );
                }
                assert_eq!(sat_total[i], want_sat as u64, "{fmt:?} n={n} seg {i}");
                off += l;
            }
            assert!(
                sat_total.iter().sum::<u64>() > 0,
                "test data must saturate somewhere"
            );
            let flushed: u64 = got
                .iter()
                .flat_map(|(_, c)| c.iter().map(|c| c.flushed + c.flushed_incoming))
                .sum();
            assert!(
                flushed > 0,
                "test data must underflow somewhere ({fmt:?} n={n})"
            );
            if n > 1 {
                let by_receivers: u64 = got
                    .iter()
                    .flat_map(|(_, c)| c.iter().map(|c| c.flushed_incoming))
                    .sum();
                assert!(
                    by_receivers > 0,
                    "first chunks must be re-quantised by receivers"
                );
            }
            for (b, _) in &got {
                assert_eq!(b, &want, "{fmt:?} n={n}");
            }
        }
    }
}
