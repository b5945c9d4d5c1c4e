//! The 2-D process grid, its sub-communicators, and the tensor-parallel region operators
//! (f32 and FP8), on in-process ranks.

mod common;
use common::values;
use fp8lm_collectives::buf::combine_f32;
use fp8lm_collectives::comm::reference_all_reduce;
use fp8lm_collectives::grid::{Grid, GroupComm};
use fp8lm_collectives::mappings::{
    copy_to_tp, gather_from_sp, gather_from_sp_fp8, reduce_from_tp, reduce_scatter_to_sp,
};
use fp8lm_collectives::{run_ranks, BufMut, Communicator, ReduceOp};
use fp8lm_fp8::cast::{amax_f32, f32_to_fp8_counted};
use fp8lm_fp8::{scale_for_amax, Fp8Format, ScaleRounding};

#[test]
fn grid_places_tensor_parallel_ranks_innermost() {
    let g = Grid::new(6, 2).unwrap();
    assert_eq!((g.data_parallel, g.tensor_parallel), (3, 2));
    assert_eq!(g.coords(5), (2, 1));
    assert_eq!(g.tp_members(4), vec![4, 5]);
    assert_eq!(g.dp_members(3), vec![1, 3, 5]);
    let g = Grid::new(4, 4).unwrap();
    assert_eq!(g.tp_members(2), vec![0, 1, 2, 3]);
    assert_eq!(g.dp_members(2), vec![2]);
    let e = Grid::new(6, 4).unwrap_err();
    assert!(
        e.contains("does not divide") && e.contains("6 ranks"),
        "{e}"
    );
    assert!(Grid::new(4, 0).is_err());
}

/// Every grid's TP groups and DP groups each cover every rank exactly once, a TP group
/// and a DP group meet in exactly one rank, and coordinates match group positions.
#[test]
fn grid_groups_cover_every_rank_once() {
    for (world, tp) in [(1, 1), (8, 1), (8, 2), (8, 4), (8, 8), (12, 3)] {
        let g = Grid::new(world, tp).unwrap();
        let (mut seen_tp, mut seen_dp) = (vec![0; world], vec![0; world]);
        for d in 0..g.data_parallel {
            let grp = g.tp_members(g.rank_at(d, 0));
            assert_eq!(grp.len(), tp);
            for (pos, &r) in grp.iter().enumerate() {
                seen_tp[r] += 1;
                assert_eq!(g.coords(r), (d, pos));
            }
        }
        for t in 0..tp {
            let grp = g.dp_members(g.rank_at(0, t));
            assert_eq!(grp.len(), world / tp);
            for (pos, &r) in grp.iter().enumerate() {
                seen_dp[r] += 1;
                assert_eq!(g.coords(r), (pos, t));
            }
            for d in 0..g.data_parallel {
                let row = g.tp_members(g.rank_at(d, 0));
                assert_eq!(grp.iter().filter(|r| row.contains(r)).count(), 1);
            }
        }
        assert!(
            seen_tp.iter().chain(&seen_dp).all(|&c| c == 1),
            "{world}x{tp}"
        );
    }
}

