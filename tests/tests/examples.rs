//! The library's example loops (`examples/` at the repository root, built by this crate)
//! run as CI runs them: `custom_loop` directly, `custom_loop_dp` under `mpirun -n 2`
//! (feature `mpi`; without it, on two in-process ranks). Each example checks its own
//! claims (the loss bound, the bit-exact reload, identical replicas) and exits non-zero
//! naming what failed; these tests run them and also check that the checks ran.
//!
//! `cargo test` builds a package's examples next to its test binaries
//! (`target/<profile>/examples/`). A test filter such as `cargo test --test examples`
//! builds only the named test, so the examples may be missing (then the tests fail and
//! say how to build them; never a silent skip) or left from an earlier build.

use std::path::PathBuf;
use std::process::Command;

/// The built example `name`, next to this test binary (`target/<profile>/deps/..`).
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary lies in target/<profile>/deps")
        .join("examples");
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "example {name} is not built: {} does not exist. `cargo test -p fp8lm-tests` (no \
         --test filter) builds the examples, or build it first: cargo build --release -p \
         fp8lm-tests --all-features --example {name}",
        path.display()
    );
    path
}

#[test]
fn custom_loop_trains_saves_and_reloads_bit_for_bit() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("custom_loop_example");
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(example("custom_loop"))
        .args(["--steps", "1500", "--dir"])
        .arg(&dir)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("start the custom_loop example");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "custom_loop failed ({}):\n{text}",
        out.status
    );
    // What the example promises, each line printed only after its check passed.
    assert!(
        text.contains("identical bit for bit") && text.contains("ok: validation loss"),
        "custom_loop did not report its checks:\n{text}"
    );
    let ckpt = dir.join("step_00001500");
    assert!(
        ckpt.join("checkpoint.json").is_file() && ckpt.join("model.safetensors").is_file(),
        "no checkpoint at {}:\n{text}",
        ckpt.display()
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[cfg(feature = "mpi")]
#[test]
fn custom_loop_dp_under_mpirun_keeps_replicas_identical() {
    use fp8lm_collectives::mpirun::run_mpirun;
    let exe = example("custom_loop_dp");
    let o = run_mpirun(
        exe.to_str().expect("UTF-8 path"),
        2,
        &[],
        &[("RAYON_NUM_THREADS", "1")],
        std::time::Duration::from_secs(300),
    );
    // The job's OpenMPI session folders (see `mpirun_command`), left empty by OpenMPI.
    let prefix = format!("fp8lm-mpirun-{}-", std::process::id());
    if let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                std::fs::remove_dir_all(e.path()).ok();
            }
        }
    }
    let o = o.unwrap_or_else(|e| panic!("mpirun -n 2 custom_loop_dp: {e}"));
    assert!(o.success, "mpirun -n 2 custom_loop_dp failed:\n{}", o.text);
    assert!(
        o.text
            .contains("2 ranks (mpi): weights identical on every rank")
            && o.text.contains("ok: val"),
        "custom_loop_dp did not run on 2 MPI ranks or did not report its checks:\n{}",
        o.text
    );
}

/// Without MPI support the same example runs its two ranks as threads of one process.
#[cfg(not(feature = "mpi"))]
#[test]
fn custom_loop_dp_on_two_in_process_ranks_keeps_replicas_identical() {
    let out = Command::new(example("custom_loop_dp"))
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("start the custom_loop_dp example");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "custom_loop_dp failed ({}):\n{text}",
        out.status
    );
    assert!(
        text.contains("2 ranks (local): weights identical on every rank"),
        "custom_loop_dp did not report its checks:\n{text}"
    );
}
