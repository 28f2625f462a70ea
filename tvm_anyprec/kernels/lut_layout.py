"""What every body of the CPU bitplane kernel shares (``kernels.lut_cpu``, ``kernels.lut_avx512``): the shape,
the stack-local buffers, the plane loads, and the prologue that puts the activations in decode order."""
from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm.script import tirx as T

from ..quant.byteslice import BYTE_TABLE_BITS, GROUP, INT8_MAX, blocks, groups
from .anyprec import lut_offset
from .lowering import KEEP
from .lut_isa import ARM_ISAS, SDOT_BIAS, _u8, lane_reduce

WIDE_MAX_M = 32  # rows of X up to which the AVX-512 body runs (decode, verify, the 32-token prefill chunk; its code
                 # grows with M up to lut_avx512.UNROLL_M, a loop above). 32x4096x4096 int8, Xeon, 2 threads: 4.8 /
                 # 4.8 / 5.4 ms at 3 / 4 / 8 bits against the AVX2 bodies' 8.1 / 6.3-7.4 / 11-15 ms and numpy fp32's
                 # 8.6-18 ms
WIDE_MAX_M_EXACT = 8   # exact mode's bound: its fp32 activations of 32 rows fill L1 (32x4096x4096 exact 35 ms in the
                      # AVX-512 body against 7.7 / 7.9 / 14 ms at 3 / 4 / 8 bits in the AVX2 bodies; Zen 4, 2 threads)
WIDE_ISAS = ("avx512gfni", "avx512")   # the instruction sets of the AVX-512 body (with or without GFNI)
AVX512 = ("avx512bw", "avx512vbmi", "avx512vnni")   # what the AVX-512 GEMV body needs (its GFNI decode: + gfni)
BIAS16 = 32768   # the AVX-512 int8 body's tables are q + BIAS16 (unsigned bytes for vpdpbusd); XC undoes it


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

    @property
    def avx2(self) -> bool:
        """AVX2 bodies may run (an AVX-512 target has AVX2: its M > 1 bodies are the AVX2 ones)."""
        return self.isa in ("avx2",) + WIDE_ISAS

    @property
    def tables(self) -> bool:
        """The row's 16-bit tables are split into byte tables held in registers (``vpshufb`` / NEON ``tbl``)."""
        return self.avx2 or self.isa in ARM_ISAS

    @property
    def sdot(self) -> bool:
        """int8 mode on "dotprod" / "i8mm" targets: the table bytes times the int8 activations by ``sdot``."""
        return self.isa in ("dotprod", "i8mm") and self.mode == "int8"

    @property
    def mmla(self) -> bool:
        """int8 mode on "i8mm" targets at M > 1: pairs of weight rows times pairs of rows of X by ``smmla``."""
        return self.isa == "i8mm" and self.mode == "int8" and self.M > 1

    @property
    def acc_lanes(self) -> int:
        """fp32 accumulator lanes per (row of X, weight row) of the AVX2 / NEON / generic bodies: one per block of 32
        with sdot, else the 8 lanes of the int16 / fp32 products."""
        return 4 if self.sdot else 8

    def byte_tables(self, b: int) -> bool:
        """int8 mode at b bits reads only the high table bytes (BYTE_TABLE_BITS: the tables are 256 x an int8
        value, ``byteslice.int_tables``): the AVX-512 body and the sdot / smmla bodies."""
        return self.mode == "int8" and b in BYTE_TABLE_BITS

    def hi_bytes(self, b: int) -> bool:
        """int8 mode's AVX2 bodies at BYTE_TABLE_BITS: the high table bytes alone, by ``vpmaddubsw``
        (``lut_isa.half_bytes``)."""
        return self.avx2 and not self.wide and self.byte_tables(b)

    def form16(self, b: int) -> bool:
        """int8 mode's AVX2 bodies above BYTE_TABLE_BITS: the tables read as FORM_GRID A + r (``byteslice.in_form``,
        ``lut_isa.form_tables``): one 16-entry table and one byte tree instead of two trees."""
        return self.avx2 and not self.wide and self.mode == "int8" and b > 4

    @property
    def abs_x(self) -> bool:
        """int8 mode's AVX2 bodies: XP holds |x| after x (columns G * 256 + k), read by ``lut_isa.half_bytes``."""
        return self.mode == "int8" and self.avx2 and not self.wide

    @property
    def xc(self) -> bool:
        """The int8 prologue fills XC (the bias lanes of biased byte tables): the AVX-512 body and ``sdot`` (not
        ``mmla``: its unsigned low bytes need no bias)."""
        return self.mode == "int8" and (self.wide or (self.sdot and not self.mmla))

    @property
    def wide(self) -> bool:
        """The AVX-512 body (``lut_avx512``) runs on AVX-512 targets: M <= WIDE_MAX_M in int8 mode (decode, verify,
        prefill), M <= WIDE_MAX_M_EXACT in exact mode (decode, verify; its prefill runs the AVX2 bodies)."""
        return self.isa in WIDE_ISAS and self.M <= (WIDE_MAX_M if self.mode == "int8" else WIDE_MAX_M_EXACT)

    @property
    def gfni(self) -> bool:
        """The AVX-512 body decodes with GFNI (``lut_avx512.gfni_codes``): on "avx512gfni" targets."""
        return self.wide and self.isa == "avx512gfni"

    @property
    def compact_tail(self) -> bool:
        """int8 mode, GFNI decode, a last group of 1 or 2 blocks (K = 576, 896, ...): that group's codes are
        decoded into one vector per block (``lut_avx512.gfni_codes``), not four vectors mostly empty."""
        return self.gfni and self.mode == "int8" and self.tail <= 2


