//! Loading a [`RunConfig`]: TOML file, then `--set key=value` overrides, then validation.
//!
//! Why a tree walk instead of plain serde: serde's messages for a nested TOML table do
//! not name the full key path, and `--set` values arrive as untyped strings. So the user's
//! tree is checked against the tree of the defaults (every key exists there with its type):
//! unknown keys, wrong types and bad enum strings are reported as `key = value` plus what
//! is allowed, and `--set` strings are coerced to the type of the key they replace before
//! anything is deserialised.

use crate::config::{ConfigError, RunConfig};
use toml::{Table, Value};

/// String-valued keys with a closed set of values, checked before deserialising.
const ENUMS: &[(&str, &[&str])] = &[
    ("precision", &["fp32", "bf16", "fp8-o1", "fp8-o2", "fp8-o3"]),
    ("tokenizer", &["byte", "gpt2"]),
    ("model.arch", &["gpt2", "llama"]),
    ("fp8.recipe", &["delayed", "current", "block"]),
    ("fp8.block_rounding", &["power-of-two", "exact"]),
    ("dist.overlap", &["auto", "on", "off"]),
    ("dist.zero_partition", &["row-blocks", "whole-tensor"]),
    (
        "dist.fp8_allreduce.method",
        &["fp8lm", "fp8-prescale", "fp8-postscale"],
    ),
];

fn err(
    origin: &str,
    key: &str,
    value: impl std::fmt::Display,
    allowed: impl Into<String>,
) -> ConfigError {
    ConfigError {
        origin: origin.into(),
        key: key.into(),
        value: value.to_string(),
        allowed: allowed.into(),
    }
}

