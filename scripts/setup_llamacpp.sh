#!/usr/bin/env bash
# Optional: build llama.cpp's `llama-bench` as the benchmarks' peer (python -m benchmarks.llamacpp, bench).
# It comes from the PyPI llama-cpp-python sdist (its vendored llama.cpp, the same sources pip would build),
# configured with cmake for this CPU's instruction sets and built for the one target `llama-bench`.
#   LLAMA_CPP_PYTHON_VERSION   the sdist's version (default 0.3.36)
#   TVM_ANYPREC_LLAMACPP_DIR   where it goes (default <cache>/llamacpp; the binary: <dir>/build/bin/llama-bench)
# Needs cmake (>= 3.14) and a C/C++ compiler. About 5 minutes on 2 cores. Safe to re-run (skips a built binary).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
DIR=$("$PY" -c "from tvm_anyprec.env import llamacpp_dir; print(llamacpp_dir())")
BIN="$DIR/build/bin/llama-bench"
if [ -x "$BIN" ] && [ "$(cat "$DIR/VERSION" 2>/dev/null)" = "$VERSION" ] && "$BIN" --help >/dev/null 2>&1; then
  echo "setup-llamacpp: $BIN (llama-cpp-python $VERSION) is built"
  exit 0
fi
command -v cmake >/dev/null || { echo "setup-llamacpp: cmake not found (Debian: apt-get install cmake)" >&2; exit 1; }
mkdir -p "$DIR"
echo "setup-llamacpp: pip download llama-cpp-python==$VERSION (sdist)"
rm -rf "$DIR/sdist" && mkdir -p "$DIR/sdist"
"$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DIR/sdist"
tar -xzf "$DIR"/sdist/llama_cpp_python-*.tar.gz -C "$DIR/sdist"
SRC=$(echo "$DIR"/sdist/llama_cpp_python-*/vendor/llama.cpp)
[ -f "$SRC/CMakeLists.txt" ] || { echo "setup-llamacpp: no vendored llama.cpp in the sdist ($SRC)" >&2; exit 1; }
# The instruction sets from this CPU's flags (x86), AMX left out: -march=native (GGML_NATIVE) builds a binary
# that dies with SIGILL on KVM guests whose CPUID lists instructions the hypervisor does not enable.
ISA=()
if [ "$(uname -m)" = x86_64 ]; then
  flags=$(grep -m1 '^flags' /proc/cpuinfo)
  has() { [[ " $flags " == *" $1 "* ]]; }
  for f in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI avx512f:AVX512 \
           avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
    if has "${f%%:*}"; then ISA+=("-DGGML_${f##*:}=ON"); else ISA+=("-DGGML_${f##*:}=OFF"); fi
  done
  NATIVE=OFF
else
  NATIVE=ON
fi
echo "setup-llamacpp: cmake (llama-bench only; GGML_NATIVE=$NATIVE ${ISA[*]}) from $SRC"
rm -rf "$DIR/build"
cmake -S "$SRC" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=$NATIVE "${ISA[@]}" -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TOOLS=ON >"$DIR/cmake.log" 2>&1 || { tail -30 "$DIR/cmake.log" >&2; exit 1; }
cmake --build "$DIR/build" --target llama-bench -j "$(nproc)" >"$DIR/build.log" 2>&1 || { tail -30 "$DIR/build.log" >&2; exit 1; }
"$BIN" --help >/dev/null 2>&1 || { echo "setup-llamacpp: $BIN does not run on this CPU" >&2; exit 1; }
echo "$VERSION" >"$DIR/VERSION"
echo "setup-llamacpp: built $BIN"
