"""The MetaSchedule driver for the project's kernels (XGBoost cost model, JSON database on disk).

``tune_kernels`` tunes every kernel of a {name: spec} table with its rule's design space
(``schedules.rules``), a progress bar (trials, workloads, best latency, time left) and resume: every
measured record is appended to the database as it comes, a workload that already has ``trials`` records is
skipped, and one with fewer gets only the missing trials (the search starts from its best records). A log
cut mid-line by a kill is repaired (the partial line dropped) before it is opened. The first session on a
kernel stores the hand schedule as record 1, so the best record is never a regression. Measurements can run
on remote devices through TVM's RPC tracker (``RPC``), with the kernels built here; for aarch64 presets the
emulated board is the default device.

The bit-width is an int32[1] tensor, not a scalar: the runner only feeds tensors (see TVM027_NOTES).
"""
from __future__ import annotations

import logging
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import tvm

from ..errors import TuningError
from ..kernels.registry import kernel_specs, spec_from_dict
from ..schedules.rules import family_of, rule_for
from ..targets import host_arch, is_gpu, preset
from .board import emulated_board
from .measure import RPC, Progress, builder, measure, runner
from .records import best_seconds, count_records, default_log_dir, open_database, repair_log, workload

logger = logging.getLogger(__name__)
_MS_LOGGERS = ("tvm.s_tir.meta_schedule", "tvm.meta_schedule")


def hand_schedule(func: tvm.tirx.PrimFunc, target, spec=None):
    """The schedule compile uses without a log, as a Schedule of the workload (with its trace); None when it
    cannot be a record of this workload (the GPU prefill dense kernel is rebuilt in a two-block form)."""
    mod = workload(func)
    sch = rule_for(spec or family_of(func), target).hand(mod, target)
    if sch is None:
        return None
    if is_gpu(target):
        try:                                   # a record must replay on the workload itself
            sch.trace.apply_to_schedule(tvm.s_tir.Schedule(mod), remove_postproc=False)
        except Exception:  # the trace names blocks the workload lacks
            return None
    return sch


def commit_hand_baseline(db, func: tvm.tirx.PrimFunc, target, rpc: RPC | None = None, spec=None) -> float | None:
    """Measure the hand schedule with the tuner's own builder and runner and store it as a record, so the
    database's best is never worse than the schedule compile uses without a log. Returns its seconds."""
    from tvm.s_tir import meta_schedule as ms

    sch = hand_schedule(func, target, spec)
    if sch is None:
        return None
    secs, run_secs, args_info = measure(sch.mod, target, rpc)
    if secs is None:
        return None
    db.commit_tuning_record(ms.database.TuningRecord(sch.trace, db.commit_workload(workload(func)),
                                                     run_secs, target, args_info))
    return secs


