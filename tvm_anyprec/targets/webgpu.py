"""Run TVM-generated WGSL kernels from Python through wgpu-py (any WebGPU adapter: a GPU, or Mesa's
lavapipe software Vulkan driver, which is what the tests use on machines without a GPU).

TVM's webgpu codegen (``tvm.compile`` for {"kind": "webgpu"}) gives WGSL source per kernel; the browser
runtime (tvm's web/ package) launches it. This is the small host side of that for tests and checks:

* the storage buffers are bound by the names in the WGSL (``@binding(i) var<storage, ...> NAME_ptr``; TVM
  orders them by name, the runner reads the order from the source);
* the last binding is a uniform ``PODArgs``: the kernel's scalar arguments (none for our kernels), then
  ``packGridDimX`` (the number of blocks along x: threads of blocks past it return at once);
* the grid (blocks along x, y, z) is not in the WGSL: ``launch_grid`` reads it from the scheduled PrimFunc's
  blockIdx bindings.

    wgsl = webgpu_source(lib)                   # lib = tvm.compile(mod, target=WEBGPU_TARGET)
    out = run_wgsl(wgsl, {"X": x, "PLANES": p, "LUTS": l, "NBITS": nb, "Y": np.zeros(...)}, ["Y"], grid)
"""
from __future__ import annotations

from ..errors import WebGPUUnavailable  # noqa: F401  (re-exported)

import os
import re

import numpy as np

WEBGPU_TARGET = {"kind": "webgpu", "host": {"kind": "llvm"}}

_BINDING = re.compile(r"@binding\((\d+)\)\s+var<(storage|uniform)[^>]*>\s+(\w+)\s*:\s*([^;]+);")
_ENTRY = re.compile(r"@compute\s+@workgroup_size\(([^)]*)\)\s*fn\s+(\w+)\s*\(")
_POD = re.compile(r"struct\s+PODArgs\s*\{([^}]*)\}")


def webgpu_source(lib) -> str:
    """The WGSL of a module built for the webgpu target (an Executable or a runtime Module)."""
    mod = getattr(lib, "mod", lib)
    found = mod._collect_from_import_tree(lambda m: m.kind == "webgpu")
    if not found:
        raise ValueError("the module has no webgpu code (was it built for the webgpu target?)")
    return "\n".join(m.inspect_source() for m in found)


def split_kernels(wgsl: str) -> dict[str, str]:
    """{entry point: its WGSL}: TVM prints one shader per kernel, each after a '// Function: NAME' header."""
    parts = re.split(r"//-+\n// Function: (\w+)\n//-+\n", wgsl)
    if len(parts) == 1:
        return {m.group(2): wgsl for m in _ENTRY.finditer(wgsl)}
    out = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        if _ENTRY.search(body):
            out[name] = body
    return out


def launch_grid(func) -> tuple[int, int, int]:
    """Blocks along x, y, z of a scheduled PrimFunc (its blockIdx-bound loops; 1 where unbound)."""
    import tvm

    grid = {"blockIdx.x": 1, "blockIdx.y": 1, "blockIdx.z": 1}
    sch = tvm.s_tir.Schedule(func)             # (0.27 has no Python TIR visitor: walk the blocks' loops)
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        for loop in sch.get_loops(block):
            lp = sch.get(loop)
            tag = lp.thread_binding.thread_tag if lp.thread_binding is not None else None
            if tag in grid:
                grid[tag] = int(lp.extent)
    return grid["blockIdx.x"], grid["blockIdx.y"], grid["blockIdx.z"]


_device = None


def device():
    """The wgpu device (created once). Raises WebGPUUnavailable saying what is missing."""
    global _device
    if _device is not None:
        return _device
    os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")   # wgpu-native's Vulkan loader warns without it
    try:
        import wgpu
    except ImportError as e:
        raise WebGPUUnavailable("wgpu-py is not installed (pip install wgpu)") from e
    try:
        adapter = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
    except Exception as e:  # wgpu raises its own error types when no Vulkan/Metal/DX12 driver is found
        adapter, err = None, e
    else:
        err = None
    if adapter is None:
        raise WebGPUUnavailable(f"no WebGPU adapter ({err}); without a GPU install Mesa's software Vulkan "
                                "driver lavapipe (Debian/Ubuntu: apt-get install mesa-vulkan-drivers)")
    feats = [f for f in ("shader-f16",) if f in adapter.features]
    _device = adapter.request_device_sync(required_features=feats)
    return _device


def adapter_name() -> str:
    info = device().adapter.info
    return f"{info.get('device')} ({info.get('backend_type')}, {info.get('adapter_type')})"


def _pad4(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4) if b else b"\0\0\0\0"


