//! The whole data-parallel loop (`fp8lm train` minus checkpoints and metrics) and the
//! `fp8lm bench train --dist` measurements.

use crate::config::{Overlap, Precision};
use crate::train::{StepStats, Trainer};
use anyhow::{anyhow, Result};
use fp8lm_collectives::Communicator;

/// Open the data of `cfg`, build a trainer as rank `comm.rank()` and run `steps`
/// data-parallel steps, calling `on_step` after each. What `fp8lm train` does under
/// `mpirun` (minus checkpoints and metrics), and what the distributed bench measures.
pub fn train_data_parallel(
    cfg: &crate::RunConfig,
    comm: &dyn Communicator,
    steps: usize,
    mut on_step: impl FnMut(&Trainer, &StepStats),
) -> Result<Trainer> {
    let mut data = crate::data::open_dataset(cfg).map_err(|e| {
        anyhow!(
            "rank {}: data.path = {:?}: {e:#}",
            comm.rank(),
            cfg.data.path
        )
    })?;
    let mut tr = Trainer::new(cfg, data.vocab_size())?;
    tr.enable_data_parallel(comm)?;
    for _ in 0..steps {
        let st = tr.train_step_dist(data.as_mut(), comm)?;
        on_step(&tr, &st);
    }
    Ok(tr)
}

/// Step time and the share of it spent in communication, averaged over the measured
/// steps (after `warmup` unmeasured ones), as rank 0 sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct DistBench {
    pub precision: Precision,
    pub ranks: usize,
    pub steps: usize,
    /// `dist.overlap` of the run (fp8-o3 overlaps only its scale agreement and packing).
    pub overlap: bool,
    pub step_s: f64,
    /// Time in communication, hidden behind the backward or not.
    pub comm_s: f64,
    /// The part of `comm_s` the step waited for.
    pub exposed_s: f64,
    /// Bytes this rank sent per step.
    pub bytes_sent_per_step: f64,
    /// This rank's optimizer state bytes.
    pub state_bytes: usize,
}

impl DistBench {
    pub fn comm_share(&self) -> f64 {
        self.comm_s / self.step_s.max(1e-12)
    }
    /// Share of the step spent waiting on communication.
    pub fn exposed_share(&self) -> f64 {
        self.exposed_s / self.step_s.max(1e-12)
    }
}

/// Measure `steps` data-parallel steps of `cfg` on `comm` (after `warmup` steps).
pub fn bench_train_dist(
    cfg: &crate::RunConfig,
    comm: &dyn Communicator,
    warmup: usize,
    steps: usize,
) -> Result<DistBench> {
    let (mut step_s, mut comm_s, mut exposed_s, mut k) = (0.0, 0.0, 0.0, 0usize);
    let mut sent0 = comm.bytes_sent();
    let tr = train_data_parallel(cfg, comm, warmup + steps, |_, st| {
        if k >= warmup {
            step_s += (st.forward + st.backward + st.optimizer).as_secs_f64();
            comm_s += st.comm.as_secs_f64();
            exposed_s += st.comm_exposed.as_secs_f64();
        }
        k += 1;
        if k == warmup {
            sent0 = comm.bytes_sent();
        }
    })?;
    let m = steps.max(1) as f64;
    Ok(DistBench {
        precision: cfg.precision,
        ranks: comm.size(),
        steps,
        overlap: tr.overlaps(),
        step_s: step_s / m,
        comm_s: comm_s / m,
        exposed_s: exposed_s / m,
        bytes_sent_per_step: (comm.bytes_sent() - sent0) as f64 / m,
        state_bytes: tr.optimizer().state_bytes(),
    })
}

