//! The NCCL part of the GPU suite, run by `scripts/gpu-check.sh` (CI only compiles it):
//! one in-process rank per GPU present, NCCL communicator from a broadcast unique id,
//! then (1) all-reduce(min) of a device scalar is the exact minimum, (2) all-gather of
//! FP8 bytes is exact, (3) the FP8-LM all-reduce of E5M2 gradients with different
//! per-rank scales matches the exact sum within the per-hop rounding bound.
//! Exits 2 saying "nothing ran" without a GPU or NCCL; 1 on a failed check.

use cudarc::nccl::ReduceOp;
use fp8lm_collectives::nccl::{E5m2Byte, NcclComm};
use fp8lm_collectives::{run_ranks, Communicator};
use fp8lm_fp8::cast::{decode_table, f32_to_fp8_amax};
use fp8lm_fp8::Fp8Format;
use fp8lm_kernels::cuda::{device, CudaBackend};

fn main() {
    let gpus = match device::list_devices() {
        Ok(g) if !g.is_empty() => g.len(),
        Ok(_) => {
            println!("gpu_nccl_check: NOTHING RAN: the CUDA driver reports no GPU");
            std::process::exit(2);
        }
        Err(e) => {
            println!("gpu_nccl_check: NOTHING RAN: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = NcclComm::version() {
        println!("gpu_nccl_check: NOTHING RAN: {e}");
        std::process::exit(2);
    }
    let n = 4096usize;
    let res = run_ranks(
        gpus,
        |host| -> Result<(f32, Vec<u8>, Vec<u8>, f32), String> {
            let r = host.rank();
            let be = CudaBackend::new(r).map_err(|e| e.to_string())?;
            let comm = NcclComm::world(host, be.comm.clone()).map_err(|e| e.to_string())?;
            let s = &be.compute;
            let e = |x: cudarc::driver::DriverError| format!("{x:?}");
            // (1) min of a device scalar.
            let mut sc = s.clone_htod(&[10.0f32 + r as f32]).map_err(e)?;
            be.compute_to_comm().map_err(|x| x.to_string())?;
            comm.all_reduce_f32(&mut sc, ReduceOp::Min)
                .map_err(|x| x.to_string())?;
            be.comm_to_compute().map_err(|x| x.to_string())?;
            let min = s.clone_dtoh(&sc).map_err(e)?[0];
            // (2) all-gather of FP8 bytes.
            let mine: Vec<E5m2Byte> = (0..16).map(|i| E5m2Byte((r * 16 + i) as u8)).collect();
            let send = s.clone_htod(&mine).map_err(e)?;
            let mut recv = s.alloc_zeros::<E5m2Byte>(16 * host.size()).map_err(e)?;
            be.compute_to_comm().map_err(|x| x.to_string())?;
            comm.all_gather(&send, &mut recv)
                .map_err(|x| x.to_string())?;
            be.comm_to_compute().map_err(|x| x.to_string())?;
            let gathered: Vec<u8> = s
                .clone_dtoh(&recv)
                .map_err(e)?
                .into_iter()
                .map(|b| b.0)
                .collect();
            // (3) FP8-LM all-reduce: values k * sin, rank scale 2^(4 + r).
            let scale = 2f32.powi(4 + r as i32);
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * (r + 3)) as f32 * 0.01).sin())
                .collect();
            let mut codes = vec![0u8; n];
            f32_to_fp8_amax(Fp8Format::E5M2, &x, scale, &mut codes);
            let dev: Vec<E5m2Byte> = codes.iter().map(|&c| E5m2Byte(c)).collect();
            let mut g = s.clone_htod(&dev).map_err(e)?;
            let mut gs = s.clone_htod(&[scale]).map_err(e)?;
            comm.fp8lm_all_reduce(&be, &mut g, &mut gs, 1.0)
                .map_err(|x| x.to_string())?;
            let out: Vec<u8> = s
                .clone_dtoh(&g)
                .map_err(e)?
                .into_iter()
                .map(|b| b.0)
                .collect();
            let out_scale = s.clone_dtoh(&gs).map_err(e)?[0];
            Ok((min, gathered, [codes, out].concat(), out_scale))
        },
    );
    let res = match res {
        Ok(v) => v,
        Err(e) => {
            println!("FAIL  nccl: {e}");
            std::process::exit(1);
        }
    };
    let mut failed = false;
    let mut check = |name: &str, ok: bool, why: String| {
        println!(
            "{}  {name}{}",
            if ok { "PASS" } else { "FAIL" },
            if ok {
                String::new()
            } else {
                format!(": {why}")
            }
        );
        failed |= !ok;
    };
    check(
        "all_reduce(min) of a device scalar",
        res.iter().all(|r| r.0 == 10.0),
        format!("{:?}", res.iter().map(|r| r.0).collect::<Vec<_>>()),
    );
    let want: Vec<u8> = (0..gpus * 16).map(|i| i as u8).collect();
    check(
        "all_gather of FP8 bytes",
        res.iter().all(|r| r.1 == want),
        "bytes differ".into(),
    );
    // The result is the mean (scale N * shared, as the CPU GradAllReducer). Bound, in
    // stored units: each rank's re-encode to the shared scale and each of the N - 1 hops
    // rounds once to E5M2 (relative half-ulp 2^-3 of a value <= sum |stored|, or half the
    // smallest subnormal), so |err| <= N (2^-3 sum |stored| + q_min / 2); divided by
    // N * shared for the mean in real units.
    let dec = decode_table(Fp8Format::E5M2);
    let shared = 16.0f32; // min over ranks of 2^(4 + r)
    let nr = gpus as f64;
    let mut worst = 0.0f64;
    let mut ok = true;
    for i in 0..n {
        let (mut sum, mut abs) = (0.0f64, 0.0f64);
        for (r, rr) in res.iter().enumerate() {
            let v = dec[rr.2[i] as usize] as f64 / 2f64.powi(4 + r as i32);
            sum += v;
            abs += v.abs();
        }
        let (got, mean) = (
            dec[res[0].2[n + i] as usize] as f64 / res[0].3 as f64,
            sum / nr,
        );
        let bound = 0.125 * abs + dec[1] as f64 / (2.0 * shared as f64);
        worst = worst.max((got - mean).abs() / bound.max(1e-30));
        ok &= (got - mean).abs() <= bound && res.iter().all(|rr| rr.2[n + i] == res[0].2[n + i]);
    }
    check(
        "FP8-LM all-reduce vs exact mean (per-hop bound), same bits on every rank",
        ok,
        format!("worst error/bound {worst:.3}"),
    );
    check(
        "FP8-LM all-reduce result scale = N * min scale",
        res.iter().all(|r| r.3 == nr as f32 * shared),
        format!("{}", res[0].3),
    );
    if failed {
        std::process::exit(1);
    }
    println!("gpu_nccl_check: all checks passed on {gpus} GPU(s)");
}
