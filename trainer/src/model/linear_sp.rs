//! The linear layer at sequence parallelism's converters (a child of `linear`, so it
//! reaches the FP8 operands' storage): the input arrives as this rank's token shard and
//! is all-gathered (g) before the GEMM; in the backward the output gradient arrives as a
//! shard and is all-gathered (ḡ's backward).
//!
//! FP8 (FP8-LM §5): the shard is cast *before* the gather, so the gather moves one byte per
//! element, E4M3 for the input and E5M2 for the gradient. Every rank must cast with the
//! same scale, so the amax is MAX-reduced over the group first (NaN as +inf, which a MAX
//! keeps): the group amax is exactly the whole tensor's, the scale is the one the layer
//! would choose for the gathered tensor, and the gathered bytes equal the cast of the
//! gathered f32 tensor byte for byte. Delayed scaling records the group amax, so every
//! rank's history (and next scale) is the same. The cast counts in the stats are this
//! rank's shard's. The amax agreement and the gather are g's FP8 steps in
//! `fp8lm_collectives::mappings` (`sp_group_amax`, `gather_from_sp_fp8_cast`). fp32
//! gathers in f32 (exact) and runs the ordinary layer; bf16 rounds the shard to bf16
//! first and gathers the bf16 (the rounding is element-wise, so the same bytes as
//! rounding the gathered f32: half of fp32's traffic).
//!
//! Memory (Megatron-LM's SP): a column-parallel layer keeps only this rank's shard of
//! its input ([`Linear::keep_input_shard`]), in the format its dW GEMM reads: E4M3 bytes
//! (FP8), f32 (fp32), bf16 (bf16). The gathered `[n, c]` input lives in one per-thread
//! buffer per format while the GEMM runs, and the backward all-gathers the shards again
//! ([`Linear::with_input_gathered`]) in that same format: the same bytes (and, in FP8,
//! the same scale), so the dW GEMM reads exactly what the forward's GEMM read, for
//! `(T - 1) / T` of `n x c` elements more traffic per layer (1, 4 or 2 bytes each).

use super::*;
use fp8lm_collectives::mappings::{gather_from_sp, gather_from_sp_fp8_cast, sp_group_amax};
use fp8lm_collectives::{chunk_range, BufMut, Communicator, Result};

impl Fp8Operand {
    /// Cast this rank's `shard` with the group's shared scale into its rows of the first
    /// `full` bytes of the storage, and all-gather them (see the module docs). The
    /// scale is chosen as [`Fp8Operand::quantize`] chooses it for the whole tensor.
    fn quantize_gathered(
        &mut self,
        be: &dyn Backend,
        shard: &[f32],
        full: usize,
        record: bool,
        comm: &dyn Communicator,
    ) -> Result<()> {
        assert!(
            self.block.is_none(),
            "sequence parallelism with the block recipe is refused at start-up"
        );
        // g's FP8 protocol (`fp8lm_collectives::mappings`), with this operand's scaling
        // state choosing the scale and the backend casting.
        let amax = sp_group_amax(comm, be.amax_f32(shard))?;
        let scale = self.cast_scale(record, || amax);
        let fmt = self.state.format;
        let bytes = &mut self.t.fp8_bytes_mut()[..full];
        let cast = gather_from_sp_fp8_cast(comm, fmt, bytes, shard.len(), |dst| {
            be.cast_fp8(fmt, shard, scale, dst)
        })?;
        // The group amax: the gathered bytes are the whole tensor's cast.
        self.t.set_scaling(Scaling::PerTensor { scale, amax });
        // (the counts are this rank's shard's)
        let c = cast.counts;
        self.record_cast(record, amax, scale, c.saturated, c.flushed, shard.len());
        Ok(())
    }
}

