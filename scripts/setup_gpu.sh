#!/usr/bin/env bash
# What the GPU targets need on a machine without a GPU (Debian/Ubuntu), for building and the tests:
#   - wgpu-py (pip, in the test extra) and Mesa's software Vulkan driver lavapipe (apt: mesa-vulkan-drivers),
#     on which the WGSL kernels of the webgpu target run
#   - the stub libcuda.so.1 (tvm_anyprec/targets/cuda_stub.c -> ~/.cache/tvm-anyprec/cuda_stub/), which lets
#     TVM's CUDA runtime load so `compile --target cuda-*` runs nvcc and embeds a fatbin; compile builds it
#     itself on first use, this only does it ahead of time
# nvcc (the CUDA toolkit, 12 or newer) is not installed here: install it from NVIDIA (CUDA_PATH or PATH).
# Safe to re-run. Needs root (or sudo) for apt; the rest runs as any user.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

"$PY" -c "import wgpu" 2>/dev/null || "$PY" -m pip install -q wgpu
if ! dpkg -s mesa-vulkan-drivers >/dev/null 2>&1; then
  echo "setup-gpu: apt-get install mesa-vulkan-drivers (lavapipe)"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mesa-vulkan-drivers >/dev/null
fi
"$PY" - <<'PY'
from tvm_anyprec.targets import cuda, webgpu
print("setup-gpu: stub libcuda.so.1 ->", cuda.build_stub())
print("setup-gpu: nvcc:", cuda.find_nvcc() or "not found (CUDA targets cannot be built here; the CUDA tests skip)")
try:
    print("setup-gpu: WebGPU adapter:", webgpu.adapter_name())
except webgpu.WebGPUUnavailable as e:
    print("setup-gpu: warning:", e)
PY
