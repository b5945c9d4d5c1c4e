//! Optimizer state across ZeRO partitions: the fp8-o3 checkpoint and its re-partitioning.
//!
//! fp8-o3 keeps each unit's optimizer state (a whole tensor, or a row block of a large
//! one, see [`fp8lm_optim::zero`]) on one owner rank. A checkpoint stores them unit by
//! unit, each with its own scale, exactly as the owners held them: each owner in its own
//! shard file, with the unit list in the shard index ([`crate::checkpoint::shard`]; older
//! checkpoints gathered every unit into `optimizer.safetensors` with the list in
//! `extra.zero_units`: name, tensor, element offset, length). So a resume on the same
//! number of ranks copies every unit's bytes back and continues bit for bit.
//!
//! With a different number of ranks, or on one process (whole tensors, as fp8-o2), the
//! units differ: the row blocks are cut to `1/(8N)` of the model. A unit whose name is
//! in the checkpoint is copied verbatim; any other is rebuilt from the checkpoint units
//! that overlap it: their states are decoded to f32 (exact: stored / power-of-two scale),
//! concatenated, and re-encoded in the unit's own format with the power-of-two scale of
//! the new amax (what `Fp8Adam` itself does after every step). Re-encoding with a scale
//! at most as large as a source block's is exact except for values pushed below the
//! format's normal range (FP8 E4M3 moments and FP16 states lose bits there: an absolute
//! error of at most half a subnormal spacing at the new scale). The prediction scalars
//! (`.amax`) become the rebuilt state's true amax; `update_amax` the max over the
//! sources (it only bounds the next step's provisional scale).

use anyhow::{anyhow, bail, Context, Result};
use fp8lm_fp8::cast::{amax_f32, f32_to_f16_amax, f32_to_fp8_amax};
use fp8lm_fp8::scaling::{scale_for_amax, ScaleRounding};
use fp8lm_fp8::{Fp8Format, ScaledFp8};
use fp8lm_optim::StateTensor;
use half::f16;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// One partition unit as the checkpoint records it: `numel` elements of tensor `tensor`
/// (index in the model layout) from element `offset`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitSpan {
    pub name: String,
    pub tensor: usize,
    pub offset: usize,
    pub numel: usize,
}

/// One named optimizer state entry, as `Optimizer::export_state` lists them.
pub type NamedState = (String, StateTensor);

/// Key of [`UnitSpan`]s in `CheckpointMeta::extra`.
pub const ZERO_UNITS_KEY: &str = "zero_units";

const STATES: [&str; 3] = ["master", "exp_avg", "exp_avg_sq"];

/// The real values of one state tensor (stored / scale; f32 as is).
pub fn state_values(st: &StateTensor) -> Vec<f32> {
    match st {
        StateTensor::F32(v) => v.clone(),
        StateTensor::F16 { data, scale } => data.iter().map(|x| x.to_f32() / scale).collect(),
        StateTensor::Fp8(t) => t.dequantize(),
        StateTensor::Scalar(x) => vec![*x as f32],
    }
}

fn pow2_scale(fmt_max: f32, amax: f32, fallback: f32) -> f32 {
    scale_for_amax(fmt_max, amax, 0, ScaleRounding::PowerOfTwo).unwrap_or(fallback)
}

/// `values` encoded like `template` (its format), with the power-of-two scale of their
/// amax (the template's scale when the amax is 0 or non-finite).
pub(crate) fn encode_like(template: &StateTensor, values: &[f32]) -> StateTensor {
    let amax = amax_f32(values);
    match template {
        StateTensor::F32(_) => StateTensor::F32(values.to_vec()),
        StateTensor::Scalar(_) => StateTensor::Scalar(values[0] as f64),
        StateTensor::F16 { scale, .. } => {
            let s = pow2_scale(65504.0, amax, *scale);
            let mut data = vec![f16::ZERO; values.len()];
            f32_to_f16_amax(values, s, &mut data);
            StateTensor::F16 { data, scale: s }
        }
        StateTensor::Fp8(t) => {
            let s = pow2_scale(t.format.max(), amax, t.scale);
            let mut data = vec![0u8; values.len()];
            f32_to_fp8_amax(t.format, values, s, &mut data);
            StateTensor::Fp8(ScaledFp8 {
                data,
                shape: t.shape.clone(),
                format: t.format,
                scale: s,
            })
        }
    }
}

