//! The gradient all-reduce of data-parallel training, in FP8 the FP8-LM way (recipe §3),
//! next to the variants it is measured against.
//!
//! Every method turns each rank's gradient tensors `g_i` (f32) into the mean over ranks.
//! The FP8 methods quantise with one scale per tensor that all ranks agree on, sum the FP8
//! bytes with the per-hop-rounded ring all-reduce of [`crate::comm`] (decode, add in f32,
//! re-encode RNE, saturating), and return FP8 values with the scale of the *mean*:
//!
//! | method | agreement (one vector all-reduce for all tensors) | rank i sends | result scale |
//! |---|---|---|---|
//! | `PreScale` | `s_g = min_i s'_i` | `fp8(s_g * g_i / N)` | `s_g` |
//! | `PostScale` | `s_g = min_i s'_i` | `fp8(s_g * g_i)` | `N * s_g` |
//! | `Fp8Lm` | `s_g = min_i s'_i` | `fp8(mu * s_g * g_i)` | `N * mu * s_g` |
//! | `MsAmp` (E4M3) | `a = max_i amax_i` | `fp8(q * g_i)`, `q = scale(a * sqrt(N))` | `N * q` |
//!
//! `s'_i` is rank i's own power-of-two scale, `2^floor(log2(fmt_max / amax_i))`, so the
//! min is the scale of the largest amax. Pre-scaling divides before the sum and loses the
//! small values to underflow; post-scaling sums N values each up to fmt_max and saturates.
//! FP8-LM's automatic factor `mu` (per tensor, equal on all ranks) sits in between and
//! adapts: after each all-reduce, if more than `overflow_fraction` (default 0.001%) of a
//! tensor's summed values sit at +-fmt_max (saturated), `mu` halves; otherwise it grows by
//! `2^(1/growth_steps)`, i.e. doubles over 1000 steps, up to `max_mu`. The saturation count
//! is that of the summed result, which every rank ends up holding identically; to save a
//! pass over it, each rank counts inside the last reduce-scatter step the chunk it
//! finishes, and one small all-gather of those shares gives every rank the same total
//! (so `mu` stays in agreement). `max_mu` defaults to 1: `s'_i` is already the
//! current (not delayed) amax scale, so `mu > 1` could only clip the largest rank's values.
//!
//! FP8-LM's re-quantisation `g''_i = fp8(s_g * g'_i / s'_i)` is done here directly from
//! the f32 gradient, `fp8(mu * s_g * g_i)`: one rounding instead of two. When gradients are
//! already FP8 tensors `(g'_i, s'_i)`, [`GradAllReducer::all_reduce_scaled_fp8`] does the
//! re-quantisation literally, through a 256-entry table per tensor, applied to each byte
//! inside the ring right before its one use ([`crate::comm::fp8_all_reduce_fused`]), so
//! FP8-LM costs no pass over the data beyond the FP8 sum itself.
//!
//! On FP8 inputs the comparison methods are the same re-quantise-and-sum with a fixed
//! factor: pre-scaling is `mu = 1/N`, post-scaling `mu = 1` ([`fixed_mu`]); the trainer
//! picks the method and FP8-LM's rule (`overflow_fraction`, `growth_steps`, `max_mu`)
//! from `dist.fp8_allreduce`, and reports each step's mu and counts ([`GradTally`]).
//!
//! Small tensors are packed into buckets of up to `bucket_bytes` so that each bucket costs
//! one all-reduce; the scale agreement for all tensors is a single vector all-reduce.

use crate::buf::{BufMut, ReduceOp};
use crate::comm::{fp8_all_reduce_fused, Communicator, Fp8Segment};
use crate::error::{CommError, Result};
use crate::fp8sum::{HopCounts, Requant};
use crate::lut::requant_table;
use fp8lm_fp8::cast::f32_to_fp8_counted;
use fp8lm_fp8::scaling::{scale_for_amax, ScaleRounding};
use fp8lm_fp8::{Fp8Format, ScaledFp8};
use half::bf16;

