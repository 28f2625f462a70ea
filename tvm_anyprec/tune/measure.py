"""Building and timing kernels for MetaSchedule, on each kind of device: its own extension points
(``PyBuilder``/``PyRunner``/``PyMeasureCallback`` subclasses at module level) plus the stock local and RPC
ones.

* CPU here: ``LocalBuilder`` with a lean build function (the default imports tvm.s_tir.tensor_intrin in every
  worker, 12-22 s: every trial times out on 2 cores) and ``LocalRunner``.
* aarch64 from x86: the same builder exporting with the cross g++ (the emulated board has no compiler),
  measured on RPC devices (``RPC``; ``tune.board`` starts the emulated one).
* WebGPU: ``WGSLBuilder``/``WGSLRunner``, in this process, through wgpu on whatever adapter there is.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
from tvm.s_tir.meta_schedule.runner import PyRunner
from tvm.s_tir.meta_schedule.runner.local_runner import LocalRunnerFuture

from ..errors import TuningError
from ..targets import host_arch, is_webgpu


@dataclass
class RPC:
    """Measure on devices registered at a TVM RPC tracker under ``key`` (``workers``: parallel sessions)."""
    host: str
    port: int
    key: str
    workers: int = 1
    timeout_s: int = 60

    @staticmethod
    def parse(tracker: str, key: str, workers: int = 1) -> "RPC":
        host, _, port = tracker.rpartition(":")
        if not host or not port.isdigit():
            raise TuningError(f"--rpc-tracker must be HOST:PORT, got {tracker!r}")
        if not key:
            raise TuningError("--rpc-key is required with --rpc-tracker")
        return RPC(host, int(port), key, workers)


def lean_build(mod, target, _params):
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm.tirx.build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def cross_export(mod) -> str:
    """Builder export for aarch64 targets: a shared library linked by the cross g++ (MetaSchedule's default
    exports a tar of objects that the device would have to link itself; the emulated board has no compiler)."""
    from tvm.support import cc

    path = os.path.join(tempfile.mkdtemp(prefix="anyprec-ms-"), "tvm_tmp_mod.so")
    mod.export_library(path, fcompile=cc.cross_compiler("aarch64-linux-gnu-g++"))
    return path


@derived_object
class WGSLBuilder(PyBuilder):
    """MetaSchedule builder for the webgpu target, in this process (WGSL codegen, nothing to link): each
    artifact is a JSON file with the kernel's WGSL, launch grid and parameter names."""

    def build(self, build_inputs):
        from ..targets.webgpu import launch_grid, webgpu_source

        out = []
        for bi in build_inputs:
            try:
                f = bi.mod["main"]
                lib = tvm.compile(bi.mod, target=bi.target)
                art = {"wgsl": webgpu_source(lib), "grid": list(launch_grid(f)),
                       "params": [str(v.name) for v in f.params]}
                # a directory of its own: MetaSchedule removes the artifact's whole parent directory
                path = os.path.join(tempfile.mkdtemp(prefix="anyprec-wgsl-"), "kernel.json")
                with open(path, "w") as fh:
                    json.dump(art, fh)
                out.append(BuilderResult(path, None))
            except Exception as e:  # a schedule the codegen rejects: a failed trial, not a failed run
                out.append(BuilderResult(None, f"{type(e).__name__}: {str(e)[-500:]}"))
        return out


def random_array(rng, dtype: str, shape) -> np.ndarray:
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return rng.standard_normal(shape).astype(dt)
    if dt.kind == "u":
        return rng.integers(0, np.iinfo(dt).max, shape, dtype=dt, endpoint=True)
    return rng.integers(0, 9, shape).astype(dt)    # small ints (the bit-width input is clamped by the kernel)


@derived_object
class WGSLRunner(PyRunner):
    """MetaSchedule runner for WebGPU builds: each kernel on random inputs through wgpu (targets.webgpu) on
    whatever adapter this machine has (lavapipe without a GPU: its times rank schedules on the CPU's software
    Vulkan, not on a GPU)."""

    def __init__(self, number: int = 3, repeat: int = 1):
        super().__init__()
        self.number, self.repeat = number, repeat

    def run(self, runner_inputs):
        from ..targets.webgpu import Prepared

        rng = np.random.default_rng(0)
        out = []
        for ri in runner_inputs:
            try:
                with open(ri.artifact_path) as fh:
                    art = json.load(fh)
                arrays = {name: random_array(rng, str(info.dtype), [int(d) for d in info.shape])
                          for name, info in zip(art["params"], ri.args_info)}
                secs = Prepared(art["wgsl"], arrays, art["grid"]).seconds(self.number, self.repeat)
                out.append(LocalRunnerFuture(res=secs))
            except Exception as e:  # a kernel the adapter rejects: a failed trial
                out.append(LocalRunnerFuture(error_message=f"{type(e).__name__}: {str(e)[-500:]}"))
        return out          # (the artifacts' directories are removed by MetaSchedule / measure_many)


@derived_object
class Progress(PyMeasureCallback):
    """Calls ``on_batch(n, [seconds of the trials that ran])`` after every measured batch."""

    def __init__(self, on_batch):
        super().__init__()
        self.on_batch = on_batch

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
        secs = [float(sum(r.run_secs) / len(r.run_secs)) for r in runner_results
                if r.error_msg is None and r.run_secs]
        self.on_batch(len(runner_results), secs)


def builder(target):
    if is_webgpu(target):
        return WGSLBuilder()
    cross = "aarch64" in str(target.attrs.get("mtriple", "")) and host_arch() != "aarch64"
    return ms.builder.LocalBuilder(f_build=lean_build, f_export=cross_export if cross else None, timeout_sec=60)


def runner(rpc: RPC | None, target=None):
    if rpc is None and target is not None and is_webgpu(target):
        return WGSLRunner()
    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=20)
    if rpc is None:
        return ms.runner.LocalRunner(evaluator_config=evaluator)
    cfg = ms.runner.RPCConfig(tracker_host=rpc.host, tracker_port=rpc.port, tracker_key=rpc.key,
                              session_timeout_sec=rpc.timeout_s)
    return ms.runner.RPCRunner(rpc_config=cfg, evaluator_config=evaluator, max_workers=rpc.workers)


def measure_many(mods: list, target, rpc: RPC | None = None) -> list:
    """Each module (one scheduled "main") built in one builder batch and measured in one runner batch with the
    tuner's own builder and runner (the same inputs and repeats as tuning trials) -> per module (mean
    seconds, run_secs, args_info), or (None, None, None) where building or running failed."""
    built = builder(target).build([ms.builder.BuilderInput(m, target) for m in mods])
    dev_type = "cpu" if target.kind.name == "llvm" else target.kind.name
    idx = [i for i, b in enumerate(built) if b.error_msg is None]
    infos = {i: ms.arg_info.ArgInfo.from_prim_func(mods[i]["main"]) for i in idx}
    futs = runner(rpc, target).run([ms.runner.RunnerInput(built[i].artifact_path, dev_type, infos[i]) for i in idx])
    out = [(None, None, None)] * len(mods)
    for i, fut in zip(idx, futs):
        res = fut.result()
        if res.error_msg is None and res.run_secs:
            out[i] = (float(sum(float(x) for x in res.run_secs) / len(res.run_secs)), res.run_secs, infos[i])
    for i in idx:              # each artifact lives in a temporary directory of its own
        shutil.rmtree(os.path.dirname(built[i].artifact_path), ignore_errors=True)
    return out


def measure(mod: tvm.IRModule, target, rpc: RPC | None = None):
    """``measure_many`` of one module."""
    return measure_many([mod], target, rpc)[0]
