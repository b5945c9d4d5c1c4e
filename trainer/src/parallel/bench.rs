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
