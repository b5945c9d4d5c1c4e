//! `fp8lm devices` and the `device` key, end to end. These hold on any machine: with or
//! without the `cuda` feature, with or without a GPU (the output says which).

mod common;
use common::{fp8lm, text};

#[test]
fn devices_lists_what_is_there_or_what_is_missing() {
    let o = fp8lm(&["devices"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("cpu"), "{t}");
    if cfg!(feature = "cuda") {
        // Every library gets a line: a version, or "missing" with the library's name.
        for (lib, file) in [
            ("driver", "libcuda"),
            ("NVRTC", "libnvrtc"),
            ("cuBLASLt", "libcublasLt"),
            ("NCCL", "libnccl"),
        ] {
            let line = t
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{lib}:")))
                .unwrap_or_else(|| panic!("no {lib} line:\n{t}"));
            assert!(!line.contains("missing") || line.contains(file), "{line}");
        }
        // NVRTC is installed by scripts/setup.sh, so it must be found.
        let nvrtc = t
            .lines()
            .find(|l| l.trim_start().starts_with("NVRTC:"))
            .unwrap();
        assert!(
            nvrtc.contains("13."),
            "NVRTC not found (run scripts/setup.sh): {nvrtc}"
        );
        // Either GPUs are listed or the output says why there are none.
        assert!(t.contains("cuda:0") || t.contains("no GPU"), "{t}");
    } else {
        assert!(t.contains("without the `cuda` cargo feature"), "{t}");
    }
}

#[test]
fn a_cuda_device_is_refused_at_start_with_the_reason() {
    let o = fp8lm(&["train", "--set", "device=cuda:0", "--set", "max_steps=1"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(t.contains("device = \"cuda:0\""), "{t}");
    let reason_given = t.contains("without the `cuda` feature")
        || t.contains("not found")
        || t.contains("reports no GPU");
    assert!(reason_given, "{t}");
    let bad = fp8lm(&["train", "--set", "device=gpu"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(text(&bad).contains("cuda:N"), "{}", text(&bad));
}
