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


def _schedule_linear(sch, n_factors, lane, dlane, unroll=None) -> None:
    """The CPU linear schedule; the knobs are ints (hand schedule) or sampled random variables (the search
    space): n_factors = [N tiles, rows per tile], lane = partial sums per row (vector width of the
    reduction), dlane = vector width of the bitplane decode, unroll = max auto-unroll step of the tile body."""
    m, n, k = sch.get_loops(sch.get_sblock("matmul"))
    no, ni = sch.split(n, n_factors)
    kw, ln = sch.split(k, [None, lane])
    sch.reorder(no, m, ni, kw, ln)
    rf = sch.rfactor(ln, 2)
    loops = sch.get_loops(rf)
    sch.vectorize(loops[-1])
    sch.parallel(loops[0])
    # unit loops kept: the number of loops must not depend on sampled tile sizes (a trace is replayed)
    sch.reverse_compute_at(sch.get_sblock("matmul"), loops[0], preserve_unit_loops=True)  # Y_rf stays tile-sized
    if _has_block(sch, "decode"):
        dec = sch.get_sblock("decode")
        sch.compute_at(dec, loops[0], preserve_unit_loops=True)
        _, dl = sch.split(sch.get_loops(dec)[-1], [None, dlane])
        sch.vectorize(dl)
    if unroll is not None:
        sch.annotate(rf, "meta_schedule.unroll_explicit", unroll)


def hand_schedule(func_or_mod, n_tile: int = 16):
    """The hand schedule as a Schedule (its trace can be stored as a tuning record): tiles of n_tile rows (or
    the largest of 8, 4, 2, 1 dividing N), 32-lane partial sums, decode vectorized over a plane word."""
    sch = tvm.s_tir.Schedule(func_or_mod)
    n_extent = int(sch.get(sch.get_loops(sch.get_sblock("matmul"))[1]).extent)
    tile = next(t for t in (n_tile, 8, 4, 2, 1) if n_extent % t == 0)
    _schedule_linear(sch, [None, tile], 32, 32)
    return sch


def schedule_linear_cpu(func: tvm.tirx.PrimFunc, n_tile: int = 16) -> tvm.tirx.PrimFunc:
    return hand_schedule(func, n_tile).mod["main"].with_attr("tirx.is_scheduled", True)


LANES = (8, 16, 32)
UNROLL = (0, 16, 64, 256)


def linear_space_cpu(sch) -> None:
    """MetaSchedule design space of the linear kernels (bitplane and dense): the hand schedule's structure
    with its knobs sampled, so the tuner explores the N tiling (perfect tiles, up to 64 rows per parallel
    task), the reduction vector width, the decode vector width and unrolling. Used as a ScheduleFn."""
    n = sch.get_loops(sch.get_sblock("matmul"))[1]
    n_factors = sch.sample_perfect_tile(n, n=2, max_innermost_factor=64)
    uniform = [1.0 / len(LANES)] * len(LANES)
    lane = sch.sample_categorical(list(LANES), uniform)
    dlane = sch.sample_categorical(list(LANES), uniform) if _has_block(sch, "decode") else 32
    unroll = sch.sample_categorical(list(UNROLL), [1.0 / len(UNROLL)] * len(UNROLL))
    _schedule_linear(sch, n_factors, lane, dlane, unroll)


def parallelize_outer(func: tvm.tirx.PrimFunc, min_extent: int = 2) -> tvm.tirx.PrimFunc | None:
    """Fallback for ops nobody scheduled (attention matmuls, cache updates). Per block, on a copy of the
    schedule so a rule that does not fit leaves nothing half-done:
      1. matmul-like blocks (S..S R): S..S fused and parallel, then R, then the last S vectorized, so the
         innermost loop walks the output and the right operand contiguously;
      2. otherwise the leading data-parallel loops fused and run in parallel.
    Only spatial loops are parallelized (dlight's block analysis says which). None when nothing fits."""
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    try:
        sch = tvm.s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
    except Exception:  # not schedulable TIR
        return None
    if not infos:
        return None
    changed = False
    for info in infos:
        for rule in (_reduce_then_vector, _parallel_lead):
            trial = sch.copy()
            try:
                ok = rule(trial, info, min_extent)
            except Exception:  # the rule does not fit this block: try the next one on a fresh copy
                ok = False
            if ok:
                sch, changed = trial, True
                break
    return sch.mod["main"] if changed else None