/// `fp8lm bench train --dist`: fp32, fp8-o1 and fp8-o3, each with gradient communication
/// overlapped with the backward and not (fp8-o3: only its agreement and packing), on `comm`, `steps` measured
/// steps each (after 2 warm-up steps). Every rank must call it; the returned table (rank
/// 0's view) is for rank 0 to print.
pub fn bench_train_dist_table(
    cfg: &crate::RunConfig,
    comm: &dyn Communicator,
    steps: usize,
) -> Result<String> {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "bench train --dist: {} ranks ({} backend), {} layers x {} channels, B={} T={} per rank, \
         {steps} steps after 2 warm-up; figures on a shared machine are noisy, compare rows",
        comm.size(),
        comm.backend(),
        cfg.model.layers,
        cfg.model.channels,
        cfg.batch,
        cfg.model.context
    );
    let _ = writeln!(
        s,
        "comm: all communication time (hidden behind the backward or not); exposed: the part \
         the step waited for"
    );
    let _ = writeln!(
        s,
        "{:<8} {:>7} {:>10} {:>10} {:>11} {:>9} {:>14} {:>12}",
        "mode", "overlap", "step ms", "comm ms", "exposed ms", "exposed%", "sent B/step", "state B"
    );
    let mut base = None;
    let mut off_step = 0.0;
    for (p, overlap) in [
        (Precision::Fp32, false),
        (Precision::Fp32, true),
        (Precision::Fp8O1, false),
        (Precision::Fp8O1, true),
        (Precision::Fp8O3, false),
        (Precision::Fp8O3, true),
    ] {
        let mut c = cfg.clone();
        c.precision = p;
        c.dist.overlap = if overlap { Overlap::On } else { Overlap::Off };
        let b = bench_train_dist(&c, comm, 2, steps)?;
        let rel = base.map_or(1.0, |s: f64| b.step_s / s);
        base.get_or_insert(b.step_s);
        let vs_off = if overlap {
            format!(", {:.2}x overlap off", b.step_s / off_step)
        } else {
            off_step = b.step_s;
            String::new()
        };
        let _ = writeln!(
            s,
            "{:<8} {:>7} {:>10.2} {:>10.2} {:>11.2} {:>8.1}% {:>14.0} {:>12}  ({rel:.2}x fp32 off{vs_off})",
            p.name(),
            if overlap { "on" } else { "off" },
            b.step_s * 1e3,
            b.comm_s * 1e3,
            b.exposed_s * 1e3,
            100.0 * b.exposed_share(),
            b.bytes_sent_per_step,
            b.state_bytes
        );
    }
    Ok(s)
}

/// A communicator that times every point-to-point exchange, broadcast and barrier of
/// the one it wraps (the collectives run as rings over them, as on
/// [`fp8lm_collectives::CountingComm`]): the time spent moving or waiting for bytes.
struct TimedComm<'a> {
    inner: &'a dyn Communicator,
    time: std::cell::Cell<std::time::Duration>,
}

impl<'a> TimedComm<'a> {
    fn new(inner: &'a dyn Communicator) -> Self {
        TimedComm {
            inner,
            time: std::cell::Cell::new(std::time::Duration::ZERO),
        }
    }
    fn timed<R>(&self, f: impl FnOnce() -> R) -> R {
        let t0 = std::time::Instant::now();
        let r = f();
        self.time.set(self.time.get() + t0.elapsed());
        r
    }
    fn seconds(&self) -> f64 {
        self.time.get().as_secs_f64()
    }
}

impl Communicator for TimedComm<'_> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn sendrecv_bytes(
        &self,
        op: &str,
        to: usize,
        send: &[u8],
        from: usize,
        recv: &mut [u8],
    ) -> fp8lm_collectives::Result<()> {
        self.timed(|| self.inner.sendrecv_bytes(op, to, send, from, recv))
    }
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> fp8lm_collectives::Result<()> {
        self.timed(|| self.inner.broadcast_bytes(buf, root))
    }
    fn barrier(&self) -> fp8lm_collectives::Result<()> {
        self.timed(|| self.inner.barrier())
    }
    fn bytes_sent(&self) -> u64 {
        self.inner.bytes_sent()
    }
    fn abort(&self, reason: &str) -> ! {
        self.inner.abort(reason)
    }
}

/// One row of `fp8lm bench train --dist` on a D x T grid: rank 0's averages per step.
#[derive(Clone, Debug, PartialEq)]
pub struct GridBench {
    pub precision: Precision,
    pub dp: usize,
    pub tp: usize,
    pub sp: bool,
    pub steps: usize,
    pub step_s: f64,
    /// Time in the tensor-parallel group's collectives (inside the forward and
    /// backward: all of it exposed).
    pub tp_comm_s: f64,
    /// Time in the data-parallel gradient reduction (and ZeRO's), and the part of it
    /// the step waited for.
    pub dp_comm_s: f64,
    pub dp_exposed_s: f64,
    /// Bytes rank 0 sent per step, by collective kind, in its tensor-parallel group
    /// (T = 1: none) and in its data-parallel group.
    pub tp_bytes: fp8lm_collectives::CollectiveBytes,
    pub dp_bytes: fp8lm_collectives::CollectiveBytes,
    /// Rank 0's activations (the ledger's category: the arena and the linears' kept
    /// inputs) and optimizer state, bytes.
    pub activation_bytes: usize,
    pub state_bytes: usize,
}

