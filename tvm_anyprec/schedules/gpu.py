"""Hand schedules of the linear kernels for GPU targets (CUDA and WebGPU share them).

Two shapes of work, chosen by M (rows of X):

* GEMV (M = 1, decode steps): one thread block per ``rows`` output rows (threadIdx.y); along K the
  ``lanes`` threads of a row (threadIdx.x) each reduce whole 32-bit plane words (adjacent threads read adjacent
  words: coalesced plane loads), decoding their own weights (the "decode" block is inlined), then the partial
  sums are combined by a cross-thread reduction (warp shuffles on CUDA, shared memory on WebGPU). Optionally
  (``lut_shared``) the LUT rows of the block are staged in shared memory first, so the per-weight LUT gather
  hits shared memory: worth it when K is large against the LUT width (the whole 3..8-bit LUT row is staged,
  the index depends on the run-time bit-width).
* tiled (M > 1, prefill): a ``tm`` x ``tn`` thread block computes one output each, with a local accumulator;
  per K step of ``tk`` the block decodes the [tn, tk] weight tile once into shared memory (cooperatively), and
  every row of X in the block reuses it. The fp32 dense kernel stages its weight tile the same way.

Results are marked ``tirx.is_scheduled`` (dlight's GPU rules assert on the LUT gather).
``linear_space_gpu`` is the same structure with the knobs sampled (a MetaSchedule ScheduleFn).
"""
from __future__ import annotations

import tvm

from ..quant.bitplanes import WORD
from ..kernels import dense
from .cpu import _has_block

MAX_THREADS = 256          # WebGPU's default limit (maxComputeInvocationsPerWorkgroup); CUDA allows 1024


def _extent(sch, loop) -> int:
    return int(sch.get(loop).extent)


def _read_index(sch, block, name: str) -> int:
    for i, region in enumerate(sch.get(block).reads):
        if getattr(region, "buffer", None) is not None and region.buffer.name == name or \
                getattr(region, "source", None) is not None and region.source.name == name:
            return i
    raise ValueError(f"block reads no buffer {name!r}")


def _bind_coop(sch, block, threads) -> None:
    """Spread the (2-D) copy loops of a block placed by compute_at over the block's threads: fuse, split
    [serial, *threads], bind."""
    loops = sch.get_loops(block)[-2:]
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    parts = sch.split(fused, [None] + [t for _, t in threads])
    for lp, (axis, _) in zip(parts[1:], threads):
        sch.bind(lp, axis)


def stage_tile(sch, block, loop, tm: int, tn: int) -> None:
    """Compute ``block`` (a weight tile: decoded, unpacked or copied) into shared memory at ``loop``, spread
    over the block's tm x tn threads. Shared scope first: compute_at then sizes the tile for the whole thread
    block, not for one thread."""
    sch.set_scope(block, 0, "shared")
    sch.compute_at(block, loop, preserve_unit_loops=True)
    _bind_coop(sch, block, [("threadIdx.y", tm), ("threadIdx.x", tn)])


def annotate_unroll(sch, block, unroll) -> None:
    if unroll is not None:
        sch.annotate(block, "pragma_auto_unroll_max_step", unroll)
        sch.annotate(block, "pragma_unroll_explicit", 1)