class Prepared:
    """One kernel ready to dispatch: its pipeline compiled and its buffers bound (``run_wgsl``'s arguments)."""

    def __init__(self, wgsl: str, arrays: dict[str, np.ndarray], grid, entry: str | None = None, scalars=()):
        import wgpu

        kernels = split_kernels(wgsl)
        if entry is None:
            if len(kernels) != 1:
                raise ValueError(f"the WGSL has {len(kernels)} kernels ({', '.join(kernels)}): name the entry point")
            entry = next(iter(kernels))
        src = kernels[entry]
        self.dev = dev = device()
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.arrays = arrays
        U = wgpu.BufferUsage
        bufs, self.storage = {}, {}
        for m in _BINDING.finditer(src):
            idx, kind, name = int(m.group(1)), m.group(2), m.group(3)
            if kind == "uniform":
                fields = re.findall(r"(\w+)\s*:\s*(\w+)", _POD.search(src).group(1))
                if len(fields) != len(scalars) + 1 or fields[-1][0] != "packGridDimX":
                    raise ValueError(f"PODArgs {fields} does not match {len(scalars)} scalar(s) + packGridDimX")
                words = [np.array([v], {"i32": np.int32, "u32": np.uint32, "f32": np.float32}[t]).tobytes()
                         for (_, t), v in zip(fields[:-1], scalars)]
                pod = b"".join(words) + np.array([self.grid[0]], np.uint32).tobytes()
                pod += b"\0" * (-len(pod) % 16)
                bufs[idx] = dev.create_buffer_with_data(data=pod, usage=U.UNIFORM)
                continue
            pname = name[:-4] if name.endswith("_ptr") else name
            if pname not in arrays:
                raise KeyError(f"kernel {entry} binds {pname!r}; given: {', '.join(arrays)}")
            data = _pad4(np.ascontiguousarray(arrays[pname]).tobytes())
            bufs[idx] = dev.create_buffer_with_data(data=data, usage=U.STORAGE | U.COPY_SRC)
            self.storage[pname] = bufs[idx]
        shader = dev.create_shader_module(code=src)
        self.pipe = dev.create_compute_pipeline(layout="auto", compute={"module": shader, "entry_point": entry})
        self.group = dev.create_bind_group(layout=self.pipe.get_bind_group_layout(0), entries=[
            {"binding": i, "resource": {"buffer": b, "offset": 0, "size": b.size}} for i, b in sorted(bufs.items())])

    def dispatch(self, times: int = 1) -> None:
        enc = self.dev.create_command_encoder()
        for _ in range(times):
            cpass = enc.begin_compute_pass()
            cpass.set_pipeline(self.pipe)
            cpass.set_bind_group(0, self.group)
            cpass.dispatch_workgroups(*self.grid)
            cpass.end()
        self.dev.queue.submit([enc.finish()])

    def read(self, name: str) -> np.ndarray:
        ref = np.asarray(self.arrays[name])
        raw = self.dev.queue.read_buffer(self.storage[name])
        return np.frombuffer(raw, dtype=ref.dtype, count=ref.size).reshape(ref.shape).copy()

    def seconds(self, number: int = 3, repeat: int = 1) -> list[float]:
        """Mean seconds per dispatch, ``repeat`` times (each over ``number`` dispatches, after a warm-up),
        waiting for the queue to finish: wall-clock time of the adapter (lavapipe: CPU time)."""
        import time

        # reading a buffer back waits for the queue (wgpu-py 0.32's on_submitted_work_done_sync is broken);
        # the smallest one, so the copy costs next to nothing
        sync = min(self.storage, key=lambda n: self.storage[n].size)
        self.dispatch()
        self.read(sync)
        out = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            self.dispatch(number)
            self.read(sync)
            out.append((time.perf_counter() - t0) / number)
        return out


def run_wgsl(wgsl: str, arrays: dict[str, np.ndarray], outputs, grid, entry: str | None = None,
             scalars=()) -> dict[str, np.ndarray]:
    """Run one kernel: ``arrays`` by parameter name (inputs and output buffers with their shape and dtype),
    ``outputs`` the names to read back, ``grid`` (x[, y[, z]]) blocks, ``scalars`` the PODArgs values before
    packGridDimX (as int32/uint32/float32 in the WGSL order). Returns {output name: array}."""
    k = Prepared(wgsl, arrays, grid, entry, scalars)
    k.dispatch()
    return {name: k.read(name) for name in outputs}


def run_prim_func(func, arrays: dict[str, np.ndarray], outputs) -> dict[str, np.ndarray]:
    """Build a scheduled PrimFunc for WebGPU and run it (one kernel) with numpy buffers by parameter name."""
    import tvm

    f = func.with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": f}), target=tvm.target.Target(WEBGPU_TARGET))
    return run_wgsl(webgpu_source(lib), arrays, outputs, launch_grid(f))