/// How gradients are summed across ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GradMethod {
    /// f32 sum, then `/ N` (the reference).
    F32,
    /// bf16 with per-hop rounding, then `/ N` in f32.
    Bf16,
    /// FP8, divide by N before the sum.
    PreScale,
    /// FP8, divide by N after the sum.
    PostScale,
    /// MS-AMP: E4M3, max-amax agreement, head-room 1/sqrt(N).
    MsAmp,
    /// FP8-LM: automatic scaling factor mu, shared minimum scale, FP8 sum, scale N * s_g.
    Fp8Lm,
}

impl GradMethod {
    pub const ALL: [GradMethod; 6] = [
        GradMethod::F32,
        GradMethod::Bf16,
        GradMethod::PreScale,
        GradMethod::PostScale,
        GradMethod::MsAmp,
        GradMethod::Fp8Lm,
    ];
    pub fn name(self) -> &'static str {
        match self {
            GradMethod::F32 => "f32",
            GradMethod::Bf16 => "bf16",
            GradMethod::PreScale => "fp8-prescale",
            GradMethod::PostScale => "fp8-postscale",
            GradMethod::MsAmp => "fp8-msamp",
            GradMethod::Fp8Lm => "fp8lm",
        }
    }
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        GradMethod::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = GradMethod::ALL.iter().map(|m| m.name()).collect();
                format!("unknown gradient all-reduce method {s:?}; expected one of {names:?}")
            })
    }
    pub fn is_fp8(self) -> bool {
        !matches!(self, GradMethod::F32 | GradMethod::Bf16)
    }
}

/// Configuration of [`GradAllReducer`].
#[derive(Clone, Debug, PartialEq)]
pub struct GradAllReduceConfig {
    pub method: GradMethod,
    /// FP8 format of the pre-/post-scaling and FP8-LM sums (gradients: E5M2 by the
    /// project's convention). MS-AMP always uses E4M3.
    pub format: Fp8Format,
    /// FP8-LM: halve mu when more than this fraction of a tensor's summed values saturate.
    pub overflow_fraction: f64,
    /// FP8-LM: mu doubles over this many steps without overflow.
    pub growth_steps: u32,
    pub initial_mu: f32,
    pub max_mu: f32,
    /// Tensors are packed into buckets of at most this many bytes (a larger tensor is a
    /// bucket of its own).
    pub bucket_bytes: usize,
}

impl Default for GradAllReduceConfig {
    fn default() -> Self {
        GradAllReduceConfig {
            method: GradMethod::Fp8Lm,
            format: Fp8Format::E5M2,
            overflow_fraction: 1e-5,
            growth_steps: 1000,
            initial_mu: 1.0,
            max_mu: 1.0,
            bucket_bytes: 4 << 20,
        }
    }
}

/// What one all-reduce did, per tensor and in total (identical on all ranks except
/// `flushed`, which is this rank's own quantisation).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GradReport {
    /// Summed values at +-fmt_max (FP8 methods): overflow.
    pub saturated: Vec<u64>,
    /// This rank's non-zero inputs that quantised to zero (FP8 methods): underflow.
    pub flushed: Vec<u64>,
    /// Scale of each reduced tensor (`mean = stored / scale`); 1 for f32/bf16.
    pub scales: Vec<f32>,
    /// FP8-LM's mu per tensor after this step's update (1 for other methods).
    pub mu: Vec<f32>,
    /// Some rank had a NaN/infinite amax: the scales fell back to 1 and the step should be
    /// skipped by the caller.
    pub nonfinite: bool,
    pub bytes_sent: u64,
}

impl GradReport {
    pub fn total_saturated(&self) -> u64 {
        self.saturated.iter().sum()
    }
    pub fn total_flushed(&self) -> u64 {
        self.flushed.iter().sum()
    }
}