/// Each row and each column of a 2 x 3 grid all-reduces independently, bit for bit as a
/// world of that size would (same ring over the members), and broadcasts reach exactly
/// the group.
#[test]
fn sub_communicators_reduce_and_broadcast_within_their_group() {
    let (d, t) = (2, 3);
    let grid = Grid::new(d * t, t).unwrap();
    let len = 101;
    let inputs: Vec<Vec<f32>> = (0..d * t).map(|r| values(r as u64 + 7, len)).collect();
    let out = run_ranks(d * t, |world| {
        let (tp, dp) = grid.groups(world)?;
        let mut a = inputs[world.rank()].clone();
        tp.all_reduce(BufMut::F32(&mut a), ReduceOp::Sum)?;
        let mut b = inputs[world.rank()].clone();
        dp.all_reduce(BufMut::F32(&mut b), ReduceOp::Sum)?;
        let mut c = [world.rank() as u8; 5];
        tp.broadcast_bytes(&mut c, 2)?;
        dp.barrier()?;
        Ok::<_, fp8lm_collectives::CommError>((a, b, c, tp.rank(), dp.rank()))
    })
    .unwrap();
    for (w, (a, b, c, tr, dr)) in out.iter().enumerate() {
        let (dpr, tpr) = grid.coords(w);
        assert_eq!((*tr, *dr), (tpr, dpr));
        let row: Vec<Vec<f32>> = grid
            .tp_members(w)
            .iter()
            .map(|&m| inputs[m].clone())
            .collect();
        let col: Vec<Vec<f32>> = grid
            .dp_members(w)
            .iter()
            .map(|&m| inputs[m].clone())
            .collect();
        let want_a = reference_all_reduce(&row, |x, y| combine_f32(ReduceOp::Sum, x, y));
        let want_b = reference_all_reduce(&col, |x, y| combine_f32(ReduceOp::Sum, x, y));
        assert_eq!(
            a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want_a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "rank {w} tp"
        );
        assert_eq!(
            b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want_b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "rank {w} dp"
        );
        // Root 2 of the row is world rank dp*3 + 2.
        assert_eq!(*c, [grid.rank_at(dpr, 2) as u8; 5], "rank {w} broadcast");
    }
}

#[test]
fn group_rejects_bad_members_naming_them() {
    let errs = run_ranks(2, |w| {
        let e1 = GroupComm::new(w, "tensor-parallel", vec![0, 5])
            .err()
            .unwrap();
        let e2 = GroupComm::new(w, "tensor-parallel", vec![1 - w.rank()])
            .err()
            .unwrap();
        Ok::<_, String>((e1.to_string(), e2.to_string()))
    })
    .unwrap();
    assert!(
        errs[0].0.contains("member rank 5 out of range"),
        "{}",
        errs[0].0
    );
    assert!(errs[0].1.contains("not among the members"), "{}", errs[0].1);
}

/// ḡ then g equals an all-reduce (reduce-scatter + all-gather), and g gathers the shards
/// in rank order; f and f̄ are the group's all-reduce.
#[test]
fn sequence_parallel_gather_and_reduce_scatter_are_inverse_layouts() {
    let t = 4;
    let (rows, cols) = (8, 5);
    let full: Vec<Vec<f32>> = (0..t)
        .map(|r| values(r as u64 + 100, rows * cols))
        .collect();
    let out = run_ranks(t, |c| {
        let shard_len = rows * cols / t;
        let mut scratch = full[c.rank()].clone();
        let mut shard = vec![0f32; shard_len];
        reduce_scatter_to_sp(c, &mut scratch, &mut shard)?;
        let mut gathered = vec![0f32; rows * cols];
        gather_from_sp(c, &shard, &mut gathered)?;
        let mut ar = full[c.rank()].clone();
        reduce_from_tp(c, &mut ar)?;
        let mut ar2 = full[c.rank()].clone();
        copy_to_tp(c, &mut ar2)?;
        Ok::<_, fp8lm_collectives::CommError>((shard, gathered, ar, ar2))
    })
    .unwrap();
    let want = reference_all_reduce(&full, |x, y| combine_f32(ReduceOp::Sum, x, y));
    for (r, (shard, gathered, ar, ar2)) in out.iter().enumerate() {
        let n = rows * cols / t;
        assert_eq!(shard[..], want[r * n..(r + 1) * n], "rank {r} shard");
        assert_eq!(gathered, &want, "rank {r} gathered");
        assert_eq!(ar, &want);
        assert_eq!(ar2, &want);
    }
    // A token count that does not divide is refused, naming the sizes.
    let e = run_ranks(3, |c| {
        let mut full = vec![0f32; 10];
        gather_from_sp(c, &[0.0; 3], &mut full)
    })
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("3 elements x 3 ranks != full tensor of 10"),
        "{e}"
    );
}

