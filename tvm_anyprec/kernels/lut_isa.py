"""Vector primitives of the CPU bitplane kernel (``kernels.lut_cpu``): the bit-plane decode, the table lookups and
the int8 dot products, per instruction set ("avx2" intrinsics, or "generic" portable vector code)."""
from __future__ import annotations

from tvm.script import tirx as T


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


def split_fp16_tables(LUT, n, off, b: int, TB, base: int) -> None:
    """Row n's fp16 LUT of bit-width b as two byte tables in TB (uint8): low bytes at base, high bytes at
    base + split_width(b) (whole 16-entry tables; for b < 4 the entries past 2^b are never indexed)."""
    w = split_width(b)
    for t in range(w // 16):
        v = T.reinterpret("uint16x16", LUT[n, T.ramp(off + 16 * t, 1, 16)])
        T.buffer_store(TB, T.Cast("uint8x16", T.bitwise_and(v, T.broadcast(T.uint16(255), 16))),
                       [T.ramp(base + 16 * t, 1, 16)])
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


def _split_lookup(TB, base: int, b: int, c, isa: str):
    """(low bytes, high bytes) of the 16-bit table entries of 32 codes: the split tables at TB[base] (from
    ``split_fp16_tables``), each looked up like an int8 table (``lookup_bytes_avx2`` / ``lookup_bytes_neon``)."""
    def table(half):
        def get(t):
            t16 = T.reinterpret("int8x16", TB[T.ramp(base + half * split_width(b) + 16 * t, 1, 16)])
            return t16 if isa == "neon" else T.vectorcombine("int8x32", t16, t16)
        return get

    look = lookup_bytes_neon if isa == "neon" else lookup_bytes_avx2
    return look(table(0), b, c), look(table(1), b, c)


def lookup_fp16_split(TB, base: int, b: int, c, isa: str) -> list:
    """The fp16 LUT entries of 32 codes as four float32x8 (codes 8q..8q+7): the bytes (``_split_lookup``)
    interleaved into fp16 and widened (vcvtph2ps, fcvtl)."""
    lo, hi = _split_lookup(TB, base, b, c, isa)
    out = []
    for q in range(4):
        pair = T.Shuffle([lo, hi], [v for e in range(8) for v in (8 * q + e, 32 + 8 * q + e)])
        out.append(T.Cast("float32x8", T.reinterpret("float16x8", pair)))
    return out


def lookup_int16_split(TB, base: int, b: int, c, isa: str) -> list:
    """The int16 table entries of 32 codes as two int16x16 (codes 0..15, 16..31): the bytes (``_split_lookup``
    on the int16 table split by ``split_fp16_tables``) re-joined."""
    lo, hi = _split_lookup(TB, base, b, c, isa)
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


def scalar_lookups(TBL, tbase, CB, cbase, WB, wbase, n: int = 256) -> None:
    """WB[wbase + k] = TBL[tbase + CB[cbase + k]] for n codes (a group), one scalar load each."""
    with T.serial(0, n) as k:
        T.buffer_store(WB, TBL[tbase + T.Cast("int32", CB[cbase + k])], [wbase + k])
