"""The bitplane operator for CPUs: one body per bit-width over the byte-sliced planes (``quant.byteslice``).

    Y[m, n] = sum_k X[m, k] * LUT_b[n, code_b(n, k)],   b = NBITS[0] clamped to min_bits..max_bits

Buffers: X fp32 [M, K]; PLANES uint8 [B, N, 8*ceil(K/64)] (byte-sliced, plane 0 = MSB); NBITS int32 [1];
Y fp32 [M, N]; and per accuracy mode:

* ``exact``: LUTS fp16 [N, L + 16] (the per-bit LUTs concatenated as today, zero-padded by 16 entries so a
  16-lane table load never leaves the buffer). fp32 math on the fp16 centroids.
* ``int8``: TABS int16 [N, L + 16] (each bit-width's centroids / its per-row scale, ``byteslice.int_tables``),
  SCALES fp32 [N, B - min_bits + 1]. The activations are quantized per call to int8 with one scale per block of
  32 columns (llama.cpp's Q8_0 granularity); each block's dot product is an exact int32 sum.

``if NBITS[0] <= b`` selects the body of bit-width b, so a b-bit call loads b plane vectors per 256 weights
and every shift, mask and table count is a constant. Inside a body, tiles of ``rows`` weight rows run in
parallel; per group of 256 weights each row's codes are decoded once (8 vectors of 32 codes), looked up into a
small tile (L1) and reused for every row of X (M > 1: prefill, verify). The activations are permuted once per
call into the decode order (and quantized, in int8 mode) before the parallel loop.

Instruction sets (``isa``, chosen from the target's features by ``cpu_isa``; an instruction the CPU lacks
would kill the process):

* ``avx2``: byte lookups by ``vpshufb`` on 16-entry tables (b <= 4: one; b = 5..8: 2^(b-4) tables merged by a
  ``vpblendvb`` tree on the code's high bits) of 16-bit values split into a low- and a high-byte table. int8
  mode: at BYTE_TABLE_BITS (3, 4) the high bytes alone, times the int8 activations by ``vpmaddubsw`` (``lut_isa.
  half_bytes``; 1.22-1.35x the re-joined form, Zen 4 running the AVX2 body, warm); above, the tables' form 16 A + r
  (``byteslice.in_form``): A by one ``vpshufb``, r by one tree, both by ``vpmaddubsw`` (``lut_isa.dot_form_avx2``;
  8 bits 1.6x the two re-joined trees). Exact mode: re-joined into fp16, widened (``vcvtph2ps``), FMA (faster than
  ``vpermps`` trees and gathers); at b = 8 scalar loads from an fp32 table in L1 (``SCALAR_MIN``; 4096x4096, 2
  threads, Zen 3: 7.2 ms against 11.7 with the trees; equal at b = 7).
* ``avx512`` (AVX-512BW + VBMI + VNNI): the GEMV body of ``kernels.lut_avx512`` (64-lane decode, ``vpermb`` /
  ``vpermi2b`` tables for every b, ``vpdpbusd``), M <= 32 (decode, verify, the prefill chunk; larger M: the AVX2
  bodies).
* ``avx512gfni`` (the same + GFNI): that body with the GFNI decode (``lut_avx512.gfni_codes``).
* ``neon`` (every aarch64 CPU): the AVX2 structure with ``tbl`` on up to four 16-entry byte tables (b > 6: one
  ``tbl4`` per 64 entries, ORed), the bytes re-joined into int16 (``smlal``) or fp16 (``fcvtl``, FMA).
* ``dotprod`` (aarch64 with +dotprod: Cortex-A76 and newer, Neoverse N1/V1): int8 mode's products by ``sdot`` on
  the table bytes (q = 256 hi + lo, low bytes stored minus SDOT_BIAS, which XC adds back; ``lut_isa.half_sdot``):
  4 ``sdot`` per 32 codes against 2 ``zip`` + 8 ``smull``/``smlal`` for the int16 products.
* ``i8mm`` (aarch64 with +i8mm: Neoverse V1/V2/N2, Cortex-A710 and newer): the ``dotprod`` GEMV; at M > 1 pairs of
  weight rows times pairs of rows of X by ``usmmla`` (low bytes) and ``smmla`` (high bytes) (``lut_isa.half_mmla``).
* ``generic``: the same decode in portable vector code, gathers for lookups. Any LLVM CPU target.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tvm.script import tirx as T

from ..quant.byteslice import GROUP, TABLE_DTYPE, row_bytes
from .anyprec import lut_offset, lut_width
from .lowering import STACK_LOCALS
from . import lut_avx512
from .lut_layout import cpu_isa  # noqa: F401  (re-exported: callers ask lut_cpu for the instruction set)
from .lut_layout import _local, _plane_vector, _prologue, _Shape, each_group, prefetch_row
from .lut_isa import (decode, dot_bytes_avx2, dot_form_avx2, form_lookup, form_tables, half_bytes, half_int,
                      half_mmla, half_sdot, lookup_f32_avx2, lookup_f32_generic, lookup_fp16_split,
                      lookup_int16_generic, lookup_int16_split, scalar_lookups, split_fp16_tables, split_lookup,
                      split_width)
from .spec import KernelSpec, register

MODES = ("exact", "int8")
ISAS = ("avx512gfni", "avx512", "avx2", "i8mm", "dotprod", "neon", "generic")
LUT_PAD = 16
SPLIT_MIN = 3   # exact mode on AVX2: the fp16 byte-split tables from this b (vpermps on fp32 tables below it)
SCALAR_MIN = 8  # exact mode on AVX2: scalar lookups into an fp32 table from this b (see the module docstring)


def _form(s, b: int) -> str:
    """The exact mode's AVX2 lookup at b bits: "scalar", "split" (fp16 byte tables), or "" (vpermps / int8)."""
    if s.mode != "exact" or not s.tables or b < SPLIT_MIN:
        return ""
    return "scalar" if b >= SCALAR_MIN and s.avx2 else "split"


