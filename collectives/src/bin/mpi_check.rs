//! `fp8lm-mpi-check`: MPI checks run under `mpirun` by the integration tests
//! (tests/mpi.rs); needs the `mpi` feature.
//!
//! - `selftest`: every collective over MPI against the serial reference of the ring order,
//!   and the FP8-LM gradient all-reduce against the in-process backend, bit for bit.
//!   Prints `rank R: selftest ok`.
//! - `fail RANK error|panic`: rank RANK fails (an error, or a panic) while the others wait
//!   in an all-reduce; the job must abort with a message naming the rank and the cause.

use fp8lm_collectives::buf::{combine_bf16, combine_f32, combine_fp8};
use fp8lm_collectives::comm::reference_all_reduce;
use fp8lm_collectives::{
    or_abort, run_ranks, BufMut, CommError, Communicator, GradAllReduceConfig, GradAllReducer,
    GradMethod, MpiComm, ReduceOp,
};
use fp8lm_fp8::{Fp8Format, ScaledFp8};
use half::bf16;

fn values(rank: usize, len: usize) -> Vec<f32> {
    fp8lm_collectives::bench::bench_gradient(rank + 17, len)
        .iter()
        .enumerate()
        .map(|(i, x)| x * (1 << (i % 9)) as f32)
        .collect()
}

fn check(cond: bool, what: &str) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(format!("selftest: {what} differs from the reference"))
    }
}

