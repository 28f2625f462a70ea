"""Every environment variable tvm-anyprec reads and every directory it uses, in one place.

No path here is relative to a source checkout unless one is found: an installed wheel keeps its tuning logs
and the emulated ARM board under the cache directory instead.

  TVM_ANYPREC_CACHE          cache directory (default ~/.cache/tvm-anyprec): text corpus, exported graphs
  TVM_ANYPREC_TUNING_LOGS    root of the tuning-record directories, one per target preset
                             (default: tuning_logs/ of the source checkout, else <cache>/tuning_logs)
  TVM_ANYPREC_ARM_ROOT       the emulated aarch64 board built by scripts/setup_arm.sh
                             (default: .arm/ of the source checkout, else <cache>/arm)
  TVM_ANYPREC_CUDA_STUB_DIR  where the stub libcuda.so.1 is built (default ~/.cache/tvm-anyprec/cuda_stub)
  TVM_ANYPREC_LLAMACPP_DIR   llama.cpp's llama-bench, the benchmarks' peer (scripts/setup_llamacpp.sh;
                             default <cache>/llamacpp)
  TVM_ANYPREC_NO_ARM / TVM_ANYPREC_NO_GPU   read by scripts/setup.sh only
  TVM_NUM_THREADS            TVM's thread pool size, as in TVM (then OMP_NUM_THREADS); when neither is set, a
                             local Session sets it to this machine's physical cores (``set_threads``: TVM itself
                             would take half the logical CPUs on x86, one thread on a 2-core VM without SMT)
"""
from __future__ import annotations

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def source_checkout() -> Path | None:
    """The source checkout this package runs from (an editable install or a clone), or None (a wheel)."""
    root = _PACKAGE.parent
    return root if (root / "pyproject.toml").exists() and (root / "tvm_anyprec").is_dir() else None


def cache_dir() -> Path:
    d = Path(os.environ.get("TVM_ANYPREC_CACHE") or Path.home() / ".cache" / "tvm-anyprec")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _data_dir(variable: str, in_checkout: str, in_cache: str) -> Path:
    """$variable when set, else <checkout>/in_checkout in a source checkout, else <cache>/in_cache."""
    env = os.environ.get(variable)
    if env:
        return Path(env)
    src = source_checkout()
    return src / in_checkout if src is not None else cache_dir() / in_cache


def tuning_logs_root() -> Path:
    return _data_dir("TVM_ANYPREC_TUNING_LOGS", "tuning_logs", "tuning_logs")


def default_log_dir(preset_name: str) -> Path:
    """The tuning-record directory of a target preset (committed records in a checkout)."""
    return tuning_logs_root() / preset_name


def arm_root() -> Path:
    return _data_dir("TVM_ANYPREC_ARM_ROOT", ".arm", "arm")


def cuda_stub_dir() -> Path:
    env = os.environ.get("TVM_ANYPREC_CUDA_STUB_DIR")
    return Path(env) if env else Path.home() / ".cache" / "tvm-anyprec" / "cuda_stub"


def llamacpp_dir() -> Path:
    env = os.environ.get("TVM_ANYPREC_LLAMACPP_DIR")
    return Path(env) if env else cache_dir() / "llamacpp"


def llama_bench() -> Path | None:
    """The llama-bench binary built by scripts/setup_llamacpp.sh, or None."""
    b = llamacpp_dir() / "build" / "bin" / "llama-bench"
    return b if b.exists() else None


def benchmarks_dir() -> Path | None:
    """benchmarks/ of the source checkout (not installed with a wheel), or None."""
    src = source_checkout()
    return src / "benchmarks" if src is not None and (src / "benchmarks" / "__main__.py").exists() else None


def physical_cores() -> int:
    """The CPU cores this process may run on, the hardware threads of one core counted once (llama.cpp's default
    thread count): from the affinity mask and /sys/devices/system/cpu/cpu*/topology."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for c in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(c)))
    return max(1, len(cores))


def set_threads(n: int | None = None) -> int:
    """Size TVM's thread pool: n when given, else TVM_NUM_THREADS / OMP_NUM_THREADS when set, else the physical
    cores. TVM reads the variable when its pool starts (the first parallel kernel of the process), so this
    must run before that; later calls change nothing for the running pool. -> the thread count asked for."""
    if n is not None:
        if n < 1:
            raise ValueError(f"threads must be at least 1, got {n}")
        os.environ["TVM_NUM_THREADS"] = str(n)
    elif not (os.environ.get("TVM_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")):
        os.environ["TVM_NUM_THREADS"] = str(physical_cores())
    return int(os.environ.get("TVM_NUM_THREADS") or os.environ["OMP_NUM_THREADS"])
