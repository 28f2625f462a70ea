"""MetaSchedule driver for the project's kernels (XGBoost cost model, JSON database on disk).

Records live in ``tuning_logs/<target-preset>/`` as MetaSchedule's JSON database (database_workload.json,
database_tuning_record.json). Each kernel is a workload keyed by its structure (MetaSchedule's structural
hash), so a record made for one model applies to every model with the same layer shapes.

Known traps handled here (see TVM027_NOTES): the default builder imports tvm.s_tir.tensor_intrin in every
worker (12-22 s: every trial times out on 2 cores), so a lean build function is passed; the bit-width is an
int32[1] tensor, not a scalar (the runner only feeds tensors); records are looked up on the kernel as the
pass emits it (before AnnotateTIROpPattern adds attributes the workload key lacks).

``tune_model`` tunes every distinct kernel of a model (an artifact, ONNX graphs or a model name) with the
project's design space (``schedules.cpu.linear_space_cpu``: N tiling, reduction and decode vector widths,
unrolling), a progress bar (trials, workloads, best latency, time left) and resume: every measured record
is appended to the database as it comes, a workload that already has ``trials`` records is skipped, and one
with fewer gets only the missing trials (the search starts from its best records). A log cut mid-line by a
kill is repaired (the partial line dropped) before it is opened. Measurements can run on remote devices
through TVM's RPC tracker (``rpc=RPC(host, port, key, workers)``), with the kernels built here.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm

from . import kernels as _fast_tvmscript  # noqa: F401  (fast TVMScript parsing; MetaSchedule parses ~250 intrinsics)

DB_FILES = ("database_workload.json", "database_tuning_record.json")


def _lean_build(mod, target, _params):
    import tvm as _tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return _tvm.tirx.build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _cross_export(mod) -> str:
    """Builder export for aarch64 targets: a shared library linked by the cross g++ (MetaSchedule's default
    exports a tar of objects that the device would have to link itself; the emulated board has no compiler)."""
    import os
    import tempfile

    from tvm.support import cc

    path = os.path.join(tempfile.mkdtemp(prefix="anyprec-ms-"), "tvm_tmp_mod.so")
    mod.export_library(path, fcompile=cc.cross_compiler("aarch64-linux-gnu-g++"))
    return path


def _builder(target):
    from tvm.s_tir import meta_schedule as ms

    from .targets import host_arch

    if _is_webgpu(target):
        return _wgsl_builder()

    cross = "aarch64" in str(target.attrs.get("mtriple", "")) and host_arch() != "aarch64"
    return ms.builder.LocalBuilder(f_build=_lean_build, f_export=_cross_export if cross else None, timeout_sec=60)


def workload(func: tvm.tirx.PrimFunc) -> tvm.IRModule:
    """The IRModule a kernel is tuned and looked up as."""
    f = func
    for attr in ("op_pattern", "tirx.is_scheduled"):
        if f.attrs is not None and attr in f.attrs:
            f = f.without_attr(attr)
    return tvm.IRModule({"main": f.with_attr("global_symbol", "main")})


def open_database(work_dir):
    from tvm.s_tir import meta_schedule as ms

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(path_workload=str(work_dir / DB_FILES[0]),
                                    path_tuning_record=str(work_dir / DB_FILES[1]))


def query_database(db, func: tvm.tirx.PrimFunc, target) -> tvm.tirx.PrimFunc | None:
    """The best tuned schedule of ``func`` in ``db`` (scheduled PrimFunc), or None."""
    sch = db.query_schedule(workload(func), target, workload_name="main")
    if sch is None:
        return None
    new = sch.mod["main"].with_attr("tirx.is_scheduled", True)
    return new.without_attr("global_symbol") if func.attrs is None or "global_symbol" not in func.attrs else new


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


class TuningError(ValueError):
    pass


def _runner(rpc: RPC | None, target=None):
    from tvm.s_tir import meta_schedule as ms

    if rpc is None and target is not None and _is_webgpu(target):
        return _wgsl_runner()
    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=20)
    if rpc is None:
        return ms.runner.LocalRunner(evaluator_config=evaluator)
    cfg = ms.runner.RPCConfig(tracker_host=rpc.host, tracker_port=rpc.port, tracker_key=rpc.key,
                              session_timeout_sec=rpc.timeout_s)
    return ms.runner.RPCRunner(rpc_config=cfg, evaluator_config=evaluator, max_workers=rpc.workers)


def _progress_callback(on_batch):
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
    from tvm.ir.utils import derived_object

    @derived_object
    class _Progress(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            secs = [float(sum(r.run_secs) / len(r.run_secs)) for r in runner_results
                    if r.error_msg is None and r.run_secs]
            on_batch(len(runner_results), secs)

    return _Progress()


def _measure(mod: tvm.IRModule, target, rpc: RPC | None = None):
    """Build ``mod`` (one scheduled "main") with the tuner's builder and time it with its runner (the same
    inputs and repeats as tuning trials). -> (mean seconds or None on failure, run_secs, args_info)."""
    return _measure_many([mod], target, rpc)[0]


def commit_hand_baseline(db, func: tvm.tirx.PrimFunc, target, rpc: RPC | None = None) -> float | None:
    """Measure the hand schedule with the tuner's own builder and runner and store it as a record, so the
    database's best is never worse than the schedule compile uses without a log. Returns its seconds."""
    from tvm.s_tir import meta_schedule as ms

    sch = _hand_schedule(func, target)
    if sch is None:
        return None
    secs, run_secs, args_info = _measure(sch.mod, target, rpc)
    if secs is None:
        return None
    db.commit_tuning_record(ms.database.TuningRecord(sch.trace, db.commit_workload(workload(func)),
                                                     run_secs, target, args_info))
    return secs


