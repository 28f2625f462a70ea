"""The bitplane operator for CPUs: one body per bit-width over the byte-sliced planes (``quant.byteslice``).

    Y[m, n] = sum_k X[m, k] * LUT_b[n, code_b(n, k)],   b = NBITS[0] clamped to min_bits..max_bits

Buffers: X fp32 [M, K]; PLANES uint8 [B, N, 8*ceil(K/64)] (byte-sliced, plane 0 = MSB); NBITS int32 [1];
Y fp32 [M, N]; and per accuracy mode:

* ``exact``: LUTS fp16 [N, L + 16] (the per-bit LUTs concatenated as today, zero-padded by 16 entries so a
  16-lane table load never leaves the buffer). fp32 math on the fp16 centroids.
* ``int8``: TABS int8 [N, L + 16] (each bit-width's centroids / its per-row scale, ``byteslice.int8_tables``),
  SCALES fp32 [N, B - min_bits + 1]. The activations are quantized per call to int8 with one scale per group of
  256 (llama.cpp's Q8_K granularity); each group's dot product is an exact int32 sum.

``if NBITS[0] <= b`` selects the body of bit-width b, so a b-bit call loads b plane vectors per 256 weights
and every shift, mask and table count is a constant. Inside a body, tiles of ``rows`` weight rows run in
parallel; per group of 256 weights each row's codes are decoded once (8 vectors of 32 codes), looked up into a
small tile (L1) and reused for every row of X (M > 1: prefill, verify). The activations are permuted once per
call into the decode order (and quantized, in int8 mode) before the parallel loop.

Instruction sets (``isa``; a body is only built for a target that has the instructions, ``schedules.rules``):

* ``avx2``: int8 lookups by ``vpshufb`` on 16-entry tables (b <= 4: one; b = 5..8: 2^(b-4) tables merged by a
  ``vpblendvb`` tree on the code's high bits), dot products by ``vpsignb`` + ``vpmaddubsw`` + ``vpmaddwd``
  (llama.cpp's sign trick: |w| unsigned times x with w's sign); exact lookups by ``vpermps`` on 8-entry fp32
  tables (b = 3: one; more bits: a ``vblendvps`` tree), then FMA.
* ``generic``: the same decode with portable vector code; the lookups are gathers (LLVM picks the
  instructions). Any LLVM CPU target, aarch64 included.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tvm.script import tirx as T

from ..quant.byteslice import GROUP, INT8_MAX, blocks, groups, row_bytes, table_zero
from .anyprec import lut_offset, lut_width
from .lowering import KEEP, STACK_LOCALS
from .spec import KernelSpec, register

MODES = ("exact", "int8")
ISAS = ("avx2", "generic")
LUT_PAD = 16
EXACT_TREE_MAX = 8   # exact mode on AVX2: vpermps/vblendvps trees for every b (gathers measured no better here)


def cpu_isa(target) -> str:
    """The instruction set of ``target`` (a target dict or tvm Target) the kernel bodies may use: "avx2" on x86
    CPUs that have it (asked from LLVM: mcpu implies the features), else "generic"."""
    import tvm
    from tvm.target import codegen

    tgt = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    if "aarch64" in str(tgt.attrs.get("mtriple", "")) or str(tgt.kind.name) != "llvm":
        return "generic"
    try:
        return "avx2" if codegen.target_has_features("avx2", tgt) else "generic"
    except Exception:  # an LLVM without the query: the portable bodies
        return "generic"


def table_width(max_bits: int, min_bits: int) -> int:
    return lut_width(max_bits, min_bits) + LUT_PAD


def default_rows(mode: str, bits: int, M: int) -> int:
    """Weight rows per parallel task (decoded together, sharing each activation load): one for a GEMV (the
    lookups feed the dot products in registers), else 4 (b <= 5) or 2."""
    if M == 1:
        return 1
    return 4 if bits <= 5 else 2


# ---------------------------------------------------------------------------------------------- primitives

def _u8(v: int, lanes: int = 32):
    return T.broadcast(T.uint8(v), lanes)


def _shift(x, s: int):
    """uint8x32 shifted by s bits inside 32-bit lanes (s > 0: left); the caller masks so no bit crosses a byte."""
    if s == 0:
        return x
    w = T.reinterpret("uint32x8", x)
    w = T.shift_left(w, T.broadcast(T.uint32(s), 8)) if s > 0 else T.shift_right(w, T.broadcast(T.uint32(-s), 8))
    return T.reinterpret("uint8x32", w)


def _srl16(x, s: int):
    return T.reinterpret("uint8x32", T.shift_right(T.reinterpret("uint16x16", x), T.broadcast(T.uint16(s), 16)))


def _sll16(x, s: int):
    return T.reinterpret("uint8x32", T.shift_left(T.reinterpret("uint16x16", x), T.broadcast(T.uint16(s), 16)))


def decode(vs, b: int) -> list:
    """b plane vectors (uint8x32, MSB plane first) -> the 8 code vectors of the group: code i lane 8j+l is the
    b-bit code of weight 64j + 8i + l. b <= 4: bits i and i+4 are decoded together as two nibbles."""
    if b <= 4:
        out = [None] * 8
        for i in range(4):
            nib = None
            for p in range(b):
                t = _shift(T.bitwise_and(vs[p], _u8(0x11 << i)), (b - 1 - p) - i)
                nib = t if nib is None else T.bitwise_or(nib, t)
            out[i] = T.bitwise_and(nib, _u8(15))
            out[i + 4] = T.bitwise_and(_srl16(nib, 4), _u8(15))
        return out
    out = []
    for i in range(8):
        c = None
        for p in range(b):
            t = _shift(T.bitwise_and(vs[p], _u8(1 << i)), (b - 1 - p) - i)
            c = t if c is None else T.bitwise_or(c, t)
        out.append(c)
    return out


def _x86(name, dtype, *args):
    return T.call_llvm_pure_intrin(dtype, f"llvm.x86.{name}", *args)


def lookup_int8_avx2(TAB, n, off, b: int, c):
    """int8x32: TAB[n, off + c] for 32 codes by vpshufb (16-entry tables) and a vpblendvb tree."""
    def table(t):
        t16 = TAB[n, T.ramp(off + 16 * t, 1, 16)]
        return T.vectorcombine("int8x32", t16, t16)

    if b <= 4:
        return _x86("avx2.pshuf.b", "int8x32", table(0), T.reinterpret("int8x32", c))
    lo = T.reinterpret("int8x32", T.bitwise_and(c, _u8(15)))
    vals = [_x86("avx2.pshuf.b", "int8x32", table(t), lo) for t in range(1 << (b - 4))]
    for bit in range(4, b):   # the byte's MSB after a 16-bit shift by 7 - bit is its bit `bit`
        mask = T.reinterpret("int8x32", _sll16(c, 7 - bit))
        vals = [_x86("avx2.pblendvb", "int8x32", vals[2 * u], vals[2 * u + 1], mask) for u in range(len(vals) // 2)]
    return vals[0]


def lookup_int8_generic(TAB, n, off, b: int, c):
    return TAB[n, off + T.Cast("int32x32", c)]


def dot_int8_avx2(w, x, zero: int = 0):
    """int32x8 partial sums of 32 int8 products (w, x int8x32). zero > 0: w is unsigned (1..127, offset not
    removed here); zero = 0: w signed, |w| <= 127 (the sign moves onto x)."""
    if zero:
        p16 = _x86("avx2.pmadd.ub.sw", "int16x16", w, x)
        return _x86("avx2.pmadd.wd", "int32x8", p16, T.broadcast(T.int16(1), 16))
    aw = _x86("avx2.psign.b", "int8x32", w, w)
    sx = _x86("avx2.psign.b", "int8x32", x, w)
    p16 = _x86("avx2.pmadd.ub.sw", "int16x16", aw, sx)
    return _x86("avx2.pmadd.wd", "int32x8", p16, T.broadcast(T.int16(1), 16))


def dot_int8_generic(WB, wo, XP, m, xo):
    total = None
    for t in range(4):
        p = T.Cast("int32x8", WB[T.ramp(wo + 8 * t, 1, 8)]) * T.Cast("int32x8", XP[m, T.ramp(xo + 8 * t, 1, 8)])
        total = p if total is None else total + p
    return total


def lookup_f32_avx2(TBL, base, b: int, idx):
    """float32x8: TBL[base + idx] for 8 int32 codes by vpermps on 8-entry tables and a vblendvps tree."""
    vals = [_x86("avx2.permps", "float32x8", TBL[T.ramp(base + 8 * t, 1, 8)], idx)
            for t in range(max(1, 1 << (b - 3)))]
    for bit in range(3, b):
        mask = T.reinterpret("float32x8", T.shift_left(idx, T.broadcast(T.int32(31 - bit), 8)))
        vals = [_x86("avx.blendv.ps.256", "float32x8", vals[2 * u], vals[2 * u + 1], mask)
                for u in range(len(vals) // 2)]
    return vals[0]


def lookup_f32_generic(TBL, base, b: int, idx):
    return TBL[base + idx]


# ---------------------------------------------------------------------------------------------- the kernel

@dataclass(frozen=True)
class _Shape:
    M: int
    N: int
    K: int
    B: int
    MINB: int
    mode: str
    isa: str

    @property
    def G(self):
        return groups(self.K)

    @property
    def tail(self):   # 64-weight blocks in the last group (1..4)
        return blocks(self.K) - 4 * (self.G - 1)


def _local(shape, dtype):
    """A local buffer kept on the stack when small (``lowering``); larger ones go to the workspace."""
    nbytes = int(shape[0]) * (4 if dtype.endswith("32") else 1)
    return T.alloc_local(shape, dtype, annotations=KEEP if nbytes <= 1024 else None)


def _plane_vector(PL, p, n, g, tail: int):
    if tail == 4:
        return PL[p, n, T.ramp(32 * g, 1, 32)]
    z8 = _u8(0, 8)
    part = [PL[p, n, T.ramp(32 * g + 8 * j, 1, 8)] if j < tail else z8 for j in range(4)]
    return T.vectorcombine("uint8x32", T.vectorcombine("uint8x16", part[0], part[1]),
                           T.vectorcombine("uint8x16", part[2], part[3]))


def _prologue(s: _Shape, X, XP, SX, XS):
    """XP [M, G*256] = X in decode order (int8 mode: quantized per group of 256, scales in SX, sums in XS)."""
    loop = T.parallel if s.M > 1 else T.serial

    def src(g, i, j, l):
        return GROUP * g + 64 * j + 8 * i + l

    def xval(m, k):
        return T.if_then_else(k < s.K, X[m, T.min(k, s.K - 1)], T.float32(0))

    with loop(0, s.M) as m:
        with T.serial(0, s.G) as g:
            if s.mode == "exact":
                with T.grid(8, 4, 8) as (i, j, l):
                    T.buffer_store(XP, xval(m, src(g, i, j, l)), [m, GROUP * g + 32 * i + 8 * j + l])
            else:
                amax = _local((1,), "float32")
                T.buffer_store(amax, T.float32(0), [0])
                with T.serial(0, GROUP) as q:
                    T.buffer_store(amax, T.max(amax[0], T.abs(xval(m, GROUP * g + q))), [0])
                inv = T.Select(amax[0] > T.float32(0), T.float32(INT8_MAX) / T.max(amax[0], T.float32(1e-30)),
                               T.float32(0))
                T.buffer_store(SX, amax[0] / T.float32(INT8_MAX), [m, g])
                with T.grid(8, 4, 8) as (i, j, l):
                    q = T.floor(xval(m, src(g, i, j, l)) * inv + T.float32(0.5))
                    q = T.max(T.min(q, T.float32(INT8_MAX)), T.float32(-INT8_MAX))
                    T.buffer_store(XP, T.Cast("int8", q), [m, GROUP * g + 32 * i + 8 * j + l])
                total = _local((1,), "int32")
                T.buffer_store(total, 0, [0])
                with T.serial(0, GROUP) as q:
                    T.buffer_store(total, total[0] + T.Cast("int32", XP[m, GROUP * g + q]), [0])
                T.buffer_store(XS, total[0], [m, g])


def _group(s: _Shape, b: int, rows: list, g, tail: int, bufs):
    PL, LUT, XP, SX, XS, WB, CB, TBL, ACC, AI = bufs
    R = len(rows)
    off = lut_offset(b, s.MINB)
    zero = table_zero(b) if s.mode == "int8" else 0
    E = max(8, 1 << b)
    if s.M == 1 and s.mode == "int8" and s.isa == "avx2":   # GEMV: lookups feed the dot products in registers
        for r, n in enumerate(rows):
            codes = decode([_plane_vector(PL, p, n, g, tail) for p in range(b)], b)
            acc = None
            for i in range(8):
                d = dot_int8_avx2(lookup_int8_avx2(LUT, n, off, b, codes[i]), XP[0, T.ramp(GROUP * g + 32 * i, 1, 32)],
                                  zero)
                acc = d if acc is None else acc + d
            if zero:   # lane 0 carries the offset correction -zero * sum(x) of the group
                acc = acc - T.Select(T.ramp(0, 1, 8) == T.broadcast(0, 8), T.broadcast(zero * XS[0, g], 8),
                                     T.broadcast(0, 8))
            a = ACC[T.ramp(r * 8, 1, 8)]
            T.buffer_store(ACC, a + T.Cast("float32x8", acc) * T.broadcast(SX[0, g], 8), [T.ramp(r * 8, 1, 8)])
        return
    if s.M == 1 and s.mode == "exact" and s.isa == "avx2":
        for r, n in enumerate(rows):
            codes = decode([_plane_vector(PL, p, n, g, tail) for p in range(b)], b)
            acc = ACC[T.ramp(r * 8, 1, 8)]
            for i in range(8):
                for q in range(4):
                    idx = T.Cast("int32x8", T.Shuffle([codes[i]], [8 * q + e for e in range(8)]))
                    look = lookup_f32_avx2 if b <= EXACT_TREE_MAX else lookup_f32_generic
                    acc = acc + look(TBL, r * E, b, idx) * XP[0, T.ramp(GROUP * g + 32 * i + 8 * q, 1, 8)]
            T.buffer_store(ACC, acc, [T.ramp(r * 8, 1, 8)])
        return
    for r, n in enumerate(rows):
        codes = decode([_plane_vector(PL, p, n, g, tail) for p in range(b)], b)
        for i in range(8):
            if s.mode == "int8":
                look = lookup_int8_avx2 if s.isa == "avx2" else lookup_int8_generic
                T.buffer_store(WB, look(LUT, n, off, b, codes[i]), [T.ramp(r * GROUP + 32 * i, 1, 32)])
            else:
                look = lookup_f32_avx2 if s.isa == "avx2" and b <= EXACT_TREE_MAX else lookup_f32_generic
                T.buffer_store(CB, codes[i], [T.ramp(0, 1, 32)])
                for q in range(4):
                    idx = T.Cast("int32x8", CB[T.ramp(8 * q, 1, 8)])
                    T.buffer_store(WB, look(TBL, r * E, b, idx), [T.ramp(r * GROUP + 32 * i + 8 * q, 1, 8)])
    with T.serial(0, s.M) as m:
        xo = GROUP * g
        if s.mode == "int8":
            for r in range(R):
                T.buffer_store(AI, T.broadcast(T.int32(0), 8), [T.ramp(8 * r, 1, 8)])
            for i in range(8):
                x = XP[m, T.ramp(xo + 32 * i, 1, 32)]
                for r in range(R):
                    wo = r * GROUP + 32 * i
                    d = dot_int8_avx2(WB[T.ramp(wo, 1, 32)], x, zero) if s.isa == "avx2" else \
                        dot_int8_generic(WB, wo, XP, m, xo + 32 * i)
                    T.buffer_store(AI, AI[T.ramp(8 * r, 1, 8)] + d, [T.ramp(8 * r, 1, 8)])
            for r in range(R):
                a = ACC[T.ramp((m * R + r) * 8, 1, 8)]
                ai = AI[T.ramp(8 * r, 1, 8)]
                if zero:
                    ai = ai - T.Select(T.ramp(0, 1, 8) == T.broadcast(0, 8), T.broadcast(zero * XS[m, g], 8),
                                       T.broadcast(0, 8))
                T.buffer_store(ACC, a + T.Cast("float32x8", ai) * T.broadcast(SX[m, g], 8),
                               [T.ramp((m * R + r) * 8, 1, 8)])
        else:
            for i in range(8):
                for q in range(4):
                    x = XP[m, T.ramp(xo + 32 * i + 8 * q, 1, 8)]
                    for r in range(R):
                        a = ACC[T.ramp((m * R + r) * 8, 1, 8)]
                        T.buffer_store(ACC, a + WB[T.ramp(r * GROUP + 32 * i + 8 * q, 1, 8)] * x,
                                       [T.ramp((m * R + r) * 8, 1, 8)])


def _body(s: _Shape, b: int, R: int, PL, LUT, WS, XP, SX, XS, Y):
    """The b-bit kernel: tiles of R rows in parallel."""
    NT = -(-s.N // R)
    E = max(8, 1 << b)
    with T.parallel(0, NT) as nt:
        WB = _local((R * GROUP,), "int8" if s.mode == "int8" else "float32")
        ACC = _local((s.M * R * 8,), "float32")
        CB = _local((32,), "uint8") if s.mode == "exact" else None
        TBL = _local((R * E,), "float32") if s.mode == "exact" else None
        AI = _local((R * 8,), "int32") if s.mode == "int8" else None
        rows = [T.min(nt * R + r, s.N - 1) for r in range(R)]
        with T.serial(0, s.M * R) as z:
            T.buffer_store(ACC, T.broadcast(T.float32(0), 8), [T.ramp(z * 8, 1, 8)])
        if s.mode == "exact":
            off = lut_offset(b, s.MINB)
            for r, n in enumerate(rows):
                for t in range(E // 8):
                    T.buffer_store(TBL, T.Cast("float32x8", LUT[n, T.ramp(off + 8 * t, 1, 8)]),
                                   [T.ramp(r * E + 8 * t, 1, 8)])
        bufs = (PL, LUT, XP, SX, XS, WB, CB, TBL, ACC, AI)
        full = s.G if s.tail == 4 else s.G - 1
        if full:
            with T.serial(0, full) as g:
                _group(s, b, rows, g, 4, bufs)
        if s.tail != 4:
            _group(s, b, rows, s.G - 1, s.tail, bufs)
        with T.serial(0, s.M) as m:
            for r in range(R):
                with T.If(nt * R + r < s.N):
                    with T.Then():
                        base = (m * R + r) * 8
                        total = ACC[base]
                        for e in range(1, 8):
                            total = total + ACC[base + e]
                        if s.mode == "int8":
                            total = total * WS[rows[r], b - s.MINB]
                        T.buffer_store(Y, total, [m, nt * R + r])


def _dispatch(s: _Shape, nbits, widths, rows, bufs):
    b = widths[0]
    R = rows.get(b) or default_rows(s.mode, b, s.M)
    if len(widths) == 1:
        _body(s, b, R, *bufs)
        return
    with T.If(nbits <= b):
        with T.Then():
            _body(s, b, R, *bufs)
        with T.Else():
            _dispatch(s, nbits, widths[1:], rows, bufs)


def make_anyprec_cpu(M: int, N: int, K: int, max_bits: int = 8, min_bits: int = 3, mode: str = "int8",
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
    xdt = "int8" if mode == "int8" else "float32"

    if mode == "int8":
        @T.prim_func
        def anyprec_cpu_int8(X: T.Buffer((M, K), "float32"), PLANES: T.Buffer((B, N, RB), "uint8"),
                             TABS: T.Buffer((N, L), "int8"), SCALES: T.Buffer((N, B - MINB + 1), "float32"),
                             NBITS: T.Buffer((1,), "int32"), Y: T.Buffer((M, N), "float32")):
            T.func_attr({"tirx.noalias": True})
            XP = T.alloc_buffer((M, G * GROUP), xdt)
            SX = T.alloc_buffer((M, G), "float32")
            XS = T.alloc_buffer((M, G), "int32")
            _prologue(s, X, XP, SX, XS)
            _dispatch(s, T.min(T.max(NBITS[0], MINB), B), widths, rows, (PLANES, TABS, SCALES, XP, SX, XS, Y))

        func = anyprec_cpu_int8
    else:
        @T.prim_func
        def anyprec_cpu_exact(X: T.Buffer((M, K), "float32"), PLANES: T.Buffer((B, N, RB), "uint8"),
                              LUTS: T.Buffer((N, L), "float16"), NBITS: T.Buffer((1,), "int32"),
                              Y: T.Buffer((M, N), "float32")):
            T.func_attr({"tirx.noalias": True})
            XP = T.alloc_buffer((M, G * GROUP), xdt)
            _prologue(s, X, XP, None, None)
            _dispatch(s, T.min(T.max(NBITS[0], MINB), B), widths, rows, (PLANES, LUTS, None, XP, None, None, Y))

        func = anyprec_cpu_exact
    return func.without_attr("global_symbol").with_attr("tirx.is_scheduled", True).with_attr(STACK_LOCALS, True)


def kernel_name(M, N, K, max_bits, min_bits, mode, isa) -> str:
    return f"anyprec_cpu_{mode}_{isa}_m{M}_n{N}_k{K}_b{min_bits}to{max_bits}"


@register
@dataclass(frozen=True)
class AnyPrecCPU(KernelSpec):
    """The CPU bitplane operator on the byte-sliced planes (``mode``: exact | int8; ``isa``: avx2 | generic)."""
    family: ClassVar[str] = "anyprec_cpu"
    M: int
    N: int
    K: int
    max_bits: int = 8
    min_bits: int = 3
    mode: str = "int8"
    isa: str = "avx2"

    def name(self) -> str:
        return kernel_name(self.M, self.N, self.K, self.max_bits, self.min_bits, self.mode, self.isa)

    def make(self):
        return make_anyprec_cpu(self.M, self.N, self.K, self.max_bits, self.min_bits, self.mode, self.isa)
