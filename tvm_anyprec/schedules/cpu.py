"""Hand schedules for CPU targets (x86 now; the same loop structure serves aarch64).

Linear kernels (bitplane "decode" + "matmul", or fp32 dense_nt "matmul" alone): rows of W are decoded one
tile of rows at a time into a small fp32 buffer (vectorized over the 32 bits of a plane word) and reused for
every row of X; the reduction is split into 32-lane partial sums (rfactor) that vectorize; tiles of N run
in parallel.
"""
from __future__ import annotations

import tvm


def _has_block(sch, name: str) -> bool:
    try:
        sch.get_sblock(name)
        return True
    except Exception:  # ScheduleError: no such block
        return False


def schedule_linear_cpu(func: tvm.tirx.PrimFunc, n_tile: int = 16) -> tvm.tirx.PrimFunc:
    sch = tvm.s_tir.Schedule(func)
    m, n, k = sch.get_loops(sch.get_sblock("matmul"))
    n_extent = int(sch.get(n).extent)
    tile = next(t for t in (n_tile, 8, 4, 2, 1) if n_extent % t == 0)
    no, ni = sch.split(n, [None, tile])
    kw, lane = sch.split(k, [None, 32])
    sch.reorder(no, m, ni, kw, lane)
    rf = sch.rfactor(lane, 2)
    loops = sch.get_loops(rf)
    sch.vectorize(loops[-1])
    sch.parallel(loops[0])
    sch.reverse_compute_at(sch.get_sblock("matmul"), loops[0])  # lane sum per tile: Y_rf stays tile-sized
    if _has_block(sch, "decode"):
        dec = sch.get_sblock("decode")
        sch.compute_at(dec, loops[0])
        _, dlane = sch.split(sch.get_loops(dec)[-1], [None, 32])
        sch.vectorize(dlane)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)
