//! The forward pass: embeddings, the blocks, the final norm, the LM head and the loss
//! (llm.c order; buffer shapes in the comments).

use super::*;

#[allow(clippy::too_many_arguments)]
fn norm_forward(
    be: &dyn Backend,
    arch: Arch,
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
) {
    match (arch, b) {
        (Arch::Gpt2, Some(b)) => be.layernorm_forward(out, mean, rstd, inp, w, b),
        _ => be.rmsnorm_forward(out, rstd, inp, w),
    }
}

impl Model {
    /// Logits of the last forward for row `row` (before softmax only when the forward
    /// had no targets).
    pub fn logits_row(&self, row: usize) -> &[f32] {
        &self.acts.logits[row * self.local.v..(row + 1) * self.local.v]
    }

    /// Forward over `inputs[b*t]` (token ids already checked `< V`). With targets, returns
    /// the mean loss (accumulated in f64) and readies `backward`; without, leaves logits.
    /// `record`: training forward (FP8 scaling histories advance).
    pub fn forward(
        &mut self,
        inputs: &[u32],
        targets: Option<&[u32]>,
        b: usize,
        t: usize,
        record: bool,
    ) -> Option<f32> {
        self.forward_ext(inputs, targets, b, t, record, None)
    }

    /// [`Model::forward`] for a model whose token embedding has no f32 copy (fp8-o2's
    /// tied embedding/LM head): `wte_f16` is the optimizer's FP16 master and its scale,
    /// decoded row by row (`f16 / scale`, exact: the f32 view the optimizer keeps).
    pub fn forward_ext(
        &mut self,
        inputs: &[u32],
        targets: Option<&[u32]>,
        b: usize,
        t: usize,
        record: bool,
        wte_f16: Option<(&[half::f16], f32)>,
    ) -> Option<f32> {
        self.forward_tp(inputs, targets, b, t, record, wte_f16, None)
            .expect("no collectives without tensor parallelism")
    }