/// Stateful gradient all-reducer (holds FP8-LM's per-tensor mu across steps).
///
/// Two in-process ranks (threads, [`crate::run_ranks`]; under `mpirun` the same calls
/// take [`crate::init`]'s MPI communicator) average one gradient tensor the FP8-LM way:
/// E5M2 on the wire, one agreed scale, and every rank gets the same bytes back.
///
/// ```
/// use fp8lm_collectives::{run_ranks, Communicator, GradAllReduceConfig, GradAllReducer};
///
/// let n = 1000;
/// let grad = |rank: usize| -> Vec<f32> {
///     (0..n).map(|i| ((i * (rank + 3)) % 101) as f32 / 100.0 - 0.5).collect()
/// };
/// let out = run_ranks(2, |comm| {
///     let mut r = GradAllReducer::new(GradAllReduceConfig::default()); // FP8-LM, E5M2
///     let mine = grad(comm.rank());
///     let (summed, report) = r.all_reduce_fp8(comm, &[&mine])?;
///     // A 2-rank ring sends each rank's half twice: one byte per element in all, plus
///     // the scale agreement and the saturation counts (f32 would send 4 bytes).
///     assert!(report.bytes_sent as usize <= n + 64, "{} bytes sent", report.bytes_sent);
///     Ok::<_, fp8lm_collectives::CommError>(summed[0].dequantize()) // the mean
/// })
/// .unwrap();
/// assert_eq!(out[0], out[1], "both ranks hold the same mean, bit for bit");
/// let (g0, g1) = (grad(0), grad(1));
/// for i in 0..n {
///     // E5M2 keeps 2 mantissa bits: each rounding (each rank's cast, then the sum's)
///     // is within 12.5% of what it rounds, so the mean is within ~13% of |g0| + |g1|.
///     let exact = (g0[i] + g1[i]) / 2.0;
///     let bound = 0.14 * (g0[i].abs() + g1[i].abs()) + 1e-3;
///     assert!((out[0][i] - exact).abs() <= bound, "{i}: {} vs {exact}", out[0][i]);
/// }
/// ```
#[derive(Clone, Debug)]
pub struct GradAllReducer {
    pub cfg: GradAllReduceConfig,
    /// Per-tensor mu (FP8-LM), indexed like the gradient list.
    pub mu: Vec<f32>,
    pub steps: u64,
}

/// Buckets: consecutive tensor index ranges whose total byte size stays within `cap`.
fn buckets(lens: &[usize], elem_bytes: usize, cap: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0usize);
    for (t, &l) in lens.iter().enumerate() {
        let b = l * elem_bytes;
        if t > start && bytes + b > cap {
            out.push(start..t);
            start = t;
            bytes = 0;
        }
        bytes += b;
    }
    if start < lens.len() {
        out.push(start..lens.len());
    }
    out
}

/// FP8 sum of every tensor's bytes across ranks, bucket by bucket (a bucket of one
/// tensor is reduced where it lies, several small ones are packed into one buffer), with
/// each tensor's re-quantisation `requant[t]` and the counts fused into the ring
/// ([`fp8_all_reduce_fused`]). Returns this rank's share of the counts per tensor.
fn sum_fp8_buckets(
    comm: &dyn Communicator,
    tensors: &mut [ScaledFp8],
    fmt: Fp8Format,
    bucket_bytes: usize,
    requant: &[[Option<Requant>; 2]],
) -> Result<Vec<HopCounts>> {
    let lens: Vec<usize> = tensors.iter().map(|t| t.data.len()).collect();
    let mut counts = vec![HopCounts::default(); tensors.len()];
    for b in buckets(&lens, 1, bucket_bytes) {
        let segs: Vec<Fp8Segment> = b
            .clone()
            .map(|t| Fp8Segment {
                len: lens[t],
                requant: requant[t][0],
                prev_requant: requant[t][1],
            })
            .collect();
        if b.len() == 1 {
            let data = &mut tensors[b.start].data;
            fp8_all_reduce_fused(comm, data, fmt, &segs, &mut counts[b])?;
            continue;
        }
        let mut buf = Vec::with_capacity(lens[b.clone()].iter().sum());
        for t in &tensors[b.clone()] {
            buf.extend_from_slice(&t.data);
        }
        fp8_all_reduce_fused(comm, &mut buf, fmt, &segs, &mut counts[b.clone()])?;
        let mut off = 0;
        for t in &mut tensors[b] {
            let l = t.data.len();
            t.data.copy_from_slice(&buf[off..off + l]);
            off += l;
        }
    }
    Ok(counts)
}

fn pow2_scale(fmt_max: f32, amax: f32) -> f32 {
    scale_for_amax(fmt_max, amax, 0, ScaleRounding::PowerOfTwo).unwrap_or(f32::INFINITY)
}

impl GradAllReducer {
    pub fn new(cfg: GradAllReduceConfig) -> Self {
        GradAllReducer {
            cfg,
            mu: Vec::new(),
            steps: 0,
        }
    }