def _schedule_gemv(sch, rows, lanes, lut_shared=False, unroll=None) -> None:
    if _has_block(sch, "decode"):
        sch.compute_inline(sch.get_sblock("decode"))
    blk = sch.get_sblock("matmul")
    m, n, k = sch.get_loops(blk)
    no, ny = sch.split(n, [None, rows])
    ko, tx, ki = sch.split(k, [None, lanes, WORD])     # thread tx reduces words ko*lanes + tx
    sch.reorder(m, no, ny, tx, ko, ki)
    sch.bind(no, "blockIdx.x")
    sch.bind(ny, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    if lut_shared:
        lut = sch.cache_read(blk, _read_index(sch, blk, "LUTS"), "shared")
        sch.compute_at(lut, no, preserve_unit_loops=True)
        _bind_coop(sch, lut, [("threadIdx.y", rows), ("threadIdx.x", lanes)])
    annotate_unroll(sch, blk, unroll)


def _schedule_tiled(sch, tm, tn, tk=WORD, unroll=None) -> None:
    blk = sch.get_sblock("matmul")
    m, n, k = sch.get_loops(blk)
    mo, my = sch.split(m, [None, tm])
    no, nx = sch.split(n, [None, tn])
    ko, ki = sch.split(k, [None, tk])
    sch.reorder(mo, no, my, nx, ko, ki)
    sch.bind(mo, "blockIdx.y")
    sch.bind(no, "blockIdx.x")
    sch.bind(my, "threadIdx.y")
    sch.bind(nx, "threadIdx.x")
    acc = sch.cache_write(blk, 0, "local")
    sch.reverse_compute_at(acc, nx, preserve_unit_loops=True)
    if _has_block(sch, "decode"):   # the weight tile, decoded (or copied: make_dense_nt_staged) into shared memory
        stage_tile(sch, sch.get_sblock("decode"), ko, tm, tn)
    # else: the one-block dense kernel (a tuning space on it): W is read from global memory
    annotate_unroll(sch, blk, unroll)


def _as_two_blocks(func):
    """The dense kernel (one "matmul" block) in its two-block form; the bitplane kernel as it is."""
    sch = tvm.s_tir.Schedule(func)
    if _has_block(sch, "decode"):
        return func
    (M, K), (N, _) = ([int(d) for d in p.shape] for p in func.params[:2])
    return dense.make_dense_nt_staged(M, N, K)


def _mnk(sch):
    return [_extent(sch, lp) for lp in sch.get_loops(sch.get_sblock("matmul"))]


def _largest_divisor(n: int, prefs) -> int:
    return next(t for t in prefs if n % t == 0)


def _lut_width(sch) -> int | None:
    """Width of the LUTS parameter (None for the dense kernel)."""
    for buf in sch.mod["main"].params:      # TVM 0.27: buffer params are buffer-typed Vars
        if buf.name == "LUTS":
            return int(buf.shape[1])
    return None


def gemv_lanes(extent: int, choices=(32, 16, 8)) -> int:
    """Threads along a reduction of ``extent`` units (plane words, weight groups): the width among
    ``choices`` wasting the fewest idle lanes (the widest on a tie)."""
    return min(choices, key=lambda t: (-(-extent // t) * t - extent, -t))


def hand_schedule(func_or_mod, max_threads: int = MAX_THREADS, lut_shared: bool | None = None):
    """The GPU hand schedule as a Schedule. ``lut_shared`` (GEMV only; default: when K >= 2x the LUT width)."""
    sch = tvm.s_tir.Schedule(func_or_mod)
    M, N, KP = _mnk(sch)
    if M > 1:
        sch = tvm.s_tir.Schedule(_as_two_blocks(sch.mod["main"]))
    if M == 1:
        lanes = gemv_lanes(KP // WORD)
        rows = _largest_divisor(N, [r for r in (8, 4, 2, 1) if r * lanes <= max_threads])
        L = _lut_width(sch)
        if lut_shared is None:
            lut_shared = L is not None and KP >= 2 * L
        _schedule_gemv(sch, rows, lanes, bool(lut_shared and L is not None))
    else:
        tn = _largest_divisor(N, (32, 16, 8, 4, 2, 1))
        tm = _largest_divisor(M, [t for t in (16, 8, 4, 2, 1) if t * tn <= max_threads])
        _schedule_tiled(sch, tm, tn)
    return sch


def schedule_linear_gpu(func: tvm.tirx.PrimFunc, max_threads: int = MAX_THREADS,
                        lut_shared: bool | None = None) -> tvm.tirx.PrimFunc:
    return hand_schedule(func, max_threads, lut_shared).mod["main"].with_attr("tirx.is_scheduled", True)


def max_threads_of(target) -> int:
    """Threads per block the schedules may use on ``target`` (capped at 256, which every target allows)."""
    try:
        return min(MAX_THREADS, int(target.attrs["max_num_threads"]))
    except Exception:  # no such attribute
        return MAX_THREADS


UNROLL = (0, 16, 64)


def _uniform(sch, choices):
    return sch.sample_categorical(list(choices), [1.0 / len(choices)] * len(choices))


def sample_knobs(sch, M: int, N: int, max_threads: int, lanes=(8, 16, 32, 64)):
    """The sampled knobs shared by the GPU design spaces: (unroll, rows, lanes) for a GEMV (M = 1), else
    (unroll, tm, tn) for the thread tile."""
    unroll = _uniform(sch, UNROLL)
    if M == 1:
        lanes_c = [t for t in lanes if t <= max_threads]
        rows_c = [r for r in (1, 2, 4, 8) if N % r == 0 and r * max(lanes_c) <= max_threads] or [1]
        return unroll, _uniform(sch, rows_c), _uniform(sch, lanes_c)
    tn_c = [t for t in (8, 16, 32) if N % t == 0] or [1]
    tm_c = [t for t in (1, 2, 4, 8) if M % t == 0 and t * max(tn_c) <= max_threads] or [1]
    tn = _uniform(sch, tn_c)
    return unroll, _uniform(sch, tm_c), tn


def linear_space_gpu(sch, max_threads: int = MAX_THREADS) -> None:
    """MetaSchedule design space (a ScheduleFn) of the linear kernels on GPU: the hand schedule's structure
    with sampled rows/lanes (GEMV) or thread tile (tiled), and unrolling. Tuning needs a runner
    on the GPU (an RPC tracker with the device)."""
    M, N, KP = _mnk(sch)
    unroll, a, b = sample_knobs(sch, M, N, max_threads)
    if M == 1:
        L = _lut_width(sch)     # a structural choice, not sampled (a trace replays one structure)
        _schedule_gemv(sch, a, b, L is not None and KP >= 2 * L, unroll)
    else:
        _schedule_tiled(sch, a, b, WORD, unroll)
