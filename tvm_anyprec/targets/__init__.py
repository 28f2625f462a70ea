"""Target presets (JSON dicts, the only form TVM 0.27 accepts) and what a host can run."""
from __future__ import annotations

import os
import platform


from ..errors import TargetError  # noqa: F401  (re-exported)


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


def _arm(mcpu: str, features: tuple) -> dict:
    # 4 cores: the boards these stand for (Raspberry Pi 4, phones' big cores, Graviton instances) have >= 4
    return {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": mcpu,
            "mattr": [f"+{f}" for f in features], "num-cores": 4}


# name -> (arch, description, function building the target dict)
PRESETS = {
    "x86": ("x86_64", "this machine's x86-64 CPU (LLVM host CPU detection)",
            lambda: {"kind": "llvm", "mcpu": _host_x86_mcpu(), "num-cores": _num_cores()}),
    "x86-avx2": ("x86_64", "portable x86-64 with AVX2/FMA (x86-64-v3)",
                 lambda: {"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": _num_cores()}),
    "x86-avx512": ("x86_64", "x86-64 with AVX-512 (x86-64-v4)",
                   lambda: {"kind": "llvm", "mcpu": "x86-64-v4", "num-cores": _num_cores()}),
    "arm-neon": ("aarch64", "aarch64 with NEON only, e.g. Cortex-A72 (Raspberry Pi 4)",
                 lambda: _arm("cortex-a72", ("neon",))),
    "arm-dotprod": ("aarch64", "aarch64 with the dot-product extension (sdot), e.g. Cortex-A76 (Snapdragon 855+)",
                    lambda: _arm("cortex-a76", ("neon", "dotprod"))),
    "arm-i8mm": ("aarch64", "aarch64 with int8 matrix multiply (smmla), e.g. Neoverse V1 (Graviton 3)",
                 lambda: _arm("neoverse-v1", ("neon", "dotprod", "i8mm"))),
}

# aarch64 presets: the instruction-set features the kernels may use, and the qemu-aarch64 CPU model that has
# exactly those (qemu 7.2 has no Neoverse V1: "max" has i8mm, and more)
ARM_FEATURES = {"arm-neon": ("neon",), "arm-dotprod": ("neon", "dotprod"), "arm-i8mm": ("neon", "dotprod", "i8mm")}
QEMU_CPU = {"arm-neon": "cortex-a72", "arm-dotprod": "cortex-a76", "arm-i8mm": "max"}
ALIASES = {"aarch64": "arm-neon", "rpi4": "arm-neon", "cortex-a72": "arm-neon", "cortex-a76": "arm-dotprod",
           "neoverse-v1": "arm-i8mm", "graviton3": "arm-i8mm"}

# GPU presets: the device code's target; the host code is built for this machine (llvm). name -> (device,
# description, function building the target dict). Compiling for CUDA needs nvcc (targets/cuda.py).
def _cuda(arch: str) -> dict:
    return {"kind": "cuda", "arch": arch, "max_num_threads": 1024, "thread_warp_size": 32,
            "max_shared_memory_per_block": 49152, "host": {"kind": "llvm"}}


GPU_PRESETS = {
    "cuda-sm80": ("cuda", "NVIDIA Ampere (A100, sm_80) via nvcc", lambda: _cuda("sm_80")),
    "cuda-sm89": ("cuda", "NVIDIA Ada (L4, RTX 40xx, sm_89) via nvcc", lambda: _cuda("sm_89")),
    "cuda-sm90": ("cuda", "NVIDIA Hopper (H100, sm_90) via nvcc", lambda: _cuda("sm_90")),
    "webgpu": ("webgpu", "WebGPU (WGSL kernels; the model runs in a browser through TVM's web runtime)",
               lambda: {"kind": "webgpu", "host": {"kind": "llvm"}}),
    "vulkan": ("vulkan", "Vulkan (SPIR-V; needs a TVM built with Vulkan support)",
               lambda: {"kind": "vulkan", "host": {"kind": "llvm"}}),
}