def table_width(max_bits: int, min_bits: int) -> int:
    return lut_width(max_bits, min_bits) + LUT_PAD


def default_rows(mode: str, bits: int, M: int, wide: bool = False, K: int = 0) -> int:
    """Weight rows per parallel task (decoded together, sharing each activation load; measured on Zen 3): a
    GEMV takes one row in int8 mode (the lookups feed the dot products in registers), two in exact mode (they
    share the fp32 activation loads); M > 1 takes 4 (b <= 5) or 2. The AVX-512 body (``wide``) takes the GEMV's
    rows up to M = 8 (verify: 1536x576 at M = 5 is no faster with 2) and above (the prefill chunk, its loop over
    the rows of X rolled) 2 for K >= 1024, else 1 (Zen 4, 2 threads, cold, ``tune.bitplane``: 32x576x1536 int8
    462-515 us with 2 rows against 488-575 with 1 at 3..7 bits; 32x1536x576 321-460 with 1 against 483-522 with
    2). ``tune ARTIFACT`` measures the choice per kernel and bit-width (``tune.bitplane``)."""
    if wide:
        return (2 if K >= 1024 else 1) if M > lut_avx512.UNROLL_M else default_rows(mode, bits, 1)
    if M == 1:
        return 1 if mode == "int8" else 2
    return 4 if bits <= 5 else 2


# ---------------------------------------------------------------------------------------------- the kernel

def _each(n: int, step, unroll: bool) -> None:
    """step(i) for i in 0..n-1: unrolled in Python (constant i), or as a TIR loop."""
    if not unroll:
        with T.serial(0, n) as i:
            return step(i)
    for i in range(n):
        step(i)


def _codes(PL, p_count: int, n, g, tail: int, VB, CB, b: int, base: int = 0, pshufb: bool = False) -> list:
    """Decode one row's group into CB (8 x 32 codes) through VB (the b plane vectors; ``pshufb``: the codes only
    index x86 ``vpshufb`` tables, ``lut_isa.decode``): the intermediate vectors live in (stack) buffers, so no
    expression tree repeats a decode (TIR passes visit trees, not DAGs, and a b > 4 lookup reads its code b - 3
    times)."""
    for p in range(p_count):
        T.buffer_store(VB, _plane_vector(PL, p, n, g, tail), [T.ramp(32 * p, 1, 32)])
    codes = decode([VB[T.ramp(32 * p, 1, 32)] for p in range(p_count)], b, pshufb)
    for i in range(8):
        T.buffer_store(CB, codes[i], [T.ramp(base + 32 * i, 1, 32)])
    return [CB[T.ramp(base + 32 * i, 1, 32)] for i in range(8)]


