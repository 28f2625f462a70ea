"""MetaSchedule driver for the project's kernels (XGBoost cost model, JSON database on disk).

Records live in ``tuning_logs/<target-preset>/`` as MetaSchedule's JSON database (database_workload.json,
database_tuning_record.json). Each kernel is a workload keyed by its structure (MetaSchedule's structural
hash), so a record made for one model applies to every model with the same layer shapes.

Known traps handled here (see TVM027_NOTES): the default builder imports tvm.s_tir.tensor_intrin in every
worker (12-22 s: every trial times out on 2 cores), so a lean build function is passed; the bit-width is an
int32[1] tensor, not a scalar (the runner only feeds tensors); records are looked up on the kernel as the
pass emits it (before AnnotateTIROpPattern adds attributes the workload key lacks).
"""
from __future__ import annotations

import time
from pathlib import Path

import tvm

DB_FILES = ("database_workload.json", "database_tuning_record.json")


def _lean_build(mod, target, _params):
    import tvm as _tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return _tvm.tirx.build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


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


def tune_kernel(func: tvm.tirx.PrimFunc, target, work_dir, trials: int, seed: int = 0) -> float:
    """Tune one kernel into the JSON database at ``work_dir``; returns seconds spent."""
    from tvm.s_tir import meta_schedule as ms

    t0 = time.time()
    cores = int(target.attrs.get("num-cores", 1)) if hasattr(target, "attrs") else 1
    ms.tune_tir(workload(func), target, work_dir=str(work_dir), max_trials_global=trials,
                num_trials_per_iter=min(16, trials), cost_model=ms.cost_model.XGBModel(num_tuning_cores=cores),
                database=open_database(work_dir),
                builder=ms.builder.LocalBuilder(f_build=_lean_build, timeout_sec=60),
                runner=ms.runner.LocalRunner(evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1,
                                                                                         min_repeat_ms=20)),
                num_tuning_cores=cores, seed=seed)
    return time.time() - t0


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