fn scalar(map: &HashMap<&str, &StateTensor>, name: &str) -> Result<f64> {
    match map.get(name) {
        Some(StateTensor::Scalar(x)) => Ok(*x),
        Some(_) => bail!("optimizer state {name:?} in the checkpoint is not a scalar"),
        None => bail!("optimizer state {name:?} missing from the checkpoint"),
    }
}

/// Re-partition checkpointed optimizer state: `stored` holds the units `old` (entries
/// `step`, then `<unit>.<state>`, `<unit>.<state>.amax`, `<unit>.update_amax`);
/// `template` is the receiving optimizer's own `export_state()` for the units `new`.
/// Returns the entries for `template`, in its order (see the module docs).
pub fn repartition_state(
    stored: &[(String, StateTensor)],
    old: &[UnitSpan],
    template: &[(String, StateTensor)],
    new: &[UnitSpan],
) -> Result<Vec<(String, StateTensor)>> {
    let mut rebuilt = rebuild(stored, old, template, new)?;
    let map: HashMap<&str, &StateTensor> = stored.iter().map(|(n, s)| (n.as_str(), s)).collect();
    template
        .iter()
        .map(|(name, _)| {
            let st = match rebuilt.remove(name) {
                Some(st) => st,
                None => (*map.get(name.as_str()).with_context(|| {
                    format!("optimizer state {name:?} missing from the checkpoint")
                })?)
                .clone(),
            };
            Ok((name.clone(), st))
        })
        .collect()
}

/// [`repartition_state`] consuming `stored`: entries copied verbatim are moved, not
/// cloned, so a resuming rank holds its share once (what it read), not twice.
pub fn repartition_state_owned(
    stored: Vec<(String, StateTensor)>,
    old: &[UnitSpan],
    template: &[(String, StateTensor)],
    new: &[UnitSpan],
) -> Result<Vec<(String, StateTensor)>> {
    let mut rebuilt = rebuild(&stored, old, template, new)?;
    let mut by_name: HashMap<String, StateTensor> = stored.into_iter().collect();
    template
        .iter()
        .map(|(name, _)| {
            let st = match rebuilt.remove(name) {
                Some(st) => st,
                None => by_name.remove(name).with_context(|| {
                    format!("optimizer state {name:?} missing from the checkpoint")
                })?,
            };
            Ok((name.clone(), st))
        })
        .collect()
}

/// The entries of the units of `new` that are not stored under their own name, rebuilt
/// from the stored units that overlap them (see the module docs).
fn rebuild(
    stored: &[(String, StateTensor)],
    old: &[UnitSpan],
    template: &[(String, StateTensor)],
    new: &[UnitSpan],
) -> Result<HashMap<String, StateTensor>> {
    let map: HashMap<&str, &StateTensor> = stored.iter().map(|(n, s)| (n.as_str(), s)).collect();
    // Rebuilt entries, for units not stored under their own name.
    let mut rebuilt: HashMap<String, StateTensor> = HashMap::new();
    let tmpl: HashMap<&str, &StateTensor> = template.iter().map(|(n, s)| (n.as_str(), s)).collect();
    for u in new {
        let master = format!("{}.master", u.name);
        if map.contains_key(master.as_str()) {
            continue;
        }
        let srcs: Vec<&UnitSpan> = old
            .iter()
            .filter(|o| {
                o.tensor == u.tensor
                    && o.offset < u.offset + u.numel
                    && u.offset < o.offset + o.numel
            })
            .collect();
        let covered: usize = srcs
            .iter()
            .map(|o| (o.offset + o.numel).min(u.offset + u.numel) - o.offset.max(u.offset))
            .sum();
        if covered != u.numel {
            bail!(
                "optimizer state for {}: the checkpoint's units cover {covered} of its {} elements",
                u.name,
                u.numel
            );
        }
        let mut ratio = 0f64;
        for o in &srcs {
            ratio = ratio.max(scalar(&map, &format!("{}.update_amax", o.name))?);
        }
        for s in STATES {
            let mut vals = Vec::with_capacity(u.numel);
            for o in &srcs {
                let key = format!("{}.{s}", o.name);
                let st = map.get(key.as_str()).with_context(|| {
                    format!("optimizer state {key:?} missing from the checkpoint")
                })?;
                let v = state_values(st);
                if v.len() != o.numel {
                    bail!(
                        "optimizer state {key:?}: {} elements, unit {} has {}",
                        v.len(),
                        o.name,
                        o.numel
                    );
                }
                let lo = u.offset.max(o.offset) - o.offset;
                let hi = (u.offset + u.numel).min(o.offset + o.numel) - o.offset;
                vals.extend_from_slice(&v[lo..hi]);
            }
            let name = format!("{}.{s}", u.name);
            let t = tmpl
                .get(name.as_str())
                .ok_or_else(|| anyhow!("optimizer has no state {name:?}"))?;
            let enc = encode_like(t, &vals);
            rebuilt.insert(
                format!("{name}.amax"),
                StateTensor::Scalar(amax_f32(&vals) as f64),
            );
            rebuilt.insert(name, enc);
        }
        rebuilt.insert(
            format!("{}.update_amax", u.name),
            StateTensor::Scalar(ratio),
        );
    }
    Ok(rebuilt)
}