def _is_webgpu(target) -> bool:
    return str(target.kind.name) == "webgpu"


def _hand_schedule(func: tvm.tirx.PrimFunc, target):
    """The schedule compile uses without a log, as a Schedule of the workload (with its trace); None when it
    cannot be a record of this workload (the GPU prefill dense kernel is rebuilt in a two-block form)."""
    from .compiler import is_gpu

    if not is_gpu(target):
        from .schedules.cpu import hand_schedule
        return hand_schedule(workload(func))
    from .schedules import gpu, intgemm_gpu

    mod = workload(func)
    threads = gpu.max_threads_of(target)
    sch = (intgemm_gpu.hand_schedule if _has_dequant(func) else gpu.hand_schedule)(mod, threads)
    try:                                   # a record must replay on the workload itself
        sch.trace.apply_to_schedule(tvm.s_tir.Schedule(mod), remove_postproc=False)
    except Exception:  # the trace names blocks the workload lacks
        return None
    return sch


def _has_dequant(func) -> bool:
    from .schedules.cpu import _has_block
    return _has_block(tvm.s_tir.Schedule(func), "dequant")


def _project_space(func, target):
    """The project's design space for ``func`` on ``target`` (a ScheduleFn)."""
    from functools import partial

    from tvm.s_tir import meta_schedule as ms

    from .compiler import is_gpu

    if not is_gpu(target):
        from .schedules.cpu import linear_space_cpu
        return ms.space_generator.ScheduleFn(linear_space_cpu)
    from .schedules import gpu, intgemm_gpu

    fn = partial(intgemm_gpu.int_gemm_space_gpu if _has_dequant(func) else gpu.linear_space_gpu,
                 max_threads=gpu.max_threads_of(target))
    if _is_webgpu(target):     # MetaSchedule has no webgpu defaults: the space is complete as it is
        return ms.space_generator.ScheduleFn(fn, sch_rules=[], postprocs=[], mutator_probs={})
    return ms.space_generator.ScheduleFn(fn)