impl GridBench {
    /// Communication the step waited for: every tensor-parallel collective, and the
    /// exposed part of the data-parallel reduction.
    pub fn exposed_s(&self) -> f64 {
        self.tp_comm_s + self.dp_exposed_s
    }
}

/// The per-step mean of `b` over `steps` steps.
fn per_step(
    b: fp8lm_collectives::CollectiveBytes,
    steps: usize,
) -> fp8lm_collectives::CollectiveBytes {
    let m = steps.max(1) as u64;
    fp8lm_collectives::CollectiveBytes {
        all_reduce: b.all_reduce / m,
        reduce_scatter: b.reduce_scatter / m,
        all_gather: b.all_gather / m,
        all_gather_fp8: b.all_gather_fp8 / m,
        other: b.other / m,
    }
}

/// Measure `steps` training steps of `cfg` on the D x T grid `world.size() / T` x
/// `cfg.dist.tensor_parallel` (tensor-parallel ranks innermost, as `fp8lm train` under
/// `mpirun`), after `warmup` steps, with the collectives counted by kind and timed.
/// T = 1 is plain data parallelism (`Trainer::train_step_dist`). The collectives run as
/// rings over the communicator's point-to-point exchanges (how they are counted).
pub fn bench_train_grid(
    cfg: &crate::RunConfig,
    world: &dyn Communicator,
    warmup: usize,
    steps: usize,
) -> Result<GridBench> {
    use fp8lm_collectives::{CollectiveBytes, CountingComm};
    let t = cfg.dist.tensor_parallel.max(1);
    let mut data = crate::data::open_dataset(cfg).map_err(|e| {
        anyhow!(
            "rank {}: data.path = {:?}: {e:#}",
            world.rank(),
            cfg.data.path
        )
    })?;
    let grid = fp8lm_collectives::grid::Grid::new(world.size(), t).map_err(|e| anyhow!("{e}"))?;
    let (tp_group, dp_group) = grid.groups(world).map_err(|e| anyhow!("{e}"))?;
    let (tp_timed, dp_timed) = (TimedComm::new(&tp_group), TimedComm::new(&dp_group));
    let (tp_c, dp_c) = (CountingComm::new(&tp_timed), CountingComm::new(&dp_timed));
    let dp = dp_group.size();
    let mut tr = if t > 1 {
        let mut tr = Trainer::new_tp(cfg, data.vocab_size(), tp_group.rank())?;
        if dp > 1 {
            tr.enable_data_parallel_from_tp_checkpoint(&dp_c, &tp_c, None)?;
        }
        tr
    } else {
        let mut tr = Trainer::new_for_ranks(cfg, data.vocab_size(), dp)?;
        if dp > 1 {
            tr.enable_data_parallel(&dp_c)?;
        }
        tr
    };
    let (mut step_s, mut step_comm_s, mut dp_exposed_s) = (0.0, 0.0, 0.0);
    let (mut tp0, mut dp0) = (0.0, 0.0);
    let (mut tpb0, mut dpb0) = (CollectiveBytes::default(), CollectiveBytes::default());
    for k in 0..warmup + steps {
        if k == warmup {
            (tp0, dp0) = (tp_timed.seconds(), dp_timed.seconds());
            (tpb0, dpb0) = (tp_c.bytes(), dp_c.bytes());
        }
        let st = match (t > 1, dp > 1) {
            (true, true) => tr.train_step_dxt(data.as_mut(), &tp_c, &dp_c)?,
            (true, false) => tr.train_step_tp(data.as_mut(), &tp_c)?,
            (false, true) => tr.train_step_dist(data.as_mut(), &dp_c)?,
            (false, false) => tr.train_step(data.as_mut())?,
        };
        if k >= warmup {
            step_s += (st.forward + st.backward + st.optimizer).as_secs_f64();
            step_comm_s += st.comm.as_secs_f64();
            dp_exposed_s += st.comm_exposed.as_secs_f64();
        }
    }
    let m = steps.max(1) as f64;
    // T > 1: the replicas' reductions run on the step's thread as `backward_tp` hands
    // the gradients out (`train_step_dxt`): all of it (the exchanges timed) is waited
    // for. T = 1: the step's own figures (`bench_train_dist`'s), its reduction time and
    // the part of it (overlapped with the backward) it waited for.
    let (dp_comm_s, dp_exposed_s) = if t > 1 {
        let s = (dp_timed.seconds() - dp0) / m;
        (s, s)
    } else {
        (step_comm_s / m, dp_exposed_s / m)
    };
    Ok(GridBench {
        precision: cfg.precision,
        dp,
        tp: t,
        sp: t > 1 && cfg.dist.sequence_parallel,
        steps,
        step_s: step_s / m,
        tp_comm_s: (tp_timed.seconds() - tp0) / m,
        dp_comm_s,
        dp_exposed_s,
        tp_bytes: per_step(tp_c.bytes().since(&tpb0), steps),
        dp_bytes: per_step(dp_c.bytes().since(&dpb0), steps),
        activation_bytes: crate::memory::LedgerSizes::of_trainer(&tr)
            .ledger()
            .category_bytes(crate::memory::Category::Activations),
        state_bytes: tr.optimizer().state_bytes(),
    })
}