/// The FP8 gather of FP8-LM's sequence parallelism: with the amax agreed over the group,
/// `gather(cast(shard_t))` is byte for byte `cast(gather(x))` with the scale of the whole
/// tensor, for both formats; the shared scale is the same on every rank; and the gather
/// moves a quarter of the f32 gather's bytes.
#[test]
fn fp8_gather_equals_cast_of_gathered_tensor_byte_for_byte() {
    let t = 4;
    let n = 4 * 96;
    // Rank 2's shard carries the largest values, so a per-rank scale would differ.
    let mut x = values(9, n);
    for v in &mut x[2 * n / 4..3 * n / 4] {
        *v *= 50.0;
    }
    for fmt in [Fp8Format::E4M3, Fp8Format::E5M2] {
        for rounding in [ScaleRounding::PowerOfTwo, ScaleRounding::Exact] {
            let scale = scale_for_amax(fmt.max(), amax_f32(&x), 0, rounding).unwrap();
            let mut want = vec![0u8; n];
            f32_to_fp8_counted(fmt, &x, scale, &mut want);
            let out = run_ranks(t, |c| {
                let shard = &x[c.rank() * n / t..(c.rank() + 1) * n / t];
                let mut bytes = vec![0u8; n];
                let before = c.bytes_sent();
                let g = gather_from_sp_fp8(c, fmt, shard, 0, rounding, 1.0, &mut bytes)?;
                let fp8_bytes = c.bytes_sent() - before;
                let mut f = vec![0f32; n];
                let before = c.bytes_sent();
                gather_from_sp(c, shard, &mut f)?;
                Ok::<_, fp8lm_collectives::CommError>((
                    bytes,
                    g,
                    fp8_bytes,
                    c.bytes_sent() - before,
                ))
            })
            .unwrap();
            for (r, (bytes, g, fp8_bytes, f32_bytes)) in out.iter().enumerate() {
                assert_eq!(bytes, &want, "{fmt:?} {rounding:?} rank {r}");
                assert_eq!(g.scale, scale, "rank {r}");
                // The gather itself is 1/4; the amax agreement adds one f32 all-reduce
                // (2 (T-1)/T * 4 bytes; with 4 ranks the ring sends 1-element chunks,
                // the empty ones as zero bytes: at most 2 (T-1) * 4 bytes).
                let amax_bytes = 2 * (t as u64 - 1) * 4;
                assert!(
                    *fp8_bytes <= f32_bytes / 4 + amax_bytes,
                    "{fp8_bytes} vs {f32_bytes}"
                );
                assert!(*fp8_bytes >= f32_bytes / 4, "{fp8_bytes} vs {f32_bytes}");
            }
        }
    }
}

/// A NaN on one rank must not split the group's scales: NaN is reduced as +inf, every
/// rank falls back to the previous scale, and the NaN stays NaN in the gathered bytes.
#[test]
fn fp8_gather_with_nan_on_one_rank_keeps_one_scale_everywhere() {
    let t = 2;
    let n = 64;
    let mut x = values(3, n);
    x[40] = f32::NAN; // in rank 1's shard
    let out = run_ranks(t, |c| {
        let shard = &x[c.rank() * n / t..(c.rank() + 1) * n / t];
        let mut bytes = vec![0u8; n];
        gather_from_sp_fp8(
            c,
            Fp8Format::E4M3,
            shard,
            0,
            ScaleRounding::PowerOfTwo,
            16.0,
            &mut bytes,
        )
        .map(|g| (g, bytes))
    })
    .unwrap();
    for (r, (g, bytes)) in out.iter().enumerate() {
        assert_eq!(g.scale, 16.0, "rank {r} must use the fallback scale");
        assert_eq!(g.amax, f32::INFINITY);
        assert_eq!(bytes[40] & 0x7f, 0x7f, "NaN code expected");
        assert_eq!(bytes, &out[0].1);
    }
}
