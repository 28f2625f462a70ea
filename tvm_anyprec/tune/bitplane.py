"""The CPU bitplane kernel's design space: rows of W per parallel task, per bit-width, measured on this CPU.

The kernel (``kernels.lut_cpu``) is explicit SIMD loops with its instruction set fixed by the target, so the
MetaSchedule search has nothing to move in it. One knob still changes its speed: how many weight rows a parallel
task decodes together (they share each activation load; more rows cost registers and table space). The best
value depends on the shape, M and the bit-width (measured on a Zen 4, 2 threads: 1 row for every decode and
verify shape; for the 32-row prefill chunk 1 at K = 576 and 2 at K = 1536; 3 spill), and the memory side
matters as much as the instructions, so each candidate is timed on copies of the layer that together exceed
the last-level cache (every call reads its weights from DRAM, as a decode step does), with the thread pool a
``Session`` uses (``env.set_threads``: TVM_NUM_THREADS, else the physical cores).

``tune_bitplane_rows`` measures every candidate of every bitplane kernel of an artifact and keeps the fastest
per bit-width in ``<log_dir>/bitplane_rows.json``; ``compile`` applies it (how = "tuned:rows=..."). Only this
machine's CPU can be measured: an x86 preset on an x86 host (the aarch64 presets keep the kernel's defaults;
their emulated timings say nothing about memory behaviour).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from ..env import set_threads
from ..errors import TuningError
from ..kernels.lut_cpu import AnyPrecCPU, build_with_rows, default_rows, table_width
from ..quant.byteslice import TABLE_DTYPE, row_bytes
from ..targets import host_arch, preset
from .records import read_rows_table, save_rows_table

logger = logging.getLogger(__name__)

MARGIN = 0.97           # a candidate replaces the kernel's default only when at least 3% faster (noise)
COLD_BYTES = 96 << 20   # the copies of one layer cycled through per timing pass (more than any L3 here)
PASSES = 7              # timing rounds per bit-width (each times every candidate); the median is kept


def _shape(spec: AnyPrecCPU):
    from ..kernels.lut_layout import _Shape

    return _Shape(spec.M, spec.N, spec.K, spec.max_bits, spec.min_bits, spec.mode, spec.isa)


def wide(spec: AnyPrecCPU) -> bool:
    """Whether the kernel runs the AVX-512 body (``lut_layout._Shape.wide``)."""
    return _shape(spec).wide


def candidates(spec: AnyPrecCPU) -> tuple:
    """Rows per task worth measuring: the AVX-512 body holds 1 or 2 rows' tables in registers (3 spill), the
    AVX2 / NEON / generic bodies take up to 4, the i8mm body at M > 1 pairs of them."""
    s = _shape(spec)
    return (1, 2) if s.wide else (2, 4) if s.mmla else (1, 2, 4)


def _choose(us: dict, default: int) -> int:
    """The fastest candidate, unless the default is within MARGIN of it."""
    best = min(us, key=us.get)
    return default if default in us and us[best] >= us[default] * MARGIN else best


def _inputs(spec: AnyPrecCPU, rng) -> list:
    """Random operands of the kernel's shapes (timing does not depend on the values)."""
    N, K, B = spec.N, spec.K, spec.max_bits
    width = table_width(spec.max_bits, spec.min_bits)
    x = rng.standard_normal((spec.M, K)).astype(np.float32)
    planes = rng.integers(0, 256, (B, N, row_bytes(K)), dtype=np.uint8)
    if spec.mode == "int8":
        tabs = rng.integers(-30000, 30000, (N, width)).astype(TABLE_DTYPE)
        return [x, planes, tabs, np.ones((N, B - spec.min_bits + 1), np.float32)]
    return [x, planes, (rng.standard_normal((N, width)) * 0.05).astype(np.float16)]


