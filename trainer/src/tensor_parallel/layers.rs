//! Column- and row-parallel linear layers (Megatron's `ColumnParallelLinear`,
//! `RowParallelLinear`): the model's own [`Linear`] (its weight shard, every precision,
//! the FP8 scaling state) with the region operators of its side of the split around it.
//! `out = inp @ W^T + b` with `W` stored `[OC, C]` as in llm.c.
//!
//! ```text
//!   column:  W_t = W[rows_t, :]      out_t[n, OC/T] = inp[n, C] @ W_t^T + b_t
//!            forward input: f (identity) | g (all-gather of the SP shards, E4M3 in FP8)
//!            dinp_partial[n, C] = dout_t @ W_t, summed by f's backward (all-reduce) |
//!            g's backward (reduce-scatter to the SP shards)
//!   row:     W_t = W[:, cols_t]      partial[n, OC] = inp_t[n, C/T] @ W_t^T
//!            summed by f̄ (all-reduce) | ḡ (reduce-scatter to the SP shards), then + b
//!            once;  dinp_t[n, C/T] = dout @ W_t, `dout` replicated | the E5M2 all-gather
//!            of the SP shards' gradient
//! ```
//! The collectives themselves are `fp8lm_collectives::mappings` (f, f̄, g, ḡ); the FP8
//! gathers, which cast before they move bytes, are `Linear::forward_sp` /
//! `Linear::backward_sp` (`model/linear_sp.rs`: they reach the FP8 operands' storage).
//! Without a group (`tp` `None`) each method is the plain layer, so the T = 1 model runs
//! exactly the code it always ran.

use crate::model::linear::Linear;
use fp8lm_collectives::mappings::{copy_to_tp, reduce_from_tp, reduce_scatter_to_sp};
use fp8lm_collectives::{Communicator, Result};

/// Output features split over the group (qkv with its heads, the MLP's fc, the
/// vocabulary-parallel LM head): `lin` holds this rank's rows of the weight.
pub struct ColumnParallelLinear<'a> {
    pub lin: &'a mut Linear,
    /// The tensor-parallel group (`None`: no tensor parallelism).
    pub tp: Option<&'a dyn Communicator>,
    /// Sequence parallelism: the input arrives as this rank's token rows.
    pub sp: bool,
}

impl<'a> ColumnParallelLinear<'a> {
    pub fn new(lin: &'a mut Linear, tp: Option<&'a dyn Communicator>, sp: bool) -> Self {
        ColumnParallelLinear { lin, tp, sp }
    }

    /// The group when g gathers the input (SP), else `None`.
    fn sp_group(&self) -> Option<&'a dyn Communicator> {
        self.tp.filter(|_| self.sp)
    }

    /// `out[n, oc_local] = inp @ W_t^T + b_t`. Under SP the input is this rank's rows
    /// `shard` and g gathers it ([`Linear::forward_sp`]; `full` receives the f32 gather in
    /// fp32); otherwise `full` is the input (f's forward is the identity).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        out: &mut [f32],
        full: &mut [f32],
        shard: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        n: usize,
        record: bool,
    ) -> Result<()> {
        match self.sp_group() {
            Some(comm) => self
                .lin
                .forward_sp(out, shard, full, w, bias, n, record, comm),
            None => {
                self.lin.forward(out, full, w, bias, n, record);
                Ok(())
            }
        }
    }

    /// `dinp_partial[n, c] = dout @ W_t` (the caller sums it over the group:
    /// [`ColumnParallelLinear::input_grad`]), `dW_t`, `db_t`: [`Linear::backward`] with
    /// the forward's input `inp` in place (under SP a layer that keeps only its shard
    /// re-gathers it, [`Linear::with_input_gathered`]).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &mut self,
        dinp_partial: &mut [f32],
        dw: &mut [f32],
        db: Option<&mut [f32]>,
        dout: &[f32],
        inp: &[f32],
        w: &[f32],
        n: usize,
    ) -> Result<()> {
        let sp = self.sp_group();
        self.lin.with_input_gathered(n, sp, inp, |li, x| {
            li.backward(dinp_partial, dw, db, dout, x, w, n)
        })
    }

    /// The input gradient summed over the group: f's backward (all-reduce of `partial`,
    /// in place) under TP, g's backward (reduce-scatter into `shard`) under SP, `partial`
    /// itself without TP. Returns the gradient the norm below reads.
    pub fn input_grad<'b>(
        &self,
        partial: &'b mut [f32],
        shard: &'b mut [f32],
    ) -> Result<&'b mut [f32]> {
        match self.tp {
            None => Ok(partial),
            Some(comm) if self.sp => {
                let k = partial.len() / comm.size();
                reduce_scatter_to_sp(comm, partial, &mut shard[..k])?;
                Ok(&mut shard[..k])
            }
            Some(comm) => {
                copy_to_tp(comm, partial)?;
                Ok(partial)
            }
        }
    }
}

