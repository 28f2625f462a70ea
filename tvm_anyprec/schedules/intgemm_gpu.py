"""GPU hand schedules (CUDA and WebGPU share them) of the low-bit-activation kernels in their word form
(``kernels.intgemm`` with ``words=True``: XQ uint32 [M, K/4], WP uint32 [N, K/8]).

act_quant: one thread block per token. The |x| max is a cross-thread reduction (warp shuffles on CUDA,
shared memory on WebGPU) whose result stays in shared memory; the threads then quantize and pack four codes
per word (word w by thread w mod T) and sum the codes of each weight group (group g by thread g mod T).

int_gemm, two shapes of work chosen by M:

* GEMV (M = 1, decode steps): one block per ``rows`` output rows (threadIdx.y); along K the ``lanes``
  threads of a row (threadIdx.x) each take whole weight groups: the group's int32 dot product (exact) is
  computed in registers from packed words, scaled, and the rows' partial sums are combined by a cross-thread
  reduction.
* tiled (M > 1, prefill): a ``tm`` x ``tn`` thread block computes one output each; per weight group the
  block unpacks the [tn, group] INT4 tile once into shared memory (cooperatively) and every token of the
  block reuses it; the group's int32 dot product is exact, then scaled into a float accumulator.

``int_gemm_space_gpu`` is the same structure with rows/lanes or the thread tile sampled (a MetaSchedule
ScheduleFn). Results are marked ``tirx.is_scheduled``.
"""
from __future__ import annotations

import tvm

from .gpu import MAX_THREADS, _largest_divisor, annotate_unroll, gemv_lanes, sample_knobs, stage_tile


def _spread(sch, loop, threads: int, axis: str = "threadIdx.x") -> None:
    _, inner = sch.split(loop, [None, threads])
    sch.bind(inner, axis)


def schedule_act_quant_gpu(func: tvm.tirx.PrimFunc, max_threads: int = MAX_THREADS) -> tvm.tirx.PrimFunc:
    sch = tvm.s_tir.Schedule(func)
    if not any(sch.get(b).name_hint == "pack" for b in sch.get_child_blocks(sch.get_sblock("root"))):
        raise ValueError("the GPU schedule takes the word form of act_quant (make_act_quant(..., words=True))")
    K = int(sch.get(sch.get_loops(sch.get_sblock("absmax"))[1]).extent)
    T = min(max_threads, 128 if K >= 512 else 64)
    sch.compute_inline(sch.get_sblock("quant"))           # recomputed by pack and gsum (a multiply and a round)
    absmax = sch.get_sblock("absmax")
    m, k = sch.get_loops(absmax)
    sch.bind(m, "blockIdx.x")
    for name in ("scale", "pack", "gsum"):
        sch.reverse_compute_at(sch.get_sblock(name), m)
    sch.set_scope(absmax, 0, "shared")
    _spread(sch, k, T)
    w, _j = sch.get_loops(sch.get_sblock("pack"))[1:]
    _spread(sch, w, T)
    g, _kk = sch.get_loops(sch.get_sblock("gsum"))[1:]
    _spread(sch, g, T)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _gemv(sch, rows: int, lanes: int, unroll=None) -> None:
    sch.compute_inline(sch.get_sblock("unpack"))
    deq, acc = sch.get_sblock("dequant"), sch.get_sblock("acc")
    m, n, g = sch.get_loops(deq)
    no, ny = sch.split(n, [None, rows])
    go, tx = sch.split(g, [None, lanes])
    sch.reorder(m, no, ny, tx, go)
    # each lane sums its groups in a register (rfactor), then the lanes' sums are combined across threads
    rf = sch.rfactor(tx, factor_axis=0)         # (the original loops stay with the write-back block)
    _m, rno, rny, rtx, rgo = sch.get_loops(rf)
    sch.bind(rno, "blockIdx.x")
    sch.bind(rny, "threadIdx.y")
    sch.bind(rtx, "threadIdx.x")
    sch.set_scope(rf, 0, "local")
    sch.compute_at(acc, rgo)
    sch.set_scope(acc, 0, "local")
    sch.reverse_compute_at(deq, rno, preserve_unit_loops=True)    # the write-back: lanes reduced across threads
    rtx, *spatial = sch.get_loops(deq)[2:]
    sy = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    sch.reorder(sy, rtx)
    sch.bind(sy, "threadIdx.y")
    sch.bind(rtx, "threadIdx.x")
    annotate_unroll(sch, acc, unroll)


def _tiled(sch, tm: int, tn: int, unroll=None) -> None:
    deq, acc, unpack = sch.get_sblock("dequant"), sch.get_sblock("acc"), sch.get_sblock("unpack")
    m, n, g = sch.get_loops(deq)
    mo, my = sch.split(m, [None, tm])
    no, nx = sch.split(n, [None, tn])
    sch.reorder(mo, no, my, nx, g)
    sch.bind(mo, "blockIdx.y")
    sch.bind(no, "blockIdx.x")
    sch.bind(my, "threadIdx.y")
    sch.bind(nx, "threadIdx.x")
    sch.compute_at(acc, g)
    sch.set_scope(acc, 0, "local")
    out = sch.cache_write(deq, 0, "local")                # the float accumulator stays in a register
    sch.reverse_compute_at(out, nx, preserve_unit_loops=True)
    stage_tile(sch, unpack, g, tm, tn)        # the group's weight tile, unpacked once per block
    annotate_unroll(sch, acc, unroll)


def _mng(sch):
    return [int(sch.get(lp).extent) for lp in sch.get_loops(sch.get_sblock("dequant"))]


def hand_schedule(func_or_mod, max_threads: int = MAX_THREADS):
    """The int_gemm GPU hand schedule as a Schedule (its trace is a tuning record)."""
    sch = tvm.s_tir.Schedule(func_or_mod)
    M, N, G = _mng(sch)
    if M == 1:
        lanes = gemv_lanes(G, [t for t in (32, 16, 8, 4) if t <= max_threads] or [1])
        rows = _largest_divisor(N, [r for r in (8, 4, 2, 1) if r * lanes <= max_threads])
        _gemv(sch, rows, lanes)
    else:
        tn = _largest_divisor(N, (32, 16, 8, 4, 2, 1))
        tm = _largest_divisor(M, [t for t in (8, 4, 2, 1) if t * tn <= max_threads])
        _tiled(sch, tm, tn)
    return sch


def schedule_int_gemm_gpu(func: tvm.tirx.PrimFunc, max_threads: int = MAX_THREADS) -> tvm.tirx.PrimFunc:
    return hand_schedule(func, max_threads).mod["main"].with_attr("tirx.is_scheduled", True)


def int_gemm_space_gpu(sch, max_threads: int = MAX_THREADS) -> None:
    """MetaSchedule design space of int_gemm (word form) on GPU: the hand schedule's structure with sampled
    rows/lanes (GEMV) or thread tile (tiled), and unrolling."""
    M, N, _G = _mng(sch)
    unroll, a, b = sample_knobs(sch, M, N, max_threads, lanes=(4, 8, 16, 32))
    (_gemv if M == 1 else _tiled)(sch, a, b, unroll)
