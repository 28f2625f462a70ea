"""Vector primitives of the CPU bitplane kernel (``kernels.lut_cpu``): the bit-plane decode, the table lookups and
the int8 dot products, per instruction set ("avx2" intrinsics, or "generic" portable vector code)."""
from __future__ import annotations

from tvm.script import tirx as T

from ..quant.byteslice import FORM_GRID, GROUP

ARM_ISAS = ("i8mm", "dotprod", "neon")   # the aarch64 bodies: NEON ``tbl`` lookups (+ ``sdot`` for the int8 sums:
                                         # "dotprod"; + ``smmla`` / ``usmmla`` at M > 1: "i8mm")
SDOT_BIAS = 128   # "dotprod": a table's low bytes are stored minus 128 (signed for sdot); the sums add it back


def _u8(v: int, lanes: int = 32):
    return T.broadcast(T.uint8(v), lanes)


def _shift(x, s: int, lanes: int = 32):
    """uint8 x lanes shifted by s bits inside 32-bit lanes (s > 0: left); the caller masks so no bit crosses a
    byte."""
    if s == 0:
        return x
    n = lanes // 4
    w = T.reinterpret(f"uint32x{n}", x)
    w = T.shift_left(w, T.broadcast(T.uint32(s), n)) if s > 0 else T.shift_right(w, T.broadcast(T.uint32(-s), n))
    return T.reinterpret(f"uint8x{lanes}", w)


def _srl16(x, s: int, lanes: int = 32):
    n = lanes // 2
    return T.reinterpret(f"uint8x{lanes}", T.shift_right(T.reinterpret(f"uint16x{n}", x), T.broadcast(T.uint16(s), n)))


def lane_reduce(v, lanes: int, combine=lambda a, b: a + b):
    """The lanes of a vector combined by halving (vextract + one op per halving: 4 ops for 16 lanes, not a chain
    of 15); the kernels' horizontal sums and maxima all go through it."""
    while lanes > 1:
        lanes //= 2
        v = combine(T.Shuffle([v], list(range(lanes))), T.Shuffle([v], list(range(lanes, 2 * lanes))))
    return v


def _sll16(x, s: int):
    return T.reinterpret("uint8x32", T.shift_left(T.reinterpret("uint16x16", x), T.broadcast(T.uint16(s), 16)))


def _swap(a, c, s: int, mask: int):
    """One butterfly of a bit-matrix transpose on byte lanes: the bits of ``a`` at mask << s trade places with the
    bits of ``c`` at mask (None: a zero vector, its terms left out). The masks keep every shifted bit in its byte."""
    if a is None and c is None:
        return None, None
    if a is None:
        t = T.bitwise_and(c, _u8(mask))
        return _shift(t, s), T.bitwise_and(c, _u8(255 ^ mask))
    if c is None:
        return T.bitwise_and(a, _u8(255 ^ (mask << s))), T.bitwise_and(_shift(a, -s), _u8(mask))
    t = T.bitwise_and(T.bitwise_xor(_shift(a, -s), c), _u8(mask))
    return T.bitwise_xor(a, _shift(t, s)), T.bitwise_xor(c, t)


def decode(vs, b: int, pshufb: bool = False) -> list:
    """b plane vectors (uint8x32, MSB plane first) -> the 8 code vectors of the group: code i lane 8j+l is the
    b-bit code of weight 64j + 8i + l. A bit-matrix transpose per byte: row q is plane b - 1 - q (rows past b
    zero, their terms folded away); after it row i holds bit i of every plane, the code. b <= 4: a 4 x 4 transpose
    of both nibbles at once (rows i hold codes i and i + 4), 2 butterfly stages; b > 4: 8 x 8, 3 stages (6
    instructions a butterfly: 72 for 8 planes against 176 moving each bit by its own mask and shift).
    ``pshufb``: the codes only index ``vpshufb`` tables, which read an index's low 4 bits and bit 7 (set: zero):
    at b <= 3 a byte's high nibble holds another code in bits 4..6, bit 7 stays clear, so no mask is needed."""
    size = 4 if b <= 4 else 8
    rows = [vs[b - 1 - q] if q < b else None for q in range(size)]
    s = 1
    while s < size:
        mask = {1: 0x55, 2: 0x33, 4: 0x0F}[s]
        for q in range(size):
            if q & s == 0:
                rows[q], rows[q + s] = _swap(rows[q], rows[q + s], s, mask)
        s *= 2
    if b > 4:
        return rows
    loose = pshufb and b <= 3

    def low(v):
        return v if loose else T.bitwise_and(v, _u8(15))

    return [low(rows[i]) for i in range(4)] + [low(_srl16(rows[i], 4)) for i in range(4)]