def time_kernels(fns: dict, spec: AnyPrecCPU, bits: list, rng) -> dict:
    """{bit-width: {candidate: microseconds per call}} of built kernels ({candidate: fn}) on the same cold copies:
    per bit-width, PASSES rounds that time each candidate in turn (order alternating, so drifting machine noise
    falls on all alike); the median round is kept."""
    import tvm

    dev = tvm.cpu()
    one = _inputs(spec, rng)
    nbytes = sum(a.nbytes for a in one[1:])
    copies = int(min(64, max(2, COLD_BYTES // max(nbytes, 1))))
    sets = [[tvm.runtime.tensor(a, dev) for a in ([one[0]] + [a.copy() for a in one[1:]])] for _ in range(copies)]
    y = tvm.runtime.tensor(np.zeros((spec.M, spec.N), np.float32), dev)
    out = {}
    for b in bits:
        nb = tvm.runtime.tensor(np.array([b], np.int32), dev)
        ts = {c: [] for c in fns}
        for fn in fns.values():
            for a in sets[:2]:
                fn(*a, nb, y)   # warm-up: code and thread pool
        for p in range(PASSES):
            for c in (list(fns) if p % 2 == 0 else list(fns)[::-1]):
                t0 = time.perf_counter()
                for a in sets:
                    fns[c](*a, nb, y)
                ts[c].append((time.perf_counter() - t0) / copies)
        out[b] = {c: float(np.median(t)) * 1e6 for c, t in ts.items()}
    return out


def artifact_specs(source) -> dict:
    """{kernel name: spec} of a compiled artifact's manifest ({} when ``source`` is not a compiled artifact)."""
    from ..artifact import MANIFEST, read_manifest
    from .driver import specs_of_manifest

    src = Path(str(source))
    if not (src / MANIFEST).exists():
        return {}
    m = read_manifest(src, verify=False)
    return specs_of_manifest(m, str(src)) if m.get("kind") == "compiled" else {}


def tune_bitplane_rows(specs: dict, target: str, log_dir, progress: bool = True) -> list[dict]:
    """Measure every rows-per-task candidate of every bitplane kernel in ``specs`` ({name: spec}; other families
    are skipped) on this CPU for the ``target`` preset and store the fastest per bit-width. Returns one row per
    kernel: name, {bit-width: chosen rows}, {bit-width: {rows: us}}."""
    import tvm
    from tqdm.auto import tqdm

    tp = preset(target)
    if tp.get("device") or tp["arch"] != host_arch():
        raise TuningError(f"the bitplane kernel's rows per task are measured on this CPU ({host_arch()}); "
                          f"{target} is a {tp.get('device') or tp['arch']} preset (it keeps the kernel's defaults)")
    kernels = {n: s for n, s in sorted(specs.items()) if isinstance(s, AnyPrecCPU)}
    if not kernels:
        raise TuningError("no CPU bitplane kernels to measure (compile for a CPU preset without --act-bits)")
    here = host_isa()
    alien = sorted({s.isa for s in kernels.values() if not runs_on(s.isa, here)})
    if alien:   # an instruction this CPU lacks would kill the process
        raise TuningError(f"{target}'s bitplane kernels use {', '.join(alien)} instructions, which this CPU "
                          f"({here}) lacks: tune them on a machine that has them")
    tgt = tvm.target.Target(tp["target"])
    threads = set_threads()   # the pool a Session runs with (TVM alone would take half the logical CPUs)
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    table = read_rows_table(log_dir)
    rng = np.random.default_rng(0)
    rows = []
    work = sum(len(candidates(s)) for s in kernels.values())
    with tqdm(total=work, unit="build", disable=not progress, desc=f"bitplane rows for {target}") as bar:
        for name, spec in kernels.items():
            bits = list(range(spec.min_bits, spec.max_bits + 1))
            fns = {}
            for R in candidates(spec):
                bar.set_postfix_str(f"{name} rows={R}")
                mod = tvm.IRModule({"main": build_with_rows(spec, {b: R for b in bits}).with_attr("global_symbol",
                                                                                                  "main")})
                fns[R] = tvm.compile(mod, target=tgt).jit()["main"]
                bar.update(1)
            us = time_kernels(fns, spec, bits, rng)
            chosen = {b: _choose(us[b], default_rows(spec.mode, b, spec.M, wide(spec), spec.K)) for b in bits}
            table[name] = {"rows": {str(b): r for b, r in chosen.items()},
                           "us": {str(b): {str(r): round(t, 2) for r, t in us[b].items()} for b in bits},
                           "cpu": _cpu_name(), "threads": threads}
            save_rows_table(log_dir, table)   # after each kernel: an interrupted run keeps what it measured
            rows.append({"kernel": name, "rows": chosen, "us": us})
    return rows


def host_isa() -> str:
    """The bitplane kernel's instruction set for this machine's CPU (``kernels.lut_cpu.cpu_isa``)."""
    from ..kernels.lut_cpu import cpu_isa

    if host_arch() == "x86_64":
        return cpu_isa(preset("x86")["target"])
    from tvm.target import codegen
    return cpu_isa({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": codegen.llvm_get_system_cpu()})


def runs_on(isa: str, here: str) -> bool:
    """Whether kernels of instruction set ``isa`` run on a CPU whose best is ``here`` (ISAS is ordered)."""
    from ..kernels.lut_cpu import ISAS

    if isa == "generic" or isa == here:
        return True
    return any(isa in fam and here in fam and ISAS.index(isa) > ISAS.index(here)
               for fam in (("avx512gfni", "avx512", "avx2"), ("i8mm", "dotprod", "neon")))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()