    fn fmt(&self) -> Fp8Format {
        if self.cfg.method == GradMethod::MsAmp {
            Fp8Format::E4M3
        } else {
            self.cfg.format
        }
    }

    fn sync_mu(&mut self, n_tensors: usize) {
        self.mu.resize(n_tensors, self.cfg.initial_mu);
    }

    fn update_mu(&mut self, t: usize, saturated: u64, len: usize) {
        self.mu[t] = next_mu(&self.cfg, self.mu[t], saturated, len);
    }

    /// The multiplier a tensor is re-quantised with before the FP8 sum of
    /// [`Self::all_reduce_scaled_fp8`]: FP8-LM's adaptive `mu[t]`, or the fixed factor of
    /// the method it is compared against (`1/N`: pre-scaling; `1`: post-scaling).
    fn scaled_mu(&self, t: usize, ranks: usize) -> f32 {
        fixed_mu(self.cfg.method, ranks).unwrap_or(self.mu[t])
    }

    /// In place: each `grads[t]` (this rank's gradient) becomes the mean over ranks, through
    /// the configured method (FP8 methods are dequantised back to f32).
    pub fn all_reduce_mean(
        &mut self,
        comm: &dyn Communicator,
        grads: &mut [&mut [f32]],
    ) -> Result<GradReport> {
        let n = comm.size() as f32;
        match self.cfg.method {
            GradMethod::F32 | GradMethod::Bf16 => {
                let sent0 = comm.bytes_sent();
                let bf = self.cfg.method == GradMethod::Bf16;
                let lens: Vec<usize> = grads.iter().map(|g| g.len()).collect();
                let eb = if bf { 2 } else { 4 };
                for b in buckets(&lens, eb, self.cfg.bucket_bytes) {
                    let total: usize = lens[b.clone()].iter().sum();
                    if bf {
                        let mut buf: Vec<bf16> = Vec::with_capacity(total);
                        for g in &grads[b.clone()] {
                            buf.extend(g.iter().map(|&x| bf16::from_f32(x)));
                        }
                        comm.all_reduce(BufMut::Bf16(&mut buf), ReduceOp::Sum)?;
                        let mut off = 0;
                        for g in &mut grads[b] {
                            for (d, s) in g.iter_mut().zip(&buf[off..]) {
                                *d = s.to_f32() / n;
                            }
                            off += g.len();
                        }
                    } else {
                        let mut buf: Vec<f32> = Vec::with_capacity(total);
                        for g in &grads[b.clone()] {
                            buf.extend_from_slice(g);
                        }
                        comm.all_reduce(BufMut::F32(&mut buf), ReduceOp::Sum)?;
                        let mut off = 0;
                        for g in &mut grads[b] {
                            for (d, s) in g.iter_mut().zip(&buf[off..]) {
                                *d = s / n;
                            }
                            off += g.len();
                        }
                    }
                }
                let k = grads.len();
                Ok(GradReport {
                    saturated: vec![0; k],
                    flushed: vec![0; k],
                    scales: vec![1.0; k],
                    mu: vec![1.0; k],
                    nonfinite: false,
                    bytes_sent: comm.bytes_sent() - sent0,
                })
            }
            _ => {
                let views: Vec<&[f32]> = grads.iter().map(|g| &**g).collect();
                let (out, report) = self.all_reduce_fp8(comm, &views)?;
                for (g, t) in grads.iter_mut().zip(&out) {
                    t.dequantize_into(g);
                }
                Ok(report)
            }
        }
    }

    /// FP8 methods: reduce this rank's f32 gradients and return the summed FP8 tensors
    /// with the scale of the mean (`mean = stored / scale`), as the FP8 optimizer takes them.
    pub fn all_reduce_fp8(
        &mut self,
        comm: &dyn Communicator,
        grads: &[&[f32]],
    ) -> Result<(Vec<ScaledFp8>, GradReport)> {
        let mut out = Vec::new();
        let report = self.all_reduce_fp8_into(comm, grads, &mut out)?;
        Ok((out, report))
    }

