//! The standard Python `safetensors` package reads our checkpoints, with the standard
//! dtype names (F8_E4M3, F8_E5M2, F16, F32) and the values we wrote.
//!
//! Needs `python3`. If the `safetensors` module is missing the test tries
//! `pip install safetensors numpy` and fails with a clear message if that is impossible.
//! Without `python3` at all it fails too, unless FP8LM_SKIP_PYTHON=1 is set (then it says
//! loudly that it skipped), so CI never passes this check silently.

use fp8lm_trainer::checkpoint::{Checkpoint, CheckpointMeta, CkptDtype, CkptTensor, FORMAT};
use fp8lm_trainer::RunConfig;
use half::f16;
use std::collections::BTreeMap;
use std::process::Command;

const SCRIPT: &str = r#"
import json, sys, math
import numpy as np
import safetensors
from safetensors import safe_open

path, expect_path = sys.argv[1], sys.argv[2]
expect = json.load(open(expect_path))

def e4m3(b):
    s = -1.0 if b & 0x80 else 1.0
    e, m = (b >> 3) & 15, b & 7
    if e == 15 and m == 7: return float('nan')
    return s * (m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0**(e - 7))

def e5m2(b):
    s = -1.0 if b & 0x80 else 1.0
    e, m = (b >> 2) & 31, b & 3
    if e == 31: return s * float('inf') if m == 0 else float('nan')
    return s * (m / 4 * 2.0**-14 if e == 0 else (1 + m / 4) * 2.0**(e - 15))

# 1. The generic (framework-free) reader sees every tensor with its standard dtype.
with open(path, 'rb') as f:
    tensors = dict(safetensors.deserialize(f.read()))
for name, want in expect.items():
    t = tensors[name]
    assert t['dtype'] == want['dtype'], (name, t['dtype'], want['dtype'])
    assert list(t['shape']) == want['shape'], (name, t['shape'], want['shape'])
    raw = bytes(t['data'])
    if want['dtype'] in ('F8_E4M3', 'F8_E5M2'):
        dec = e4m3 if want['dtype'] == 'F8_E4M3' else e5m2
        scale = np.frombuffer(bytes(tensors[name + '.scale']['data']), dtype='<f4')[0]
        vals = [dec(b) / scale for b in raw]
    elif want['dtype'] == 'F16':
        vals = np.frombuffer(raw, dtype='<f2').astype(np.float64).tolist()
    else:
        vals = np.frombuffer(raw, dtype='<f4').astype(np.float64).tolist()
    assert len(vals) == len(want['values']), name
    for a, b in zip(vals, want['values']):
        b = float(b) if isinstance(b, str) else b
        assert (math.isnan(a) and b is None) or a == b, (name, a, b)

# 2. The numpy loader reads the non-FP8 tensors (numpy has no FP8 dtype) and the metadata.
with safe_open(path, framework='numpy') as f:
    meta = f.metadata()
    assert meta['fp8lm.format'] == 'fp8lm-checkpoint-v1', meta
    w = f.get_tensor('wte')
    assert w.dtype == np.float32 and list(w.shape) == expect['wte']['shape']
    assert w.reshape(-1).astype(np.float64).tolist() == expect['wte']['values']

# 3. With ml_dtypes (if installed) numpy views the FP8 bytes directly.
try:
    import ml_dtypes
    raw = bytes(tensors['h.0.w']['data'])
    v = np.frombuffer(raw, dtype=ml_dtypes.float8_e4m3fn).astype(np.float64)
    for a, b in zip(v.tolist(), [e4m3(b) for b in raw]):
        assert a == b or (math.isnan(a) and math.isnan(b)), (a, b)
    print('ml_dtypes cross-check ok')
except ImportError:
    print('ml_dtypes not installed: FP8 decoded by formula only')
print('OK', len(tensors), 'tensors')
"#;

fn python() -> Option<String> {
    for p in ["python3", "python"] {
        if Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Some(p.to_string());
        }
    }
    None
}

#[test]
fn python_safetensors_reads_our_checkpoint() {
    let Some(py) = python() else {
        if std::env::var("FP8LM_SKIP_PYTHON").as_deref() == Ok("1") {
            eprintln!(
                "SKIPPED (FP8LM_SKIP_PYTHON=1): python3 not found; checkpoint interop NOT checked"
            );
            return;
        }
        panic!("python3 not found: install Python 3 (with `pip install safetensors numpy`) or set FP8LM_SKIP_PYTHON=1 to skip this check explicitly");
    };
    let has = |py: &str| {
        Command::new(py)
            .args(["-c", "import safetensors, numpy"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !has(&py) {
        let out = Command::new(&py)
            .args(["-m", "pip", "install", "--quiet", "safetensors", "numpy"])
            .output();
        assert!(
            has(&py),
            "the Python `safetensors` package is missing and `{py} -m pip install safetensors numpy` failed: {:?}",
            out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        );
    }

    // Every FP8 bit pattern, including NaN and (E5M2) infinities, with non-trivial scales.
    let bits: Vec<u8> = (0..=255u8).collect();
    let h: Vec<f16> = [0.0f32, 1.0, -2.5, 65504.0, 6.1e-5, 3.0e-8]
        .iter()
        .map(|&x| f16::from_f32(x))
        .collect();
    let w: Vec<f32> = (0..12).map(|i| i as f32 * 0.1 - 0.55).collect();
    let tensors = vec![
        CkptTensor::f32("wte", &[3, 4], &w),
        CkptTensor::fp8("h.0.w", CkptDtype::F8E4M3, &[16, 16], &bits, 0.25),
        CkptTensor::fp8("h.0.dy", CkptDtype::F8E5M2, &[256], &bits, 4096.0),
        CkptTensor::f16("v", &[6], &h, None),
    ];
    let mut expect = serde_json::Map::new();
    for t in &tensors {
        let values: Vec<serde_json::Value> = t
            .to_f32()
            .unwrap()
            .iter()
            .map(|&v| {
                if v.is_nan() {
                    serde_json::Value::Null
                } else if v.is_infinite() {
                    // JSON has no infinity: the script reads "inf" / "-inf" with float().
                    serde_json::json!(if v > 0.0 { "inf" } else { "-inf" })
                } else {
                    serde_json::json!(v as f64)
                }
            })
            .collect();
        expect.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype.name(), "shape": t.shape, "values": values}),
        );
    }
    let meta = CheckpointMeta {
        format: FORMAT.into(),
        step: 7,
        config: RunConfig::default(),
        rng_state: 1,
        data_position: 2,
        scaling: serde_json::json!({}),
        extra: serde_json::json!({}),
        files: BTreeMap::new(),
        optimizer_shards: None,
        tp_shards: None,
    };
    let mut ck = Checkpoint::new(meta);
    ck.groups.insert("model".into(), tensors);
    let root = std::env::temp_dir().join(format!("fp8lm-pyst-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let dir = ck.save(&root, 1).unwrap();
    let expect_path = root.join("expect.json");
    std::fs::write(&expect_path, serde_json::to_string(&expect).unwrap()).unwrap();
    let script = root.join("check.py");
    std::fs::write(&script, SCRIPT).unwrap();
    let out = Command::new(&py)
        .arg(&script)
        .arg(dir.join("model.safetensors"))
        .arg(&expect_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("OK"),
        "Python safetensors check failed:\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{stdout}");
}
