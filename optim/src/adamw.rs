//! AdamW with fp32 state: the reference optimizer (16 bytes/parameter counting the f32
//! weights and gradients the trainer holds; 8 of them here, the two moments).
//!
//! Decoupled weight decay (Loshchilov & Hutter), applied only to tensors whose
//! [`ParamMeta::weight_decay`] is set (matrices), with bias-corrected moments. FP8
//! gradients ([`Grad::Fp8`]) are decoded on the fly (`real = stored / scale`), so an O1
//! run's FP8 weight gradients feed the same f32 update.

use crate::api::{AdamWHyper, Grad, Optimizer, ParamMeta, ParamOut, StateTensor};
use crate::update::{AdamWGrad, StepConsts, UpdateOps};
use fp8lm_fp8::cast::decode_table;
use rayon::prelude::*;

/// Elements per rayon task.
const CHUNK: usize = 8192;

pub struct AdamW {
    pub hyper: AdamWHyper,
    metas: Vec<ParamMeta>,
    m_f32: Vec<Vec<f32>>,
    v_f32: Vec<Vec<f32>>,
    /// Updates taken (for bias correction).
    t: u64,
}

impl AdamW {
    pub fn new(metas: &[ParamMeta], hyper: AdamWHyper) -> Self {
        AdamW {
            hyper,
            metas: metas.to_vec(),
            m_f32: metas.iter().map(|p| vec![0.0; p.numel()]).collect(),
            v_f32: metas.iter().map(|p| vec![0.0; p.numel()]).collect(),
            t: 0,
        }
    }

    pub fn steps_taken(&self) -> u64 {
        self.t
    }
}

/// The host AdamW over one chunk ([`crate::UpdateOps::adamw_chunk`] of
/// [`crate::HostUpdate`]): one monomorphised loop per gradient type, so the f32 one
/// vectorises.
pub(crate) fn host_chunk(
    p: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: AdamWGrad<'_>,
    k: &StepConsts,
    grad_scale: f32,
) {
    assert!(
        m.len() == p.len() && v.len() == p.len() && g.len() == p.len(),
        "AdamW chunk: lengths differ"
    );
    match g {
        AdamWGrad::F32(g) => apply(k, grad_scale, p, m, v, |j| g[j]),
        AdamWGrad::Fp8 {
            codes,
            format,
            scale,
        } => {
            // decode and descale folded into one 256-entry table (the same
            // `value / scale` division, done once per code)
            let mut table = *decode_table(format);
            table.iter_mut().for_each(|x| *x /= scale);
            // Decode a block into f32 first (a scalar gather), then run the update on
            // it: the update vectorises, which it cannot with a table lookup inside
            // (same values, same bits).
            const BLOCK: usize = 512;
            let mut gb = [0f32; BLOCK];
            for (((p, m), v), c) in p
                .chunks_mut(BLOCK)
                .zip(m.chunks_mut(BLOCK))
                .zip(v.chunks_mut(BLOCK))
                .zip(codes.chunks(BLOCK))
            {
                let gb = &mut gb[..c.len()];
                gb.iter_mut()
                    .zip(c)
                    .for_each(|(g, &c)| *g = table[c as usize]);
                apply(k, grad_scale, p, m, v, |j| gb[j]);
            }
        }
    }
}

/// The per-element update (the expressions [`crate::UpdateOps::adamw_chunk`] documents).
#[inline(always)]
fn apply(
    k: &StepConsts,
    grad_scale: f32,
    p: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    grad: impl Fn(usize) -> f32,
) {
    for j in 0..p.len() {
        let g = grad(j) * grad_scale;
        m[j] = k.b1 * m[j] + k.one_minus_b1 * g;
        v[j] = k.b2 * v[j] + k.one_minus_b2 * g * g;
        let upd = (m[j] * k.inv_bc1) / ((v[j] * k.inv_bc2).sqrt() + k.eps);
        p[j] -= k.lr * (upd + k.wd * p[j]);
    }
}

