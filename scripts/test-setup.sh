#!/usr/bin/env bash
# Proves scripts/setup.sh detects a missing libclang the way bindgen sees it.
#
# In a private mount namespace, every directory that holds libclang shared objects is
# replaced by a view without them (but with libclang-cpp.so.N, as a fresh machine has it),
# and `apt-get` is replaced by a recorder that logs its arguments and installs nothing.
# setup.sh must then ask for libclang-dev. A second case, with libclang visible, must ask
# for nothing. Run by .ci/run after the real setup; needs root (unshare -m).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

if [ "${1:-}" != "--inside" ]; then
  fail=0
  for case_ in hidden visible; do
    log=$(mktemp)
    if ! unshare -m --propagation private bash "$0" --inside "$case_" "$log"; then
      echo "test-setup: $case_: setup.sh failed" >&2; fail=1
    fi
    asked=$(tr '\n' ' ' <"$log")
    if [ "$case_" = hidden ]; then
      grep -q 'install.*libclang-dev' "$log" || { echo "test-setup: libclang hidden, but setup asked apt-get for: '$asked'" >&2; fail=1; }
    else
      [ ! -s "$log" ] || { echo "test-setup: libclang present, but setup asked apt-get for: '$asked'" >&2; fail=1; }
    fi
    rm -f "$log"
  done
  [ $fail -eq 0 ] && echo "test-setup: 2 passed, 0 failed" || { echo "test-setup: failed" >&2; exit 1; }
  exit 0
fi

case_=$2 log=$3
fake=$(mktemp -d)
# The recorder: apt-get update is logged as nothing (harmless), install logs its packages.
cat >"$fake/apt-get" <<REC
#!/usr/bin/env bash
case "\$1" in update) ;; *) echo "\$*" >>"$log" ;; esac
REC
chmod +x "$fake/apt-get"

if [ "$case_" = hidden ]; then
  for d in /usr/lib/llvm-*/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib /usr/local/lib; do
    [ -d "$d" ] || continue
    ls "$d" | grep -E '^libclang(\.so|-[0-9])' | grep -qv '^libclang-cpp' || continue
    # Keep the original reachable elsewhere: the view's links point there, not at $d
    # (which the view is about to cover).
    orig=$(mktemp -d) view=$(mktemp -d)
    mount --bind "$d" "$orig"
    mount -t tmpfs tmpfs "$view"
    for e in "$d"/* "$d"/.[!.]*; do
      [ -e "$e" ] || [ -L "$e" ] || continue
      n=$(basename "$e")
      case "$n" in libclang-cpp*) ;; libclang.so*|libclang-[0-9]*) continue ;; esac
      if [ -L "$e" ]; then
        # Keep links as they are, relative ones anchored at $d (they resolve through
        # the views, so a link to a hidden libclang stays dangling, as intended).
        t=$(readlink "$e"); case "$t" in /*) ;; *) t="$d/$t" ;; esac
        ln -s "$t" "$view/$n"
      else
        ln -s "$orig/$n" "$view/$n"
      fi
    done
    # A fresh machine's libclang-cpp, present or simulated: it must not count.
    [ -e "$view/libclang-cpp.so.14" ] || touch "$view/libclang-cpp.so.14"
    mount --bind "$view" "$d"
  done
fi
# Hide the real apt-get behind the recorder; mpirun and mpi.h are really installed, so
# a correct setup asks only for libclang-dev (hidden) or nothing (visible).
PATH="$fake:$PATH" LIBCLANG_PATH= bash "$here/setup.sh" || true
