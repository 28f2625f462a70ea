"""The tuning-record database: MetaSchedule's JSON database in one directory per target preset.

``<log_dir>/database_workload.json`` + ``database_tuning_record.json`` (one record per line; a line cut by a
kill is dropped by ``repair_log``), ``int_gemm_variants.json`` (the ARM integer-GEMM variant measured
fastest per kernel, ``tune.variants``) and ``bitplane_rows.json`` (the CPU bitplane kernel's rows per task per
bit-width, ``tune.bitplane``). Each kernel is a workload keyed by its structure (MetaSchedule's
structural hash of ``workload(func)``), so a record made for one model applies to every model with the same
layer shapes. Records are looked up on the kernel as the pass emits it, without the attributes added later
(AnnotateTIROpPattern's op_pattern, is_scheduled, the kernel spec).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import tvm

from ..env import default_log_dir  # noqa: F401  (re-exported: the directory compile and tune default to)
from ..kernels.spec import SPEC_ATTR

logger = logging.getLogger(__name__)

DB_FILES = ("database_workload.json", "database_tuning_record.json")
VARIANTS_FILE = "int_gemm_variants.json"
ROWS_FILE = "bitplane_rows.json"
_NOT_WORKLOAD = ("op_pattern", "tirx.is_scheduled", SPEC_ATTR)


def workload(func: tvm.tirx.PrimFunc) -> tvm.IRModule:
    """The IRModule a kernel is tuned and looked up as."""
    f = func
    for attr in _NOT_WORKLOAD:
        if f.attrs is not None and attr in f.attrs:
            f = f.without_attr(attr)
    return tvm.IRModule({"main": f.with_attr("global_symbol", "main")})


def open_database(work_dir):
    from tvm.s_tir import meta_schedule as ms

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(path_workload=str(work_dir / DB_FILES[0]),
                                    path_tuning_record=str(work_dir / DB_FILES[1]))


def load_database(path, warn=logger.warning):
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


def query_database(db, func: tvm.tirx.PrimFunc, target) -> tvm.tirx.PrimFunc | None:
    """The best tuned schedule of ``func`` in ``db`` (scheduled PrimFunc), or None."""
    sch = db.query_schedule(workload(func), target, workload_name="main")
    if sch is None:
        return None
    new = sch.mod["main"].with_attr("tirx.is_scheduled", True)
    return new.without_attr("global_symbol") if func.attrs is None or "global_symbol" not in func.attrs else new


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


def repair_log(path, warn=logger.warning) -> int:
    """Drop lines a kill cut short (a JSON database is one record per line); returns how many were dropped."""
    dropped = 0
    for name in DB_FILES:
        f = Path(path) / name
        if not f.exists():
            continue
        good = []
        for line in f.read_text().splitlines():
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


def load_variant_choices(log_dir, warn=logger.warning) -> dict:
    """{int_gemm kernel name: variant} from <log_dir>/int_gemm_variants.json ({} when absent; a corrupt file
    is ignored with a warning)."""
    try:
        return {k: v["variant"] for k, v in read_variant_table(log_dir).items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        warn(f"warning: ignoring {Path(log_dir) / VARIANTS_FILE}: {e}")
        return {}


def _save_table(path: Path, table: dict) -> Path:
    """Write a JSON table atomically (a kill leaves the old one)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
    tmp.replace(path)
    return path


def _read_table(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def save_variant_table(log_dir, table: dict) -> Path:
    return _save_table(Path(log_dir) / VARIANTS_FILE, table)


def read_variant_table(log_dir) -> dict:
    return _read_table(Path(log_dir) / VARIANTS_FILE)


def save_rows_table(log_dir, table: dict) -> Path:
    return _save_table(Path(log_dir) / ROWS_FILE, table)


def read_rows_table(log_dir) -> dict:
    return _read_table(Path(log_dir) / ROWS_FILE)


def load_rows_choices(log_dir, warn=logger.warning) -> dict:
    """{bitplane kernel name: {bit-width: rows per task}} from <log_dir>/bitplane_rows.json ({} when absent; a
    corrupt file is ignored with a warning, and compile keeps the kernel's defaults)."""
    try:
        out = {}
        for name, entry in read_rows_table(log_dir).items():
            rows = {int(b): int(r) for b, r in entry["rows"].items()}
            if any(r < 1 or r > 8 for r in rows.values()):
                raise ValueError(f"{name}: rows per task out of 1..8: {rows}")
            out[name] = rows
        return out
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        warn(f"warning: ignoring {Path(log_dir) / ROWS_FILE}: {e}")
        return {}
