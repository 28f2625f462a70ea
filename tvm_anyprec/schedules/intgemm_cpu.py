"""Hand schedules (CPU) for the low-bit-activation kernels of ``tvm_anyprec.kernels.intgemm``.

int_gemm: a tile of weight rows is unpacked (INT4 nibbles -> int8) once and reused for every token; the
reduction inside a group is split into 32-lane int32 partial sums (rfactor) that vectorize, so LLVM emits
sign/zero-extends plus a 16-bit-lane multiply-add (vpmaddwd on AVX2; the operands fit in 16 bits); the lane
sum, the zero-point correction and the scales follow per tile. Tiles of N run in parallel.
act_quant: tokens in parallel, the element loops vectorized.
"""
from __future__ import annotations

import tvm


def _tile(extent: int, want: int) -> int:
    return next(t for t in (want, 16, 8, 4, 2, 1) if extent % t == 0)


def schedule_int_gemm_cpu(func: tvm.tirx.PrimFunc, n_tile: int = 16) -> tvm.tirx.PrimFunc:
    sch = tvm.s_tir.Schedule(func)
    acc = sch.get_sblock("acc")
    m, n, g, kk = sch.get_loops(acc)
    nt = _tile(int(sch.get(n).extent), n_tile)
    no, ni = sch.split(n, [None, nt])
    sch.reorder(no, m, g, kk, ni)
    sch.parallel(no)
    sch.vectorize(ni)
    unpack = sch.get_sblock("unpack")
    sch.compute_at(unpack, no)
    if nt > 1:  # the tile of unpacked rows stored k-major ([K, nt]): the vector over n reads it contiguously
        sch.transform_layout(unpack, ("write", 0), lambda a, b: (a // nt, b, a % nt))
        un, uk = sch.get_loops(unpack)[-2:]
        sch.reorder(uk, un)
        sch.vectorize(un)
    sch.decompose_reduction(acc, kk)
    try:
        deq = sch.get_sblock("dequant")
    except Exception:  # the "acc" variant has no dequantize block
        deq = None
    if deq is not None:
        sch.reverse_compute_at(deq, no)
        inner = sch.get_loops(deq)[1:]   # below the parallel tile loop: (m,) n-in-tile, g (unit loops vanish)
        if nt > 1 and len(inner) >= 2:
            dn, dg = inner[-2:]
            sch.reorder(dg, dn)
            sch.vectorize(dn)
            sch.decompose_reduction(deq, dg)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def schedule_act_quant_cpu(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    sch = tvm.s_tir.Schedule(func)
    m = sch.get_loops(sch.get_sblock("absmax"))[0]
    sch.parallel(m)
    for name in ("scale", "quant", "gsum"):
        sch.reverse_compute_at(sch.get_sblock(name), m)
    quant = sch.get_sblock("quant")
    k = sch.get_loops(quant)[-1]
    _, kv = sch.split(k, [None, _tile(int(sch.get(k).extent), 16)])
    sch.vectorize(kv)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)
