//! The backward pass, layer by layer in reverse, handing each group of finished
//! gradients out as soon as it is done ([`Model::backward_with`]).

use super::*;

#[allow(clippy::too_many_arguments)]
fn norm_backward(
    be: &dyn Backend,
    arch: Arch,
    dinp: &mut [f32],
    dw: &mut [f32],
    db: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    w: &[f32],
    mean: &[f32],
    rstd: &[f32],
) {
    match (arch, db) {
        (Arch::Gpt2, Some(db)) => be.layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd),
        _ => be.rmsnorm_backward(dinp, dw, dout, inp, w, rstd),
    }
}

impl Model {
    /// Gradients of the mean loss of the last forward (with targets) into `grads`
    /// (overwritten). Consumes that forward: a second call panics.
    pub fn backward(&mut self) {
        self.backward_with(&mut |_| {});
    }

    /// [`Model::backward`], handing each group of gradients to `on_final` as soon as the
    /// backward is done with it (order and groups: [`Model::grad_groups`]). A group's f32
    /// gradients and its linears (FP8 weight gradients already quantised) are never
    /// touched again by this backward, so `on_final` may send them to another thread and
    /// reduce them there while the backward goes on with the earlier layers: the
    /// overlap of data-parallel training. The split is plain `split_at_mut`: the
    /// borrows handed out are disjoint by construction.
    pub fn backward_with<'a>(&'a mut self, on_final: &mut dyn FnMut(FinalGrads<'a>)) {
        self.backward_tp(None, on_final)
            .expect("no collectives without tensor parallelism")
    }

