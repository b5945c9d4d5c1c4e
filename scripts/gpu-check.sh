#!/usr/bin/env bash
# The GPU suite of the CUDA backend. CI does not run it (.ci/run does not call it); run it
# by hand on a machine with an NVIDIA GPU (Ada sm_89 or Hopper sm_90+ for FP8 GEMMs;
# sm_90+ for NCCL FP8 reductions). Without a GPU it says that nothing ran and exits 2.
#
# It runs: (1) FP8 casts on the GPU bit-exact vs the CPU casts (all 65536 f16 patterns,
# the seeded f32 set, every format/mode, several scales); (2) each FP8 GEMM of a linear
# layer vs the CPU backend within the f32 accumulation bound; (3) layer ops vs the CPU;
# (4) the FP8-LM Adam kernel vs the host evaluation of the same expressions (bitwise);
# (5) NCCL on every GPU present: min-scale all-reduce, FP8 all-gather, the FP8-LM FP8
# all-reduce vs the exact mean; (6) FP8 GEMM throughput (TFLOP/s).
# NOT wired yet, reported as such: a training step of the small model on CUDA vs CPU,
# 20 steps fp8-o2 vs fp32 on CUDA, `fp8lm bench train` on the GPU. The model does not run
# on the CUDA backend yet.
set -uo pipefail
cd "$(dirname "$0")/.."

if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; } \
   && ! ls /dev/nvidia[0-9]* >/dev/null 2>&1; then
  echo "gpu-check: NOTHING RAN: no NVIDIA GPU or driver on this machine (no nvidia-smi GPU, no /dev/nvidiaN)."
  exit 2
fi

# NVRTC + headers (setup.sh), and cuBLASLt + NCCL from pip when the system has none.
bash scripts/setup.sh || { echo "gpu-check: setup failed: nothing ran"; exit 2; }
python3 -m pip install -q --disable-pip-version-check "nvidia-cublas==13.2.1.1" "nvidia-nccl-cu13==2.28.9" \
  || echo "gpu-check: could not pip-install cuBLASLt/NCCL; using the system's if present"

# cudarc 0.19 loads NCCL as `libnccl.so` (or libnccl.so.<CUDA major>), but the pip wheel
# ships only libnccl.so.2: give the loader a `libnccl.so` link (LD_LIBRARY_PATH is read at
# process start, so it is set here, not in the binary).
links="$PWD/target/cuda-lib-links"
mkdir -p "$links"
nccl=$(python3 -c "import glob, site; print(next(iter(sorted(f for d in site.getsitepackages() + [site.getusersitepackages()] for f in glob.glob(d + '/nvidia/nccl/lib/libnccl.so.2'))), ''))" 2>/dev/null)
[ -n "$nccl" ] && ln -sf "$nccl" "$links/libnccl.so"
export LD_LIBRARY_PATH="$links${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

status=0
run() {
  echo "== $*"
  "$@"
  local rc=$?
  if [ $rc -eq 2 ]; then echo "gpu-check: NOTHING RAN in: $*"; fi
  [ $rc -eq 0 ] || status=1
}
run cargo run --release -q -p fp8lm-kernels --features cuda --example gpu_check
run cargo run --release -q -p fp8lm-collectives --features cuda --example gpu_nccl_check
cargo run --release -q --features cuda -- devices

echo "== NOT RUN (not wired: the model does not run on the CUDA backend yet):"
echo "   one training step of the small model, CUDA vs CPU"
echo "   20 steps fp8-o2 vs fp32 loss on CUDA"
echo "   fp8lm bench train on the GPU (step time, memory)"
if [ $status -eq 0 ]; then
  echo "gpu-check: every check that is wired passed (see NOT RUN above)"
else
  echo "gpu-check: FAILED (see FAIL / NOTHING RAN lines above)"
fi
exit $status