// ---- byte encoding of state lists (for gathering them over a communicator) --------

fn put(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u64).to_le_bytes());
    out.extend_from_slice(b);
}

/// Serialise state entries (little-endian, length-prefixed).
pub fn encode_states(states: &[(String, StateTensor)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(states.len() as u64).to_le_bytes());
    for (name, st) in states {
        put(&mut out, name.as_bytes());
        match st {
            StateTensor::F32(v) => {
                out.push(0);
                put(&mut out, bytemuck_f32(v).as_slice());
            }
            StateTensor::F16 { data, scale } => {
                out.push(1);
                out.extend_from_slice(&scale.to_le_bytes());
                let b: Vec<u8> = data
                    .iter()
                    .flat_map(|x| x.to_bits().to_le_bytes())
                    .collect();
                put(&mut out, &b);
            }
            StateTensor::Fp8(t) => {
                out.push(2);
                out.push(match t.format {
                    Fp8Format::E4M3 => 0,
                    Fp8Format::E5M2 => 1,
                });
                out.extend_from_slice(&t.scale.to_le_bytes());
                let dims: Vec<u8> = t
                    .shape
                    .iter()
                    .flat_map(|&d| (d as u64).to_le_bytes())
                    .collect();
                put(&mut out, &dims);
                put(&mut out, &t.data);
            }
            StateTensor::Scalar(x) => {
                out.push(3);
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
    out
}

fn bytemuck_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            bail!("optimizer state bytes truncated");
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn f32(&mut self) -> Result<f32> {
        Ok(f32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u64()? as usize;
        self.take(n)
    }
}

/// Inverse of [`encode_states`]; trailing bytes (padding) are ignored.
pub fn decode_states(bytes: &[u8]) -> Result<Vec<(String, StateTensor)>> {
    let mut r = Reader(bytes);
    let n = r.u64()? as usize;
    let mut out = Vec::with_capacity(n.min(1 << 20));
    for _ in 0..n {
        let name = String::from_utf8(r.bytes()?.to_vec())
            .map_err(|_| anyhow!("optimizer state name is not UTF-8"))?;
        let st = match r.take(1)?[0] {
            0 => StateTensor::F32(
                r.bytes()?
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            1 => {
                let scale = r.f32()?;
                let data = r
                    .bytes()?
                    .chunks_exact(2)
                    .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                    .collect();
                StateTensor::F16 { data, scale }
            }
            2 => {
                let format = match r.take(1)?[0] {
                    0 => Fp8Format::E4M3,
                    _ => Fp8Format::E5M2,
                };
                let scale = r.f32()?;
                let shape = r
                    .bytes()?
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap()) as usize)
                    .collect();
                let data = r.bytes()?.to_vec();
                StateTensor::Fp8(ScaledFp8 {
                    data,
                    shape,
                    format,
                    scale,
                })
            }
            3 => StateTensor::Scalar(f64::from_le_bytes(r.take(8)?.try_into().unwrap())),
            t => bail!("optimizer state {name:?}: unknown kind tag {t}"),
        };
        out.push((name, st));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_bytes_round_trip() {
        let states = vec![
            ("step".to_string(), StateTensor::Scalar(7.0)),
            ("a.master".into(), StateTensor::F32(vec![1.5, -2.0])),
            (
                "b.exp_avg_sq".into(),
                StateTensor::F16 {
                    data: vec![f16::from_f32(3.0), f16::from_f32(-0.5)],
                    scale: 8.0,
                },
            ),
            (
                "c.exp_avg".into(),
                StateTensor::Fp8(ScaledFp8 {
                    data: vec![1, 2, 200],
                    shape: vec![3, 1],
                    format: Fp8Format::E4M3,
                    scale: 0.25,
                }),
            ),
        ];
        let mut b = encode_states(&states);
        b.extend_from_slice(&[0; 9]); // padding is ignored
        assert_eq!(decode_states(&b).unwrap(), states);
        assert!(decode_states(&b[..10]).is_err());
    }

    /// Two FP8/FP16 row blocks merged into one unit and split again: values within the
    /// stated bound (half a subnormal spacing at the new scale), amax scalars exact.
    #[test]
    fn reblocking_keeps_values() {
        let vals: Vec<f32> = (0..40)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.013)
            .collect();
        let tmpl_m = StateTensor::Fp8(ScaledFp8 {
            data: vec![],
            shape: vec![],
            format: Fp8Format::E4M3,
            scale: 1.0,
        });
        let tmpl_v = StateTensor::F16 {
            data: vec![],
            scale: 1.0,
        };
        let old = vec![
            UnitSpan {
                name: "w[0..1]".into(),
                tensor: 0,
                offset: 0,
                numel: 16,
            },
            UnitSpan {
                name: "w[1..3]".into(),
                tensor: 0,
                offset: 16,
                numel: 24,
            },
        ];
        let mut stored = vec![("step".to_string(), StateTensor::Scalar(3.0))];
        for o in &old {
            let v = &vals[o.offset..o.offset + o.numel];
            stored.push((format!("{}.master", o.name), StateTensor::F32(v.to_vec())));
            stored.push((format!("{}.exp_avg", o.name), encode_like(&tmpl_m, v)));
            stored.push((format!("{}.exp_avg_sq", o.name), encode_like(&tmpl_v, v)));
            for s in STATES {
                stored.push((
                    format!("{}.{s}.amax", o.name),
                    StateTensor::Scalar(amax_f32(v) as f64),
                ));
            }
            stored.push((
                format!("{}.update_amax", o.name),
                StateTensor::Scalar(o.numel as f64),
            ));
        }
        let new = vec![UnitSpan {
            name: "w".into(),
            tensor: 0,
            offset: 0,
            numel: 40,
        }];
        let mut template = vec![("step".to_string(), StateTensor::Scalar(0.0))];
        template.push(("w.master".into(), StateTensor::F32(vec![])));
        template.push(("w.exp_avg".into(), tmpl_m.clone()));
        template.push(("w.exp_avg_sq".into(), tmpl_v.clone()));
        for s in STATES {
            template.push((format!("w.{s}.amax"), StateTensor::Scalar(0.0)));
        }
        template.push(("w.update_amax".into(), StateTensor::Scalar(0.0)));
        let got = repartition_state(&stored, &old, &template, &new).unwrap();
        assert_eq!(got.len(), template.len());
        assert_eq!(got[0].1, StateTensor::Scalar(3.0));
        assert_eq!(got[1].1, StateTensor::F32(vals.clone()));
        let amax = amax_f32(&vals);
        // Sources decoded from each block's own FP8/FP16 encoding.
        let src_m: Vec<f32> = stored
            .iter()
            .filter(|(n, _)| n.ends_with(".exp_avg"))
            .flat_map(|(_, s)| state_values(s))
            .collect();
        let m = state_values(&got[2].1);
        for (a, b) in m.iter().zip(&src_m) {
            // E4M3: half the smallest subnormal (2^-9) at the new scale, relative to 448.
            assert!(
                (a - b).abs() <= amax * 2f32.powi(-10) / 448.0 * 2.0,
                "{a} vs {b}"
            );
        }
        assert_eq!(got[4].1, StateTensor::Scalar(amax as f64));
        assert_eq!(got[7].1, StateTensor::Scalar(24.0));
        // And back to the two blocks: the master is exact.
        let back = repartition_state(&got, &new, &stored, &old).unwrap();
        assert_eq!(back[1].1, stored[1].1);
        // A unit the checkpoint does not cover is an error naming it.
        let wide = vec![UnitSpan {
            name: "w".into(),
            tensor: 0,
            offset: 0,
            numel: 41,
        }];
        let e = repartition_state(&stored, &old, &template, &wide).unwrap_err();
        assert!(e.to_string().contains("cover 40 of its 41"), "{e}");
    }
}
