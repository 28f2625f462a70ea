"""Target presets (JSON dicts, the only form TVM 0.27 accepts) and what a host can run."""
from __future__ import annotations

import os
import platform


class TargetError(ValueError):
    pass


def _host_x86_mcpu() -> str:
    try:
        import tvm
        cpu = tvm.target.codegen.llvm_get_system_cpu()
        if cpu and cpu != "generic":
            return cpu
    except Exception:  # older/newer API: fall back to a portable AVX2 baseline
        pass
    return "x86-64-v3"


def _num_cores() -> int:
    try:
        import psutil
        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except Exception:
        return os.cpu_count() or 1


# name -> (arch, description, function building the target dict)
PRESETS = {
    "x86": ("x86_64", "this machine's x86-64 CPU (LLVM host CPU detection)",
            lambda: {"kind": "llvm", "mcpu": _host_x86_mcpu(), "num-cores": _num_cores()}),
    "x86-avx2": ("x86_64", "portable x86-64 with AVX2/FMA (x86-64-v3)",
                 lambda: {"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": _num_cores()}),
    "x86-avx512": ("x86_64", "x86-64 with AVX-512 (x86-64-v4)",
                   lambda: {"kind": "llvm", "mcpu": "x86-64-v4", "num-cores": _num_cores()}),
}

UNSUPPORTED = {
    "vulkan": "this TVM build has no SPIR-V code generator (target.build.vulkan is missing); "
              "GPU targets are tracked in their own issue",
}


def preset(name: str) -> dict:
    """-> {"name", "arch", "target": dict}"""
    if name in UNSUPPORTED:
        raise TargetError(f"target {name!r} is not available: {UNSUPPORTED[name]}")
    if name not in PRESETS:
        raise TargetError(f"unknown target {name!r}; presets: {', '.join(PRESETS)}")
    arch, _desc, make = PRESETS[name]
    return {"name": name, "arch": arch, "target": make()}


def host_arch() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def check_runnable(arch: str, target_name: str) -> None:
    if arch != host_arch():
        raise TargetError(f"artifact was compiled for {target_name} ({arch}); this machine is {host_arch()}: "
                          "recompile with --target for this machine, or run it on a matching device")