    /// [`Self::all_reduce_fp8`] into caller-owned tensors, reused from step to step (their
    /// buffers are resized as needed; fresh 64 MiB allocations cost page faults).
    pub fn all_reduce_fp8_into(
        &mut self,
        comm: &dyn Communicator,
        grads: &[&[f32]],
        out: &mut Vec<ScaledFp8>,
    ) -> Result<GradReport> {
        let method = self.cfg.method;
        if !method.is_fp8() {
            return Err(CommError::new(
                comm.rank(),
                "grad all_reduce_fp8",
                format!("method {} is not an FP8 method", method.name()),
            ));
        }
        let sent0 = comm.bytes_sent();
        let fmt = self.fmt();
        let n = comm.size();
        let k = grads.len();
        self.sync_mu(k);
        // 1. Agreement on one scale per tensor: a single vector all-reduce.
        let amax: Vec<f32> = grads.iter().map(|g| fp8lm_fp8::cast::amax_f32(g)).collect();
        let mut agree: Vec<f32> = if method == GradMethod::MsAmp {
            amax.clone()
        } else {
            amax.iter().map(|&a| pow2_scale(fmt.max(), a)).collect()
        };
        // NaN amax must survive the Min: encode it as NaN (min/max propagate NaN).
        for (a, s) in amax.iter().zip(agree.iter_mut()) {
            if !a.is_finite() {
                *s = f32::NAN;
            }
        }
        let op = if method == GradMethod::MsAmp {
            ReduceOp::Max
        } else {
            ReduceOp::Min
        };
        comm.all_reduce(BufMut::F32(&mut agree), op)?;
        let mut nonfinite = false;
        // (quantisation multiplier, result scale) per tensor
        let scales: Vec<(f32, f32)> = (0..k)
            .map(|t| {
                let a = agree[t];
                if a.is_nan() {
                    nonfinite = true;
                    return (1.0, n as f32);
                }
                let s_g = match method {
                    GradMethod::MsAmp => pow2_scale(fmt.max(), a * (n as f32).sqrt()),
                    _ => a,
                };
                // All ranks all-zero: any scale works.
                let s_g = if s_g.is_finite() { s_g } else { 1.0 };
                match method {
                    GradMethod::PreScale => (s_g / n as f32, s_g),
                    GradMethod::PostScale | GradMethod::MsAmp => (s_g, n as f32 * s_g),
                    GradMethod::Fp8Lm => {
                        let q = self.mu[t] * s_g;
                        (q, n as f32 * q)
                    }
                    GradMethod::F32 | GradMethod::Bf16 => unreachable!(),
                }
            })
            .collect();
        // 2. Quantise into buckets, FP8-sum each bucket, unpack.
        let lens: Vec<usize> = grads.iter().map(|g| g.len()).collect();
        let mut report = GradReport {
            saturated: vec![0; k],
            flushed: vec![0; k],
            scales: scales.iter().map(|s| s.1).collect(),
            mu: vec![1.0; k],
            nonfinite,
            bytes_sent: 0,
        };
        // Quantise straight into the output tensors.
        out.truncate(k);
        while out.len() < k {
            out.push(ScaledFp8::zeros(&[0], fmt));
        }
        for (t, (g, o)) in grads.iter().zip(out.iter_mut()).enumerate() {
            o.data.resize(lens[t], 0);
            o.shape = vec![lens[t]];
            o.format = fmt;
            o.scale = scales[t].1;
            // Cast and underflow count in one pass.
            let (_, counts) = f32_to_fp8_counted(fmt, g, scales[t].0, &mut o.data);
            report.flushed[t] = counts.flushed;
        }
        let adapt_mu = method == GradMethod::Fp8Lm;
        let requant = vec![[None, None]; k];
        self.sum_and_finish(comm, out, fmt, &lens, &requant, adapt_mu, sent0, report)
    }