impl Optimizer for AdamW {
    fn step_on(
        &mut self,
        ops: &dyn UpdateOps,
        outs: &mut [ParamOut<'_>],
        grads: &[Grad<'_>],
        lr: f32,
        grad_scale: f32,
    ) {
        assert!(
            outs.len() == self.metas.len() && grads.len() == self.metas.len(),
            "AdamW::step: {} params / {} grads for {} tensors",
            outs.len(),
            grads.len(),
            self.metas.len()
        );
        self.t += 1;
        let h = self.hyper;
        let bc1 = 1.0 - (h.beta1 as f64).powi(self.t as i32);
        let bc2 = 1.0 - (h.beta2 as f64).powi(self.t as i32);
        let (inv_bc1, inv_bc2) = ((1.0 / bc1) as f32, (1.0 / bc2) as f32);
        for i in 0..self.metas.len() {
            let wd = if self.metas[i].weight_decay {
                h.weight_decay
            } else {
                0.0
            };
            let p: &mut [f32] = match &mut outs[i] {
                ParamOut::F32(p) => p,
                ParamOut::Fp8(_) => {
                    panic!("AdamW holds no master to write FP8 compute weights from")
                }
            };
            assert_eq!(
                p.len(),
                self.m_f32[i].len(),
                "AdamW::step: tensor {} length",
                self.metas[i].name
            );
            let k = StepConsts {
                b1: h.beta1,
                b2: h.beta2,
                one_minus_b1: 1.0 - h.beta1,
                one_minus_b2: 1.0 - h.beta2,
                inv_bc1,
                inv_bc2,
                eps: h.eps,
                lr,
                wd,
            };
            let grad = grads[i];
            p.par_chunks_mut(CHUNK)
                .zip(self.m_f32[i].par_chunks_mut(CHUNK))
                .zip(self.v_f32[i].par_chunks_mut(CHUNK))
                .enumerate()
                .for_each(|(ci, ((p, m), v))| {
                    let r = ci * CHUNK..ci * CHUNK + p.len();
                    let g = match grad {
                        Grad::F32(g) => AdamWGrad::F32(&g[r]),
                        Grad::Fp8(t) => AdamWGrad::Fp8 {
                            codes: &t.data[r],
                            format: t.format,
                            scale: t.scale,
                        },
                    };
                    ops.adamw_chunk(p, m, v, g, &k, grad_scale);
                });
        }
    }

    fn state_bytes(&self) -> usize {
        self.m_f32
            .iter()
            .chain(&self.v_f32)
            .map(|v| v.len() * 4)
            .sum()
    }

    fn export_state(&self) -> Vec<(String, StateTensor)> {
        let mut out = vec![("adamw.t".to_string(), StateTensor::Scalar(self.t as f64))];
        for (i, meta) in self.metas.iter().enumerate() {
            out.push((
                format!("adamw.m.{}", meta.name),
                StateTensor::F32(self.m_f32[i].clone()),
            ));
            out.push((
                format!("adamw.v.{}", meta.name),
                StateTensor::F32(self.v_f32[i].clone()),
            ));
        }
        out
    }

    fn visit_state<'a>(&'a self, f: &mut dyn FnMut(&str, crate::api::StateRef<'a>)) {
        use crate::api::StateRef;
        f("adamw.t", StateRef::Scalar(self.t as f64));
        for (i, meta) in self.metas.iter().enumerate() {
            f(
                &format!("adamw.m.{}", meta.name),
                StateRef::F32(&self.m_f32[i]),
            );
            f(
                &format!("adamw.v.{}", meta.name),
                StateRef::F32(&self.v_f32[i]),
            );
        }
    }

    fn import_state(&mut self, state: Vec<(String, StateTensor)>) -> Result<(), String> {
        let mut t = None;
        let mut m = vec![None; self.metas.len()];
        let mut v = vec![None; self.metas.len()];
        for (name, tensor) in state {
            if name == "adamw.t" {
                match tensor {
                    StateTensor::Scalar(x) if x >= 0.0 && x.fract() == 0.0 => t = Some(x as u64),
                    other => {
                        return Err(format!(
                            "adamw.t: expected a non-negative integer scalar, got {other:?}"
                        ))
                    }
                }
                continue;
            }
            let (slot, pname) = if let Some(p) = name.strip_prefix("adamw.m.") {
                (&mut m, p)
            } else if let Some(p) = name.strip_prefix("adamw.v.") {
                (&mut v, p)
            } else {
                return Err(format!("{name}: not an AdamW state entry"));
            };
            let idx = self
                .metas
                .iter()
                .position(|meta| meta.name == pname)
                .ok_or_else(|| format!("{name}: no parameter named {pname}"))?;
            match tensor {
                StateTensor::F32(data) if data.len() == self.metas[idx].numel() => {
                    slot[idx] = Some(data)
                }
                StateTensor::F32(data) => {
                    return Err(format!(
                        "{name}: {} elements, parameter has {}",
                        data.len(),
                        self.metas[idx].numel()
                    ))
                }
                _ => return Err(format!("{name}: expected an f32 tensor")),
            }
        }
        let t = t.ok_or("adamw.t: missing")?;
        for (i, meta) in self.metas.iter().enumerate() {
            if m[i].is_none() || v[i].is_none() {
                return Err(format!("adamw state for {}: missing m or v", meta.name));
            }
        }
        self.t = t;
        self.m_f32 = m.into_iter().map(Option::unwrap).collect();
        self.v_f32 = v.into_iter().map(Option::unwrap).collect();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fp8lm_fp8::{Fp8Format, ScaledFp8};

    fn metas() -> Vec<ParamMeta> {
        vec![
            ParamMeta {
                name: "w".into(),
                shape: vec![2, 3],
                weight_decay: true,
            },
            ParamMeta {
                name: "b".into(),
                shape: vec![3],
                weight_decay: false,
            },
        ]
    }

    /// Straight-line f64 AdamW for one element.
    fn reference(p0: f64, grads: &[f64], lr: f64, wd: f64, h: AdamWHyper) -> f64 {
        let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
        for (t, &g) in grads.iter().enumerate() {
            let t = t as i32 + 1;
            m = h.beta1 as f64 * m + (1.0 - h.beta1 as f64) * g;
            v = h.beta2 as f64 * v + (1.0 - h.beta2 as f64) * g * g;
            let mh = m / (1.0 - (h.beta1 as f64).powi(t));
            let vh = v / (1.0 - (h.beta2 as f64).powi(t));
            p -= lr * (mh / (vh.sqrt() + h.eps as f64) + wd * p);
        }
        p
    }

    #[test]
    fn matches_f64_reference_and_decays_matrices_only() {
        let h = AdamWHyper::default();
        let mut opt = AdamW::new(&metas(), h);
        let mut w = vec![0.5f32, -0.25, 1.0, 2.0, -1.0, 0.0];
        let mut b = vec![0.5f32, -0.25, 1.0];
        let gseq = [
            [0.1f32, -0.2, 0.3, 0.0, 1.0, -1.0],
            [0.05, 0.2, -0.3, 0.5, 1.0, 0.25],
        ];
        for g in &gseq {
            let gb = &g[..3];
            opt.step(
                &mut [&mut w, &mut b],
                &[Grad::F32(g), Grad::F32(gb)],
                1e-2,
                0.5,
            );
        }
        for j in 0..6 {
            let gs: Vec<f64> = gseq.iter().map(|g| g[j] as f64 * 0.5).collect();
            let want = reference([0.5, -0.25, 1.0, 2.0, -1.0, 0.0][j], &gs, 1e-2, 0.1, h);
            assert!(
                (w[j] as f64 - want).abs() < 1e-6,
                "w[{j}] {} vs {want}",
                w[j]
            );
        }
        for j in 0..3 {
            let gs: Vec<f64> = gseq.iter().map(|g| g[j] as f64 * 0.5).collect();
            let want = reference([0.5, -0.25, 1.0][j], &gs, 1e-2, 0.0, h);
            assert!(
                (b[j] as f64 - want).abs() < 1e-6,
                "b[{j}] {} vs {want}",
                b[j]
            );
        }
        assert_eq!(opt.state_bytes(), 9 * 8);
    }

    #[test]
    fn fp8_gradients_are_decoded_with_their_scale() {
        let g = [0.5f32, -0.25, 1.0, 0.125, -2.0, 0.0];
        let (g8, _) = ScaledFp8::quantize_current(&g, &[2, 3], Fp8Format::E5M2, 0);
        let (mut w1, mut w2) = (vec![1f32; 6], vec![1f32; 6]);
        let m1 = vec![metas()[0].clone()];
        let (mut a, mut b) = (
            AdamW::new(&m1, AdamWHyper::default()),
            AdamW::new(&m1, AdamWHyper::default()),
        );
        a.step(&mut [&mut w1], &[Grad::F32(&g)], 1e-2, 1.0);
        b.step(&mut [&mut w2], &[Grad::Fp8(&g8)], 1e-2, 1.0);
        assert_eq!(
            w1, w2,
            "these values are exact in E5M2, so the updates must be identical"
        );
    }

    /// The FP8 path decodes blocks into f32 before the (vectorised) update: over several
    /// chunks and a ragged tail it must equal the f32 path fed `value / scale` per code.
    #[test]
    fn fp8_block_decode_matches_f32_path_over_chunks() {
        let n = 2 * CHUNK + 777;
        let g: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 1001) as f32 - 500.0) * 1e-4)
            .collect();
        let (g8, _) = ScaledFp8::quantize_current(&g, &[n], Fp8Format::E5M2, 0);
        let table = decode_table(g8.format);
        let g_dec: Vec<f32> = g8
            .data
            .iter()
            .map(|&c| table[c as usize] / g8.scale)
            .collect();
        let m1 = vec![ParamMeta {
            name: "w".into(),
            shape: vec![n],
            weight_decay: true,
        }];
        let w0: Vec<f32> = (0..n).map(|i| (i % 13) as f32 * 0.01).collect();
        let (mut w1, mut w2) = (w0.clone(), w0);
        let (mut a, mut b) = (
            AdamW::new(&m1, AdamWHyper::default()),
            AdamW::new(&m1, AdamWHyper::default()),
        );
        for _ in 0..2 {
            a.step(&mut [&mut w1], &[Grad::F32(&g_dec)], 1e-2, 0.5);
            b.step(&mut [&mut w2], &[Grad::Fp8(&g8)], 1e-2, 0.5);
        }
        assert!(w1.iter().zip(&w2).all(|(x, y)| x.to_bits() == y.to_bits()));
    }

    #[test]
    fn state_round_trips_and_bad_state_is_named() {
        let mut a = AdamW::new(&metas(), AdamWHyper::default());
        let (mut w, mut b) = (vec![1f32; 6], vec![1f32; 3]);
        a.step(
            &mut [&mut w, &mut b],
            &[Grad::F32(&[1.0; 6]), Grad::F32(&[1.0; 3])],
            1e-2,
            1.0,
        );
        let st = a.export_state();
        let mut c = AdamW::new(&metas(), AdamWHyper::default());
        c.import_state(st.clone()).unwrap();
        assert_eq!(c.export_state(), st);
        let mut bad = st.clone();
        bad[1].1 = StateTensor::F32(vec![0.0; 2]);
        let err = c.import_state(bad).unwrap_err();
        assert!(
            err.contains("adamw.m.w") && err.contains("2 elements"),
            "{err}"
        );
        let mut missing = st;
        missing.pop();
        assert!(c.import_state(missing).unwrap_err().contains("b"));
    }
}
