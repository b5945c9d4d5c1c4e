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