/// `fp8lm bench train --dist --tp`: for each grid D x T of `world` with T in `tps`
/// (dividing the world size), each precision of `precisions`, SP off and on (T > 1),
/// `steps` measured steps after 2 warm-up ones: step time, communication time and what
/// the step waited for, bytes per step by collective kind (rank 0, tensor-parallel and
/// data-parallel groups) and rank 0's activation (memory ledger) and optimizer-state bytes. Every rank
/// must call it; the table (rank 0's view) is for rank 0 to print.
pub fn bench_train_grid_table(
    cfg: &crate::RunConfig,
    world: &dyn Communicator,
    tps: &[usize],
    precisions: &[Precision],
    steps: usize,
) -> Result<String> {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "bench train --dist (D x T grids): {} ranks ({} backend), {} layers x {} channels, \
         {} heads, B={} T={} per replica, {steps} steps after 2 warm-up; figures on a shared \
         machine are noisy, compare rows; bytes are rank 0's per step, exact",
        world.size(),
        world.backend(),
        cfg.model.layers,
        cfg.model.channels,
        cfg.model.heads,
        cfg.batch,
        cfg.model.context
    );
    let _ = writeln!(
        s,
        "tp ms: tensor-parallel collectives (all exposed); dp ms: gradient reduction \
         (exposed part in exposed ms); AR/RS/AG/AG8: all-reduce, reduce-scatter, f32/bf16 \
         all-gather, FP8 all-gather bytes in the TP group; DP B: bytes in the DP group"
    );
    let _ = writeln!(
        s,
        "{:<7} {:>5} {:>3} {:>9} {:>8} {:>8} {:>11} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12} {:>11}",
        "mode", "DxT", "SP", "step ms", "tp ms", "dp ms", "exposed ms", "AR B", "RS B", "AG B",
        "AG8 B", "DP B", "acts B", "state B"
    );
    for &p in precisions {
        for &t in tps {
            if t == 0 || !world.size().is_multiple_of(t) {
                continue;
            }
            for sp in if t > 1 {
                vec![false, true]
            } else {
                vec![false]
            } {
                let mut c = cfg.clone();
                c.precision = p;
                c.dist.tensor_parallel = t;
                c.dist.sequence_parallel = sp;
                let b = bench_train_grid(&c, world, 2, steps)?;
                let tb = b.tp_bytes;
                let _ = writeln!(
                    s,
                    "{:<7} {:>5} {:>3} {:>9.2} {:>8.2} {:>8.2} {:>11.2} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12} {:>11}",
                    p.name(),
                    format!("{}x{}", b.dp, b.tp),
                    if b.sp { "on" } else { "off" },
                    b.step_s * 1e3,
                    b.tp_comm_s * 1e3,
                    b.dp_comm_s * 1e3,
                    b.exposed_s() * 1e3,
                    tb.all_reduce,
                    tb.reduce_scatter,
                    tb.all_gather,
                    tb.all_gather_fp8,
                    b.dp_bytes.total(),
                    b.activation_bytes,
                    b.state_bytes
                );
            }
        }
    }
    Ok(s)
}