    /// FP8-LM on gradients that are already FP8 tensors `(g'_i, s'_i)` (in place): one
    /// all-gather of the scales finds `s_g = min_i s'_i`; each rank re-quantises
    /// `g''_i = fp8(mu * s_g * g'_i / s'_i)` through a 256-entry table; the FP8 sum follows
    /// and each tensor's scale becomes `N * mu * s_g` (the scale of the mean). The table is
    /// applied inside the ring's hops (no pass of its own), and the chunk a rank sends
    /// first is re-quantised by its receiver, with the sender's table (which is why the
    /// scales are gathered rather than min-reduced); the results are bit for bit those of
    /// re-quantising first and summing after.
    pub fn all_reduce_scaled_fp8(
        &mut self,
        comm: &dyn Communicator,
        grads: &mut [ScaledFp8],
    ) -> Result<GradReport> {
        if !SCALED_FP8_METHODS.contains(&self.cfg.method) {
            let names: Vec<_> = SCALED_FP8_METHODS.iter().map(|m| m.name()).collect();
            return Err(CommError::new(
                comm.rank(),
                "grad all_reduce_scaled_fp8",
                format!(
                    "FP8 inputs are reduced by one of {names:?} (a factor mu on the shared \
                     minimum scale); method is {}",
                    self.cfg.method.name()
                ),
            ));
        }
        let sent0 = comm.bytes_sent();
        let n = comm.size() as f32;
        let k = grads.len();
        self.sync_mu(k);
        let fmt = match grads.first() {
            Some(g) => g.format,
            None => self.cfg.format,
        };
        if let Some(g) = grads.iter().find(|g| g.format != fmt) {
            return Err(CommError::new(
                comm.rank(),
                "grad all_reduce_scaled_fp8",
                format!(
                    "mixed FP8 formats in one call ({} and {})",
                    fmt.name(),
                    g.format.name()
                ),
            ));
        }
        // One all-gather of every rank's scales: s_g = min_i s'_i (a NaN anywhere gives
        // NaN, as the Min all-reduce would), and the previous rank's scale, whose table
        // this rank applies to the chunk that rank sends first (see fp8_all_reduce_fused).
        let mine: Vec<u8> = grads.iter().flat_map(|g| g.scale.to_le_bytes()).collect();
        let all = comm.all_gather_bytes(&mine)?;
        let scale_of = |rank: usize, t: usize| {
            let o = (rank * k + t) * 4;
            f32::from_le_bytes(all[o..o + 4].try_into().expect("4 bytes"))
        };
        let ranks = comm.size();
        let s_g: Vec<f32> = (0..k)
            .map(|t| {
                (0..ranks)
                    .map(|r| scale_of(r, t))
                    .fold(f32::INFINITY, |m, x| {
                        if m.is_nan() || x.is_nan() {
                            f32::NAN
                        } else {
                            m.min(x)
                        }
                    })
            })
            .collect();
        let prev = (comm.rank() + ranks - 1) % ranks;
        let lens: Vec<usize> = grads.iter().map(|g| g.len()).collect();
        let mut report = GradReport {
            saturated: vec![0; k],
            flushed: vec![0; k],
            scales: vec![1.0; k],
            mu: vec![1.0; k],
            nonfinite: s_g.iter().any(|s| !s.is_finite() || *s <= 0.0),
            bytes_sent: 0,
        };
        // None when the table is the identity (ratio 1).
        let table = |ratio: f32| -> Option<([u8; 256], u8)> {
            let (lut, flush_hi) = requant_table(fmt, ratio);
            let identity = lut.iter().enumerate().all(|(v, &w)| v as u8 == w);
            (!identity).then_some((lut, flush_hi))
        };
        // Each tensor's re-quantisation tables (own, previous rank's); applied inside the
        // ring (fused).
        let mut luts = Vec::with_capacity(k);
        for (t, g) in grads.iter_mut().enumerate() {
            let q = self.scaled_mu(t, ranks) * s_g[t];
            luts.push((table(q / g.scale), table(q / scale_of(prev, t))));
            report.scales[t] = n * q;
            g.scale = n * q;
        }
        fn as_rq(l: &Option<([u8; 256], u8)>) -> Option<Requant<'_>> {
            l.as_ref().map(|(lut, flush_hi)| Requant {
                lut,
                flush_hi: *flush_hi,
            })
        }
        let requant: Vec<[Option<Requant>; 2]> =
            luts.iter().map(|(o, p)| [as_rq(o), as_rq(p)]).collect();
        let adapt_mu = self.cfg.method == GradMethod::Fp8Lm;
        let mut report =
            self.sum_and_finish(comm, grads, fmt, &lens, &requant, adapt_mu, sent0, report)?;
        if !adapt_mu {
            report.mu = (0..k).map(|t| self.scaled_mu(t, ranks)).collect();
        }
        Ok(report)
    }

    /// The common tail of both FP8 entry points: FP8-sum the tensors bucket by bucket
    /// (re-quantising on the way where `requant` (own, previous rank's) says so, counting
    /// flushed codes), agree on the per-tensor counts (one all-gather of each rank's
    /// share: the saturated sums it finished, the previous rank's codes it flushed), adapt
    /// mu from the saturation counts (`adapt_mu`), and account the bytes this rank sent
    /// since `sent0`.
    #[allow(clippy::too_many_arguments)]
    fn sum_and_finish(
        &mut self,
        comm: &dyn Communicator,
        tensors: &mut [ScaledFp8],
        fmt: Fp8Format,
        lens: &[usize],
        requant: &[[Option<Requant>; 2]],
        adapt_mu: bool,
        sent0: u64,
        mut report: GradReport,
    ) -> Result<GradReport> {
        let counts = sum_fp8_buckets(comm, tensors, fmt, self.cfg.bucket_bytes, requant)?;
        let (saturated, flushed_by_next) = agree_counts(comm, &counts)?;
        for (t, c) in counts.iter().enumerate() {
            if requant[t][0].is_some() {
                report.flushed[t] = c.flushed + flushed_by_next[t];
            }
        }
        report.saturated = saturated;
        if adapt_mu {
            for (t, &len) in lens.iter().enumerate() {
                self.update_mu(t, report.saturated[t], len);
            }
            report.mu = self.mu.clone();
        }
        self.steps += 1;
        report.bytes_sent = comm.bytes_sent() - sent0;
        Ok(report)
    }
}

