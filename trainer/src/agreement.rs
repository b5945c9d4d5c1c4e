//! Start-up agreement between data-parallel ranks, beyond the config hash: ranks that
//! would train different things together are refused before the first step, with
//! messages that name each rank's value.
//!
//! - [`agree_config_keys`]: the resolved configs, key by key. A difference names the keys
//!   and every rank's value (`seed: rank 0 = 1337, rank 1 = 7`), not just two hashes.
//! - [`agree_start`]: the step the run starts at (its checkpoint's), the data position
//!   and a hash of the loaded weights. Ranks resuming different checkpoints (one
//!   `--resume D`, one `--resume D/checkpoints/step_40`) are refused naming each rank's
//!   step, instead of training different weights together until they hang.

use anyhow::{bail, Result};
use fp8lm_collectives::Communicator;
use std::collections::BTreeMap;

use crate::config::RunConfig;
use crate::Trainer;

fn comm_err(e: fp8lm_collectives::CommError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// Every rank's `mine`, of any length, in rank order.
pub fn all_gather_var(comm: &dyn Communicator, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
    let lens = comm
        .all_gather_bytes(&(mine.len() as u64).to_le_bytes())
        .map_err(comm_err)?;
    let lens: Vec<usize> = lens
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()) as usize)
        .collect();
    let max = lens.iter().copied().max().unwrap_or(0);
    let mut padded = mine.to_vec();
    padded.resize(max, 0);
    let all = comm.all_gather_bytes(&padded).map_err(comm_err)?;
    Ok(lens
        .iter()
        .enumerate()
        .map(|(r, &n)| all[r * max..r * max + n].to_vec())
        .collect())
}

