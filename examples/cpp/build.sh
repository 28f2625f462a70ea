#!/usr/bin/env bash
# Build the C++ example against the TVM runtime of an apache-tvm wheel (headers and libtvm_runtime.so /
# libtvm_ffi.so ship in the wheel).
#   examples/cpp/build.sh [OUT_BINARY]                 this machine (the project's venv)
#   ARCH=aarch64 examples/cpp/build.sh [OUT_BINARY]    aarch64, with aarch64-linux-gnu-g++ against the aarch64
#                                                      runtime of scripts/setup_arm.sh (.arm/site); run it on
#                                                      the board, or here: examples/cpp/run_aarch64.sh BINARY ...
# Needs g++ (C++17) and the project's venv (or any python with apache-tvm installed) as $PYTHON.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
PYTHON=${PYTHON:-$here/../../.venv/bin/python}
ARCH=${ARCH:-$(uname -m)}
read -r tvm_dir ffi_dir < <("$PYTHON" -c "import os, tvm, tvm_ffi; print(os.path.dirname(tvm.__file__), os.path.dirname(tvm_ffi.__file__))")
inc=(-I"$tvm_dir/include" -I"$ffi_dir/include" -I"$ffi_dir/3rdparty/dlpack/include")
if [ "$ARCH" = aarch64 ] && [ "$(uname -m)" != aarch64 ]; then
  site=${TVM_ANYPREC_ARM_ROOT:-$here/../../.arm}/site
  [ -f "$site/tvm/lib/libtvm_runtime.so" ] || { echo "no aarch64 TVM runtime in $site: run scripts/setup_arm.sh" >&2; exit 2; }
  site=$(cd "$site" && pwd)
  CXX=${CXX:-aarch64-linux-gnu-g++}
  tvm_lib=$site/tvm/lib; ffi_lib=$site/tvm_ffi/lib
  out=${1:-$here/build/anyprec_generate.aarch64}
else
  tvm_lib=$tvm_dir/lib; ffi_lib=$ffi_dir/lib
  out=${1:-$here/build/anyprec_generate}
fi
mkdir -p "$(dirname "$out")"
${CXX:-g++} -std=c++17 -O2 -o "$out" "$here/anyprec_generate.cc" "${inc[@]}" \
  -L"$tvm_lib" -L"$ffi_lib" -ltvm_runtime -ltvm_ffi -Wl,-rpath,"$tvm_lib" -Wl,-rpath,"$ffi_lib"
echo "$out"