def cpu_isa(target) -> str:
    """The instruction set of ``target`` (a target dict or tvm Target) the kernel bodies may use: "avx512" on x86
    CPUs with AVX-512BW, VBMI and VNNI ("avx512gfni" with GFNI too), "avx2" on those with AVX2 (asked from LLVM:
    mcpu implies the features), "neon" on aarch64 (Advanced SIMD is part of ARMv8-A: ``tbl`` exists on every
    aarch64 CPU), else "generic"."""
    import tvm
    from tvm.target import codegen

    tgt = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    if str(tgt.kind.name) != "llvm":
        return "generic"
    if "aarch64" in str(tgt.attrs.get("mtriple", "")):
        try:
            if codegen.target_has_features("dotprod", tgt):
                return "i8mm" if codegen.target_has_features("i8mm", tgt) else "dotprod"
            return "neon"
        except Exception:
            return "neon"
    try:
        if all(codegen.target_has_features(f, tgt) for f in AVX512):
            return "avx512gfni" if codegen.target_has_features("gfni", tgt) else "avx512"
        return "avx2" if codegen.target_has_features("avx2", tgt) else "generic"
    except Exception:  # an LLVM without the query: the portable bodies
        return "generic"


STACK_MAX = 16 << 10   # bytes of one local buffer kept on the stack (the tiles and tables are a few KiB)


def _local(shape, dtype):
    """A local buffer kept on the stack (``lowering``) when small; larger ones (a 32-row accumulator tile) go to
    TVM's workspace."""
    nbytes = int(shape[0]) * tvm.DataType(dtype).bits // 8
    return T.alloc_local(shape, dtype, annotations=KEEP if nbytes <= STACK_MAX else None)


PREFETCH_ROWS = 8   # rows ahead whose table and first plane lines are prefetched (a row of a small layer takes tens
                    # of ns, DRAM ~100): a 576x576 4-bit GEMV from DRAM 44 -> 19 us (AVX-512 body), 49 -> 30 us
                    # (AVX2 body); Xeon, 2 threads


def _prefetch(load) -> None:
    """A read prefetch of the cache line holding ``load`` into every cache level (``prefetcht0``, ``prfm``)."""
    T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(load), T.int32(0), T.int32(3),
                                  T.int32(1)))


