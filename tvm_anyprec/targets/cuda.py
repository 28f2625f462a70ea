"""Building CUDA modules with nvcc, on machines with or without an NVIDIA driver.

TVM's CUDA runtime sidecar (lib/libtvm_runtime_cuda.so) needs libcuda.so.1. Without it (no driver) TVM
silently builds CUDA modules as *source only*: nvcc never runs and the exported library embeds CUDA C text.
``ensure_cuda_build()`` makes a real build possible in this process:

* where the sidecar loaded at ``import tvm`` (a driver is installed) it only sets the nvcc mode;
* otherwise it compiles a stub libcuda.so.1 (cuda_stub.c beside this file: every call returns
  CUDA_ERROR_NO_DEVICE) into ~/.cache/tvm-anyprec/cuda_stub/ (or $TVM_ANYPREC_CUDA_STUB_DIR), loads it
  globally (its soname satisfies the sidecar's dependency, so LD_LIBRARY_PATH is not needed) and then loads
  the sidecar, after which ``target.build.cuda`` runs nvcc (TVM_CUDA_COMPILE_MODE=nvcc) and embeds a fatbin.

scripts/setup_gpu.sh builds the same stub ahead of time.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

from ..env import cuda_stub_dir
from ..errors import TargetError

FATBIN_MAGIC = b"\x50\xed\x55\xba"   # fatbin header, what nvcc embeds for -fatbin
STUB_SRC = Path(__file__).with_name("cuda_stub.c")
_stub_handle = None


def stub_dir() -> Path:
    return cuda_stub_dir()


def find_nvcc() -> str | None:
    for c in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_PATH", "/usr/local/cuda"), "bin", "nvcc"),
              "/usr/local/cuda/bin/nvcc"):
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def build_stub(out_dir: Path | None = None) -> Path:
    """Compile cuda_stub.c into <out_dir>/libcuda.so.1 (skipped when up to date)."""
    out_dir = Path(out_dir) if out_dir is not None else stub_dir()
    lib = out_dir / "libcuda.so.1"
    if lib.exists() and lib.stat().st_mtime >= STUB_SRC.stat().st_mtime:
        return lib
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise TargetError("building for CUDA without an NVIDIA driver needs a C compiler (cc/gcc) to build the "
                          "stub libcuda.so.1; install gcc, or install the NVIDIA driver")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".libcuda.so.1.{os.getpid()}"
    r = subprocess.run([cc, "-shared", "-fPIC", "-O1", "-Wl,-soname,libcuda.so.1", "-o", str(tmp), str(STUB_SRC)],
                       capture_output=True, text=True)
    if r.returncode:
        raise TargetError(f"building the stub libcuda.so.1 failed:\n{r.stderr}")
    os.replace(tmp, lib)
    return lib


def _load_sidecar() -> None:
    from pathlib import Path as _P

    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    runtime_dir = _P(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(package="tvm", target_name="tvm_runtime_cuda",
                                                       extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL")


def ensure_cuda_build() -> str:
    """Make ``tvm.compile`` for a CUDA target produce a fatbin in this process. Returns how: "driver" (the
    CUDA runtime loaded with the real driver) or "stub". Raises TargetError naming what is missing."""
    global _stub_handle
    import tvm

    nvcc = find_nvcc()
    if nvcc is None:
        raise TargetError("compiling for CUDA needs nvcc (the CUDA toolkit, 12 or newer): none on PATH or in "
                          "$CUDA_PATH/bin; install it or set CUDA_PATH")
    os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"   # the default (nvrtc) needs the cuda-python bindings
    # a /usr/local/bin/nvcc link makes TVM guess /usr/local as the toolkit
    os.environ.setdefault("CUDA_PATH", str(Path(os.path.realpath(nvcc)).parent.parent))
    if shutil.which("nvcc") is None:
        os.environ["PATH"] = str(Path(nvcc).parent) + os.pathsep + os.environ.get("PATH", "")
    if tvm.runtime.enabled("cuda"):
        return "stub" if _stub_handle is not None else "driver"
    try:
        _stub_handle = ctypes.CDLL(str(build_stub()), mode=ctypes.RTLD_GLOBAL)
        _load_sidecar()
    except OSError as e:   # usually libcudart.so.13 (the CUDA 13 runtime) is not on the library path
        raise TargetError(f"cannot load TVM's CUDA runtime (libtvm_runtime_cuda.so): {e}; it needs the CUDA "
                          "runtime libcudart from the CUDA toolkit on the library path") from e
    if not tvm.runtime.enabled("cuda"):
        raise TargetError("TVM's CUDA runtime did not register after loading the stub driver")
    return "stub"


def has_gpu() -> bool:
    import tvm

    try:
        return bool(tvm.runtime.enabled("cuda") and tvm.cuda(0).exist)
    except Exception:  # the driver reports an error instead of "no device"
        return False