def _group(s: _Shape, b: int, rows: list, g, tail: int, bufs):
    PL, LUT, XP, SX, XC, WB, CB, TBL, ACC, VB = bufs
    R = len(rows)
    hi_only = s.sdot and s.byte_tables(b)   # zero low bytes (byteslice.int_tables): only the high bytes' products
    hi_bytes, form16 = s.hi_bytes(b), s.form16(b)
    off = lut_offset(b, s.MINB)

    def looked(r, c):   # AVX2, tables read as bytes: the high bytes (hi_bytes) or the form's (A, r) bytes (form16)
        return form_lookup(TBL, r * 2 * split_width(b), b, c) if form16 else \
            [split_lookup(TBL, r * 2 * split_width(b), b, c, s.isa, True)[1]]

    def bdot(w):   # half_bytes' dot of the looked-up bytes w with x, |x|
        return (lambda x, ax: dot_form_avx2(*w, x, ax)) if form16 else (lambda x, ax: dot_bytes_avx2(w[0], x, ax))

    E = max(8, 1 << b)
    if s.M == 1 and s.mode == "int8" and s.tables:   # GEMV: lookups feed the dot products in registers
        for r, n in enumerate(rows):
            codes = _codes(PL, b, n, g, tail, VB, CB, b, pshufb=s.avx2)
            a = ACC[T.ramp(r * 8, 1, s.acc_lanes)]
            for h in range(2):
                if s.sdot:
                    a = a + half_sdot(h, g, 0, lambda i, r=r: split_lookup(
                        TBL, r * 2 * split_width(b), b, codes[i], s.isa, hi_only), XP, SX, XC, hi_only)
                    continue
                if hi_bytes or form16:
                    a = a + half_bytes(h, g, 0, lambda i, x, ax, r=r: bdot(looked(r, codes[i]))(x, ax), XP, SX,
                                       0 if form16 else 8)
                    continue
                a = a + half_int(s, h, g, 0, lambda i, r=r: lookup_int16_split(
                    TBL, r * 2 * split_width(b), b, codes[i], s.isa), XP, SX)
            T.buffer_store(ACC, a, [T.ramp(r * 8, 1, s.acc_lanes)])
        return
    if s.M == 1 and s.mode == "exact" and s.tables:   # GEMV: the rows of a tile share each x load
        for r, n in enumerate(rows):
            _codes(PL, b, n, g, tail, VB, CB, b, base=r * GROUP, pshufb=s.avx2)
            if _form(s, b) == "scalar":
                scalar_lookups(TBL, r * E, CB, r * GROUP, WB, r * GROUP)

        def step(i):
            accs = [ACC[T.ramp(r * 8, 1, 8)] for r in range(R)]
            for r in range(R):
                c = CB[T.ramp(r * GROUP + 32 * i, 1, 32)]
                if _form(s, b) == "scalar":
                    vals = [WB[T.ramp(r * GROUP + 32 * i + 8 * q, 1, 8)] for q in range(tail)]
                elif _form(s, b) == "split":
                    vals = lookup_fp16_split(TBL, r * 2 * split_width(b), b, c, s.isa)
                else:
                    vals = [lookup_f32_avx2(TBL, r * E, b, T.Cast("int32x8", CB[T.ramp(r * GROUP + 32 * i + 8 * q,
                                                                                          1, 8)])) for q in range(tail)]
                for q in range(tail):
                    accs[r] = accs[r] + vals[q] * XP[0, T.ramp(GROUP * g + 32 * i + 8 * q, 1, 8)]
            for r in range(R):
                T.buffer_store(ACC, accs[r], [T.ramp(r * 8, 1, 8)])

        _each(8, step, unroll=b <= 5)   # b > 5: the long lookup trees in a loop (code size, build time)
        return
    for r, n in enumerate(rows):
        _codes(PL, b, n, g, tail, VB, CB, b, pshufb=s.avx2)
        if _form(s, b) == "scalar":
            scalar_lookups(TBL, r * E, CB, 0, WB, r * GROUP)
            continue

        def step(i, r=r, n=n):
            c = CB[T.ramp(32 * i, 1, 32)]
            if s.sdot:   # the low and high table bytes, for sdot
                pair = split_lookup(TBL, r * 2 * split_width(b), b, c, s.isa, hi_only)
                for u in range(1 if hi_only else 0, 2):
                    T.buffer_store(WB, pair[u], [T.ramp(r * 2 * GROUP + 64 * i + 32 * u, 1, 32)])
            elif hi_bytes or form16:   # 32 (hi_bytes) or 64 (form16: A then r) bytes per code vector
                for u, w in enumerate(looked(r, c)):
                    T.buffer_store(WB, w, [T.ramp(r * 2 * GROUP + 64 * i + 32 * u, 1, 32)])
            elif s.mode == "int8":
                vals = lookup_int16_split(TBL, r * 2 * split_width(b), b, c, s.isa) if s.tables else \
                    lookup_int16_generic(LUT, n, off, b, c)
                for u in range(2):
                    T.buffer_store(WB, vals[u], [T.ramp(r * GROUP + 32 * i + 16 * u, 1, 16)])
            elif _form(s, b) == "split":
                vals = lookup_fp16_split(TBL, r * 2 * split_width(b), b, c, s.isa)
                for q in range(tail):
                    T.buffer_store(WB, vals[q], [T.ramp(r * GROUP + 32 * i + 8 * q, 1, 8)])
            else:
                look = lookup_f32_avx2 if s.avx2 else lookup_f32_generic
                for q in range(tail):
                    idx = T.Cast("int32x8", CB[T.ramp(32 * i + 8 * q, 1, 8)])
                    T.buffer_store(WB, look(TBL, r * E, b, idx), [T.ramp(r * GROUP + 32 * i + 8 * q, 1, 8)])

        _each(8, step, unroll=b <= 4 or s.isa == "generic")   # (a gather index in a TIR loop trips TVM's
                                                              # region analysis: the generic bodies unroll)
    if s.mmla:   # pairs of rows of X (the last row twice for odd M) times pairs of weight rows
        with T.serial(0, (s.M + 1) // 2) as mp:
            for rp in range(R // 2):
                def pair(i, j, rp=rp):
                    return [None if u == 0 and hi_only else T.vectorcombine("int8x16", *(
                        WB[T.ramp(r * 2 * GROUP + 64 * i + 32 * u + 8 * j, 1, 8)] for r in (2 * rp, 2 * rp + 1)))
                            for u in range(2)]
                base = (mp * (R // 2) + rp) * 16
                acc = [ACC[T.ramp(base + 4 * j, 1, 4)] for j in range(4)]
                for h in range(2):
                    f = half_mmla(h, g, 2 * mp, T.min(2 * mp + 1, s.M - 1), pair, XP, SX, hi_only)
                    acc = [acc[j] + f[j] for j in range(4)]
                for j in range(4):
                    T.buffer_store(ACC, acc[j], [T.ramp(base + 4 * j, 1, 4)])
        return
    with T.serial(0, s.M) as m:
        xo = GROUP * g
        if s.mode == "int8":
            for r in range(R):
                lanes = T.ramp((m * R + r) * 8, 1, s.acc_lanes)
                a = ACC[lanes]
                for h in range(2):
                    if s.sdot:
                        a = a + half_sdot(h, g, m, lambda i, r=r: [
                            WB[T.ramp(r * 2 * GROUP + 64 * i + 32 * u, 1, 32)] for u in range(2)], XP, SX, XC, hi_only)
                    elif hi_bytes or form16:
                        a = a + half_bytes(h, g, m, lambda i, x, ax, r=r: bdot(
                            [WB[T.ramp(r * 2 * GROUP + 64 * i + 32 * u, 1, 32)] for u in range(1 + form16)])(x, ax),
                            XP, SX, 0 if form16 else 8)
                    else:
                        a = a + half_int(s, h, g, m, lambda i, r=r: [
                            WB[T.ramp(r * GROUP + 32 * i + 16 * u, 1, 16)] for u in range(2)], XP, SX)
                T.buffer_store(ACC, a, [lanes])
        else:
            for i in range(8):
                for q in range(tail):
                    x = XP[m, T.ramp(xo + 32 * i + 8 * q, 1, 8)]
                    for r in range(R):
                        a = ACC[T.ramp((m * R + r) * 8, 1, 8)]
                        T.buffer_store(ACC, a + WB[T.ramp(r * GROUP + 32 * i + 8 * q, 1, 8)] * x,
                                       [T.ramp((m * R + r) * 8, 1, 8)])


def _body(s: _Shape, b: int, R: int, PL, LUT, WS, XP, SX, XC, Y):
    """The b-bit kernel: tiles of R rows in parallel."""
    if s.wide:
        return lut_avx512.body(s, b, R, PL, LUT, WS, XP, SX, XC, Y)
    NT = -(-s.N // R)
    E = max(8, 1 << b)
    with T.parallel(0, NT) as nt:
        # the GEMV paths feed the lookups straight into the dot products (scalar lookups go through WB)
        fast = s.M == 1 and s.tables and _form(s, b) != "scalar"
        WB = None if fast else _local((R * 2 * GROUP,), "int8") if s.sdot or s.hi_bytes(b) or s.form16(b) else \
            _local((R * GROUP,), "int16" if s.mode == "int8" else "float32")
        ACC = _local((s.M * R * 8,), "float32")
        CB = _local((R * GROUP,), "uint8")
        VB = _local((32 * b,), "uint8")
        split = _form(s, b) == "split" or (s.mode == "int8" and s.tables)   # byte tables of fp16 / int16 values
        TBL = _local((R * 2 * split_width(b),), "uint8") if split else \
            _local((R * E,), "float32") if s.mode == "exact" else None
        rows = [T.min(nt * R + r, s.N - 1) for r in range(R)]
        prefetch_row(s, b, PL, LUT, nt * R)
        with T.serial(0, s.M * R) as z:
            T.buffer_store(ACC, T.broadcast(T.float32(0), 8), [T.ramp(z * 8, 1, 8)])
        if TBL is not None:
            off = lut_offset(b, s.MINB)
            for r, n in enumerate(rows):
                if s.form16(b):
                    form_tables(LUT, n, off, b, TBL, r * 2 * split_width(b))
                    continue
                if split:
                    split_fp16_tables(LUT, n, off, b, TBL, r * 2 * split_width(b), signed_low=s.sdot and not s.mmla)
                    continue
                for t in range(E // 8):
                    T.buffer_store(TBL, T.Cast("float32x8", LUT[n, T.ramp(off + 8 * t, 1, 8)]),
                                   [T.ramp(r * E + 8 * t, 1, 8)])
        bufs = (PL, LUT, XP, SX, XC, WB, CB, TBL, ACC, VB)
        each_group(s, lambda g, tail: _group(s, b, rows, g, tail, bufs))
        with T.serial(0, s.M) as m:
            for r in range(R):
                with T.If(nt * R + r < s.N):
                    with T.Then():
                        # lanes summed in order; mmla: lane 2 (r % 2) + m % 2 of the pair tile's 4 block vectors
                        if s.mmla:
                            lanes = [((m // 2) * (R // 2) + r // 2) * 16 + 2 * (r % 2) + m % 2 + 4 * j
                                     for j in range(4)]
                        else:
                            lanes = [(m * R + r) * 8 + e for e in range(s.acc_lanes)]
                        total = ACC[lanes[0]]
                        for e in lanes[1:]:
                            total = total + ACC[e]
                        if s.mode == "int8":
                            total = total * WS[rows[r], b - s.MINB]
                        T.buffer_store(Y, total, [m, nt * R + r])


def _dispatch(s: _Shape, nbits, widths, rows, bufs):
    b = widths[0]
    R = rows.get(b) or default_rows(s.mode, b, s.M, s.wide, s.K)
    if len(widths) == 1:
        _body(s, b, R, *bufs)
        return
    with T.If(nbits <= b):
        with T.Then():
            _body(s, b, R, *bufs)
        with T.Else():
            _dispatch(s, nbits, widths[1:], rows, bufs)


def make_anyprec_cpu(M: int, N: int, K: int, max_bits: int = 8, min_bits: int = 3, mode: str = "exact",
                     isa: str = "avx2", rows: dict | None = None):
    """PrimFunc of the CPU bitplane operator (no global_symbol). ``rows``: {bit-width: rows per parallel task}
    (default ``default_rows``)."""
    if mode not in MODES:
        raise ValueError(f"accuracy mode must be one of {MODES}, got {mode!r}")
    if isa not in ISAS:
        raise ValueError(f"instruction set must be one of {ISAS}, got {isa!r}")
    s = _Shape(M, N, K, max_bits, min_bits, mode, isa)
    B, MINB, G = max_bits, min_bits, s.G
    RB, L = row_bytes(K), table_width(max_bits, min_bits)
    widths = list(range(MINB, B + 1))
    rows = dict(rows or {})
    if s.mmla and any(r % 2 for r in rows.values()):
        raise ValueError(f"the i8mm body at M > 1 takes weight rows in pairs: rows per task must be even, got {rows}")
    # int8 mode: int8 values (NEON / generic: int16 for their int16 products; AVX2 widens them where it needs to)
    xdt = "float32" if mode == "exact" else "int8" if s.wide or s.sdot or s.avx2 else "int16"

    if mode == "int8":
        @T.prim_func
        def anyprec_cpu_int8(X: T.Buffer((M, K), "float32"), PLANES: T.Buffer((B, N, RB), "uint8"),
                             TABS: T.Buffer((N, L), TABLE_DTYPE), SCALES: T.Buffer((N, B - MINB + 1), "float32"),
                             NBITS: T.Buffer((1,), "int32"), Y: T.Buffer((M, N), "float32")):
            T.func_attr({"tirx.noalias": True})
            XP = T.alloc_buffer((M, G * GROUP * (2 if s.abs_x else 1)), xdt)
            SX = T.alloc_buffer((M, G * 32), "float32")
            XC = T.alloc_buffer((M, G * 32), "int32")
            _prologue(s, X, XP, SX, XC if s.xc else None)
            _dispatch(s, T.min(T.max(NBITS[0], MINB), B), widths, rows, (PLANES, TABS, SCALES, XP, SX, XC, Y))

        func = anyprec_cpu_int8
    else:
        @T.prim_func
        def anyprec_cpu_exact(X: T.Buffer((M, K), "float32"), PLANES: T.Buffer((B, N, RB), "uint8"),
                              LUTS: T.Buffer((N, L), "float16"), NBITS: T.Buffer((1,), "int32"),
                              Y: T.Buffer((M, N), "float32")):
            T.func_attr({"tirx.noalias": True})
            XP = T.alloc_buffer((M, G * GROUP), xdt)
            _prologue(s, X, XP, None)
            _dispatch(s, T.min(T.max(NBITS[0], MINB), B), widths, rows, (PLANES, LUTS, None, XP, None, None, Y))

        func = anyprec_cpu_exact
    return func.without_attr("global_symbol").with_attr("tirx.is_scheduled", True).with_attr(STACK_LOCALS, True)


def kernel_name(M, N, K, max_bits, min_bits, mode, isa) -> str:
    return f"anyprec_cpu_{mode}_{isa}_m{M}_n{N}_k{K}_b{min_bits}to{max_bits}"


@register
@dataclass(frozen=True)
class AnyPrecCPU(KernelSpec):
    """The CPU bitplane operator on the byte-sliced planes (``mode``: exact | int8; ``isa``: one of ``ISAS``)."""
    family: ClassVar[str] = "anyprec_cpu"
    M: int
    N: int
    K: int
    max_bits: int = 8
    min_bits: int = 3
    mode: str = "exact"
    isa: str = "avx2"

    def name(self) -> str:
        return kernel_name(self.M, self.N, self.K, self.max_bits, self.min_bits, self.mode, self.isa)

    def make(self):
        return make_anyprec_cpu(self.M, self.N, self.K, self.max_bits, self.min_bits, self.mode, self.isa)


def build_with_rows(spec: AnyPrecCPU, rows: dict):
    """``spec.build()`` with ``rows`` ({bit-width: rows per task}, measured by ``tune.bitplane``)."""
    return spec.attach(make_anyprec_cpu(spec.M, spec.N, spec.K, spec.max_bits, spec.min_bits, spec.mode, spec.isa,
                                        rows=rows))