    /// [`Model::forward_ext`] on a tensor-parallel rank: `comm` is its tensor-parallel
    /// group (required when [`Model::tp`] is set; its collectives' errors are returned).
    /// With targets, the vocabulary-parallel cross-entropy also leaves the gradient of
    /// the logits for the backward.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_tp(
        &mut self,
        inputs: &[u32],
        targets: Option<&[u32]>,
        b: usize,
        t: usize,
        record: bool,
        wte_f16: Option<(&[half::f16], f32)>,
        comm: Option<&dyn Communicator>,
    ) -> fp8lm_collectives::Result<Option<f32>> {
        let comm = tp_comm(self.tp, comm);
        let tp_vocab = self.tp.map(|s| s.vocab(&self.dims));
        let ca = self.attn_width();
        let (sp, spt) = self.sp_size();
        let d = self.local;
        assert!(
            b <= d.b && t <= d.t && inputs.len() == b * t,
            "forward: b={b} t={t} exceeds B={} T={}",
            d.b,
            d.t
        );
        let (n, c, l_n) = (b * t, d.c, d.l);
        let (fc, f) = (d.fc_out(), d.f);
        let bt = d.b * d.t; // per-layer stride unit
        let (ns, bts, ks) = sp_rows(n, bt, c, spt);
        let wte_stored = self.param_is_f32(self.layout.wte);
        let keep = self.acts.keep_linear_inputs;
        let Model {
            be,
            params,
            layout: lay,
            linears,
            acts: a,
            rope,
            wte_f16_units,
            ..
        } = self;
        let be: &dyn Backend = &**be;
        let p = |i: usize| &params[lay.range(i)];
        match (wte_stored, wte_f16) {
            (false, None) if tp_vocab.is_none() && wte_f16_units.is_some() => wte_f16_units
                .as_ref()
                .expect("checked")
                .encoder_forward(be, &mut a.encoded[..n * c], inputs, lay.wpe.map(p), t, c),
            _ if tp_vocab.is_some() => tp::embed_forward_model(
                comm.expect("tp_comm"),
                &mut a.encoded[..],
                inputs,
                tp_vocab.clone().expect("checked"),
                wte_stored.then(|| p(lay.wte)),
                wte_f16,
                lay.wpe.map(p),
                t,
                c,
                sp.then_some(&mut a.dln[..]),
            )?,
            (true, _) => be.encoder_forward(
                &mut a.encoded[..n * c],
                inputs,
                p(lay.wte),
                lay.wpe.map(p),
                t,
                c,
            ),
            (false, Some((wte, scale))) => be.encoder_forward_f16(
                &mut a.encoded[..n * c],
                inputs,
                wte,
                scale,
                lay.wpe.map(p),
                t,
                c,
            ),
            (false, None) => panic!(
                "forward: this model's token embedding is the optimizer's FP16 master; \
                 call forward_ext with it (Trainer does)"
            ),
        }
        for l in 0..l_n {
            let bp = lay.blocks[l];
            let lin = &mut linears[4 * l..4 * l + 4];
            let (done, cur) = a.residual3.split_at_mut(l * bts * c);
            let residual = if l == 0 {
                &a.encoded[..ns * c]
            } else {
                at(done, l - 1, bts * c, ns * c)
            };
            let (s_c, s_f) = (in_stride(keep, bt * c), in_stride(keep, bt * f));
            let s_a = in_stride(keep, bt * ca);
            let ln1 = match sp {
                true => sp_norm_full(&mut a.ln1, n * c),
                false => at_mut(&mut a.ln1, l, s_c, n * c),
            };
            let (ln1_mean, ln1_rstd) = (
                at_mut(&mut a.ln1_mean, l, bts, ns),
                at_mut(&mut a.ln1_rstd, l, bts, ns),
            );
            norm_forward(
                be,
                d.arch,
                sp::norm_out(sp, ln1, &mut a.sp_a, ks),
                ln1_mean,
                ln1_rstd,
                residual,
                p(bp.n1w),
                bp.n1b.map(p),
            );
            let qkv = at_mut(&mut a.qkv, l, bt * 3 * ca, n * 3 * ca);
            let (w, bias, sh) = (p(bp.qkvw), bp.qkvb.map(p), &a.sp_a[..ks]);
            ColumnParallelLinear::new(&mut lin[0], comm, sp)
                .forward(qkv, ln1, sh, w, bias, n, record)?;
            if d.arch == Arch::Llama {
                be.rope_forward(qkv, rope, t, ca, d.h);
            }
            let atty = at_mut(&mut a.atty, l, s_a, n * ca);
            let att = at_mut(&mut a.att, l, d.b * d.h * d.t * d.t, b * d.h * t * t);
            be.attention_forward(atty, att, qkv, t, ca, d.h);
            let attproj = RowParallelLinear::new(&mut lin[1], comm, sp).forward(
                &mut a.attproj[..n * c],
                &mut a.sp_b,
                atty,
                p(bp.projw),
                bp.projb.map(p),
                n,
                record,
            )?;
            let residual2 = at_mut(&mut a.residual2, l, bts * c, ns * c);
            be.residual_forward(residual2, residual, attproj);
            let ln2 = match sp {
                true => sp_norm_full(&mut a.ln1, n * c),
                false => at_mut(&mut a.ln2, l, s_c, n * c),
            };
            let (ln2_mean, ln2_rstd) = (
                at_mut(&mut a.ln2_mean, l, bts, ns),
                at_mut(&mut a.ln2_rstd, l, bts, ns),
            );
            norm_forward(
                be,
                d.arch,
                sp::norm_out(sp, ln2, &mut a.sp_a, ks),
                ln2_mean,
                ln2_rstd,
                residual2,
                p(bp.n2w),
                bp.n2b.map(p),
            );
            let fch = at_mut(&mut a.fch, l, bt * fc, n * fc);
            let (w, bias, sh) = (p(bp.fcw), bp.fcb.map(p), &a.sp_a[..ks]);
            ColumnParallelLinear::new(&mut lin[2], comm, sp)
                .forward(fch, ln2, sh, w, bias, n, record)?;
            let fch_act = at_mut(&mut a.fch_act, l, s_f, n * f);
            match d.arch {
                Arch::Gpt2 => be.gelu_forward(fch_act, fch),
                Arch::Llama => be.swiglu_forward(fch_act, fch, f),
            }
            let fcproj = RowParallelLinear::new(&mut lin[3], comm, sp).forward(
                &mut a.fcproj[..n * c],
                &mut a.sp_b,
                fch_act,
                p(bp.fprojw),
                bp.fprojb.map(p),
                n,
                record,
            )?;
            be.residual_forward(&mut cur[..ns * c], residual2, fcproj);
        }
        let last = at(&a.residual3, l_n - 1, bts * c, ns * c);
        let (lnf, lnf_mean, lnf_rstd) = (
            match sp {
                true => sp_norm_full(&mut a.ln1, n * c),
                false => &mut a.lnf[..n * c],
            },
            &mut a.lnf_mean[..ns],
            &mut a.lnf_rstd[..ns],
        );
        norm_forward(
            be,
            d.arch,
            sp::norm_out(sp, lnf, &mut a.sp_a, ks),
            lnf_mean,
            lnf_rstd,
            last,
            p(lay.nfw),
            lay.nfb.map(p),
        );
        let logits = &mut a.logits[..n * d.v];
        let (head, sh) = (&mut linears[4 * l_n], &a.sp_a[..ks]);
        ColumnParallelLinear::new(head, comm, sp).forward(
            logits,
            lnf,
            sh,
            p(lay.head),
            None,
            n,
            record,
        )?;
        let Some(targets) = targets else {
            return Ok(None);
        };
        assert_eq!(targets.len(), n);
        match (comm, tp_vocab) {
            (Some(comm), Some(v)) => crate::tensor_parallel::vocab_parallel_cross_entropy(
                comm,
                logits,
                v,
                targets,
                &mut a.losses[..n],
                1.0 / n as f32,
            )?,
            _ => be.softmax_xent_forward(logits, &mut a.losses[..n], targets),
        }
        self.inputs[..n].copy_from_slice(inputs);
        self.targets[..n].copy_from_slice(targets);
        self.last_bt = Some((b, t));
        Ok(Some(be.mean_f64(&a.losses[..n]) as f32))
    }
}