/// Input features split over the group (the attention and MLP output projections):
/// `lin` holds this rank's columns of the weight; the bias is whole on every rank and
/// added once, after the reduction.
pub struct RowParallelLinear<'a> {
    pub lin: &'a mut Linear,
    /// The tensor-parallel group (`None`: no tensor parallelism).
    pub tp: Option<&'a dyn Communicator>,
    /// Sequence parallelism: the output leaves as this rank's token rows.
    pub sp: bool,
}

impl<'a> RowParallelLinear<'a> {
    pub fn new(lin: &'a mut Linear, tp: Option<&'a dyn Communicator>, sp: bool) -> Self {
        RowParallelLinear { lin, tp, sp }
    }

    /// The layer's output, `inp_t @ W_t^T` summed over the group, `+ b`: the GEMM into
    /// `partial` (`[n, oc]`), then f̄ (all-reduce, then the bias once) under TP, ḡ
    /// (reduce-scatter into `shard`, then the bias on it) under SP; without TP the GEMM
    /// adds the bias itself, as always. Returns the output the residual adds: `partial`
    /// or, under SP, this rank's rows in `shard`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward<'b>(
        &mut self,
        partial: &'b mut [f32],
        shard: &'b mut [f32],
        inp: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        n: usize,
        record: bool,
    ) -> Result<&'b [f32]> {
        let Some(comm) = self.tp else {
            self.lin.forward(partial, inp, w, bias, n, record);
            return Ok(partial);
        };
        self.lin.forward(partial, inp, w, None, n, record);
        let out = if self.sp {
            let k = partial.len() / comm.size();
            reduce_scatter_to_sp(comm, partial, &mut shard[..k])?;
            &mut shard[..k]
        } else {
            reduce_from_tp(comm, partial)?;
            partial
        };
        if let Some(b) = bias {
            for row in out.chunks_exact_mut(b.len()) {
                for (o, &x) in row.iter_mut().zip(b) {
                    *o += x;
                }
            }
        }
        Ok(out)
    }

    /// `dinp_t = dout @ W_t` (overwritten), `dW_t`, `db`. Under SP the output gradient is
    /// this rank's rows `dout`, all-gathered by [`Linear::backward_sp`] (`scratch`: room
    /// for the f32 gather; E5M2 with a shared scale in FP8), and `db` is the sum over
    /// this rank's rows only (the caller all-reduces it with the norms' gradients);
    /// otherwise `dout` is the whole (replicated: f̄'s backward is the identity) gradient.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &mut self,
        dinp: &mut [f32],
        dw: &mut [f32],
        db: Option<&mut [f32]>,
        dout: &[f32],
        scratch: &mut [f32],
        inp: &[f32],
        w: &[f32],
        n: usize,
    ) -> Result<()> {
        match self.tp.filter(|_| self.sp) {
            Some(comm) => self
                .lin
                .backward_sp(dinp, dw, db, dout, scratch, inp, w, n, comm),
            None => {
                self.lin.backward(dinp, dw, db, dout, inp, w, n);
                Ok(())
            }
        }
    }
}
