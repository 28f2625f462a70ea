"""ARM integer-GEMM variant choice: the variants (neon / sdot / smmla / packed) are different kernels, not
schedules of one, so this is a measured choice among them rather than a MetaSchedule search. The fastest per
kernel goes to <log_dir>/int_gemm_variants.json, which ``compile`` then applies (how = "tuned:<variant>")."""
from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path

import tvm

from ..errors import TuningError
from ..kernels.intgemm import IntGemm
from ..kernels.intgemm_arm import unsupported
from ..schedules.intgemm_arm import VARIANTS, schedule_int_gemm_arm, target_features
from ..targets import host_arch, preset
from .board import emulated_board
from .driver import specs_of_manifest
from .measure import RPC, measure_many
from .records import default_log_dir, read_variant_table, save_variant_table

logger = logging.getLogger(__name__)


def int_gemm_kernels(manifest: dict) -> dict:
    """{int_gemm kernel name: (spec, activation bit-widths of the layers it serves)} of a low-bit-activation
    artifact's manifest (a kernel serves every layer of its N, K whose rows it computes)."""
    out = {}
    for name, spec in specs_of_manifest(manifest).items():
        if isinstance(spec, IntGemm):
            out[name] = (spec, {v["act_bits"] for v in manifest["layers"].values()
                                if v["N"] == spec.N and v["K"] == spec.K and spec.M in v["rows"].values()})
    return out


def tune_int_gemm_variants(manifest: dict, target: str, log_dir=None, rpc: RPC | None = None,
                           progress: bool = True, where: str = "the artifact") -> list[dict]:
    """Measure every ARM variant of every integer GEMM kernel of a low-bit-activation artifact's manifest on
    the target (a board through ``rpc``; default for aarch64 presets: the emulated board) and store the
    fastest per kernel. Returns one row per kernel: name, variant, ms per variant."""
    tp = preset(target)
    if tp["arch"] != "aarch64":
        raise TuningError(f"integer GEMM variants exist for the aarch64 presets; {target} has one schedule")
    kernels = int_gemm_kernels(manifest)
    if not kernels:
        raise TuningError(f"{where} has no integer GEMM kernels: compile it with --act-bits 8|4")
    tgt = tvm.target.Target(tp["target"])
    feats = target_features(tp)
    log_dir = Path(log_dir) if log_dir is not None else default_log_dir(target)
    log_dir.mkdir(parents=True, exist_ok=True)
    table = read_variant_table(log_dir)
    rows = []
    with ExitStack() as stack:
        device = "the RPC devices"
        if rpc is None and host_arch() != "aarch64":
            rpc, device = stack.enter_context(emulated_board(tp)), "the emulated board"
        plan = []
        for name, (spec, bits) in sorted(kernels.items()):
            ab = 4 if bits == {4} else 8
            cands = [v for v, (need, _) in VARIANTS.items() if (need == "neon" or need in feats)
                     and (v == "neon" or not unsupported(v, spec.K, spec.group_size, ab))]
            plan.append((name, spec.make(), ab, cands))
        # one build batch and one measurement batch (worker pools start once, not per variant)
        cases = [(name, v, tvm.IRModule({"main": schedule_int_gemm_arm(f, v, feats, ab).with_attr("global_symbol",
                                                                                              "main")}))
                 for name, f, ab, cands in plan for v in cands]
        if progress:
            logger.info(f"int_gemm variants for {target}: building {len(cases)} kernels, measuring on {device}")
        secs = [r[0] for r in measure_many([m for *_, m in cases], tgt, rpc)]
        for name, _f, ab, _cands in plan:
            ms_by = {v: t * 1e3 for (n, v, _), t in zip(cases, secs) if n == name and t is not None}
            if not ms_by:
                raise TuningError(f"{name}: no variant could be measured on {target}")
            best = min(ms_by, key=ms_by.get)
            table[name] = {"variant": best, "ms": ms_by, "act_bits": ab}
            rows.append({"kernel": name, "variant": best, "ms": ms_by})
        save_variant_table(log_dir, table)
    return rows
