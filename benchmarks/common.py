"""Shared benchmark plumbing: thread pinning, timing statistics, cache flushing, machine description and a
disk cache of compiled kernels (so re-runs do not recompile)."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

DEFAULT_THREADS = 2
THREAD_ENV = ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def threads_from_argv(argv) -> int:
    """--threads N from a raw argv (read before argparse so the environment is set before numpy loads)."""
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return DEFAULT_THREADS


def pin_threads(n: int) -> None:
    """Fix every thread pool we use to n threads: TVM's (TVM_NUM_THREADS), numpy's OpenBLAS and OpenMP.
    Must run before numpy/TVM are imported; onnxruntime and torch get n explicitly where they are used."""
    for k in THREAD_ENV:
        os.environ[k] = str(n)


def thread_report() -> dict:
    return {k: os.environ.get(k) for k in THREAD_ENV}


# ----------------------------------------------------------------------------- timing
def stats(times) -> dict:
    ts = sorted(times)
    q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
    return {"median_s": statistics.median(ts), "min_s": ts[0], "max_s": ts[-1], "p25_s": q[0], "p75_s": q[2],
            "n": len(ts), "times_s": [round(t, 9) for t in times]}


def measure(fn, reps: int, warmup: int = 2, flush=None) -> dict:
    """Time ``fn()`` ``reps`` times (after ``warmup`` untimed calls); ``flush()`` runs before each timed call,
    outside the timed region. -> stats dict (seconds)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        if flush is not None:
            flush()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return stats(ts)


# ----------------------------------------------------------------------------- machine
def _lscpu() -> dict:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except Exception:  # no lscpu: the platform module's answer is all we have
        return {}
    info = {}
    for line in out.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            info[k.strip()] = v.strip()
    return info


def l3_bytes() -> int:
    """Last-level cache size from sysfs (0 when unknown)."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    best = 0
    for idx in base.glob("index*"):
        try:
            s = (idx / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
        best = max(best, int(s.rstrip("KMG")) * mult)
    return best


def machine_info(threads: int) -> dict:
    import numpy as np

    cpu = _lscpu()
    info = {
        "date": time.strftime("%Y-%m-%d"), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": platform.machine(), "cpu": cpu.get("Model name") or platform.processor(),
        "cores": os.cpu_count(), "threads_per_core": cpu.get("Thread(s) per core"),
        "hypervisor": cpu.get("Hypervisor vendor"), "l3_bytes": l3_bytes(),
        "flags_avx512f": "avx512f" in cpu.get("Flags", ""), "flags_avx2": "avx2" in cpu.get("Flags", ""),
        "python": platform.python_version(), "numpy": np.__version__,
        "threads": threads, "thread_env": thread_report(),
    }
    info["git"] = git_state()
    try:
        import psutil
        info["mem_bytes"] = psutil.virtual_memory().total
    except Exception:  # psutil is a dependency, but the report must not die on it
        pass
    for mod in ("tvm", "onnxruntime", "torch"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # a missing peer is reported, not fatal
            info[mod] = f"unavailable: {e}"
    try:
        import numpy as np  # noqa: F811
        cfg = np.show_config(mode="dicts")
        info["numpy_blas"] = cfg.get("Build Dependencies", {}).get("blas", {}).get("name")
    except Exception:  # older numpy: no dict mode
        pass
    return info


def git_state() -> dict:
    """The commit measured, and the source files that differed from it (uncommitted work is measured too)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "tvm_anyprec", "benchmarks"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.splitlines()
    except Exception as e:  # not a checkout
        return {"error": str(e)}
    return {"commit": head, "uncommitted": [line.strip() for line in dirty]}


# ----------------------------------------------------------------------------- compiled kernels
def kernel_cache_dir() -> Path:
    from tvm_anyprec.data import cache_dir

    d = cache_dir() / "bench-kernels"
    d.mkdir(parents=True, exist_ok=True)
    return d


def build_primfunc(func, target: dict, name: str):
    """Compile a PrimFunc (no global_symbol) for ``target`` -> callable. The shared library is cached on disk
    under a key of (TVMScript text, target, TVM version), so a re-run loads it instead of compiling."""
    import tvm

    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    key = hashlib.sha256((mod.script() + json.dumps(target, sort_keys=True) + tvm.__version__).encode()).hexdigest()
    path = kernel_cache_dir() / f"{name}-{key[:16]}.so"
    if not path.exists():
        ex = tvm.compile(mod, target=tvm.target.Target(target))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.so")
        ex.export_library(str(tmp))
        os.replace(tmp, path)
    return tvm.runtime.load_module(str(path))["main"]


def host_target(threads: int, mcpu: str | None = None) -> dict:
    """The compile pipeline's 'x86' preset (LLVM host CPU), with num-cores = the benchmark's thread count.
    ``mcpu``: compile for that CPU instead (e.g. "znver3": the AVX2 bodies on an AVX-512 host); it must be one whose
    instructions this host has (an instruction the CPU lacks kills the process)."""
    from tvm_anyprec.targets import preset

    t = dict(preset("x86")["target"])
    t["num-cores"] = threads
    if mcpu:
        t["mcpu"] = mcpu
    return t