class _MetaScheduleLogs:
    """MetaSchedule logs every iteration at INFO to the console; keep them in work_dir/logs only (the level
    and propagation of its loggers are saved first and restored after)."""

    def __init__(self, work_dir):
        self.dir = Path(work_dir) / "logs"

    def __enter__(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        self.saved = []
        for name in _MS_LOGGERS:
            lg = logging.getLogger(name)
            self.saved.append((lg, lg.level, lg.propagate))
            lg.setLevel(logging.WARNING)
        return self

    def __exit__(self, *exc):
        for lg, level, prop in self.saved:
            lg.setLevel(level)
            lg.propagate = prop
        return False


def tune_kernel(func: tvm.tirx.PrimFunc, target, work_dir, trials: int, seed: int = 0, rpc: RPC | None = None,
                space: str = "project", on_batch=None, spec=None) -> float:
    """Tune one kernel into the JSON database at ``work_dir``; returns seconds spent. ``space``: "project"
    (the kernel's rule, ``schedules.rules``) or "generic" (MetaSchedule's default rules)."""
    from tvm.s_tir import meta_schedule as ms

    t0 = time.time()
    cores = int(target.attrs.get("num-cores", 1)) if hasattr(target, "attrs") else 1
    callbacks = list(ms.measure_callback.MeasureCallback.create("default"))
    if on_batch is not None:
        callbacks.append(Progress(on_batch))
    gen = "post-order-apply"
    if space == "project":
        family = spec.family if spec is not None else family_of(func)
        gen = rule_for(family, target).space(target)
        if gen is None:
            raise TuningError(f"{family} kernels have no design space on {target.kind.name} (hand schedule only)")
    with _MetaScheduleLogs(work_dir):
        ms.tune_tir(workload(func), target, work_dir=str(Path(work_dir) / "logs"), max_trials_global=trials,
                    num_trials_per_iter=min(8, trials), cost_model=ms.cost_model.XGBModel(num_tuning_cores=cores),
                    database=open_database(work_dir), builder=builder(target), runner=runner(rpc, target),
                    measure_callbacks=callbacks, space=gen, num_tuning_cores=cores, seed=seed)
    return time.time() - t0


def specs_of_manifest(manifest: dict, where="the artifact") -> dict:
    """{kernel name: spec} a compiled artifact's manifest recorded (``kernel_specs``)."""
    specs = manifest.get("kernel_specs")
    if specs is None:
        raise TuningError(f"{where} records no kernel specs (compiled by an older tvm-anyprec, which wrote only "
                          "kernel names): compile it again, or tune its ONNX graphs or model instead")
    return {name: spec_from_dict(d) for name, d in specs.items()}


def tunable_specs(mod) -> dict:
    """{kernel name: spec} of the kernels of a rewritten module that have a design space (the linear ones)."""
    return {k: s for k, s in kernel_specs(mod).items() if s.family in ("anyprec_linear", "dense_nt")}


@dataclass
class TuneConfig:
    target: str = "x86"
    trials: int = 32
    log_dir: str | Path | None = None
    rpc: RPC | None = None
    only: str | None = None
    space: str = "project"
    progress: bool = True
    seed: int = 0


def tune_kernels(specs: dict, cfg: TuneConfig) -> list[dict]:
    """Tune every kernel of ``specs`` ({name: KernelSpec}) for the ``cfg.target`` preset, ``cfg.trials``
    measured records per kernel, into ``cfg.log_dir`` (default tuning_logs/<target>/). Resumable (see the
    module docstring). ``cfg.only``: a substring filter on kernel names. Returns one row per kernel: name,
    records added now, records in all, best ms, reused (nothing to do)."""
    if cfg.trials < 1:
        raise TuningError(f"--trials must be >= 1, got {cfg.trials}")
    tp = preset(cfg.target)
    rpc = cfg.rpc
    if rpc is None and tp.get("device") == "cuda":
        from ..targets.cuda import has_gpu
        if not has_gpu():
            raise TuningError(f"measuring {cfg.target} kernels needs an NVIDIA GPU: run tune on a machine with "
                              "one, or give --rpc-tracker/--rpc-key of one (webgpu tunes here, on any WebGPU adapter)")
    if cfg.only:
        specs = {k: s for k, s in specs.items() if cfg.only in k}
        if not specs:
            raise TuningError(f"no kernel name contains {cfg.only!r}")
    if cfg.space == "project":        # kernels whose rule has no design space keep their hand schedule
        tgt = tvm.target.Target(tp["target"])
        specs = {k: s for k, s in specs.items() if rule_for(s, tgt).space(tgt) is not None}
    with ExitStack() as stack:
        if rpc is None and tp["arch"] == "aarch64" and host_arch() != "aarch64":
            rpc = stack.enter_context(emulated_board(tp))
        return _tune(specs, cfg, tp, rpc)


def _tune(specs, cfg, tp, rpc) -> list[dict]:
    from tqdm.auto import tqdm

    tgt = tvm.target.Target(tp["target"])
    log_dir = Path(cfg.log_dir) if cfg.log_dir is not None else default_log_dir(cfg.target)
    log_dir.mkdir(parents=True, exist_ok=True)
    repair_log(log_dir)
    db = open_database(log_dir)
    plan = []
    for name, spec in sorted(specs.items()):
        f = spec.build()
        plan.append((name, spec, f, max(0, cfg.trials - count_records(db, f, tgt))))
    rows = []
    bar = tqdm(total=sum(p[-1] for p in plan), unit="trial", disable=not cfg.progress, file=sys.stderr,
               desc=f"tuning {len(plan)} kernels for {cfg.target}")
    state = {"best": None, "wl": 0, "name": ""}

    def on_batch(n, secs):
        if secs:
            b = min(secs)
            state["best"] = b if state["best"] is None else min(state["best"], b)
        bar.update(n)
        bar.set_postfix_str(f"workload {state['wl'] + 1}/{len(plan)} {state['name']}, best "
                            + (f"{state['best'] * 1e3:.3f} ms" if state["best"] else "-"))

    try:
        for name, spec, f, n in plan:
            before = count_records(db, f, tgt)
            state["name"] = name
            if n and before == 0:          # first session on this kernel: the hand schedule is record 1
                hand = commit_hand_baseline(db, f, tgt, rpc, spec)
                n -= 1
                state["best"] = None
                on_batch(1, [hand] if hand else [])
            if n:
                state["best"] = best_seconds(db, f) or state["best"]
                tune_kernel(f, tgt, log_dir, n, seed=cfg.seed, rpc=rpc, space=cfg.space, on_batch=on_batch,
                            spec=spec)
                db = open_database(log_dir)           # tune_kernel appended to the files: re-read them
            state["wl"] += 1
            after = count_records(db, f, tgt)
            rows.append({"kernel": name, "trials_now": after - before, "records": after,
                         "best_ms": (best_seconds(db, f) or 0) * 1e3, "reused": after == before})
    finally:
        bar.close()
    return rows
