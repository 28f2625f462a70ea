#!/usr/bin/env bash
# Install what the aarch64 target needs on an x86-64 Debian/Ubuntu machine, and build the emulated "board":
#   - Debian packages: qemu-user (qemu-aarch64), the aarch64 cross compilers (gcc/g++-aarch64-linux-gnu)
#   - $ARM_ROOT/sysroot: a minimal arm64 Debian userland with python3.11 (extracted from arm64 .debs, no chroot)
#   - $ARM_ROOT/site:    the aarch64 TVM runtime (apache-tvm + apache-tvm-ffi wheels for aarch64, the compiler
#                        library removed) and numpy, for the RPC server that runs under qemu-aarch64
# ARM_ROOT defaults to ./.arm (gitignored). Safe to re-run: finished steps are skipped. Needs root for apt
# (or sudo); the rest runs as any user.
set -euo pipefail
cd "$(dirname "$0")/.."
ARM_ROOT=${ARM_ROOT:-$PWD/.arm}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

need_pkgs=()
command -v qemu-aarch64 >/dev/null || need_pkgs+=(qemu-user)
command -v aarch64-linux-gnu-g++ >/dev/null || need_pkgs+=(gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  echo "setup-arm: dpkg --add-architecture arm64"
  $SUDO dpkg --add-architecture arm64
  UPDATE=1
fi
if [ ${#need_pkgs[@]} -gt 0 ] || [ -n "${UPDATE:-}" ]; then
  echo "setup-arm: apt-get install ${need_pkgs[*]:-(index only)}"
  $SUDO apt-get update -qq >/dev/null
  [ ${#need_pkgs[@]} -eq 0 ] || DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

PYV=3.11
if [ ! -x "$ARM_ROOT/sysroot/usr/bin/python$PYV" ]; then
  echo "setup-arm: arm64 sysroot with python$PYV -> $ARM_ROOT/sysroot"
  rm -rf "$ARM_ROOT/debs" "$ARM_ROOT/sysroot.tmp"
  mkdir -p "$ARM_ROOT/debs" "$ARM_ROOT/sysroot.tmp"
  pkgs="libc6 libgcc-s1 libstdc++6 python$PYV-minimal libpython$PYV-minimal libpython$PYV-stdlib libexpat1 zlib1g
        libffi8 libssl3 libbz2-1.0 liblzma5 libuuid1 libcrypt1 libsqlite3-0 libncursesw6 libtinfo6 libreadline8
        libnsl2 libtirpc3 libdb5.3 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 libcom-err2 libkeyutils1"
  (cd "$ARM_ROOT/debs" && apt-get download -q $(for p in $pkgs; do echo "$p:arm64"; done) media-types >/dev/null)
  for f in "$ARM_ROOT"/debs/*.deb; do dpkg -x "$f" "$ARM_ROOT/sysroot.tmp"; done
  rm -rf "$ARM_ROOT/debs"
  # Debian ships no .pyc: precompile the stdlib once (import under qemu ~3 s -> ~2 s)
  qemu-aarch64 -L "$ARM_ROOT/sysroot.tmp" "$ARM_ROOT/sysroot.tmp/usr/bin/python$PYV" -m compileall -q -j0 \
      "$ARM_ROOT/sysroot.tmp/usr/lib/python$PYV" >/dev/null 2>&1 || true
  rm -rf "$ARM_ROOT/sysroot" && mv "$ARM_ROOT/sysroot.tmp" "$ARM_ROOT/sysroot"
fi

if [ ! -f "$ARM_ROOT/site/.complete" ]; then
  # the same TVM runtime versions as the host (pyproject.toml pins them)
  TVM_V=$("$PY" -c "import importlib.metadata as m; print(m.version('apache-tvm'))")
  FFI_V=$("$PY" -c "import importlib.metadata as m; print(m.version('apache-tvm-ffi'))")
  echo "setup-arm: aarch64 apache-tvm==$TVM_V apache-tvm-ffi==$FFI_V -> $ARM_ROOT/site"
  rm -rf "$ARM_ROOT/site"
  "$PY" -m pip install -q --target "$ARM_ROOT/site" --no-deps --only-binary=:all: \
      --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 \
      --python-version $PYV --implementation cp --abi cp311 --abi abi3 \
      "apache-tvm==$TVM_V" "apache-tvm-ffi==$FFI_V" numpy ml_dtypes typing_extensions cloudpickle psutil 2>&1 \
      | grep -v -i 'warning\|notice' || true
  # runtime only on the device side (the compiler library is ~100 MB and never used there)
  rm -f "$ARM_ROOT"/site/tvm/lib/libtvm_compiler.so "$ARM_ROOT"/site/tvm/lib/libtvm_runtime_cuda.so
  touch "$ARM_ROOT/site/.complete"
fi
echo "setup-arm: done ($(du -sh "$ARM_ROOT" | cut -f1) in $ARM_ROOT; $(qemu-aarch64 --version | head -1))"