/// `key -> value` of every leaf of a config (dotted keys).
fn flatten(cfg: &RunConfig) -> BTreeMap<String, String> {
    fn walk(t: &toml::Table, prefix: &str, out: &mut BTreeMap<String, String>) {
        for (k, v) in t {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                toml::Value::Table(sub) => walk(sub, &key, out),
                other => {
                    out.insert(key, other.to_string());
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    if let Ok(toml::Value::Table(t)) = toml::Value::try_from(cfg) {
        walk(&t, "", &mut out);
    }
    out
}

/// The keys on which `configs` (one per rank) differ, each with every rank's value.
pub fn config_differences(configs: &[BTreeMap<String, String>]) -> Vec<String> {
    let mut keys: Vec<&String> = configs.iter().flat_map(|c| c.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut out = Vec::new();
    for k in keys {
        let vals: Vec<Option<&String>> = configs.iter().map(|c| c.get(k)).collect();
        if vals.iter().all(|v| *v == vals[0]) {
            continue;
        }
        let each: Vec<String> = vals
            .iter()
            .enumerate()
            .map(|(r, v)| format!("rank {r} = {}", v.map_or("(absent)", |s| s.as_str())))
            .collect();
        out.push(format!("{k}: {}", each.join(", ")));
    }
    out
}

/// Refuse configs that differ between ranks, naming the keys and each rank's value.
pub fn agree_config_keys(comm: &dyn Communicator, cfg: &RunConfig) -> Result<()> {
    let mine = serde_json::to_vec(&flatten(cfg))?;
    let all = all_gather_var(comm, &mine)?;
    let configs: Vec<BTreeMap<String, String>> = all
        .iter()
        .map(|b| serde_json::from_slice(b).unwrap_or_default())
        .collect();
    let diffs = config_differences(&configs);
    if !diffs.is_empty() {
        bail!(
            "the ranks were started with different configs (every rank must run the same \
             config): {}",
            diffs.join("; ")
        );
    }
    Ok(())
}

/// A hash of the trainer's weights (the f32 values every layer reads), for agreement.
pub fn weights_hash(tr: &Trainer) -> u64 {
    let mut h = crc32fast::Hasher::new();
    let mut n = 0u64;
    for (meta, data) in tr.model().named_params() {
        h.update(meta.name.as_bytes());
        for v in data {
            h.update(&v.to_le_bytes());
        }
        n += data.len() as u64;
    }
    ((h.finalize() as u64) << 32) ^ n
}

/// Refuse ranks that start from different states: different steps (different
/// checkpoints), data positions or weights. Every message names each rank's value.
pub fn agree_start(
    comm: &dyn Communicator,
    step: u64,
    data_position: u64,
    weights: u64,
) -> Result<()> {
    let mut mine = Vec::with_capacity(24);
    for v in [step, data_position, weights] {
        mine.extend_from_slice(&v.to_le_bytes());
    }
    let all = comm.all_gather_bytes(&mine).map_err(comm_err)?;
    let per: Vec<[u64; 3]> = all
        .chunks_exact(24)
        .map(|c| {
            let g = |i: usize| u64::from_le_bytes(c[8 * i..8 * i + 8].try_into().unwrap());
            [g(0), g(1), g(2)]
        })
        .collect();
    let list = |i: usize, hex: bool| -> String {
        per.iter()
            .enumerate()
            .map(|(r, v)| {
                if hex {
                    format!("rank {r}: {:#018x}", v[i])
                } else {
                    format!("rank {r}: {}", v[i])
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let differs = |i: usize| per.iter().any(|v| v[i] != per[0][i]);
    if differs(0) {
        bail!(
            "the ranks start at different steps ({}): they loaded different checkpoints; \
             resume every rank from the same one",
            list(0, false)
        );
    }
    if differs(1) {
        bail!(
            "the ranks start at different data positions ({}) at step {}: they loaded \
             different checkpoints or data; resume every rank from the same one",
            list(1, false),
            step
        );
    }
    if differs(2) {
        bail!(
            "the ranks start from different weights at step {} (weight hashes {}): they \
             loaded different checkpoints; resume every rank from the same one",
            step,
            list(2, true)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fp8lm_collectives::run_ranks;

    #[test]
    fn differing_configs_name_keys_and_every_value() {
        let errs = run_ranks(3, |c| {
            let mut cfg = RunConfig::default();
            if c.rank() == 2 {
                cfg.seed = 7;
                cfg.model.layers = 3;
            }
            Ok::<_, fp8lm_collectives::CommError>(
                agree_config_keys(c, &cfg).map_err(|e| e.to_string()),
            )
        })
        .unwrap();
        for e in errs {
            let e = e.unwrap_err();
            assert!(
                e.contains("seed: rank 0 = 1337, rank 1 = 1337, rank 2 = 7")
                    && e.contains("model.layers: rank 0 = 2, rank 1 = 2, rank 2 = 3"),
                "{e}"
            );
            assert!(!e.contains("max_steps"), "only the differing keys: {e}");
        }
        let ok = run_ranks(2, |c| {
            Ok::<_, fp8lm_collectives::CommError>(
                agree_config_keys(c, &RunConfig::default()).is_ok(),
            )
        })
        .unwrap();
        assert_eq!(ok, vec![true, true]);
    }

    #[test]
    fn different_steps_positions_and_weights_are_refused_naming_each_rank() {
        let run = |vals: [[u64; 3]; 2]| {
            run_ranks(2, move |c| {
                let v = vals[c.rank()];
                Ok::<_, fp8lm_collectives::CommError>(
                    agree_start(c, v[0], v[1], v[2]).map_err(|e| e.to_string()),
                )
            })
            .unwrap()
        };
        let r = run([[40, 5, 9], [60, 7, 8]]);
        let e = r[0].as_ref().unwrap_err();
        assert!(
            e.contains("different steps (rank 0: 40, rank 1: 60)"),
            "{e}"
        );
        assert_eq!(r[0], r[1]);
        let e = run([[40, 5, 9], [40, 7, 9]])[1].clone().unwrap_err();
        assert!(e.contains("data positions (rank 0: 5, rank 1: 7)"), "{e}");
        let e = run([[40, 5, 9], [40, 5, 8]])[0].clone().unwrap_err();
        assert!(
            e.contains("different weights") && e.contains("0x0000000000000009"),
            "{e}"
        );
        assert!(run([[40, 5, 9], [40, 5, 9]]).iter().all(|r| r.is_ok()));
    }

    #[test]
    fn weights_hash_sees_one_changed_value() {
        let cfg = RunConfig::default();
        let mut tr = Trainer::new(&cfg, 256).unwrap();
        let h = weights_hash(&tr);
        assert_eq!(h, weights_hash(&Trainer::new(&cfg, 256).unwrap()));
        let (name, mut data) = {
            let (m, d) = tr.model().named_params().next().unwrap();
            (m.name.clone(), d.to_vec())
        };
        data[3] += 1e-6;
        tr.model_mut().set_param(&name, &data).unwrap();
        assert_ne!(h, weights_hash(&tr));
    }
}