/// The methods [`GradAllReducer::all_reduce_scaled_fp8`] takes: all three re-quantise each
/// rank's FP8 gradient to `mu * s_g` (shared minimum scale) and differ only in `mu`.
pub const SCALED_FP8_METHODS: [GradMethod; 3] = [
    GradMethod::Fp8Lm,
    GradMethod::PreScale,
    GradMethod::PostScale,
];

/// The fixed mu of the non-adaptive methods on FP8 inputs (`1/N`: pre-scaling, `1`:
/// post-scaling); `None` for FP8-LM's adaptive one (and the f32/bf16/MS-AMP methods).
pub fn fixed_mu(method: GradMethod, ranks: usize) -> Option<f32> {
    match method {
        GradMethod::PreScale => Some(1.0 / ranks as f32),
        GradMethod::PostScale => Some(1.0),
        _ => None,
    }
}

/// FP8-LM's automatic scaling rule, one step of it: `mu` halves when more than
/// `cfg.overflow_fraction` of the tensor's `len` summed values saturated, else grows by
/// `2^(1/growth_steps)` up to `cfg.max_mu`. Shared by the replicated all-reduce and the
/// fp8-o3 reduce-scatter so both follow the same (configured) rule.
pub fn next_mu(cfg: &GradAllReduceConfig, mu: f32, saturated: u64, len: usize) -> f32 {
    let frac = saturated as f64 / len.max(1) as f64;
    if frac > cfg.overflow_fraction {
        mu * 0.5
    } else {
        let g = 2f64.powf(1.0 / cfg.growth_steps.max(1) as f64) as f32;
        (mu * g).min(cfg.max_mu)
    }
}

/// One training step's FP8 gradient reductions summed over every call (groups, buckets):
/// what `metrics.jsonl` reports as the all-reduce's health.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GradTally {
    /// FP8 values reduced (per rank).
    pub elements: u64,
    /// Summed values at +-fmt_max (identical on all ranks).
    pub saturated: u64,
    /// This rank's non-zero values flushed to zero by its (re-)quantisation.
    pub flushed: u64,
    /// mu of every reduced tensor after the step.
    pub mu: Vec<f32>,
}

impl GradTally {
    /// Add the report of one call that reduced tensors of `lens` elements.
    pub fn add(&mut self, report: &GradReport, lens: &[usize]) {
        self.elements += lens.iter().map(|&l| l as u64).sum::<u64>();
        self.saturated += report.total_saturated();
        self.flushed += report.total_flushed();
        self.mu.extend_from_slice(&report.mu);
    }
    pub fn overflow_fraction(&self) -> f64 {
        self.saturated as f64 / self.elements.max(1) as f64
    }
    pub fn underflow_fraction(&self) -> f64 {
        self.flushed as f64 / self.elements.max(1) as f64
    }
    /// (min, mean, max) of mu; `None` before any FP8 reduction.
    pub fn mu_range(&self) -> Option<(f32, f32, f32)> {
        if self.mu.is_empty() {
            return None;
        }
        let min = self.mu.iter().copied().fold(f32::INFINITY, f32::min);
        let max = self.mu.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mean = self.mu.iter().map(|&m| m as f64).sum::<f64>() / self.mu.len() as f64;
        Some((min, mean as f32, max))
    }
}

