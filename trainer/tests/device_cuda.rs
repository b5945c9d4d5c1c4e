//! `device = "cuda[:N]"` builds the model on the CUDA backend (`CudaStaged`) or says
//! exactly why it cannot: no CUDA support in this build, no driver, no such GPU. Never a
//! panic. On a machine with a GPU and the `cuda` feature the model is on "cuda".

use fp8lm_trainer::{RunConfig, Trainer};

fn cfg(device: &str, backend: &str) -> RunConfig {
    RunConfig {
        device: device.into(),
        backend: backend.into(),
        ..RunConfig::default()
    }
}

#[test]
fn a_cuda_device_gives_the_cuda_backend_or_a_named_reason() {
    match Trainer::new(&cfg("cuda:0", "cpu"), 64) {
        // Only a build with the feature can have built a CUDA model.
        #[cfg(feature = "cuda")]
        Ok(tr) => {
            assert_eq!(tr.model().backend().name(), "cuda");
        }
        #[cfg(not(feature = "cuda"))]
        Ok(_) => panic!("a CUDA model without the cuda feature"),
        Err(e) => {
            let s = format!("{e:#}");
            assert!(s.contains("device = \"cuda:0\""), "{s}");
            if cfg!(feature = "cuda") {
                // The library or the GPU that is missing, by name.
                assert!(
                    s.contains("not found") || s.contains("no GPU") || s.contains("only"),
                    "{s}"
                );
            } else {
                assert!(s.contains("no CUDA support"), "{s}");
            }
        }
    }
}

#[test]
fn the_reference_backend_on_a_gpu_is_refused() {
    let e = match Trainer::new(&cfg("cuda", "reference"), 64) {
        Ok(_) => panic!("backend = reference with device = cuda was accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        e.contains("backend = \"reference\"") && e.contains("device = \"cuda\""),
        "{e}"
    );
}