def _wgsl_builder():
    """MetaSchedule builder for the webgpu target, in this process (WGSL codegen, nothing to link): each
    artifact is a JSON file with the kernel's WGSL, launch grid and parameter names."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder

    @derived_object
    class _WGSLBuilder(PyBuilder):
        def build(self, build_inputs):
            import json
            import tempfile

            from .targets.webgpu import launch_grid, webgpu_source

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

    return _WGSLBuilder()


def _random_array(rng, dtype: str, shape) -> np.ndarray:
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return rng.standard_normal(shape).astype(dt)
    if dt.kind == "u":
        return rng.integers(0, np.iinfo(dt).max, shape, dtype=dt, endpoint=True)
    return rng.integers(0, 9, shape).astype(dt)    # small ints (the bit-width input is clamped by the kernel)


def _wgsl_runner(number: int = 3, repeat: int = 1):
    """MetaSchedule runner for WebGPU builds: each kernel on random inputs through wgpu (targets.webgpu) on
    whatever adapter this machine has (lavapipe without a GPU: its times rank schedules on the CPU's
    software Vulkan, not on a GPU)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import PyRunner
    from tvm.s_tir.meta_schedule.runner.local_runner import LocalRunnerFuture

    @derived_object
    class _WGSLRunner(PyRunner):
        def run(self, runner_inputs):
            import json

            from .targets.webgpu import Prepared

            rng = np.random.default_rng(0)
            out = []
            for ri in runner_inputs:
                try:
                    with open(ri.artifact_path) as fh:
                        art = json.load(fh)
                    arrays = {name: _random_array(rng, str(info.dtype), [int(d) for d in info.shape])
                              for name, info in zip(art["params"], ri.args_info)}
                    secs = Prepared(art["wgsl"], arrays, art["grid"]).seconds(number, repeat)
                    out.append(LocalRunnerFuture(res=secs))
                except Exception as e:  # a kernel the adapter rejects: a failed trial
                    out.append(LocalRunnerFuture(error_message=f"{type(e).__name__}: {str(e)[-500:]}"))
            return out          # (the artifacts' directories are removed by MetaSchedule / _measure_many)

    return _WGSLRunner()


# ----------------------------------------------------------------------------- integer GEMM variants (ARM)
VARIANTS_FILE = "int_gemm_variants.json"


def is_act_artifact(source) -> bool:
    """A compiled artifact with low-bit activations (``compile --act-bits``)?"""
    from .artifact import MANIFEST, read_manifest

    p = Path(str(source))
    return (p / MANIFEST).exists() and "act_quant" in read_manifest(p, verify=False)


def int_gemm_kernels(manifest: dict) -> dict[str, set]:
    """{int_gemm kernel name: activation bit-widths of the layers it serves} of a low-bit-activation artifact
    (a kernel serves every layer of its N, K whose rows it computes)."""
    pat = re.compile(r"int_gemm_w4_m(\d+)_n(\d+)_k(\d+)_g(\d+)$")
    out = {}
    for name in manifest.get("kernels", {}):
        m = pat.match(name)
        if not m:
            continue
        M, N, K, _gs = map(int, m.groups())
        out[name] = {v["act_bits"] for v in manifest["layers"].values()
                     if v["N"] == N and v["K"] == K and M in v["rows"].values()}
    return out


def _measure_many(mods: list, target, rpc: RPC | None = None) -> list:
    """Each module built in one builder batch and measured in one runner batch -> per module (mean seconds,
    run_secs, args_info), or (None, None, None) where building or running failed."""
    from tvm.s_tir import meta_schedule as ms

    built = _builder(target).build([ms.builder.BuilderInput(m, target) for m in mods])
    dev_type = "cpu" if target.kind.name == "llvm" else target.kind.name
    idx = [i for i, b in enumerate(built) if b.error_msg is None]
    infos = {i: ms.arg_info.ArgInfo.from_prim_func(mods[i]["main"]) for i in idx}
    futs = _runner(rpc, target).run([ms.runner.RunnerInput(built[i].artifact_path, dev_type, infos[i]) for i in idx])
    out = [(None, None, None)] * len(mods)
    for i, fut in zip(idx, futs):
        res = fut.result()
        if res.error_msg is None and res.run_secs:
            out[i] = (float(sum(float(x) for x in res.run_secs) / len(res.run_secs)), res.run_secs, infos[i])
    for i in idx:              # each artifact lives in a temporary directory of its own
        shutil.rmtree(os.path.dirname(built[i].artifact_path), ignore_errors=True)
    return out