def _x86(name, dtype, *args):
    return T.call_llvm_pure_intrin(dtype, f"llvm.x86.{name}", *args)


def lookup_bytes_avx2(table, b: int, c):
    """int8x32: entry c of a 2^b-entry byte table for 32 codes, by vpshufb on 16-entry tables (``table(t)``:
    entries 16t..16t+15 in both 128-bit halves) and, for b > 4, a vpblendvb tree on the code's high bits."""
    if b <= 4:
        return _x86("avx2.pshuf.b", "int8x32", table(0), T.reinterpret("int8x32", c))
    lo = T.reinterpret("int8x32", T.bitwise_and(c, _u8(15)))
    vals = [_x86("avx2.pshuf.b", "int8x32", table(t), lo) for t in range(1 << (b - 4))]
    for bit in range(4, b):   # the byte's MSB after a 16-bit shift by 7 - bit is its bit `bit`
        mask = T.reinterpret("int8x32", _sll16(c, 7 - bit))
        vals = [_x86("avx2.pblendvb", "int8x32", vals[2 * u], vals[2 * u + 1], mask) for u in range(len(vals) // 2)]
    return vals[0]


def split_width(b: int) -> int:
    return max(16, 1 << b)


def split_fp16_tables(LUT, n, off, b: int, TB, base: int, signed_low: bool = False) -> None:
    """Row n's fp16 LUT of bit-width b as two byte tables in TB (uint8): low bytes at base, high bytes at
    base + split_width(b) (whole 16-entry tables; for b < 4 the entries past 2^b are never indexed).
    ``signed_low``: the low bytes stored minus SDOT_BIAS (bit 7 flipped), as int8 they are the signed operand of
    ``sdot``: an int16 q = 256 * (high byte as int8) + (low byte as int8) + SDOT_BIAS."""
    w = split_width(b)
    for t in range(w // 16):
        v = T.reinterpret("uint16x16", LUT[n, T.ramp(off + 16 * t, 1, 16)])
        low = T.bitwise_and(v, T.broadcast(T.uint16(255), 16))
        if signed_low:
            low = T.bitwise_xor(low, T.broadcast(T.uint16(SDOT_BIAS), 16))
        T.buffer_store(TB, T.Cast("uint8x16", low), [T.ramp(base + 16 * t, 1, 16)])
        T.buffer_store(TB, T.Cast("uint8x16", T.shift_right(v, T.broadcast(T.uint16(8), 16))),
                       [T.ramp(base + w + 16 * t, 1, 16)])


def lookup_bytes_neon(table, b: int, c):
    """int8x32: entry c of a 2^b-entry byte table for 32 codes, by NEON ``tbl`` on up to four 16-entry tables per
    instruction (``table(t)``: entries 16t..16t+15 as int8x16). b > 6: one ``tbl4`` per 64 entries on the code
    minus 64j, ORed (``tbl`` gives 0 for an index past its tables). Plain ARMv8 NEON: every aarch64 CPU has it."""
    n = max(1, (1 << b) // 16)
    halves = []
    for h in range(2):
        idx = T.Shuffle([c], list(range(16 * h, 16 * h + 16)))
        out = None
        for j in range(0, n, 4):
            ix = idx if j == 0 else idx - T.broadcast(T.uint8(16 * j), 16)
            ts = [table(t) for t in range(j, min(n, j + 4))]
            v = T.call_llvm_pure_intrin("int8x16", f"llvm.aarch64.neon.tbl{len(ts)}.v16i8", *ts,
                                        T.reinterpret("int8x16", ix))
            out = v if out is None else T.bitwise_or(out, v)
        halves.append(out)
    return T.vectorcombine("int8x32", halves[0], halves[1])


def split_lookup(TB, base: int, b: int, c, isa: str, hi_only: bool = False):
    """(low bytes, high bytes) of the 16-bit table entries of 32 codes: the split tables at TB[base] (from
    ``split_fp16_tables``), each looked up like an int8 table (``lookup_bytes_avx2`` / ``lookup_bytes_neon``).
    ``hi_only``: (None, high bytes), for tables whose low bytes are zero (``byteslice.BYTE_TABLE_BITS``)."""
    def table(half):
        def get(t):
            t16 = T.reinterpret("int8x16", TB[T.ramp(base + half * split_width(b) + 16 * t, 1, 16)])
            return t16 if isa in ARM_ISAS else T.vectorcombine("int8x32", t16, t16)
        return get

    look = lookup_bytes_neon if isa in ARM_ISAS else lookup_bytes_avx2
    return None if hi_only else look(table(0), b, c), look(table(1), b, c)


def lookup_fp16_split(TB, base: int, b: int, c, isa: str) -> list:
    """The fp16 LUT entries of 32 codes as four float32x8 (codes 8q..8q+7): the bytes (``split_lookup``)
    interleaved into fp16 and widened (vcvtph2ps, fcvtl)."""
    lo, hi = split_lookup(TB, base, b, c, isa)
    out = []
    for q in range(4):
        pair = T.Shuffle([lo, hi], [v for e in range(8) for v in (8 * q + e, 32 + 8 * q + e)])
        out.append(T.Cast("float32x8", T.reinterpret("float16x8", pair)))
    return out


def lookup_int16_split(TB, base: int, b: int, c, isa: str) -> list:
    """The int16 table entries of 32 codes as two int16x16 (codes 0..15, 16..31): the bytes (``split_lookup``
    on the int16 table split by ``split_fp16_tables``) re-joined."""
    lo, hi = split_lookup(TB, base, b, c, isa)
    return [T.reinterpret("int16x16", T.Shuffle([lo, hi], [v for e in range(16 * u, 16 * u + 16) for v in (e, 32 + e)]))
            for u in range(2)]


def lookup_int16_generic(TAB, n, off, b: int, c) -> list:
    c32 = T.Cast("int32x32", c)
    return [T.Shuffle([TAB[n, off + c32]], list(range(16 * u, 16 * u + 16))) for u in range(2)]


def dot_int16_avx2(w, x):
    """int32x8: lane t = w[2t] x[2t] + w[2t+1] x[2t+1] (w, x int16x16; vpmaddwd)."""
    return _x86("avx2.pmadd.wd", "int32x8", w, x)


def dot_int16_generic(w, x):
    p = T.Cast("int32x16", w) * T.Cast("int32x16", x)
    return T.Shuffle([p], list(range(0, 16, 2))) + T.Shuffle([p], list(range(1, 16, 2)))


def dot_int16_neon(w, x):
    """int32x8: lane t < 4 = w[t] x[t] + w[t+4] x[t+4], lane 4 + t = the same on lanes 8..15 (the blocks of 32 stay
    apart as in ``dot_int16_avx2``): two ``smull`` and two ``smlal`` on 4-lane halves."""
    def part(idx):
        return T.Cast("int32x8", T.Shuffle([w], idx)) * T.Cast("int32x8", T.Shuffle([x], idx))
    return part([0, 1, 2, 3, 8, 9, 10, 11]) + part([4, 5, 6, 7, 12, 13, 14, 15])


def sdot(acc, a, b):
    """int32x4: acc + lane t = the dot product of bytes 4t..4t+3 of a and b (int8x16; ``sdot``, +dotprod)."""
    return T.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.sdot.v4i32.v16i8", acc, a, b)


def smmla(acc, a, b, unsigned_a: bool = False):
    """int32x4: acc + the 2 x 2 products of a's two 8-byte rows and b's (lane 2i + j: row i of a . row j of b;
    ``smmla``, or ``usmmla`` with a unsigned; +i8mm)."""
    return T.call_llvm_pure_intrin("int32x4", f"llvm.aarch64.neon.{'us' if unsigned_a else 's'}mmla.v4i32.v16i8",
                                   acc, a, b)


def lookup_f32_avx2(TBL, base, b: int, idx):
    """float32x8: TBL[base + idx] for 8 int32 codes by vpermps on 8-entry tables and a vblendvps tree."""
    vals = [_x86("avx2.permps", "float32x8", TBL[T.ramp(base + 8 * t, 1, 8)], idx)
            for t in range(max(1, (1 << b) // 8))]
    for bit in range(3, b):
        mask = T.reinterpret("float32x8", T.shift_left(idx, T.broadcast(T.int32(31 - bit), 8)))
        vals = [_x86("avx.blendv.ps.256", "float32x8", vals[2 * u], vals[2 * u + 1], mask)
                for u in range(len(vals) // 2)]
    return vals[0]


def lookup_f32_generic(TBL, base, b: int, idx):
    return TBL[base + idx]


def scalar_lookups(TBL, tbase, CB, cbase, WB, wbase, n: int = 256) -> None:
    """WB[wbase + k] = TBL[tbase + CB[cbase + k]] for n codes (a group), one scalar load each."""
    with T.serial(0, n) as k:
        T.buffer_store(WB, TBL[tbase + T.Cast("int32", CB[cbase + k])], [wbase + k])


def half_int(s, h: int, g, m, weights, XP, SX):
    """float32x8: half h of group g of int8 mode (codes i = 4h..4h+3; ``weights(i)``: their int16 table values
    as two int16x16) times row m of the activations, the int32 sums of each block of 32 scaled by its scale.
    Lane t of the first (second) int32x8 sums codes 2t, 2t+1 (16 + 2t, 17 + 2t): block t // 4 (2 + t // 4).
    Activations held as int8 (the AVX2 bodies) are widened here."""
    dot = dot_int16_avx2 if s.avx2 else dot_int16_neon if s.isa == "neon" else dot_int16_generic
    acc = [None, None]
    for i in range(4 * h, 4 * h + 4):
        w = weights(i)
        for u in range(2):
            x = XP[m, T.ramp(GROUP * g + 32 * i + 16 * u, 1, 16)]
            d = dot(w[u], x if XP.dtype == "int16" else T.Cast("int16x16", x))
            acc[u] = d if acc[u] is None else acc[u] + d
    scaled = [T.Cast("float32x8", acc[u]) * SX[m, T.ramp(32 * g + 16 * h + 8 * u, 1, 8)] for u in range(2)]
    return scaled[0] + scaled[1]


def dot_bytes_avx2(w, x, ax):
    """int32x8: lane t = sum of w[e] x[e] for bytes e = 4t..4t+3 (w, x int8x32 in -127..127, ax = |x|):
    ``vpmaddubsw`` on |x| and w with x's sign (``vpsignb``; no int16 pair sum can saturate), then ``vpmaddwd`` by
    ones."""
    pairs = _x86("avx2.pmadd.ub.sw", "int16x16", ax, _x86("avx2.psign.b", "int8x32", w, x))
    return _x86("avx2.pmadd.wd", "int32x8", pairs, T.broadcast(T.int16(1), 16))


def form_tables(LUT, n, off, b: int, TB, base: int) -> None:
    """Row n's b-bit int16 table in ``byteslice.in_form`` (b > 4) as byte tables at TB[base]: the 16 cluster bases A
    (``byteslice.cluster_base``: (first + last) >> 5 of each cluster's entries), then r = q - FORM_GRID A[code >>
    (b - 4)] for the 2^b codes; both int8 (|A|, |r| <= 127)."""
    sub = 1 << (b - 4)
    a = T.shift_right(LUT[n, T.ramp(off, sub, 16)] + LUT[n, T.ramp(off + sub - 1, sub, 16)],
                      T.broadcast(T.int16(5), 16))
    T.buffer_store(TB, T.Cast("uint8x16", a), [T.ramp(base, 1, 16)])
    av = T.Cast("int16x16", T.reinterpret("int8x16", TB[T.ramp(base, 1, 16)]))
    for t in range((1 << b) // 16):
        at = T.Shuffle([av], [(16 * t + e) // sub for e in range(16)])
        r = LUT[n, T.ramp(off + 16 * t, 1, 16)] - T.shift_left(at, T.broadcast(T.int16(4), 16))
        T.buffer_store(TB, T.Cast("uint8x16", r), [T.ramp(base + 16 + 16 * t, 1, 16)])


def form_lookup(TB, base: int, b: int, c) -> tuple:
    """(A, r) bytes (int8x32) of 32 b-bit codes from ``form_tables``' bytes at TB[base]: A by one ``vpshufb`` on the
    code's top 4 bits, r by ``lookup_bytes_avx2`` (a blend tree of 2^(b-4) tables)."""
    def table(first):
        def get(t):
            t16 = T.reinterpret("int8x16", TB[T.ramp(base + first + 16 * t, 1, 16)])
            return T.vectorcombine("int8x32", t16, t16)
        return get

    h = T.reinterpret("int8x32", T.bitwise_and(_srl16(c, b - 4), _u8(15)))
    return _x86("avx2.pshuf.b", "int8x32", table(0)(0), h), lookup_bytes_avx2(table(16), b, c)


def dot_form_avx2(a, r, x, ax):
    """int32x8: ``dot_bytes_avx2`` of FORM_GRID a + r (int8x32 each) with x: the two byte products kept apart in
    int16 (FORM_GRID x a pair sum would saturate), joined by ``vpmaddwd`` by FORM_GRID and by ones."""
    pa = _x86("avx2.pmadd.ub.sw", "int16x16", ax, _x86("avx2.psign.b", "int8x32", a, x))
    pr = _x86("avx2.pmadd.ub.sw", "int16x16", ax, _x86("avx2.psign.b", "int8x32", r, x))
    return _x86("avx2.pmadd.wd", "int32x8", pa, T.broadcast(T.int16(FORM_GRID), 16)) + \
        _x86("avx2.pmadd.wd", "int32x8", pr, T.broadcast(T.int16(1), 16))


def half_bytes(h: int, g, m, dot, XP, SX, shift: int = 8):
    """float32x8: ``half_int`` for tables read as bytes on AVX2 (the int16 values 256 x an int8 one at
    ``byteslice.BYTE_TABLE_BITS``, FORM_GRID A + r above): ``dot(i, x, |x|)`` gives code vector i's int32x8 with
    the int8 activations (the high bytes' by ``dot_bytes_avx2``, 4 instructions per 32 codes against 2 lookups, 2
    shuffles and 2 ``vpmaddwd``, then shifted by ``shift`` = 8; the table form's by ``dot_form_avx2``, 0); |x| is
    read from the second half of XP (``_Shape.abs_x``). Lane t sums
    bytes 4t..4t+3 of each code vector: block (t // 2, h), its scale at SX lane 16h + 4 (t // 2). The int32 sums
    are those of the int16 path (x 256 before the conversion, so the float values are the same)."""
    acc = None
    half = XP.shape[1] // 2
    for i in range(4 * h, 4 * h + 4):
        col = GROUP * g + 32 * i
        d = dot(i, XP[m, T.ramp(col, 1, 32)], XP[m, T.ramp(half + col, 1, 32)])
        acc = d if acc is None else acc + d
    sx = T.Shuffle([SX[m, T.ramp(32 * g + 16 * h, 1, 16)]], [4 * (t // 2) for t in range(8)])
    return T.Cast("float32x8", T.shift_left(acc, T.broadcast(T.int32(shift), 8)) if shift else acc) * sx


def _join_bytes(hi_acc, lo_acc, hi_only: bool):
    """int32x4: 256 x the high bytes' sums + the low bytes' (``hi_only``: the low bytes are zero, left out)."""
    hi = T.shift_left(hi_acc, T.broadcast(T.int32(8), 4))
    return hi if hi_only else hi + lo_acc


def half_sdot(h: int, g, m, pairs, XP, SX, XC, hi_only: bool = False):
    """float32x4: half h of group g of int8 mode on "dotprod" (``pairs(i)``: the low and high table bytes of code
    vector i, int8x32, the low ones minus SDOT_BIAS) times row m of the activations (int8). ``sdot`` lane t of
    the bytes 16u..16u+15 sums 4 codes of block j = 2u + t // 2; the high and low bytes' sums are kept apart over
    the half's 4 code vectors, then joined: 256 high + low, the lanes 2j and 2j + 1 added, + XC (SDOT_BIAS x
    the block's activations): the exact int32 sum of block (j, h) in lane j, scaled by its scale (float32x4).
    ``hi_only`` (tables with zero low bytes, ``byteslice.BYTE_TABLE_BITS``): the low bytes' sum would be -SDOT_BIAS
    x the activations, which XC cancels: both left out, 256 x the high bytes' sum is the same exact sum."""
    zero = T.broadcast(T.int32(0), 4)
    lo_acc, hi_acc = [zero, zero], [zero, zero]
    for i in range(4 * h, 4 * h + 4):
        lo, hi = pairs(i)
        for u in range(2):
            x = XP[m, T.ramp(GROUP * g + 32 * i + 16 * u, 1, 16)]
            half = list(range(16 * u, 16 * u + 16))
            if not hi_only:
                lo_acc[u] = sdot(lo_acc[u], T.Shuffle([lo], half), x)
            hi_acc[u] = sdot(hi_acc[u], T.Shuffle([hi], half), x)
    total = [_join_bytes(hi_acc[u], lo_acc[u], hi_only) for u in range(2)]
    t8 = T.vectorcombine("int32x8", total[0], total[1])
    lanes = T.ramp(32 * g + 16 * h, 1, 4)
    blocks = T.Shuffle([t8], [0, 2, 4, 6]) + T.Shuffle([t8], [1, 3, 5, 7])
    return T.Cast("float32x4", blocks if hi_only else blocks + XC[m, lanes]) * SX[m, lanes]


def half_mmla(h: int, g, m0, m1, pair, XP, SX, hi_only: bool = False) -> list:
    """Half h of group g of int8 mode on "i8mm" for rows m0, m1 of the activations and two weight rows: per block
    j a float32x4, lanes [n0 m0, n0 m1, n1 m0, n1 m1] (``pair(i, j)``: the two rows' low and high table bytes
    of block j of code vector i, each int8x16 = row n0's 8 bytes then n1's; the low bytes unsigned). Over the
    block's 4 code vectors ``usmmla`` sums the low bytes, ``smmla`` the high ones; 256 high + low is the exact
    int32 sum ``half_sdot`` gives in lane j for each pair (m, n), scaled the same way: the same float steps, so
    each row of an M > 1 call equals an M = 1 call bit for bit. ``hi_only``: zero low bytes, their products left out."""
    zero = T.broadcast(T.int32(0), 4)
    s0, s1 = (SX[m, T.ramp(32 * g + 16 * h, 1, 4)] for m in (m0, m1))
    out = []
    for j in range(4):
        lo_acc = hi_acc = zero
        for i in range(4 * h, 4 * h + 4):
            lo, hi = pair(i, j)
            x = T.vectorcombine("int8x16", *(XP[m, T.ramp(GROUP * g + 32 * i + 8 * j, 1, 8)] for m in (m0, m1)))
            if not hi_only:
                lo_acc = smmla(lo_acc, lo, x, unsigned_a=True)
            hi_acc = smmla(hi_acc, hi, x)
        out.append(T.Cast("float32x4", _join_bytes(hi_acc, lo_acc, hi_only)) * T.Shuffle([s0, s1], [j, 4 + j, j, 4 + j]))
    return out