    /// [`Model::backward_with`] on a tensor-parallel rank (`comm`: its group, required
    /// when [`Model::tp`] is set). The group's collectives run on the calling thread.
    pub fn backward_tp<'a>(
        &'a mut self,
        comm: Option<&dyn Communicator>,
        on_final: &mut dyn FnMut(FinalGrads<'a>),
    ) -> fp8lm_collectives::Result<()> {
        let comm = tp_comm(self.tp, comm);
        let tp_vocab = self.tp.map(|s| s.vocab(&self.dims));
        let ca = self.attn_width();
        let (sp, spt) = self.sp_size();
        let spc = comm.filter(|_| sp);
        let (b, t) = self
            .last_bt
            .take()
            .expect("backward without a forward with targets");
        let d = self.local;
        let (n, c, l_n) = (b * t, d.c, d.l);
        let (fc, f) = (d.fc_out(), d.f);
        let bt = d.b * d.t;
        let (ns, bts, _) = sp_rows(n, bt, c, spt);
        // Linear weights' gradients are overwritten by their dW GEMM; zero the rest
        // (unless accumulating micro-batches: then every backward op adds).
        let accumulate = self.accumulate;
        for lin in &mut self.linears {
            lin.accumulate = accumulate;
        }
        if !accumulate {
            for (i, li) in self.linear_of_tensor.iter().enumerate() {
                if li.is_none() {
                    self.grads[self.layout.range(i)].fill(0.0);
                }
            }
        } else {
            sp::count_accumulated_once(spc, &mut self.grads, &self.layout);
        }
        let specs = self.grad_groups();
        let fp8 = !self.wgrad_f32.is_empty();
        let keep = self.acts.keep_linear_inputs;
        let Model {
            be,
            params,
            grads,
            wgrad_f32,
            layout: lay,
            linears,
            acts: a,
            rope,
            inputs,
            targets,
            ..
        } = self;
        // FP8: each linear's dW GEMM writes f32 scratch, cast to E5M2 right after (the
        // tied head's part waits for the embedding's scatter-add at the end).
        let (head_scratch, block_scratch) = wgrad_f32.split_at_mut(if fp8 { d.v * c } else { 0 });
        let lay: &Layout = lay;
        let be: &dyn Backend = &**be;
        let p = |i: usize| &params[lay.range(i)];
        let (inputs, targets) = (&inputs[..n], &targets[..n]);
        // Flat buffer: [embeddings | block 0 | ... | block L-1 | final norm (+ head)].
        let (emb_g, rest) = grads.split_at_mut(specs[l_n + 1].range.end);
        let (blocks_g, head_g) = rest.split_at_mut(specs[0].range.start - emb_g.len());
        let mut block_g: Vec<&mut [f32]> = Vec::with_capacity(l_n);
        let mut tail = blocks_g;
        for spec in specs[1..=l_n].iter().rev() {
            let (g, t2) = tail.split_at_mut(spec.range.len());
            block_g.push(g);
            tail = t2;
        }
        let (block_lin, head_lin) = linears.split_at_mut(4 * l_n);
        let head = &mut head_lin[0];
        let mut block_lin: Vec<&mut [Linear]> = block_lin.chunks_mut(4).collect();
        // Range of tensor `i` inside the group that starts at flat offset `base`.
        let local = |i: usize, base: usize| {
            let r = lay.range(i);
            r.start - base..r.end - base
        };
        let head_base = specs[0].range.start;
        let tied = lay.head == lay.wte;

        // loss and LM head: dlogits[n,V] in place of the probabilities
        let dlogits = &mut a.logits[..n * d.v];
        if comm.is_none() {
            // (under TP the vocabulary-parallel cross-entropy left dlogits in the forward)
            be.softmax_xent_backward(dlogits, targets, 1.0 / n as f32);
        }
        let dlnf = &mut a.dln[..n * c];
        let dhead = if fp8 {
            &mut head_scratch[..]
        } else if tied {
            &mut emb_g[lay.range(lay.head)]
        } else {
            &mut head_g[local(lay.head, head_base)]
        };
        let lnf = match sp {
            true => sp_norm_full(&mut a.ln1, n * c),
            false => &a.lnf[..n * c],
        };
        let mut head_col = ColumnParallelLinear::new(&mut *head, comm, sp);
        head_col.backward(dlnf, dhead, None, dlogits, lnf, p(lay.head), n)?;
        let dlnf = head_col.input_grad(dlnf, &mut a.sp_a)?;
        let dres = &mut a.dresidual[..ns * c];
        dres.fill(0.0);
        let last = at(&a.residual3, l_n - 1, bts * c, ns * c);
        let (dw, db) = two_mut(
            head_g,
            local(lay.nfw, head_base),
            lay.nfb.map(|i| local(i, head_base)),
        );
        norm_backward(
            be,
            d.arch,
            dres,
            dw,
            db,
            dlnf,
            last,
            p(lay.nfw),
            &a.lnf_mean[..ns],
            &a.lnf_rstd[..ns],
        );
        let nf = [
            Some(local(lay.nfw, head_base)),
            lay.nfb.map(|i| local(i, head_base)),
        ];
        sp::reduce_partial_grads(spc, head_g, &nf)?;
        let head = if tied {
            on_final(FinalGrads {
                group: GradGroup::Head,
                offset: head_base,
                grads: head_g,
                linears: &mut [],
            });
            Some(head)
        } else {
            if fp8 {
                head.quantize_wgrad_acc(&mut head_scratch[..]);
            }
            on_final(FinalGrads {
                group: GradGroup::Head,
                offset: head_base,
                grads: head_g,
                linears: std::slice::from_mut(head),
            });
            None
        };

        for l in (0..l_n).rev() {
            let bp = lay.blocks[l];
            let lin = block_lin.pop().expect("one linear chunk per block");
            let grads = block_g.pop().expect("one gradient range per block");
            let base = specs[l_n - l].range.start;
            let residual = if l == 0 {
                &a.encoded[..ns * c]
            } else {
                at(&a.residual3, l - 1, bts * c, ns * c)
            };
            let rng = |i: usize| local(i, base);
            // MLP: dres is d(residual3) = d(fcproj), and flows on to residual2
            let dfch_act = &mut a.dfch_act[..n * f];
            let (dw, db) = two_mut(grads, rng(bp.fprojw), bp.fprojb.map(rng));
            let dw = wgrad_target(fp8, dw, block_scratch);
            RowParallelLinear::new(&mut lin[3], comm, sp).backward(
                dfch_act,
                dw,
                db,
                dres,
                &mut a.fcproj,
                at(&a.fch_act, l, in_stride(keep, bt * f), n * f),
                p(bp.fprojw),
                n,
            )?;
            if fp8 {
                let len = lin[3].c * lin[3].oc;
                lin[3].quantize_wgrad_acc(&mut block_scratch[..len]);
            }
            let fch = at(&a.fch, l, bt * fc, n * fc);
            let dfch = &mut a.dfch[..n * fc];
            match d.arch {
                Arch::Gpt2 => be.gelu_backward(dfch, fch, dfch_act),
                Arch::Llama => be.swiglu_backward(dfch, fch, dfch_act, f),
            }
            let dln = &mut a.dln[..n * c];
            let (dw, db) = two_mut(grads, rng(bp.fcw), bp.fcb.map(rng));
            let dw = wgrad_target(fp8, dw, block_scratch);
            let ln2 = match sp {
                true => sp_norm_full(&mut a.ln1, n * c),
                false => at(&a.ln2, l, in_stride(keep, bt * c), n * c),
            };
            let mut fc_col = ColumnParallelLinear::new(&mut lin[2], comm, sp);
            fc_col.backward(dln, dw, db, dfch, ln2, p(bp.fcw), n)?;
            if fp8 {
                let len = fc_col.lin.c * fc_col.lin.oc;
                fc_col.lin.quantize_wgrad_acc(&mut block_scratch[..len]);
            }
            let dln_s = fc_col.input_grad(dln, &mut a.sp_a)?;
            let (dw, db) = two_mut(grads, rng(bp.n2w), bp.n2b.map(rng));
            let residual2 = at(&a.residual2, l, bts * c, ns * c);
            norm_backward(
                be,
                d.arch,
                dres,
                dw,
                db,
                dln_s,
                residual2,
                p(bp.n2w),
                at(&a.ln2_mean, l, bts, ns),
                at(&a.ln2_rstd, l, bts, ns),
            );
            // attention: dres is now d(residual2) = d(attproj), and flows on to the input
            let datty = &mut a.datty[..n * ca];
            let (dw, db) = two_mut(grads, rng(bp.projw), bp.projb.map(rng));
            let dw = wgrad_target(fp8, dw, block_scratch);
            RowParallelLinear::new(&mut lin[1], comm, sp).backward(
                datty,
                dw,
                db,
                dres,
                &mut a.fcproj,
                at(&a.atty, l, in_stride(keep, bt * ca), n * ca),
                p(bp.projw),
                n,
            )?;
            if fp8 {
                let len = lin[1].c * lin[1].oc;
                lin[1].quantize_wgrad_acc(&mut block_scratch[..len]);
            }
            let qkv = at(&a.qkv, l, bt * 3 * ca, n * 3 * ca);
            let att = at(&a.att, l, d.b * d.h * d.t * d.t, b * d.h * t * t);
            let dqkv = &mut a.dqkv[..n * 3 * ca];
            be.attention_backward(dqkv, datty, qkv, att, t, ca, d.h);
            if d.arch == Arch::Llama {
                be.rope_backward(dqkv, rope, t, ca, d.h);
            }
            let (dw, db) = two_mut(grads, rng(bp.qkvw), bp.qkvb.map(rng));
            let dw = wgrad_target(fp8, dw, block_scratch);
            let ln1 = match sp {
                true => sp_norm_full(&mut a.ln1, n * c),
                false => at(&a.ln1, l, in_stride(keep, bt * c), n * c),
            };
            let mut qkv_col = ColumnParallelLinear::new(&mut lin[0], comm, sp);
            qkv_col.backward(dln, dw, db, dqkv, ln1, p(bp.qkvw), n)?;
            if fp8 {
                let len = qkv_col.lin.c * qkv_col.lin.oc;
                qkv_col.lin.quantize_wgrad_acc(&mut block_scratch[..len]);
            }
            let dln_s = qkv_col.input_grad(dln, &mut a.sp_a)?;
            let (dw, db) = two_mut(grads, rng(bp.n1w), bp.n1b.map(rng));
            norm_backward(
                be,
                d.arch,
                dres,
                dw,
                db,
                dln_s,
                residual,
                p(bp.n1w),
                at(&a.ln1_mean, l, bts, ns),
                at(&a.ln1_rstd, l, bts, ns),
            );
            let partial = [
                Some(rng(bp.n1w)),
                bp.n1b.map(rng),
                Some(rng(bp.n2w)),
                bp.n2b.map(rng),
                bp.projb.map(rng),
                bp.fprojb.map(rng),
            ];
            sp::reduce_partial_grads(spc, grads, &partial)?;
            on_final(FinalGrads {
                group: GradGroup::Block(l),
                offset: base,
                grads,
                linears: lin,
            });
        }
        let (dwte, dwpe) = two_mut(emb_g, lay.range(lay.wte), lay.wpe.map(|i| lay.range(i)));
        let dwte = if fp8 && tied {
            &mut head_scratch[..]
        } else {
            dwte
        };
        match tp_vocab {
            Some(v) => {
                let dres = sp::gather_rows(spc, dres, &mut a.dln)?;
                tp::embed_backward(dwte, dwpe, dres, inputs, v, t, c)
            }
            None => be.encoder_backward(dwte, dwpe, dres, inputs, t, c),
        }
        let linears: &mut [Linear] = match head {
            Some(head) => {
                // the tied LM head's gradient is final only now (embedding lookup added)
                if fp8 {
                    head.quantize_wgrad_acc(&mut head_scratch[..]);
                }
                std::slice::from_mut(head)
            }
            None => &mut [],
        };
        on_final(FinalGrads {
            group: GradGroup::Embedding,
            offset: 0,
            grads: emb_g,
            linears,
        });
        Ok(())
    }
}