def _reduce_then_vector(sch, info, _min_extent) -> bool:
    kinds = info.dom_kind()
    loops = [it.loop_rv for it in info.iters]
    if len(kinds) < 2 or not kinds.endswith("SR") or kinds.count("R") != 1 or any(lp is None for lp in loops):
        return False
    *outer, last_s, red = loops
    if int(sch.get(last_s).extent) % 8:
        return False
    sch.reorder(*outer, red, last_s)
    if outer:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    sch.vectorize(last_s)                        # before decompose_reduction (compact-dataflow check)
    sch.decompose_reduction(info.block_rv, red)
    return True


VECTOR_LANES = 16   # an all-spatial block's fused loop is split into chunks of this many, vectorized


def _parallel_lead(sch, info, min_extent) -> bool:
    lead = []
    for it in info.iters:
        if it.kind != "S" or it.loop_rv is None:
            break
        lead.append(it.loop_rv)
    if not lead:
        return False
    fused = sch.fuse(*lead) if len(lead) > 1 else lead[0]
    extent = int(sch.get(fused).extent)
    if extent < min_extent:
        return False
    if len(lead) == len(info.iters) and extent % (VECTOR_LANES * 2) == 0:   # elementwise: vector chunks
        outer, inner = sch.split(fused, [None, VECTOR_LANES])
        sch.parallel(outer)
        sch.vectorize(inner)
        return True
    sch.parallel(fused)
    return True


def _unscheduled_pass(name: str, schedule):
    """A module pass applying ``schedule(func)`` (a scheduled PrimFunc, or None: leave it) to every PrimFunc not
    marked scheduled, and marking what it scheduled."""

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod, _ctx):
        for gv, f in list(mod.functions_items()):
            if isinstance(f, tvm.tirx.PrimFunc) and "tirx.is_scheduled" not in (f.attrs or {}):
                g = schedule(f)
                if g is not None:
                    mod[gv] = g.with_attr("tirx.is_scheduled", True)
        return mod

    return _pass


def fallback_pass():
    """Module pass: parallelize_outer on every PrimFunc not marked scheduled (runs after dlight)."""
    return _unscheduled_pass("AnyPrecParallelizeRemaining", parallelize_outer)


SMALL_OP_ELEMS = 1 << 15   # outputs up to this many elements run on one thread (a decode step's norms, adds)


def _param_buffers(func) -> list:
    return [p for p in func.params if isinstance(p, tvm.tirx.Buffer)]


def _output_elems(func) -> int:
    """Elements of the largest buffer parameter (-1: a dynamic shape)."""
    total = 0
    for buf in _param_buffers(func):
        n = 1
        for d in buf.shape:
            if not isinstance(d, tvm.tirx.IntImm):
                return -1
            n *= int(d)
        total = max(total, n)
    return total


def schedule_small(func: tvm.tirx.PrimFunc, max_elems: int = SMALL_OP_ELEMS) -> tvm.tirx.PrimFunc | None:
    """Ops on small tensors (RMSNorm of one token, residual adds, rotary, reshapes; largest buffer at most
    ``max_elems``): on one thread, every intermediate block inlined into its consumer, each reduction computed
    once (dlight's CPU Reduction rule recomputes a norm's mean for each output element, in parallel: 112 us
    for one 576-value RMSNorm against about 1 us here). None: not small, or not schedulable."""
    n = _output_elems(func)
    if n < 0 or n > max_elems:
        return None
    try:
        sch = tvm.s_tir.Schedule(func)
        root = sch.get_sblock("root") if _has_block(sch, "root") else None
        blocks = sch.get_child_blocks(root) if root is not None else []
    except Exception:  # not schedulable TIR (already lowered)
        return None
    outs = {b.name for b in _param_buffers(func)}
    for b in blocks:
        block = sch.get(b)
        if block.init is not None or any(w.source.name in outs for w in block.writes):
            continue   # reductions are computed once; outputs stay
        try:
            sch.compute_inline(b)
        except Exception:  # not inlinable (e.g. read with a reduction): keep it as its own loop nest
            pass
    return sch.mod["main"]


def small_ops_pass():
    """Module pass: ``schedule_small`` on every unscheduled PrimFunc it fits (runs before dlight)."""
    return _unscheduled_pass("AnyPrecSmallOps", schedule_small)
