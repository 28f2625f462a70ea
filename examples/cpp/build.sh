#!/usr/bin/env bash
# Build the C++ example against the TVM runtime of the installed apache-tvm wheel (headers and
# libtvm_runtime.so / libtvm_ffi.so ship in the wheel). Usage: examples/cpp/build.sh [OUT_BINARY]
# Needs g++ (C++17) and the project's venv (or any python with apache-tvm installed) as $PYTHON.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
PYTHON=${PYTHON:-$here/../../.venv/bin/python}
out=${1:-$here/build/anyprec_generate}
read -r tvm_dir ffi_dir < <("$PYTHON" -c "import os, tvm, tvm_ffi; print(os.path.dirname(tvm.__file__), os.path.dirname(tvm_ffi.__file__))")
mkdir -p "$(dirname "$out")"
${CXX:-g++} -std=c++17 -O2 -o "$out" "$here/anyprec_generate.cc" \
  -I"$tvm_dir/include" -I"$ffi_dir/include" -I"$ffi_dir/3rdparty/dlpack/include" \
  -L"$tvm_dir/lib" -L"$ffi_dir/lib" -ltvm_runtime -ltvm_ffi \
  -Wl,-rpath,"$tvm_dir/lib" -Wl,-rpath,"$ffi_dir/lib"
echo "$out"