fn defaults_tree() -> Table {
    match Value::try_from(RunConfig::default()) {
        Ok(Value::Table(t)) => t,
        _ => unreachable!("RunConfig::default() serialises to a TOML table"),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a number",
        Value::Boolean(_) => "true or false",
        Value::Datetime(_) => "a datetime",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

fn keys_of(t: &Table, prefix: &str) -> String {
    let mut k: Vec<String> = t.keys().map(|k| join(prefix, k)).collect();
    k.sort();
    k.join(", ")
}

/// Check `user` against `defaults`: every key known, every value of the right type.
/// Integers are accepted (and converted) where a float is expected.
fn check_tree(
    user: &mut Table,
    defaults: &Table,
    prefix: &str,
    origin: &str,
) -> Result<(), ConfigError> {
    for (key, value) in user.iter_mut() {
        let path = join(prefix, key);
        let Some(default) = defaults.get(key) else {
            return Err(err(
                origin,
                &path,
                format!("{} (unknown key)", show(value)),
                format!("one of the known keys: {}", keys_of(defaults, prefix)),
            ));
        };
        match (default, &mut *value) {
            (Value::Table(d), Value::Table(u)) => check_tree(u, d, &path, origin)?,
            (Value::Table(d), v) => {
                return Err(err(
                    origin,
                    &path,
                    show(v),
                    format!("a table with keys {}", keys_of(d, &path)),
                ))
            }
            (Value::Float(_), Value::Integer(i)) => *value = Value::Float(*i as f64),
            // Most integer keys are counts; signed ones (fp8.margin) are range-checked
            // later by validate(), which names the allowed range.
            (Value::Integer(_), Value::Integer(i)) if *i < 0 && path != "fp8.margin" => {
                return Err(err(origin, &path, *i, "an integer >= 0"));
            }
            (d, v) if std::mem::discriminant(d) != std::mem::discriminant(v) => {
                return Err(err(origin, &path, show(v), type_name(d)))
            }
            _ => {}
        }
        if let (Some((_, allowed)), Value::String(s)) =
            (ENUMS.iter().find(|(k, _)| *k == path), &*value)
        {
            if !allowed.contains(&s.as_str()) {
                let list: Vec<String> = allowed.iter().map(|a| format!("{a:?}")).collect();
                return Err(err(
                    origin,
                    &path,
                    show(value),
                    format!("one of {}", list.join(", ")),
                ));
            }
        }
    }
    Ok(())
}

/// Parse a `--set` value into the type of the key it replaces.
fn coerce(key: &str, raw: &str, default: &Value) -> Result<Value, ConfigError> {
    let origin = "--set";
    let raw_unquoted = raw
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .unwrap_or(raw);
    Ok(match default {
        Value::String(_) => Value::String(raw_unquoted.to_string()),
        Value::Integer(_) => Value::Integer(
            raw.trim()
                .parse::<i64>()
                .map_err(|_| err(origin, key, format!("{raw:?}"), "an integer"))?,
        ),
        Value::Float(_) => Value::Float(
            raw.trim()
                .parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .ok_or_else(|| err(origin, key, format!("{raw:?}"), "a finite number"))?,
        ),
        Value::Boolean(_) => Value::Boolean(match raw.trim() {
            "true" => true,
            "false" => false,
            _ => return Err(err(origin, key, format!("{raw:?}"), "true or false")),
        }),
        Value::Table(t) => {
            return Err(err(
                origin,
                key,
                format!("{raw:?}"),
                format!("set one of its keys instead: {}", keys_of(t, key)),
            ))
        }
        other => {
            // Arrays / datetimes: parse as a TOML expression.
            let parsed: Table = toml::from_str(&format!("v = {raw}"))
                .map_err(|_| err(origin, key, format!("{raw:?}"), type_name(other)))?;
            parsed["v"].clone()
        }
    })
}

/// Apply one `key=value` override to the tree.
fn apply_override(tree: &mut Table, defaults: &Table, kv: &str) -> Result<(), ConfigError> {
    let Some((key, raw)) = kv.split_once('=') else {
        return Err(err(
            "--set",
            kv,
            "(no `=`)",
            "key=value, e.g. --set model.layers=4",
        ));
    };
    let key = key.trim();
    let parts: Vec<&str> = key.split('.').collect();
    let mut d = defaults;
    let mut t = tree;
    for (i, part) in parts.iter().enumerate() {
        let prefix = parts[..i].join(".");
        let Some(dv) = d.get(*part) else {
            return Err(err(
                "--set",
                key,
                format!("{raw:?} (unknown key)"),
                format!("one of the known keys: {}", keys_of(d, &prefix)),
            ));
        };
        if i + 1 == parts.len() {
            let v = coerce(key, raw, dv)?;
            t.insert(part.to_string(), v);
            return Ok(());
        }
        let Value::Table(dt) = dv else {
            return Err(err(
                "--set",
                key,
                format!("{raw:?}"),
                format!(
                    "`{}` is not a table; did you mean --set {}={raw}?",
                    join(&prefix, part),
                    join(&prefix, part)
                ),
            ));
        };
        d = dt;
        let entry = t
            .entry(part.to_string())
            .or_insert_with(|| Value::Table(Table::new()));
        let Value::Table(next) = entry else {
            return Err(err("--set", key, format!("{raw:?}"), "a key under a table"));
        };
        t = next;
    }
    Ok(())
}

fn merge(base: &mut Table, over: Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(Value::Table(b)), Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Build a validated config from TOML text (empty = all defaults) and `--set` overrides.
/// `origin` names the text's source (a file name) in error messages.
pub fn load_config_str(
    text: &str,
    origin: &str,
    overrides: &[String],
) -> Result<RunConfig, ConfigError> {
    let mut tree: Table = toml::from_str(text).map_err(|e| {
        let msg = e.message().to_string();
        let line = e
            .span()
            .map(|s| {
                format!(
                    " (line {})",
                    text[..s.start.min(text.len())].lines().count().max(1)
                )
            })
            .unwrap_or_default();
        err(
            origin,
            "(syntax)",
            format!("not valid TOML{line}: {msg}"),
            "TOML: key = value lines, [table] headers",
        )
    })?;
    let defaults = defaults_tree();
    check_tree(&mut tree, &defaults, "", origin)?;
    for kv in overrides {
        apply_override(&mut tree, &defaults, kv)?;
    }
    check_tree(&mut tree, &defaults, "", "--set")?;
    // Lay the user's keys over the full default tree: a partial table such as `[data]`
    // must keep RunConfig::default()'s other values, not the sub-struct's own defaults.
    let mut full = defaults;
    merge(&mut full, tree);
    let cfg: RunConfig = Value::Table(full)
        .try_into()
        .map_err(|e: toml::de::Error| {
            err(origin, "(config)", e.message(), "see configs/example.toml")
        })?;
    cfg.validate().map_err(|mut e| {
        let from_set = overrides
            .iter()
            .any(|kv| kv.split_once('=').map(|(k, _)| k.trim()) == Some(e.key.as_str()));
        e.origin = if from_set {
            "--set".into()
        } else {
            origin.into()
        };
        e
    })?;
    Ok(cfg)
}

/// [`load_config_str`] on a file; `None` = defaults only.
pub fn load_config(
    path: Option<&std::path::Path>,
    overrides: &[String],
) -> Result<RunConfig, ConfigError> {
    match path {
        None => load_config_str("", "defaults", overrides),
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| {
                err(
                    &p.display().to_string(),
                    "--config",
                    format!("{:?} ({e})", p.display().to_string()),
                    "a readable TOML file",
                )
            })?;
            load_config_str(&text, &p.display().to_string(), overrides)
        }
    }
}

/// The resolved config as TOML (written to the run directory).
pub fn to_toml(cfg: &RunConfig) -> String {
    toml::to_string_pretty(cfg).unwrap_or_else(|e| format!("# could not serialise config: {e}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, sets: &[&str]) -> Result<RunConfig, ConfigError> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        load_config_str(text, "run.toml", &sets)
    }

    #[test]
    fn defaults_are_valid_and_round_trip() {
        let cfg = load("", &[]).unwrap();
        assert_eq!(cfg, RunConfig::default());
        let again = load(&to_toml(&cfg), &[]).unwrap();
        assert_eq!(again, cfg);
    }

    #[test]
    fn overrides_coerce_types_and_win_over_file() {
        let cfg = load(
            "max_steps = 10\n[optim]\nlr = 1\n[model]\nlayers = 3\n",
            &[
                "model.layers=4",
                "optim.lr=0.5",
                "precision=fp8-o2",
                "tokenizer=\"byte\"",
            ],
        )
        .unwrap();
        assert_eq!(cfg.max_steps, 10);
        assert_eq!(cfg.model.layers, 4);
        assert_eq!(cfg.optim.lr, 0.5);
        assert_eq!(cfg.precision, crate::Precision::Fp8O2);
    }

    #[test]
    fn unknown_key_is_named_with_alternatives() {
        let e = load("[model]\nlayer = 3\n", &[]).unwrap_err();
        assert_eq!(e.key, "model.layer");
        assert_eq!(e.origin, "run.toml");
        let msg = e.to_string();
        assert!(msg.contains("model.layers"), "{msg}");
        assert!(msg.contains("unknown key"), "{msg}");
        let e = load("", &["optim.learning_rate=3"]).unwrap_err();
        assert_eq!(
            (e.origin.as_str(), e.key.as_str()),
            ("--set", "optim.learning_rate")
        );
        assert!(e.allowed.contains("optim.lr"), "{e}");
    }

    #[test]
    fn wrong_types_are_named() {
        let e = load("max_steps = \"ten\"\n", &[]).unwrap_err();
        assert_eq!(e.key, "max_steps");
        assert!(
            e.value.contains("ten") && e.allowed.contains("integer"),
            "{e}"
        );
        let e = load("", &["batch=eight"]).unwrap_err();
        assert_eq!(e.key, "batch");
        assert!(e.to_string().contains("\"eight\""), "{e}");
        let e = load("model = 3\n", &[]).unwrap_err();
        assert!(e.allowed.contains("model.heads"), "{e}");
        let e = load("batch = -1\n", &[]).unwrap_err();
        assert!(e.allowed.contains(">= 0"), "{e}");
        let e = load("", &["optim.lr=fast"]).unwrap_err();
        assert_eq!(e.key, "optim.lr");
    }

    #[test]
    fn bad_enum_values_list_the_choices() {
        let e = load("precision = \"fp9\"\n", &[]).unwrap_err();
        assert_eq!(e.key, "precision");
        assert!(
            e.value.contains("fp9") && e.allowed.contains("fp8-o2"),
            "{e}"
        );
        let e = load("", &["tokenizer=sentencepiece"]).unwrap_err();
        assert!(e.allowed.contains("\"gpt2\""), "{e}");
    }

    #[test]
    fn dist_overlap_is_auto_on_or_off() {
        use crate::config::Overlap;
        assert_eq!(load("", &[]).unwrap().dist.overlap, Overlap::Auto);
        let c = load("[dist]\noverlap = \"off\"\n", &[]).unwrap();
        assert_eq!(c.dist.overlap, Overlap::Off);
        assert_eq!(
            load("", &["dist.overlap=on"]).unwrap().dist.overlap,
            Overlap::On
        );
        let e = load("[dist]\noverlap = true\n", &[]).unwrap_err();
        assert_eq!(e.key, "dist.overlap");
        let e = load("", &["dist.overlap=sometimes"]).unwrap_err();
        assert!(e.allowed.contains("\"auto\""), "{e}");
        // auto: on unless MPI busy-waits on a host with no core to spare
        assert!(Overlap::Auto.resolve("local", 1, 2));
        assert!(!Overlap::Auto.resolve("mpi", 1, 1));
        assert!(!Overlap::Auto.resolve("mpi", 2, 2));
        assert!(Overlap::Auto.resolve("mpi", 2, 1));
        assert!(Overlap::Auto.resolve("mpi", 8, 8));
        assert!(Overlap::On.resolve("mpi", 1, 1));
        assert!(!Overlap::Off.resolve("local", 64, 1));
    }

    #[test]
    fn impossible_values_are_rejected() {
        let e = load("[model]\nheads = 5\nchannels = 64\n", &[]).unwrap_err();
        assert_eq!((e.key.as_str(), e.value.as_str()), ("model.heads", "5"));
        assert!(e.allowed.contains("divisor of model.channels = 64"), "{e}");
        let e = load("batch = 0\n", &[]).unwrap_err();
        assert_eq!((e.key.as_str(), e.value.as_str()), ("batch", "0"));
        let e = load("", &["data.path=/no/such/file.bin"]).unwrap_err();
        assert_eq!(e.key, "data.path");
        assert_eq!(e.origin, "--set");
        assert!(
            e.value.contains("/no/such/file.bin") && e.value.contains("no such file"),
            "{e}"
        );
        let e = load("[optim]\nbeta2 = 1.0\n", &[]).unwrap_err();
        assert_eq!(e.key, "optim.beta2");
        let e = load("", &["model.vocab=100"]).unwrap_err();
        assert!(e.allowed.contains("256"), "{e}");
        let e = load("", &["tokenizer=gpt2"]).unwrap_err();
        assert_eq!(e.key, "data.path");
        assert!(e.allowed.contains("embedded corpus"), "{e}");
    }

    fn keys(t: &Table, prefix: &str, out: &mut Vec<String>) {
        for (k, v) in t {
            let p = join(prefix, k);
            match v {
                Value::Table(sub) => keys(sub, &p, out),
                _ => out.push(p),
            }
        }
    }

    #[test]
    fn shipped_configs_load_and_example_documents_every_key() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let example = std::fs::read_to_string(dir.join("example.toml")).unwrap();
        assert_eq!(
            load(&example, &[]).unwrap(),
            RunConfig::default(),
            "example.toml shows the defaults"
        );
        let (mut want, mut got) = (Vec::new(), Vec::new());
        keys(&defaults_tree(), "", &mut want);
        keys(&toml::from_str(&example).unwrap(), "", &mut got);
        want.sort();
        got.sort();
        assert_eq!(got, want, "configs/example.toml must list every key");
        let tiny = std::fs::read_to_string(dir.join("tiny.toml")).unwrap();
        let mut want = RunConfig::default();
        (want.max_steps, want.eval_every, want.checkpoint_every) = (2000, 250, 500);
        want.precision = crate::Precision::Fp8O2;
        assert_eq!(
            load(&tiny, &[]).unwrap(),
            want,
            "tiny.toml = the defaults in fp8-o2 with a longer run"
        );
        let gpt2 = std::fs::read_to_string(dir.join("gpt2-124m.toml")).unwrap();
        let e = load(&gpt2, &[]).unwrap_err();
        assert_eq!(e.key, "data.path", "{e}");
        let here = dir.join("gpt2-124m.toml").display().to_string();
        let cfg = load(&gpt2, &[format!("data.path={here}").as_str()]).unwrap();
        assert_eq!(
            (cfg.model.layers, cfg.model.channels, cfg.vocab()),
            (12, 768, 50304)
        );
    }

    #[test]
    fn syntax_errors_name_file_and_line() {
        let e = load("max_steps = 10\nseed = = 3\n", &[]).unwrap_err();
        assert_eq!(e.origin, "run.toml");
        assert!(e.value.contains("line 2"), "{e}");
        let e = load("", &["max_steps"]).unwrap_err();
        assert!(e.allowed.contains("key=value"), "{e}");
    }

    #[test]
    fn device_key_is_validated() {
        use crate::config::Device;
        assert_eq!(load("", &[]).unwrap().device, "cpu");
        for (v, want) in [
            ("cpu", Device::Cpu),
            ("cuda", Device::Cuda(0)),
            ("cuda:3", Device::Cuda(3)),
        ] {
            let cfg = load("", &[&format!("device={v}")]).unwrap();
            assert_eq!(Device::parse(&cfg.device), Ok(want));
        }
        for bad in [
            "gpu", "cuda:", "cuda:-1", "cuda:x", "cuda:+1", "CUDA", "cuda:1:2",
        ] {
            let e = load("", &[&format!("device={bad}")]).unwrap_err();
            assert_eq!(e.key, "device", "{bad}");
            assert_eq!(e.origin, "--set");
            assert!(e.to_string().contains("cuda:N"), "{e}");
        }
        let e = load("device = \"tpu\"\n", &[]).unwrap_err();
        assert_eq!((e.key.as_str(), e.origin.as_str()), ("device", "run.toml"));
    }

    #[test]
    fn dist_fp8_allreduce_and_zero_partition_keys() {
        let c = load(
            "[dist]\nzero_partition = \"whole-tensor\"\n[dist.fp8_allreduce]\nmax_mu = 0.5\n",
            &["dist.fp8_allreduce.method=fp8-postscale"],
        )
        .unwrap();
        assert_eq!(
            c.dist.zero_partition,
            crate::config::ZeroPartition::WholeTensor
        );
        let r = c.dist.fp8_allreduce.reducer_config();
        assert_eq!((r.method.name(), r.max_mu), ("fp8-postscale", 0.5));
        for (set, key) in [
            (
                "dist.fp8_allreduce.method=fp8-msamp",
                "dist.fp8_allreduce.method",
            ),
            ("dist.fp8_allreduce.max_mu=3", "dist.fp8_allreduce.max_mu"),
            (
                "dist.fp8_allreduce.growth_steps=0",
                "dist.fp8_allreduce.growth_steps",
            ),
            (
                "dist.fp8_allreduce.overflow_fraction=1.5",
                "dist.fp8_allreduce.overflow_fraction",
            ),
            ("dist.zero_partition=rows", "dist.zero_partition"),
        ] {
            let e = load("", &[set]).unwrap_err();
            assert_eq!(e.key, key, "{e}");
        }
    }

    #[test]
    fn tensor_parallel_keys_refuse_shapes_that_do_not_split() {
        let c = load("", &[]).unwrap();
        assert_eq!(
            (c.dist.tensor_parallel, c.dist.sequence_parallel),
            (1, false)
        );
        let c = load(
            "[model]\nheads = 4\nchannels = 64\ncontext = 32\n",
            &["dist.tensor_parallel=2", "dist.sequence_parallel=true"],
        )
        .unwrap();
        assert_eq!(
            (c.dist.tensor_parallel, c.dist.sequence_parallel),
            (2, true)
        );
        // (settings, key refused, text the error must contain)
        for (sets, key, text) in [
            (vec!["dist.tensor_parallel=0"], "dist.tensor_parallel", "0"),
            (
                vec!["dist.sequence_parallel=true"],
                "dist.sequence_parallel",
                "tensor_parallel = 1",
            ),
            (
                vec![
                    "model.heads=3",
                    "model.channels=48",
                    "dist.tensor_parallel=2",
                ],
                "model.heads",
                "3 does not",
            ),
            // byte tokenizer: 256 divides by 4 but not by 3 (and 3 divides 12 heads)
            (
                vec![
                    "model.heads=12",
                    "model.channels=48",
                    "dist.tensor_parallel=3",
                ],
                "model.vocab",
                "256 does not",
            ),
            (
                vec![
                    "model.vocab=300",
                    "model.heads=8",
                    "model.channels=64",
                    "dist.tensor_parallel=8",
                ],
                "model.vocab",
                "300 does not",
            ),
            // LLaMA: F = 8 * 64 / 3 = 170 rounded up to 176 = 5.5 x 32 (heads and 256 split)
            (
                vec![
                    "model.arch=llama",
                    "model.heads=32",
                    "model.channels=64",
                    "dist.tensor_parallel=32",
                ],
                "model.channels",
                "MLP width 176",
            ),
            (
                vec![
                    "model.heads=4",
                    "model.channels=64",
                    "model.context=30",
                    "dist.tensor_parallel=4",
                    "dist.sequence_parallel=true",
                ],
                "model.context",
                "30 does not",
            ),
        ] {
            let e = load("", &sets).unwrap_err();
            assert_eq!(e.key, key, "{sets:?}: {e}");
            assert!(e.to_string().contains(text), "{sets:?}: {e}");
        }
    }
}