/// From every rank's per-tensor counts: the total of `saturated` over ranks (the same on
/// all ranks, exact u64 arithmetic) and the next rank's `flushed_incoming` (this rank's
/// codes that the next rank flushed while re-quantising them for it).
fn agree_counts(comm: &dyn Communicator, mine: &[HopCounts]) -> Result<(Vec<u64>, Vec<u64>)> {
    let k = mine.len();
    if comm.size() == 1 || k == 0 {
        return Ok((mine.iter().map(|c| c.saturated).collect(), vec![0; k]));
    }
    let bytes: Vec<u8> = mine
        .iter()
        .flat_map(|c| [c.saturated, c.flushed_incoming])
        .flat_map(|c| c.to_le_bytes())
        .collect();
    let all = comm.all_gather_bytes(&bytes)?;
    let word = |rank: usize, t: usize, j: usize| {
        let o = rank * bytes.len() + (2 * t + j) * 8;
        u64::from_le_bytes(all[o..o + 8].try_into().expect("8 bytes"))
    };
    let next = (comm.rank() + 1) % comm.size();
    let saturated = (0..k)
        .map(|t| (0..comm.size()).map(|r| word(r, t, 0)).sum())
        .collect();
    let flushed_by_next = (0..k).map(|t| word(next, t, 1)).collect();
    Ok((saturated, flushed_by_next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flushed_count_of_the_f32_path_matches_the_cast() {
        // Values around the flush threshold, both signs, zeros and non-finite ones: the
        // report counts the non-zero inputs whose code has zero magnitude.
        for fmt in [Fp8Format::E4M3, Fp8Format::E5M2] {
            let ms = fmt.min_subnormal();
            let xs: Vec<f32> = (0..20_000)
                .map(|i| {
                    let f = i as f32 / 10_000.0; // 0 .. 2 min_subnormal
                    let x = f * ms / 0.75;
                    if i % 2 == 0 {
                        x
                    } else {
                        -x
                    }
                })
                .chain([0.0, -0.0, ms * 0.5, ms * 0.5000001, f32::NAN, f32::INFINITY])
                .collect();
            let q = 0.75;
            let want = xs
                .iter()
                .filter(|&&x| x != 0.0 && fmt.encode(x * q, true) & 0x7F == 0)
                .count() as u64;
            assert!(want > 1000);
            let mut out = vec![0u8; xs.len()];
            let (_, counts) = f32_to_fp8_counted(fmt, &xs, q, &mut out);
            assert_eq!(counts.flushed, want, "{fmt:?}");
        }
    }

    #[test]
    fn buckets_pack_small_tensors_and_isolate_big_ones() {
        assert_eq!(
            buckets(&[10, 10, 10, 100, 5], 1, 25),
            vec![0..2, 2..3, 3..4, 4..5]
        );
        assert_eq!(buckets(&[1, 1, 1], 4, 1 << 20), vec![0..3]);
        assert!(buckets(&[], 1, 8).is_empty());
    }

    #[test]
    fn mu_halves_on_overflow_and_doubles_over_growth_steps() {
        let mut r = GradAllReducer::new(GradAllReduceConfig {
            max_mu: 4.0,
            ..Default::default()
        });
        r.sync_mu(1);
        r.update_mu(0, 2, 100_000); // 2e-5 > 1e-5
        assert_eq!(r.mu[0], 0.5);
        r.update_mu(0, 1, 100_000); // 1e-5 is not more than the threshold
        for _ in 0..999 {
            r.update_mu(0, 0, 100_000);
        }
        assert!((r.mu[0] - 1.0).abs() < 1e-3, "{}", r.mu[0]);
        assert_eq!(GradMethod::parse("fp8lm"), Ok(GradMethod::Fp8Lm));
        assert!(GradMethod::parse("fp9").unwrap_err().contains("fp8-msamp"));
    }
}