def prefetch_row(s: _Shape, b: int, PL, LUT, row) -> None:
    """Prefetch what a b-bit call reads first of row ``row`` + PREFETCH_ROWS: every line of its table (32 16-bit
    entries a line, and the line of its last entry: the tables start anywhere in a line, rows being 1040 bytes
    apart) and the first two lines of each plane row (longer rows are streams the hardware prefetcher follows).
    At 3 bits the bodies load 16 entries (a whole vpshufb table), so the line of entry 15 is the last one (it was
    entry 7's: a 1536x576 3-bit GEMV from DRAM took 100 us against 4 bits' 70, 55 us with it; AVX2 body, Zen 4, 1
    thread; the AVX2 SmolLM2 decode step at 3 bits 10.95 -> 9.24 ms, 2 threads). The table's last line was missed
    before: a 1536x576 GEMV from DRAM took 46 / 99 us at 4 / 5 bits, 23 / 27 us with it (21 at 3 bits; AVX-512
    body, Zen 4, 2 threads), the table load being the first thing a row waits for."""
    ahead = T.min(row + PREFETCH_ROWS, s.N - 1)
    for e in list(range(0, 1 << b, 32)) + [max(1 << b, 16) - 1]:   # b = 3: the bodies load 16 entries
        _prefetch(LUT[ahead, lut_offset(b, s.MINB) + e])
    for p, o in [(p, o) for p in range(b) for o in range(0, min(int(PL.shape[2]), 128), 64)]:
        _prefetch(PL[p, ahead, o])


def each_group(s: _Shape, step) -> None:
    """step(g, tail) over the groups of 256 weights: the whole groups in a TIR loop (tail 4 blocks of 64), then
    a partial last group with its own constant block count."""
    full = s.G if s.tail == 4 else s.G - 1
    if full:
        with T.serial(0, full) as g:
            step(g, 4)
    if s.tail != 4:
        step(s.G - 1, s.tail)


def _plane_vector(PL, p, n, g, tail: int):
    if tail == 4:
        return PL[p, n, T.ramp(32 * g, 1, 32)]
    z8 = _u8(0, 8)
    part = [PL[p, n, T.ramp(32 * g + 8 * j, 1, 8)] if j < tail else z8 for j in range(4)]
    return T.vectorcombine("uint8x32", T.vectorcombine("uint8x16", part[0], part[1]),
                           T.vectorcombine("uint8x16", part[2], part[3]))