thread_local! {
    /// The gathered E4M3 input `[n, c]` of the column-parallel layer whose forward or
    /// backward runs on this thread (each layer keeps only its shard under SP).
    static X_E4M3_GATHERED: std::cell::RefCell<Tensor> =
        std::cell::RefCell::new(Tensor::zeros(DType::E4M3, &[0]));
    /// fp32's: the gathered f32 input `[n, c]` (as `X_E4M3_GATHERED`).
    static X_F32_GATHERED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// bf16's: the gathered bf16 input `[n, c]` (as `X_E4M3_GATHERED`).
    static X_BF16_GATHERED: std::cell::RefCell<Vec<bf16>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `db += sum over rows of dout` (this rank's shard rows: the caller all-reduces `db`).
fn bias_grad(be: &dyn Backend, db: Option<&mut [f32]>, dout_shard: &[f32]) {
    if let Some(db) = db {
        be.bias_backward(db, dout_shard);
    }
}

impl Linear {
    /// [`Linear::forward`] of a column-parallel layer under sequence parallelism: `shard`
    /// is this rank's `[n / T, c]` rows of the input; `full` (`[n, c]`) receives the f32
    /// gather of an unsharded fp32 / bf16 layer (the input its backward reads) and is
    /// untouched otherwise: FP8's gather moves the E4M3 bytes into the layer's own input
    /// storage, bf16's the bf16 into the shared buffer, each keeping its shard.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_sp(
        &mut self,
        out: &mut [f32],
        shard: &[f32],
        full: &mut [f32],
        w: &[f32],
        bias: Option<&[f32]>,
        n: usize,
        record: bool,
        comm: &dyn Communicator,
    ) -> Result<()> {
        let (c, oc) = (self.c, self.oc);
        assert!(
            out.len() == n * oc && shard.len() * comm.size() == n * c,
            "{}: shape mismatch",
            self.name
        );
        let sharded = self.input_shards > 1;
        match self.precision {
            LinearPrecision::Fp32 if sharded => {
                return X_F32_GATHERED.with(|g| {
                    let mut g = g.borrow_mut();
                    grow(&mut g, n * c);
                    gather_from_sp(comm, shard, &mut g[..n * c])?;
                    self.forward(out, &g[..n * c], w, bias, n, record);
                    // Keep this rank's rows: the backward gathers them again.
                    self.x_shard_f32[..shard.len()].copy_from_slice(shard);
                    Ok(())
                });
            }
            LinearPrecision::Bf16 if sharded => {
                return X_BF16_GATHERED.with(|g| {
                    let mut g = g.borrow_mut();
                    grow(&mut g, n * c);
                    // This rank's rows are rounded to bf16 *before* g: the rounding is
                    // element-wise (`fp8lm_fp8::cast::f32_to_bf16`, `half`'s bits on every
                    // path), so the gathered bf16 equal the rounding of the gathered f32
                    // input byte for byte and g moves 2 bytes per element, not 4.
                    let rows = chunk_range(n * c, comm.size(), comm.rank());
                    self.be.cast_bf16(shard, &mut g[rows.clone()]);
                    comm.all_gather(BufMut::Bf16(&mut g[..n * c]))?;
                    // This rank's rows are kept (the backward gathers them again); the
                    // gathered input is lent to the cache for the GEMM.
                    let mut cache = self.bf16.take().expect("bf16 cache");
                    cache.x[..rows.len()].copy_from_slice(&g[rows]);
                    std::mem::swap(&mut *g, &mut cache.x);
                    self.bf16 = Some(cache);
                    self.gemm_bf16_input(out, w, n);
                    if let Some(b) = bias {
                        self.be.bias_forward(out, b);
                    }
                    let cache = self.bf16.as_mut().expect("bf16 cache");
                    std::mem::swap(&mut *g, &mut cache.x);
                    Ok(())
                });
            }
            LinearPrecision::Fp32 | LinearPrecision::Bf16 => {
                gather_from_sp(comm, shard, &mut full[..n * c])?;
                self.forward(out, &full[..n * c], w, bias, n, record);
                return Ok(());
            }
            LinearPrecision::Fp8 { .. } => {}
        }
        let mut f = self.fp8.take().expect("fp8 state");
        let r = X_E4M3_GATHERED.with(|g| {
            let mut g = g.borrow_mut();
            if sharded {
                // Gather into the shared buffer; the layer's own storage (now in `g`)
                // receives this rank's rows below.
                g.ensure_len(n * c);
                std::mem::swap(&mut *g, &mut f.x.t);
            }
            let r = f.x.quantize_gathered(&*self.be, shard, n * c, record, comm);
            if r.is_ok() {
                self.gemm_sp(&mut f, out, w, bias, n, record);
            }
            if sharded {
                let rows = chunk_range(n * c, comm.size(), comm.rank());
                let own = rows.len();
                g.fp8_bytes_mut()[..own].copy_from_slice(&f.x.t.fp8_bytes()[rows]);
                std::mem::swap(&mut *g, &mut f.x.t);
                // The scale and amax of this cast stay with the shard kept.
                std::mem::swap(g.scaling_mut(), f.x.t.scaling_mut());
            }
            r
        });
        self.fp8 = Some(f);
        r
    }

    /// The forward GEMM of [`Linear::forward_sp`] once the E4M3 input is gathered.
    fn gemm_sp(
        &mut self,
        f: &mut Fp8Linear,
        out: &mut [f32],
        w: &[f32],
        bias: Option<&[f32]>,
        n: usize,
        record: bool,
    ) {
        let (c, oc) = (self.c, self.oc);
        {
            if self.weight_from_optimizer {
                if record {
                    f.w.record_written();
                }
            } else {
                f.w.quantize(&*self.be, w, record);
            }
            let shape = GemmShape::new(n, oc, c).trans_b();
            self.gemm_fp8(shape, f.x.operand(n * c), f.w.operand(oc * c), out);
            if let Some(b) = bias {
                self.be.bias_forward(out, b);
            }
        }
    }

    /// Sequence parallelism: keep only `1 / t` of the `rows x c` input's rows (this
    /// rank's shard) from now on, in the format the dW GEMM reads (E4M3, f32 or bf16);
    /// the layer must then be run by [`Linear::forward_sp`] and its backward inside
    /// [`Linear::with_input_gathered`]. No effect with the block recipe (refused with SP
    /// at start-up) or for `t <= 1`.
    pub fn keep_input_shard(&mut self, t: usize, rows: usize) {
        if t <= 1 {
            return;
        }
        let shard = rows * self.c / t;
        match self.precision {
            LinearPrecision::Fp8 { .. } => {
                let f = self.fp8.as_mut().expect("fp8 state");
                if f.x.block.is_some() {
                    return;
                }
                f.x.t = Tensor::zeros(DType::E4M3, &[shard]);
            }
            LinearPrecision::Fp32 => self.x_shard_f32 = vec![0f32; shard],
            LinearPrecision::Bf16 => {
                self.bf16.as_mut().expect("bf16 cache").x = vec![bf16::ZERO; shard];
            }
        }
        self.input_shards = t;
    }

    /// Bytes of the per-thread gathered-input buffer this layer needs (`rows x c` E4M3
    /// bytes when an FP8 layer keeps a shard, else 0).
    pub fn e4m3_gathered_bytes(&self, rows: usize) -> usize {
        self.gathered_bytes(
            rows,
            1,
            matches!(self.precision, LinearPrecision::Fp8 { .. }),
        )
    }

    /// fp32 under SP: bytes of the per-thread gathered f32 input this layer needs
    /// (`4 x rows x c` when it keeps a shard, else 0).
    pub fn f32_gathered_bytes(&self, rows: usize) -> usize {
        self.gathered_bytes(rows, 4, self.precision == LinearPrecision::Fp32)
    }

    /// bf16 under SP: bytes of the per-thread gathered bf16 input this layer needs
    /// (`2 x rows x c` when it keeps a shard, else 0).
    pub fn bf16_gathered_bytes(&self, rows: usize) -> usize {
        self.gathered_bytes(rows, 2, self.precision == LinearPrecision::Bf16)
    }

    fn gathered_bytes(&self, rows: usize, elem: usize, precision: bool) -> usize {
        if self.input_shards > 1 && precision {
            elem * rows * self.c
        } else {
            0
        }
    }

    /// fp32 under SP: bytes of the f32 input shard this layer keeps for its dW GEMM.
    pub fn f32_input_shard_bytes(&self) -> usize {
        4 * self.x_shard_f32.len()
    }

    /// Run `backward` (this layer's [`Linear::backward`]) with the whole input in place:
    /// under SP (`comm`) a layer that keeps a shard all-gathers the shards of its `n`
    /// rows first, in their own format (E4M3 bytes with the forward's scale, f32, bf16:
    /// bit-identical to what the forward's GEMM read); otherwise `backward` runs as it
    /// is. `backward` gets the f32 input to pass on: `inp`, or (fp32 keeping a shard) the
    /// gathered one (the other formats' backwards read their own copy, not `inp`).
    pub fn with_input_gathered<R>(
        &mut self,
        n: usize,
        comm: Option<&dyn Communicator>,
        inp: &[f32],
        backward: impl FnOnce(&mut Linear, &[f32]) -> R,
    ) -> Result<R> {
        let Some(comm) = comm.filter(|_| self.input_shards > 1) else {
            return Ok(backward(self, inp));
        };
        let c = self.c;
        let rows = chunk_range(n * c, comm.size(), comm.rank());
        let own = rows.len();
        match self.precision {
            LinearPrecision::Fp32 => X_F32_GATHERED.with(|g| {
                let mut g = g.borrow_mut();
                grow(&mut g, n * c);
                g[rows].copy_from_slice(&self.x_shard_f32[..own]);
                comm.all_gather(BufMut::F32(&mut g[..n * c]))?;
                Ok(backward(self, &g[..n * c]))
            }),
            LinearPrecision::Bf16 => X_BF16_GATHERED.with(|g| {
                let mut g = g.borrow_mut();
                grow(&mut g, n * c);
                let mut cache = self.bf16.take().expect("bf16 cache");
                g[rows].copy_from_slice(&cache.x[..own]);
                let gathered = comm.all_gather(BufMut::Bf16(&mut g[..n * c]));
                std::mem::swap(&mut *g, &mut cache.x);
                self.bf16 = Some(cache);
                let out = gathered.map(|()| backward(self, inp));
                let mut cache = self.bf16.take().expect("bf16 cache");
                std::mem::swap(&mut *g, &mut cache.x);
                self.bf16 = Some(cache);
                out
            }),
            LinearPrecision::Fp8 { .. } => {
                let mut f = self.fp8.take().expect("fp8 state");
                X_E4M3_GATHERED.with(|g| {
                    let mut g = g.borrow_mut();
                    g.ensure_len(n * c);
                    g.fp8_bytes_mut()[rows].copy_from_slice(&f.x.t.fp8_bytes()[..own]);
                    let fmt = f.x.state.format;
                    let gathered =
                        comm.all_gather(BufMut::Fp8(&mut g.fp8_bytes_mut()[..n * c], fmt));
                    std::mem::swap(&mut *g, &mut f.x.t);
                    // The gathered bytes were cast with the shard's scale.
                    f.x.t.set_scaling(g.scaling().clone());
                    self.fp8 = Some(f);
                    let out = gathered.map(|()| backward(self, inp));
                    let mut f = self.fp8.take().expect("fp8 state");
                    std::mem::swap(&mut *g, &mut f.x.t);
                    self.fp8 = Some(f);
                    out
                })
            }
        }
    }

    /// [`Linear::backward`] of a row-parallel layer under sequence parallelism: the
    /// output gradient arrives as this rank's `[n / T, oc]` rows `dout_shard` and is
    /// all-gathered (f32 into `dout_full` in fp32 / bf16; E5M2 bytes with the group's
    /// shared scale in FP8). The bias gradient is this rank's rows' sum (partial: the
    /// caller all-reduces it over the group with the norms').
    #[allow(clippy::too_many_arguments)]
    pub fn backward_sp(
        &mut self,
        dinp: &mut [f32],
        dw: &mut [f32],
        dbias: Option<&mut [f32]>,
        dout_shard: &[f32],
        dout_full: &mut [f32],
        inp: &[f32],
        w: &[f32],
        n: usize,
        comm: &dyn Communicator,
    ) -> Result<()> {
        let (c, oc) = (self.c, self.oc);
        bias_grad(&*self.be, dbias, dout_shard);
        let LinearPrecision::Fp8 { .. } = self.precision else {
            gather_from_sp(comm, dout_shard, &mut dout_full[..n * oc])?;
            self.backward(dinp, dw, None, &dout_full[..n * oc], inp, w, n);
            return Ok(());
        };
        assert!(
            dinp.len() == n * c && dw.len() == oc * c && dout_shard.len() * comm.size() == n * oc
        );
        let mut f = self.fp8.take().expect("fp8 state");
        let r = DY_E5M2.with(|b| {
            let mut b = b.borrow_mut();
            b.ensure_len(n * oc);
            std::mem::swap(&mut *b, &mut f.dy.t);
            let r =
                f.dy.quantize_gathered(&*self.be, dout_shard, n * oc, true, comm);
            if r.is_ok() {
                let s_dinp = GemmShape::new(n, c, oc);
                let s_dw = GemmShape::new(oc, c, n).trans_a();
                self.gemm_fp8(s_dinp, f.dy.operand(n * oc), f.w.operand(oc * c), dinp);
                self.gemm_fp8(s_dw, f.dy.operand(n * oc), f.x.operand(n * c), dw);
            }
            std::mem::swap(&mut *b, &mut f.dy.t);
            // The bytes go back to the pool; the scaling of this cast stays with the
            // operand (as in `Linear::backward`).
            std::mem::swap(b.scaling_mut(), f.dy.t.scaling_mut());
            r
        });
        self.fp8 = Some(f);
        r
    }
}