def tune_int_gemm_variants(artifact, target: str, log_dir=None, rpc: RPC | None = None,
                           progress: bool = True) -> list[dict]:
    """Measure every ARM variant of every integer GEMM kernel of a low-bit-activation artifact (``compile
    --act-bits``) on the target (a board through ``rpc``; default for aarch64 presets: the emulated board) and
    store the fastest per kernel in <log_dir>/int_gemm_variants.json, which ``compile`` then applies
    (how = "tuned:<variant>"). The variants are different kernels, not schedules of one, so this is a
    measured choice among them rather than a MetaSchedule search."""
    import json
    from contextlib import ExitStack

    from .artifact import read_manifest
    from .kernels.intgemm_arm import unsupported
    from .schedules.intgemm_arm import VARIANTS, gemm_shape, schedule_int_gemm_arm, target_features
    from .targets import host_arch, preset

    tp = preset(target)
    if tp["arch"] != "aarch64":
        raise TuningError(f"integer GEMM variants exist for the aarch64 presets; {target} has one schedule")
    man = read_manifest(artifact, kind="compiled", verify=False)
    kernels = int_gemm_kernels(man)
    if not kernels:
        raise TuningError(f"{artifact} has no integer GEMM kernels: compile it with --act-bits 8|4")
    tgt = tvm.target.Target(tp["target"])
    feats = target_features(tp)
    log_dir = Path(log_dir) if log_dir is not None else default_log_dir(target)
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / VARIANTS_FILE
    table = json.loads(path.read_text()) if path.exists() else {}
    rows = []
    with ExitStack() as stack:
        where = "the RPC devices"
        if rpc is None and host_arch() != "aarch64":
            rpc, where = stack.enter_context(emulated_board(tp)), "the emulated board"
        plan = []
        for name, bits in sorted(kernels.items()):
            f = kernel_from_name(name)
            s = gemm_shape(f)
            ab = 4 if bits == {4} else 8
            cands = [v for v, (need, _) in VARIANTS.items() if (need == "neon" or need in feats)
                     and (v == "neon" or not unsupported(v, s["K"], s["group_size"], ab))]
            plan.append((name, f, ab, cands))
        # one build batch and one measurement batch (worker pools start once, not per variant)
        cases = [(name, v, tvm.IRModule({"main": schedule_int_gemm_arm(f, v, feats, ab).with_attr("global_symbol",
                                                                                              "main")}))
                 for name, f, ab, cands in plan for v in cands]
        if progress:
            print(f"int_gemm variants for {target}: building {len(cases)} kernels, measuring on "
                  f"{where}", file=sys.stderr)
        secs = [r[0] for r in _measure_many([m for *_, m in cases], tgt, rpc)]
        for name, f, ab, cands in plan:
            ms_by = {v: t * 1e3 for (n, v, _), t in zip(cases, secs) if n == name and t is not None}
            if not ms_by:
                raise TuningError(f"{name}: no variant could be measured on {target}")
            best = min(ms_by, key=ms_by.get)
            table[name] = {"variant": best, "ms": ms_by, "act_bits": ab}
            rows.append({"kernel": name, "variant": best, "ms": ms_by})
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        tmp.replace(path)
    return rows