fn selftest(c: &dyn Communicator) -> Result<(), String> {
    let (n, r) = (c.size(), c.rank());
    let e = |e: CommError| e.to_string();
    for len in [0usize, 1, 5, 1000, 100_003] {
        let ins: Vec<Vec<f32>> = (0..n).map(|k| values(k, len)).collect();
        for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Min] {
            let mut b = ins[r].clone();
            c.all_reduce(BufMut::F32(&mut b), op).map_err(e)?;
            let want = reference_all_reduce(&ins, |a, x| combine_f32(op, a, x));
            check(
                b.iter()
                    .map(|x| x.to_bits())
                    .eq(want.iter().map(|x| x.to_bits())),
                "f32",
            )?;
        }
        for fmt in [Fp8Format::E4M3, Fp8Format::E5M2] {
            let ins8: Vec<Vec<u8>> = ins
                .iter()
                .map(|v| v.iter().map(|&x| fmt.encode(x * 1e4, true)).collect())
                .collect();
            let mut b = ins8[r].clone();
            c.all_reduce(BufMut::Fp8(&mut b, fmt), ReduceOp::Sum)
                .map_err(e)?;
            let want = reference_all_reduce(&ins8, |a, x| combine_fp8(fmt, ReduceOp::Sum, a, x));
            check(b == want, fmt.name())?;
        }
        let insb: Vec<Vec<bf16>> = ins
            .iter()
            .map(|v| v.iter().map(|&x| bf16::from_f32(x)).collect())
            .collect();
        let mut b = insb[r].clone();
        c.all_reduce(BufMut::Bf16(&mut b), ReduceOp::Sum)
            .map_err(e)?;
        check(
            b == reference_all_reduce(&insb, |a, x| combine_bf16(ReduceOp::Sum, a, x)),
            "bf16",
        )?;
    }
    let mut b = if r == n - 1 {
        vec![1u8, 2, 3]
    } else {
        vec![0; 3]
    };
    c.broadcast(BufMut::Fp8(&mut b, Fp8Format::E4M3), n - 1)
        .map_err(e)?;
    check(b == [1, 2, 3], "broadcast")?;
    c.barrier().map_err(e)?;
    // Config-hash disagreement is an error on every rank, not an abort.
    let err = c.agree_u64("config hash", if r == 1 { 7 } else { 5 });
    check(
        err.is_err_and(|e| e.to_string().contains("rank 1 has 0x0000000000000007")),
        "config hash disagreement",
    )?;
    // FP8-LM over MPI == FP8-LM in-process, for three steps (mu evolves identically).
    let cfg = GradAllReduceConfig {
        method: GradMethod::Fp8Lm,
        bucket_bytes: 3000,
        ..Default::default()
    };
    let grads = |k: usize, step: usize| -> Vec<Vec<f32>> {
        [700usize, 5000, 2]
            .iter()
            .map(|&l| values(k * 10 + step, l).iter().map(|x| x * 3.0).collect())
            .collect()
    };
    let local = run_ranks(n, |lc| {
        let mut red = GradAllReducer::new(cfg.clone());
        let mut outs = Vec::new();
        for step in 0..3 {
            let g = grads(lc.rank(), step);
            let views: Vec<&[f32]> = g.iter().map(|v| &v[..]).collect();
            outs.push(red.all_reduce_fp8(lc, &views)?.0);
        }
        Ok::<_, CommError>(outs)
    })
    .map_err(e)?;
    let mut red = GradAllReducer::new(cfg);
    for (step, want) in local[r].iter().enumerate() {
        let g = grads(r, step);
        let views: Vec<&[f32]> = g.iter().map(|v| &v[..]).collect();
        let got = red.all_reduce_fp8(c, &views).map_err(e)?.0;
        check(got == *want, "FP8-LM gradient all-reduce vs in-process")?;
    }
    // FP8-LM on already-scaled FP8 gradients (re-quantisation fused into the ring, the
    // first chunk re-quantised by the receiver): bytes, scales and every count.
    let scaled_cfg = GradAllReduceConfig {
        method: GradMethod::Fp8Lm,
        bucket_bytes: 3000,
        initial_mu: 0.25,
        ..Default::default()
    };
    let scaled = |k: usize| -> Vec<ScaledFp8> {
        grads(k, 7)
            .iter()
            .map(|g| {
                let g: Vec<f32> = g.iter().map(|x| x * (k + 1) as f32).collect();
                ScaledFp8::quantize_current(&g, &[g.len()], Fp8Format::E5M2, 0).0
            })
            .collect()
    };
    let local = run_ranks(n, |lc| {
        let mut red = GradAllReducer::new(scaled_cfg.clone());
        let mut t = scaled(lc.rank());
        let rep = red.all_reduce_scaled_fp8(lc, &mut t)?;
        Ok::<_, CommError>((t, rep))
    })
    .map_err(e)?;
    let mut red = GradAllReducer::new(scaled_cfg);
    let mut t = scaled(r);
    let rep = red.all_reduce_scaled_fp8(c, &mut t).map_err(e)?;
    let (want_t, want_rep) = &local[r];
    let same_t = t
        .iter()
        .zip(want_t)
        .all(|(a, b)| a.data == b.data && a.scale == b.scale);
    check(
        same_t,
        "FP8-LM scaled-FP8 all-reduce vs in-process (bytes, scales)",
    )?;
    check(
        rep.flushed == want_rep.flushed && rep.saturated == want_rep.saturated,
        "FP8-LM scaled-FP8 all-reduce vs in-process (counts)",
    )?;
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let comm = MpiComm::init().unwrap_or_else(|e| {
        eprintln!("fp8lm-mpi-check: {e}");
        std::process::exit(2)
    });
    let c: &dyn Communicator = &comm;
    match args.first().map(String::as_str) {
        Some("selftest") => {
            or_abort(c, selftest(c));
            println!("rank {}: selftest ok ({} ranks)", c.rank(), c.size());
        }
        Some("fail") if args.len() == 3 => {
            let bad: usize = args[1].parse().expect("fail: RANK must be an integer");
            let mut b = vec![1f32; 1 << 16];
            or_abort(c, c.all_reduce(BufMut::F32(&mut b), ReduceOp::Sum));
            if c.rank() == bad {
                std::thread::sleep(std::time::Duration::from_millis(200));
                if args[2] == "panic" {
                    panic!("injected panic on rank {bad}");
                }
                let r: Result<(), String> =
                    Err("cannot open data file /nonexistent/shard.bin (injected)".into());
                or_abort(c, r);
            }
            // The healthy ranks block here until the abort tears the job down.
            or_abort(c, c.all_reduce(BufMut::F32(&mut b), ReduceOp::Sum));
            println!("rank {}: not aborted", c.rank());
        }
        _ => {
            eprintln!("usage: fp8lm-mpi-check selftest | fail RANK error|panic");
            std::process::exit(2)
        }
    }
}
