//! `fp8lm inspect`: what a checkpoint holds, tensor by tensor.

use anyhow::Result;
use fp8lm_trainer::checkpoint::{read_safetensors_file, Checkpoint, CkptTensor};
use std::collections::BTreeMap;
use std::path::Path;

fn human(bytes: usize) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.2} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
}

fn table(group: &str, tensors: &[CkptTensor]) {
    println!("\n{group}: {} tensors", tensors.len());
    println!(
        "  {:<40} {:<8} {:<16} {:>12} {:>10}",
        "name", "dtype", "shape", "scale", "bytes"
    );
    let mut by_dtype: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for t in tensors {
        let scale = t.scale.map_or("-".to_string(), |s| format!("{s:.4e}"));
        println!(
            "  {:<40} {:<8} {:<16} {:>12} {:>10}",
            t.name,
            t.dtype.name(),
            format!("{:?}", t.shape),
            scale,
            t.bytes.len()
        );
        let e = by_dtype.entry(t.dtype.name()).or_default();
        e.0 += t.numel();
        e.1 += t.bytes.len();
    }
    for (dt, (n, b)) in by_dtype {
        println!("  total {dt:<8} {n:>12} elements {:>12}", human(b));
    }
}

pub fn inspect(path: &Path) -> Result<()> {
    if path.extension().is_some_and(|e| e == "safetensors") && path.is_file() {
        let tensors = read_safetensors_file(path)?;
        table(&path.display().to_string(), &tensors);
        return Ok(());
    }
    let ck = Checkpoint::load(path)?;
    let m = &ck.meta;
    let c = &m.config;
    println!("checkpoint {}", ck.dir.display());
    println!("  format        {}", m.format);
    println!("  step          {}", m.step);
    println!("  precision     {}", c.precision.name());
    println!(
        "  model         {:?} L={} H={} C={} T={} V={}",
        c.model.arch,
        c.model.layers,
        c.model.heads,
        c.model.channels,
        c.model.context,
        c.vocab()
    );
    println!(
        "  data          {} (position {})",
        if c.data.path.is_empty() {
            "embedded corpus"
        } else {
            &c.data.path
        },
        m.data_position
    );
    println!("  rng state     {:#018x}", m.rng_state);
    if let Some(obj) = m.scaling.as_object() {
        println!("  fp8 scaling   {} scaling states", obj.len());
    }
    for (f, s) in &m.files {
        println!(
            "  file          {f}: {} (crc32 {}) verified",
            human(s.bytes as usize),
            s.crc32
        );
    }
    if let Some(idx) = &m.optimizer_shards {
        println!(
            "  optimizer     sharded over {} ranks (dp {} x tp {}), partition {}; each shard's tensors: fp8lm inspect <shard file>",
            idx.world_size, idx.dp, idx.tp, idx.partition
        );
        for e in &idx.shards {
            println!(
                "  shard         {}: rank {} (dp {}, tp {}), {} units, {} elements",
                e.file,
                e.rank,
                e.dp_rank,
                e.tp_rank,
                e.units.len(),
                e.units.iter().map(|u| u.numel).sum::<usize>()
            );
        }
    }
    if let Some(idx) = &m.tp_shards {
        println!(
            "  tensor par.   {} shards (grid dp {} x tp {}); each shard's tensors: fp8lm inspect <shard file>",
            idx.shards.len(),
            idx.dp,
            idx.tp
        );
        for e in &idx.shards {
            println!(
                "  shard         {}: rank {} (dp {}, tp {}), {} tensors",
                e.file,
                e.rank,
                e.dp_rank,
                e.tp_rank,
                e.tensors.len()
            );
        }
    }
    for (g, tensors) in &ck.groups {
        table(g, tensors);
    }
    Ok(())
}