def load_variant_choices(log_dir, warn=print) -> dict:
    """{int_gemm kernel name: variant} from <log_dir>/int_gemm_variants.json ({} when absent; a corrupt file
    is ignored with a warning)."""
    import json

    path = Path(log_dir) / VARIANTS_FILE
    if not path.exists():
        return {}
    try:
        return {k: v["variant"] for k, v in json.loads(path.read_text()).items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        warn(f"warning: ignoring {path}: {e}")
        return {}


def tune_kernel(func: tvm.tirx.PrimFunc, target, work_dir, trials: int, seed: int = 0, rpc: RPC | None = None,
                space: str = "project", on_batch=None) -> float:
    """Tune one kernel into the JSON database at ``work_dir``; returns seconds spent. ``space``: "project"
    (the linear-kernel design space of tvm_anyprec.schedules) or "generic" (MetaSchedule's default rules)."""
    import logging

    from tvm.s_tir import meta_schedule as ms

    t0 = time.time()
    cores = int(target.attrs.get("num-cores", 1)) if hasattr(target, "attrs") else 1
    callbacks = list(ms.measure_callback.MeasureCallback.create("default"))
    if on_batch is not None:
        callbacks.append(_progress_callback(on_batch))
    gen = _project_space(func, target) if space == "project" else "post-order-apply"
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    with _quiet_logs(work_dir):
        ms.tune_tir(workload(func), target, work_dir=str(Path(work_dir) / "logs"), max_trials_global=trials,
                    num_trials_per_iter=min(8, trials), cost_model=ms.cost_model.XGBModel(num_tuning_cores=cores),
                    database=open_database(work_dir),
                    builder=_builder(target),
                    runner=_runner(rpc, target), measure_callbacks=callbacks, space=gen,
                    num_tuning_cores=cores, seed=seed)
    return time.time() - t0


class _quiet_logs:
    """MetaSchedule logs every iteration at INFO to the console; keep them in work_dir/logs only."""

    def __init__(self, work_dir):
        self.dir = Path(work_dir) / "logs"

    def __enter__(self):
        import logging
        self.dir.mkdir(parents=True, exist_ok=True)
        self.saved = []
        for name in ("tvm.s_tir.meta_schedule", "tvm.meta_schedule"):
            lg = logging.getLogger(name)
            self.saved.append((lg, lg.level, lg.propagate))
            lg.setLevel(logging.WARNING)
        return self

    def __exit__(self, *exc):
        for lg, level, prop in self.saved:
            lg.setLevel(level)
            lg.propagate = prop
        return False


# ----------------------------------------------------------------------------- model-level tuning
_KERNEL_RE = {
    "anyprec_linear": re.compile(r"anyprec_linear_m(\d+)_n(\d+)_k(\d+)_b(\d+)to(\d+)$"),
    "dense_nt": re.compile(r"dense_nt_m(\d+)_n(\d+)_k(\d+)$"),
    "int_gemm": re.compile(r"int_gemm_w4_m(\d+)_n(\d+)_k(\d+)_g(\d+)$"),
}


def kernel_from_name(name: str) -> tvm.tirx.PrimFunc:
    """Rebuild a kernel from the name the rewrite pass gave it (an artifact's manifest lists them)."""
    from .kernels import dense
    from .kernels.anyprec import make_anyprec_linear

    m = _KERNEL_RE["anyprec_linear"].match(name)
    if m:
        M, N, K, lo, hi = map(int, m.groups())
        return make_anyprec_linear(M, N, K, hi, lo)
    m = _KERNEL_RE["dense_nt"].match(name)
    if m:
        return dense.make_dense_nt(*map(int, m.groups()))
    m = _KERNEL_RE["int_gemm"].match(name)
    if m:
        from .kernels.intgemm import make_int_gemm
        return make_int_gemm(*map(int, m.groups()))
    raise TuningError(f"unknown kernel name {name!r}")


def model_kernels(source, exclude=("lm_head",)) -> dict[str, tvm.tirx.PrimFunc]:
    """The distinct kernels of a model: from a compiled artifact's manifest, or by importing ONNX graphs
    (a file or directory) and running the rewrite pass, or, for a model name ('smollm2', a .gguf, an HF
    directory), by exporting it first (into the cache directory, once)."""
    from .artifact import MANIFEST, read_manifest

    src = Path(str(source))
    if (src / MANIFEST).exists():
        m = read_manifest(src, verify=False)
        if m.get("kind") != "compiled":
            raise TuningError(f"{src} is a {m.get('kind')!r} directory: give a compiled artifact, ONNX or a model")
        return {k: kernel_from_name(k) for k in m["kernels"]}
    is_onnx = src.suffix == ".onnx" or (src.is_dir() and any(src.glob("*.onnx")))
    if not is_onnx:
        from . import api, data
        model = data.resolve_model(source)
        src = data.cache_dir() / "onnx" / model.stem
        if not all((src / f"{g}.onnx").exists() for g in ("decode", "prefill", "verify")):
            api.export(src, model)
    from .frontend.onnx_import import import_onnx
    from .passes.anyprec_rewrite import KERNEL_PREFIXES, AnyPrecRewrite

    mod = AnyPrecRewrite(3, 8, exclude)(import_onnx(src).mod)
    return {gv.name_hint: f for gv, f in mod.functions_items()
            if isinstance(f, tvm.tirx.PrimFunc) and gv.name_hint.startswith(KERNEL_PREFIXES)}


def count_records(db, func, target) -> int:
    """Measured records of ``func`` on ``target`` already in ``db``."""
    mod = workload(func)
    if not db.has_workload(mod):
        return 0
    wl = db.commit_workload(mod)
    return sum(1 for r in db.get_top_k(wl, 1 << 20) if str(r.target.kind.name) == str(target.kind.name))


def best_seconds(db, func) -> float | None:
    mod = workload(func)
    if not db.has_workload(mod):
        return None
    top = db.get_top_k(db.commit_workload(mod), 1)
    return float(sum(top[0].run_secs) / len(top[0].run_secs)) if top and top[0].run_secs else None


def repair_log(path, warn=print) -> int:
    """Drop lines a kill cut short (a JSON database is one record per line); returns how many were dropped."""
    import json

    dropped = 0
    for name in DB_FILES:
        f = Path(path) / name
        if not f.exists():
            continue
        lines = f.read_text().splitlines()
        good = []
        for line in lines:
            if not line.strip():
                continue
            try:
                json.loads(line)
                good.append(line)
            except ValueError:
                dropped += 1
        if dropped:
            warn(f"warning: {f}: dropped {dropped} unreadable line(s) (an interrupted write); kept {len(good)}")
            tmp = f.with_name(f.name + ".tmp")
            tmp.write_text("".join(x + "\n" for x in good))
            tmp.replace(f)
    return dropped


def tune_model(source, target: str = "x86", trials: int = 32, log_dir=None, rpc: RPC | None = None,
               only=None, space: str = "project", progress: bool = True, seed: int = 0) -> list[dict]:
    """Tune every distinct kernel of ``source`` for the ``target`` preset, ``trials`` measured records per
    kernel, into ``log_dir`` (default tuning_logs/<target>/). Resumable (see the module docstring).
    ``only``: a substring filter on kernel names. The first session on a kernel measures the hand schedule
    as its first record, so the best record is never a regression. Returns one row per kernel: name, records
    added now, records in all, best ms, reused (nothing to do)."""
    from contextlib import ExitStack

    from .targets import host_arch, preset

    if trials < 1:
        raise TuningError(f"--trials must be >= 1, got {trials}")
    tp = preset(target)
    if rpc is None and tp.get("device") == "cuda":
        from .targets.cuda import has_gpu
        if not has_gpu():
            raise TuningError(f"measuring {target} kernels needs an NVIDIA GPU: run tune on a machine with one, "
                              "or give --rpc-tracker/--rpc-key of one (webgpu tunes here, on any WebGPU adapter)")
    with ExitStack() as stack:
        if rpc is None and tp["arch"] == "aarch64" and host_arch() != "aarch64":
            rpc = stack.enter_context(emulated_board(tp))
        return _tune_model(source, target, tp, trials, log_dir, rpc, only, space, progress, seed)


def emulated_board(tp: dict, n_servers: int = 1):
    """Context: a loopback RPC tracker with ``n_servers`` aarch64 servers under qemu-aarch64 (the preset's CPU
    model) -> RPC. Measurements there rank schedules under emulation, not on real hardware."""
    from contextlib import contextmanager

    from .targets import arm
    from .targets.remote import local_rpc_cluster

    why = arm.missing()
    if why:
        raise TuningError(f"{tp['name']} is an aarch64 target: give --rpc-tracker/--rpc-key of real boards, or "
                          f"set up the emulated board ({why})")

    def server(_i, host, port, key, sport):
        return arm.device_server_command(tp["qemu_cpu"], "--tracker", f"{host}:{port}", "--key", key,
                                         "--port", str(sport))

    @contextmanager
    def _board():
        print(f"tvm-anyprec tune: measuring on the emulated aarch64 board (qemu-aarch64 -cpu {tp['qemu_cpu']}): "
              "schedules are ranked by emulated time, not real-hardware time; re-tune on a board "
              "(--rpc-tracker) for performance", file=sys.stderr)
        with local_rpc_cluster(n_servers, key=f"anyprec-{tp['name']}", server_cmd=server, timeout_s=180) as c:
            yield RPC(c[0], c[1], c[2], n_servers, timeout_s=300)

    return _board()


def _tune_model(source, target, tp, trials, log_dir, rpc, only, space, progress, seed) -> list[dict]:
    from tqdm.auto import tqdm

    tgt = tvm.target.Target(tp["target"])
    log_dir = Path(log_dir) if log_dir is not None else default_log_dir(target)
    log_dir.mkdir(parents=True, exist_ok=True)
    repair_log(log_dir, warn=lambda m: print(m, file=sys.stderr))
    kernels = model_kernels(source)
    if only:
        kernels = {k: f for k, f in kernels.items() if only in k}
        if not kernels:
            raise TuningError(f"no kernel name contains {only!r}")
    db = open_database(log_dir)
    plan = [(name, f, max(0, trials - count_records(db, f, tgt))) for name, f in sorted(kernels.items())]
    todo = sum(n for _, _, n in plan)
    rows = []
    bar = tqdm(total=todo, unit="trial", disable=not progress, file=sys.stderr,
               desc=f"tuning {len(plan)} kernels for {target}")
    state = {"best": None, "wl": 0, "name": ""}

    def on_batch(n, secs):
        if secs:
            b = min(secs)
            state["best"] = b if state["best"] is None else min(state["best"], b)
        bar.update(n)
        bar.set_postfix_str(f"workload {state['wl'] + 1}/{len(plan)} {state['name']}, best "
                            + (f"{state['best'] * 1e3:.3f} ms" if state["best"] else "-"))

    try:
        for name, f, n in plan:
            before = count_records(db, f, tgt)
            state["name"] = name
            if n and before == 0:          # first session on this kernel: the hand schedule is record 1
                hand = commit_hand_baseline(db, f, tgt, rpc)
                n -= 1
                state["best"] = None
                on_batch(1, [hand] if hand else [])
            if n:
                state["best"] = best_seconds(db, f) or state["best"]
                tune_kernel(f, tgt, log_dir, n, seed=seed, rpc=rpc, space=space, on_batch=on_batch)
                db = open_database(log_dir)           # tune_kernel appended to the files: re-read them
            state["wl"] += 1
            after = count_records(db, f, tgt)
            rows.append({"kernel": name, "trials_now": after - before, "records": after,
                         "best_ms": (best_seconds(db, f) or 0) * 1e3, "reused": after == before})
    finally:
        bar.close()
    return rows


REPO_LOGS = Path(__file__).resolve().parents[1] / "tuning_logs"


def default_log_dir(preset_name: str) -> Path:
    """tuning_logs/<preset>/ of this checkout (committed records)."""
    return REPO_LOGS / preset_name


def load_database(path, warn=print):
    """Open a tuning log directory for lookups. A missing directory gives None; an unreadable or corrupt one
    gives None and a warning naming the problem (compiling then falls back to the hand schedules)."""
    path = Path(path)
    if not all((path / f).exists() for f in DB_FILES):
        return None
    try:
        return open_database(path)
    except Exception as e:  # JSONDatabase raises TVMError/ValueError on garbage; never let it stop a compile
        msg = str(e).strip().splitlines()
        warn(f"warning: ignoring tuning log {path}: {msg[-1] if msg else type(e).__name__}")
        return None