UNSUPPORTED = {
    "vulkan": "this TVM build has no SPIR-V code generator (target.build.vulkan is missing)",
}
# what each needs from the TVM build; when it is there the target works (checked at call time)
UNSUPPORTED_NEEDS = {"vulkan": "target.build.vulkan"}
UNSUPPORTED_HINT = {
    "vulkan": "the apache-tvm wheel is built without Vulkan (USE_VULKAN=OFF): build TVM from source with "
              "-DUSE_VULKAN=ON, or use --target webgpu (WGSL) or a cuda-* preset",
}


def _unsupported(name: str) -> bool:
    need = UNSUPPORTED_NEEDS.get(name)
    if need is None:
        return name in UNSUPPORTED
    import tvm
    return tvm.get_global_func(need, allow_missing=True) is None


def preset(name: str) -> dict:
    """-> {"name", "arch", "target": dict[, "features", "qemu_cpu"][, "device"]}"""
    name = ALIASES.get(name, name)
    if name in UNSUPPORTED and _unsupported(name):
        hint = f"; {UNSUPPORTED_HINT[name]}" if name in UNSUPPORTED_HINT else ""
        raise TargetError(f"target {name!r} is not available: {UNSUPPORTED[name]}{hint}")
    if name in GPU_PRESETS:   # arch: the host code's (this machine's); the kernels run on "device"
        device, _desc, make = GPU_PRESETS[name]
        return {"name": name, "arch": host_arch(), "device": device, "target": make()}
    if name not in PRESETS:
        raise TargetError(f"unknown target {name!r}; presets: {', '.join(PRESETS)}, "
                          f"{', '.join(n for n in GPU_PRESETS if n not in UNSUPPORTED)}")
    arch, _desc, make = PRESETS[name]
    out = {"name": name, "arch": arch, "target": make()}
    if name in ARM_FEATURES:
        out.update(features=list(ARM_FEATURES[name]), qemu_cpu=QEMU_CPU[name])
    return out


def export_compiler(tp: dict):
    """fcompile for export_library: the host toolchain for x86, the aarch64 cross compiler for ARM."""
    if tp["arch"] == "aarch64" and host_arch() != "aarch64":
        from .arm import cross_compiler
        return cross_compiler()
    return None


def host_arch() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def check_runnable(arch: str, target_name: str) -> None:
    if arch != host_arch():
        hint = (" (or run it through RPC: Session(..., remote=...), CLI run --qemu / --rpc)"
                if arch == "aarch64" else "")
        raise TargetError(f"artifact was compiled for {target_name} ({arch}); this machine is {host_arch()}: "
                          f"recompile with --target for this machine, or run it on a matching device{hint}")


def local_device(tp: dict):
    """The device an artifact compiled for preset ``tp`` runs on here: the CPU, or CUDA GPU 0 / Vulkan device 0
    for a GPU artifact. Raises TargetError saying what is missing."""
    import tvm

    check_runnable(tp["arch"], tp["name"])
    device = tp.get("device")
    if device is None:
        return tvm.cpu()
    if device == "cuda":
        from .cuda import has_gpu
        if not has_gpu():
            raise TargetError(f"artifact was compiled for {tp['name']} (CUDA, {tp['target'].get('arch')}); this "
                              "machine has no usable CUDA GPU (no NVIDIA driver, or no device): run it on a "
                              "machine with an NVIDIA GPU and driver")
        return tvm.cuda(0)
    if device == "vulkan":
        if not (tvm.runtime.enabled("vulkan") and tvm.vulkan(0).exist):
            raise TargetError(f"artifact was compiled for {tp['name']}; this machine has no Vulkan device "
                              "usable by TVM's runtime")
        return tvm.vulkan(0)
    raise TargetError(f"artifact was compiled for {tp['name']}: its WGSL kernels run in a browser through TVM's "
                      "web runtime (tvm.js), not in this Python runtime")


def is_gpu(target) -> bool:
    """A ``tvm.target.Target`` whose kernels run on a GPU (CUDA, WebGPU, Vulkan)."""
    return "gpu" in [str(k) for k in target.keys]


def is_webgpu(target) -> bool:
    return str(target.kind.name) == "webgpu"