def _prologue(s: _Shape, X, XP, SX, XC=None):
    """XP [M, G*256] = X in decode order. int8 mode: quantized per block of 32 columns (llama.cpp's Q8_0; one
    scale per 256 columns cost +4.6% perplexity at 3 bits on SmolLM2, per 64 +1.2..3.7%). Block (j, h) of group g
    holds columns 256g + 64j + 32h + [0, 32): bits i = 4h..4h+3 of the planes' block j. The int8 values are stored
    as int16 (the products are int16 table value x activation). The scales are laid out as the int32 lanes of a
    half-group's dot products need them (lane t sums codes 2t and 2t + 1 of a code vector: block t // 4):
    SX[m, 32g + 16h + t] = scale of block (t // 4, h). The AVX-512 int8 body keeps the values int8 (vpdpbusd: lane
    t sums bytes 4t..4t+3 of a pair of codes, block (t % 8) // 2), and XC (int32, laid out like SX) is what its
    biased tables add to each lane: BIAS16 * the sum of the activations the lane multiplies. The AVX-512 exact body
    reads each pair of codes (2q, 2q+1) in the order its byte unpacks leave the fp16 values: position 64q + 32a +
    16c + 8h + l holds code 2q + c, lane 8(a + 2h) + l. With the GFNI decode (``s.gfni``) position 64z + 8w + i
    (w = 2j + e) holds column 64j + 8i + 2z + e, and one int32 lane t per group (block (t // 4, t % 2)) sums
    bytes 4t..4t+3 of all four code vectors: SX and XC have 16 lanes per group. The "dotprod" body (``s.sdot``)
    keeps the int8 values in the NEON order and one lane per block (j, h): SX[m, 32g + 16h + j] and XC (SDOT_BIAS x
    the block's sum, ``_sdot_bias_lanes``)."""
    loop = T.parallel if s.M > 1 else T.serial
    if s.mode == "int8":
        with loop(0, s.M) as m:
            if s.G > 1:
                with T.serial(0, s.G - 1) as g:
                    _quantize_group(s, m, g, X, XP, SX, XC, 4)
            _quantize_group(s, m, s.G - 1, X, XP, SX, XC, s.tail if s.compact_tail else 4, last=True)
        return

    def src(g, i, j, l):
        return GROUP * g + 64 * j + 8 * i + l

    def xval(m, k):
        return T.if_then_else(k < s.K, X[m, T.min(k, s.K - 1)], T.float32(0))

    with loop(0, s.M) as m:
        with T.serial(0, s.G) as g:
            if s.mode == "exact" and s.gfni:   # code vector z lane 8w + i, in the unpacks' order
                with T.grid(4, 8, 8) as (z, w, i):
                    T.buffer_store(XP, xval(m, src(g, i, w // 2, 2 * z + w % 2)), [m, GROUP * g + 64 * z + 32 * (
                        w % 2) + 16 * (w // 4) + 8 * ((w // 2) % 2) + i])
            elif s.mode == "exact" and s.wide:
                with T.grid(4, 2, 2, 2, 8) as (q, a, c, h, l):
                    T.buffer_store(XP, xval(m, src(g, 2 * q + c, a + 2 * h, l)),
                                   [m, GROUP * g + 64 * q + 32 * a + 16 * c + 8 * h + l])
            else:
                with T.grid(8, 4, 8) as (i, j, l):
                    T.buffer_store(XP, xval(m, src(g, i, j, l)), [m, GROUP * g + 32 * i + 8 * j + l])


def _block_values(s: _Shape, X, m, c0: int | tvm.tirx.PrimExpr, valid: int) -> list:
    """Columns c0..c0 + 31 of row m of X as two float32x16 (``valid``: how many of them are < K, 32 when all)."""
    out = []
    for v in (0, 1):
        n = min(max(valid - 16 * v, 0), 16)
        idx = T.ramp(c0 + 16 * v, 1, 16)
        if n == 16:
            out.append(X[m, idx])
        elif n == 0:
            out.append(T.broadcast(T.float32(0), 16))
        else:
            out.append(T.Select(idx < T.broadcast(s.K, 16), X[m, T.min(idx, T.broadcast(s.K - 1, 16))],
                                T.broadcast(T.float32(0), 16)))
    return out


def _quantize_group(s: _Shape, m, g, X, XP, SX, XC, nblocks: int, last: bool = False) -> None:
    """int8 mode: group g of row m of X quantized per block of 32 into XP, its scales into SX and (AVX-512) its
    bias sums into XC, in the decode order of the body (see ``_prologue``). ``nblocks`` < 4: the compact last
    group (``_Shape.compact_tail``): code vector j holds block j, lane 8l + i the code of column 64j + 8i + l;
    int32 lane t of vector j covers block (j, t % 2) and sits at lane 16j + t of SX and XC. Each block is two
    vector loads, a vector quantization into QB and a scatter of its 32 bytes (columns past K, ``last``: zeros);
    the scalar loop with a bound check per value took 14 / 27 us of a 32-row call at K = 576 / 1536 (Zen 4)."""
    compact = nblocks < 4
    amax = _local((1,), "float32")
    QB = _local((32,), XP.dtype)
    for j, h in [(j, h) for j in range(nblocks) for h in range(2)]:
        c0 = GROUP * g + 64 * j + 32 * h
        halves = _block_values(s, X, m, c0, s.K - c0 if last else 32)
        T.buffer_store(amax, lane_reduce(T.max(T.abs(halves[0]), T.abs(halves[1])), 16, T.max), [0])
        inv = T.Select(amax[0] > T.float32(0), T.float32(INT8_MAX) / T.max(amax[0], T.float32(1e-30)),
                       T.float32(0))
        for u in range(8 if compact else 1 if s.sdot else 4):
            lane = 16 * j + 2 * u + h if compact else 4 * j + 2 * (u % 2) + h if s.gfni else \
                16 * h + (8 * (u // 2) + 2 * j + u % 2 if s.wide else j if s.sdot else 4 * j + u)
            T.buffer_store(SX, amax[0] / T.float32(INT8_MAX), [m, 32 * g + lane])
        qs = []
        for v in (0, 1):
            q = T.floor(halves[v] * T.broadcast(inv, 16) + T.broadcast(T.float32(0.5), 16))
            qs.append(T.max(T.min(q, T.broadcast(T.float32(INT8_MAX), 16)), T.broadcast(T.float32(-INT8_MAX), 16)))
            T.buffer_store(QB, T.Cast(f"{XP.dtype}x16", qs[v]), [T.ramp(16 * v, 1, 16)])
        if s.gfni:   # bytes 8i + l (i = 0..3) are 4 consecutive bytes of XP: one shuffle and one store per l
            qb = QB[T.ramp(0, 1, 32)]
            for l in range(8):
                pos = 64 * j + 8 * l + 4 * h if compact else 64 * (l // 2) + 8 * (2 * j + l % 2) + 4 * h
                T.buffer_store(XP, T.Shuffle([qb], [8 * i + l for i in range(4)]), [m, T.ramp(GROUP * g + pos, 1, 4)])
            _bias_lanes(qs[0] + qs[1], compact, XC, m, g, j, h)
            continue
        for i in range(4):   # columns c0 + 8i + l, l = 0..7: 8 consecutive values of XP (and of |x|: s.abs_x)
            q8 = QB[T.ramp(8 * i, 1, 8)]
            col = GROUP * g + 32 * (4 * h + i) + 8 * j
            T.buffer_store(XP, q8, [m, T.ramp(col, 1, 8)])
            if s.abs_x:
                T.buffer_store(XP, T.abs(q8), [m, T.ramp(s.G * GROUP + col, 1, 8)])
        if s.sdot and s.xc:
            _sdot_bias_lanes(qs[0] + qs[1], XC, m, g, j, h)

    def bias(first, terms):   # BIAS16 * the sum of the lane's bytes, one expression (no store-load chain)
        return sum((T.Cast("int32", XP[m, GROUP * g + first + o]) for o in terms), T.int32(0)) * BIAS16

    if XC is not None and s.wide and not s.gfni:   # lane t of half h: bytes 4t..4t+3 of pairs 2h and 2h + 1
        with T.grid(2, 16) as (h, t):
            T.buffer_store(XC, bias(64 * 2 * h + 4 * t, [64 * c + u for c in range(2) for u in range(4)]),
                           [m, 32 * g + 16 * h + t])


def _sdot_bias_lanes(v, XC, m, g, j: int, h: int) -> None:
    """The "dotprod" body's XC lane of block (j, h) from ``v`` (as in ``_bias_lanes``): lane 16h + j of group g is
    SDOT_BIAS times the sum of the block's quantized columns."""
    T.buffer_store(XC, T.Cast("int32", lane_reduce(v, 16)) * SDOT_BIAS, [m, 32 * g + 16 * h + j])


def _bias_lanes(v, compact: bool, XC, m, g, j: int, h: int) -> None:
    """XC lanes of block (j, h) from ``v`` (float32x16, lane 8i' + l: the sum of the block's quantized columns 8i +
    l over i = i', i' + 2; exact integers): BIAS16 times the sum of the bytes each int32 lane multiplies. GFNI
    decode: lanes 4j + 2e + h sum the columns with l % 2 = e; compact: lane 16j + 2l + h sums the 4 columns 8i + l."""
    if compact:
        w = T.Shuffle([v], list(range(8))) + T.Shuffle([v], list(range(8, 16)))
        for l in range(8):
            T.buffer_store(XC, T.Cast("int32", T.Shuffle([w], [l])) * BIAS16, [m, 32 * g + 16 * j + 2 * l + h])
        return
    for e in (0, 1):
        part = lane_reduce(T.Shuffle([v], list(range(e, 16, 2))), 8)
        T.buffer_store(XC, T.Cast("int32", part) * BIAS16, [m, 32 * g + 4 * j + 2 * e + h])
