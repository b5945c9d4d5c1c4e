#!/usr/bin/env bash
# Install the system packages fp8lm's MPI build needs (OpenMPI, and libclang for the
# `mpi` crate's bindgen), if they are missing. Idempotent; needs root (or sudo) on Debian.
#
# libclang: bindgen (through clang-sys) loads `libclang.so`, `libclang.so.N` or
# `libclang-N.so[.M]`. A fresh Debian machine may carry `libclang-cpp.so.N` (the C++
# interface, a dependency of other LLVM packages) without any of those; it is not what
# bindgen loads, so it must not count. `scripts/test-setup.sh` checks exactly that.
set -euo pipefail

# Directories clang-sys searches on Linux (plus LIBCLANG_PATH when set).
libclang_dirs() {
  [ -n "${LIBCLANG_PATH:-}" ] && echo "$LIBCLANG_PATH"
  ls -d /usr/lib/llvm-*/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib /usr/local/lib 2>/dev/null || true
}
have_libclang() {
  local d f name
  while read -r d; do
    for f in "$d"/libclang.so "$d"/libclang.so.* "$d"/libclang-[0-9]*.so "$d"/libclang-[0-9]*.so.*; do
      [ -e "$f" ] || continue
      name=$(basename "$f")
      case "$name" in libclang-cpp*) continue ;; esac
      return 0
    done
  done < <(libclang_dirs)
  return 1
}

need_apt=()
command -v mpirun >/dev/null 2>&1 || need_apt+=(openmpi-bin)
[ -e /usr/lib/x86_64-linux-gnu/openmpi/include/mpi.h ] || [ -e /usr/include/x86_64-linux-gnu/openmpi/mpi.h ] \
  || ls /usr/lib/*/openmpi/include/mpi.h >/dev/null 2>&1 || need_apt+=(libopenmpi-dev)
have_libclang || need_apt+=(libclang-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing ${need_apt[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
have_libclang || { echo "setup: libclang (libclang.so or libclang-N.so) still missing after install" >&2; exit 1; }

# CUDA backend (feature `cuda`, built by CI's --all-features): NVRTC, the run-time CUDA C
# compiler, and the CUDA headers, from the Python package index. They need no GPU: the
# kernel-compile test (kernels/tests/cuda_nvrtc.rs) runs NVRTC on the CPU and fails if it
# cannot load it. The 13.x wheels match cudarc's `cuda-13020` feature (libnvrtc.so.13);
# they land in site-packages/nvidia/cu13/{lib,include}, where the backend looks for them.
have_nvrtc() {
  python3 - <<'PY' 2>/dev/null
import glob, site, sys
ds = site.getsitepackages() + [site.getusersitepackages()]
sys.exit(0 if any(glob.glob(d + "/nvidia/cu13/lib/libnvrtc.so.13*") for d in ds)
         and any(glob.glob(d + "/nvidia/cu13/include/cuda_runtime.h") for d in ds) else 1)
PY
}
if ! have_nvrtc; then
  if ! python3 -m pip --version >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "setup: installing python3-pip" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-pip >/dev/null
  fi
  echo "setup: installing nvidia-cuda-nvrtc and nvidia-cuda-runtime 13.2 (pip)" >&2
  python3 -m pip install -q --disable-pip-version-check "nvidia-cuda-nvrtc==13.2.78" "nvidia-cuda-runtime==13.2.75" \
    || python3 -m pip install -q --disable-pip-version-check --break-system-packages \
         "nvidia-cuda-nvrtc==13.2.78" "nvidia-cuda-runtime==13.2.75"
fi
have_nvrtc || { echo "setup: NVRTC (libnvrtc.so.13) still missing after pip install" >&2; exit 1; }
