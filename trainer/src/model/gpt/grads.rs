//! The gradients as the rest of the step sees them: the groups the backward finishes
//! (what data parallelism reduces while the backward goes on), the optimizer-facing
//! views, and the weights the optimizer writes back.

use super::*;

/// Which part of the network a group of finished gradients belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradGroup {
    /// Final norm, and the LM head when it is not tied to the embedding (LLaMA).
    Head,
    /// Block `l`.
    Block(usize),
    /// Token (and GPT-2's position) embeddings, with GPT-2's tied LM head.
    Embedding,
}

/// Where a [`GradGroup`] lies: its flat-buffer range and the indices of the linears
/// (into `Model::linears`) whose weights are in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GradGroupSpec {
    pub group: GradGroup,
    pub range: Range<usize>,
    pub linears: Range<usize>,
}

/// A group of gradients the backward is done with (see [`Model::backward_with`]).
pub struct FinalGrads<'a> {
    pub group: GradGroup,
    /// Flat-buffer offset of `grads[0]`.
    pub offset: usize,
    /// f32 gradients of the group's range (for FP8 linears, the f32 copy their FP8
    /// weight gradient was cast from).
    pub grads: &'a mut [f32],
    /// The linears whose weights lie in the group, FP8 weight gradients quantised.
    pub linears: &'a mut [Linear],
}

impl Model {
    /// The groups of gradients the backward finishes one after another, in the order it
    /// finishes them (the order [`Model::backward_with`] hands them out): the final norm
    /// (and LLaMA's untied LM head), the blocks from last to first, then the embeddings
    /// (with GPT-2's tied LM head, whose gradient the embedding backward adds to last).
    /// Each group is a contiguous range of the flat buffer.
    pub fn grad_groups(&self) -> Vec<GradGroupSpec> {
        let lay = &self.layout;
        let l_n = self.dims.l;
        let head = 4 * l_n..4 * l_n + 1;
        let block_start = |l: usize| lay.offsets[lay.blocks[l].n1w];
        let tied = lay.head == lay.wte;
        let mut out = vec![GradGroupSpec {
            group: GradGroup::Head,
            range: lay.offsets[lay.nfw]..lay.total,
            linears: if tied {
                head.end..head.end
            } else {
                head.clone()
            },
        }];
        for l in (0..l_n).rev() {
            let end = if l + 1 < l_n {
                block_start(l + 1)
            } else {
                lay.offsets[lay.nfw]
            };
            out.push(GradGroupSpec {
                group: GradGroup::Block(l),
                range: block_start(l)..end,
                linears: 4 * l..4 * l + 4,
            });
        }
        out.push(GradGroupSpec {
            group: GradGroup::Embedding,
            range: 0..block_start(0),
            linears: if tied { head } else { 0..0 },
        });
        out
    }

    /// Each tensor's gradient as the optimizer sees it: FP8 for linear weights in FP8
    /// mode, f32 otherwise.
    pub fn grad_views(&self) -> Vec<Grad<'_>> {
        (0..self.layout.metas.len())
            .map(
                |i| match self.linear_of_tensor[i].and_then(|li| self.linears[li].fp8.as_ref()) {
                    Some(f) => Grad::Fp8(&f.wgrad),
                    None => Grad::F32(&self.grads[self.layout.range(i)]),
                },
            )
            .collect()
    }

    /// Parameters and the optimizer-facing gradients, borrowed together for an update.
    pub fn params_and_grads(&mut self) -> (Vec<&mut [f32]>, Vec<Grad<'_>>) {
        let Model {
            params,
            grads,
            layout,
            linears,
            linear_of_tensor,
            ..
        } = self;
        let ps = split_tensors_mut(params, layout);
        let gs = (0..layout.metas.len())
            .map(
                |i| match linear_of_tensor[i].and_then(|li| linears[li].fp8.as_ref()) {
                    Some(f) => Grad::Fp8(&f.wgrad),
                    None => Grad::F32(&grads[layout.range(i)]),
                },
            )
            .collect();
        (ps, gs)
    }

    /// Where the optimizer writes each tensor's compute weights (f32 in `params`, or
    /// fp8-o2's E4M3 copy of a linear's weight), and the optimizer-facing gradients.
    /// After the update, hand the FP8 targets' results to [`Model::accept_written`].
    pub fn outs_and_grads(&mut self) -> (Vec<ParamOut<'_>>, Vec<Grad<'_>>) {
        let Model {
            params,
            grads,
            layout,
            linears,
            linear_of_tensor,
            weights_from_optimizer,
            ..
        } = self;
        let ext = *weights_from_optimizer;
        let mut parts: Vec<Option<(&mut crate::model::linear::Fp8Operand, &fp8lm_fp8::ScaledFp8)>> =
            linears
                .iter_mut()
                .map(|l| {
                    l.fp8.as_mut().map(|f| {
                        let crate::model::linear::Fp8Linear { w, wgrad, .. } = f;
                        (w, &*wgrad)
                    })
                })
                .collect();
        let mut outs = Vec::with_capacity(layout.metas.len());
        let mut gs = Vec::with_capacity(layout.metas.len());
        for (i, p) in split_tensors_mut(params, layout).into_iter().enumerate() {
            match linear_of_tensor[i].and_then(|li| parts[li].take()) {
                Some((w, wgrad)) => {
                    gs.push(Grad::Fp8(wgrad));
                    outs.push(if ext {
                        ParamOut::Fp8(w.optimizer_target())
                    } else {
                        ParamOut::F32(p)
                    });
                }
                None => {
                    gs.push(Grad::F32(&grads[layout.range(i)]));
                    outs.push(ParamOut::F32(p));
                }
            }
        }
        (outs, gs)
    }

    /// Take the optimizer's FP8 casts (one entry per tensor, `Some` for FP8 targets).
    pub fn accept_written(&mut self, written: &[Option<Fp8Written>]) {
        for (i, w) in written.iter().enumerate() {
            if let (Some(w), Some(li)) = (w, self.linear_of_tensor[i]) {
                if let Some(f) = self.linears[li].fp8.as_mut() {
                    f.w.accept_written(*w);
                }
            }
        }
    }

    /// Have `opt` write the compute weights from its current master (fp8-o2 after
    /// construction, a checkpoint restore, or a skipped step). A no-op for models whose
    /// f32 weights are the master. The FP8 casts run on the model's backend.
    pub fn write_compute_weights(&mut self, opt: &dyn Optimizer) -> Result<(), String> {
        if !self.weights_from_optimizer {
            return Ok(());
        }
        let be = self.backend().clone();
        let (mut outs, _) = self.outs_and_grads();
        opt.write_compute_weights_on(&*be, &mut outs)?;
        let written = written_of(&outs);
        drop(outs);
        self.accept_written(&written);
        Ok(())
    }

    /// Total time spent in GEMMs since the last call.
    pub fn take_gemm_time(&mut self) -> std::time::Duration {
        self.linears.iter_mut().map(|l| l.take_gemm_time()).sum()
    }
}
