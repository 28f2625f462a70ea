"""The AVX-512 GEMV body of the CPU bitplane kernel (``kernels.lut_cpu``, isa "avx512": AVX-512BW + VBMI +
VNNI, as on Zen 4/5 and Ice Lake or newer Xeons).

Per row and group of 256 weights the b plane vectors (32 bytes each) are widened once to 64 lanes (the upper
half shifted right by one bit), so one 64-lane decode yields two code vectors at once: pair q holds codes 2q
(lanes 0..31) and 2q + 1 (lanes 32..63), the activations of pair q are 64 contiguous values of XP.

With GFNI (isa "avx512gfni", both modes; every CPU with the other three features has it: Ice Lake, Zen 4/5) the
decode is instead a ``vpermt2b`` (two for b > 4) and one ``vgf2p8affineqb`` per 64 codes (``gfni_codes``: an 8 x 8 bit-matrix
transpose per qword), ~45 instructions per 256 weights at 3 bits against ~65: 1.2x (3 bits) to 1.4x (6..8 bits)
faster on a 4096x4096 GEMV (Xeon, KVM, 1 thread), and the activations' order follows (``lut_layout._prologue``).

The tables live in zmm registers for every bit-width: ``vpermb`` on a 64-entry table for b <= 6, ``vpermi2b`` on
128 entries for b = 7, two ``vpermi2b`` merged by the code's top bit for b = 8.

Both modes split the row's 16-bit table (fp16 LUT, or int16 table) into a low-byte and a high-byte table, look
both up and re-join the bytes:

* int8 mode: not re-joined. The int16 table value q is taken as the unsigned u = q + 32768 = 256 uh + ul (the
  high-byte table XOR 0x80), and each byte table is multiplied with the int8 activations by ``vpdpbusd`` (u8 x s8,
  four products per int32 lane): sum u x = sum lo x + 256 sum hi x, exact in int32. The bias adds
  32768 * sum(x) to each int32 lane, the same for every row: the prologue sums it once per call (XC) and each
  half-group subtracts it before the int32 sums are scaled, so they stay exact. (Re-joining into int16 for
  ``vpdpwssd`` was 1.12x slower at 3 bits, equal at 8.)
* exact mode: re-joined by the byte unpacks (``vpunpck[lh]bw``) and widened by ``vcvtph2ps``; the prologue stores
  the activations in the order the unpacks leave the values, so no cross-lane shuffle is needed; then FMA into
  four accumulators per row.
"""
from __future__ import annotations

from tvm.script import tirx as T

from ..quant.byteslice import GROUP
from .anyprec import lut_offset
from .lut_isa import _shift, _srl16, lane_reduce
from .lut_layout import _local, _plane_vector, each_group, prefetch_row

VEC = 64
UNROLL_M = 8   # int8 mode: rows of X up to which the loop over them is unrolled (its lookups shared by CSE); above
               # it (the prefill chunk) the looked-up bytes go to L1 once and a TIR loop runs over the rows


def _x86(name, dtype, *args):
    return T.call_llvm_pure_intrin(dtype, f"llvm.x86.{name}", *args)


def _u8(v: int):
    return T.broadcast(T.uint8(v), VEC)


def widen(v):
    """A 32-byte plane vector as 64 lanes: the bytes, then the bytes shifted right by one bit (so bit i of the
    upper half is bit i + 1 of the plane byte: one mask then selects the bits of codes i and i + 1)."""
    return T.vectorcombine("uint8x64", v, _srl16(v, 1, 32))


def decode_pairs(ws, b: int) -> list:
    """b widened plane vectors (MSB plane first) -> 4 uint8x64 code pairs: pair q lane 32c + 8j + l is the b-bit
    code of weight 64j + 8(2q + c) + l. b <= 4: the codes of bits i and i + 4 are decoded together as nibbles."""
    def gather(mask: int, i: int):
        out = None
        for p in range(b):
            t = _shift(T.bitwise_and(ws[p], _u8(mask)), (b - 1 - p) - i, VEC)
            out = t if out is None else T.bitwise_or(out, t)
        return out

    if b <= 4:
        pairs = [None] * 4
        for i in (0, 2):
            nib = gather(0x11 << i, i)
            pairs[i // 2] = T.bitwise_and(nib, _u8(15))
            pairs[i // 2 + 2] = T.bitwise_and(_srl16(nib, 4, VEC), _u8(15))
        return pairs
    return [gather(1 << i, i) for i in (0, 2, 4, 6)]


def lookup(table, b: int, c):
    """int8x64: entry c of a 2^b-entry byte table for 64 codes (``table(t)``: entries 64t..64t+63 as int8x64)."""
    idx = T.reinterpret("int8x64", c)
    if b <= 6:
        return _x86("avx512.permvar.qi.512", "int8x64", table(0), idx)
    lo = _x86("avx512.vpermi2var.qi.512", "int8x64", table(0), idx, table(1))
    if b == 7:
        return lo
    hi = _x86("avx512.vpermi2var.qi.512", "int8x64", table(2), idx, table(3))
    return T.Select(idx < T.broadcast(T.int8(0), VEC), hi, lo)


def gfni_codes(ws, b: int, compact: int = 0) -> list:
    """b plane vectors (uint8x32, MSB plane first) -> 4 uint8x64 code vectors by a byte shuffle (one ``vpermt2b``
    for b <= 4, two and a blend above) and one ``vgf2p8affineqb`` each: vector z qword w = 2j + e gathers the b plane bytes 8j + l (l = 2z + e) at
    bytes 8 - b + p (plane p), and the affine transform by the identity bytes transposes that 8 x 8 bit matrix, so
    lane 8w + i holds the code of weight 64j + 8i + l. Bits b..7 of a code carry leftover bytes (the tables repeat
    every 2^b entries and the lookups ignore the bits past their table). ``compact`` = T > 0 (a last group of T
    < 4 blocks, ``_Shape.compact_tail``): T vectors instead, vector j qword l gathering plane bytes 8j + l (lane
    8l + i: the code of weight 64j + 8i + l), so a group of one block costs one vector, not four."""
    # byte i of each qword: 1 << i (0x8040201008040201 as a signed int64)
    ident = T.reinterpret("int8x64", T.broadcast(T.int64(0x8040201008040201 - (1 << 64)), 8))
    out = []
    for z in range(compact or 4):
        idx = []
        for w in range(8):
            src = 8 * z + w if compact else 8 * (w // 2) + 2 * z + w % 2
            idx += [32 * max(0, i - (8 - b)) + src for i in range(8)]
        data = T.Shuffle(list(ws), idx)
        out.append(_x86("vgf2p8affineqb.512", "int8x64", ident, T.reinterpret("int8x64", data), T.int8(0)))
    return [T.reinterpret("uint8x64", c) for c in out]


def table_bytes(b: int) -> int:
    return max(VEC, 1 << b)


def _store_table(TB, base: int, b: int, chunk) -> None:
    """TB[base : base + table_bytes(b)] from ``chunk(t)`` (uint8x16 of entries 16t..16t+15): the 2^b entries
    repeated to fill it (so a lookup may ignore a code's bits past b, as the GFNI decode leaves them)."""
    live = max(16, 1 << b) // 16
    for t in range(table_bytes(b) // 16):
        T.buffer_store(TB, chunk(t % live), [T.ramp(base + 16 * t, 1, 16)])


def prepare_tables(s, b: int, LUT, n, TB, base: int) -> None:
    """Row n's tables for a b-bit call: the low-byte table then the high-byte table of its 16-bit values (b < 4:
    the 2^b entries repeated in each 16-entry chunk)."""
    off = lut_offset(b, s.MINB)

    def entries(t):
        if b >= 4:
            return LUT[n, T.ramp(off + 16 * t, 1, 16)]
        part = LUT[n, T.ramp(off, 1, 1 << b)]
        return T.Shuffle([part] * (16 >> b), [e % (1 << b) for e in range(16)])   # (no more lanes out than in)

    half = lambda sh: lambda t: T.Cast("uint8x16", T.bitwise_and(T.shift_right(  # noqa: E731
        T.reinterpret("uint16x16", entries(t)), T.broadcast(T.uint16(sh), 16)), T.broadcast(T.uint16(255), 16)))
    if 0 in halves(s, b):
        _store_table(TB, base, b, half(0))
    if s.mode == "int8":   # the high bytes of q + 32768
        _store_table(TB, base + table_bytes(b), b, lambda t: T.bitwise_xor(half(8)(t), T.broadcast(T.uint8(0x80), 16)))
    else:
        _store_table(TB, base + table_bytes(b), b, half(8))


def _unpack(lo, hi, upper: bool):
    """vpunpck[lh]bw: per 128-bit lane, bytes 8u..8u+7 (u = upper) of lo and hi interleaved (fp16 values)."""
    first = 8 if upper else 0
    return T.Shuffle([lo, hi], [v for L in range(4) for e in range(first, first + 8)
                                for v in (16 * L + e, VEC + 16 * L + e)])


def _f32(v16, half: int):
    """float32x16 from fp16 lanes 16*half.. of a 32-value vector held as int8x64."""
    part = T.Shuffle([v16], list(range(32 * half, 32 * half + 32)))
    return T.Cast("float32x16", T.reinterpret("float16x16", part))


def halves(s, b: int) -> tuple:
    """The table halves (0: low bytes, 1: high bytes) int8 mode looks up and multiplies at b bits: only the high
    one at BYTE_TABLE_BITS, where the int16 tables are 256 x an int8 value (``byteslice.int_tables``): 4 lookups and
    4 ``vpdpbusd`` per 256 weights instead of 8 and 8 (4096x11008 GEMV, 2 threads, Zen 4, same-process A/B: 0.905
    -> 0.707 ms at 3 bits, 0.923 -> 0.807 ms at 4)."""
    return (1,) if s.byte_tables(b) else (0, 1)


def _int8_sums(s, looked, XP, XC, g, m, compact: int = 0, chains: int = 2, ks: tuple = (0, 1)) -> list:
    """int8 mode: [(int32x16 exact sums, SX lane offset)] of one row and group (``looked(k, q)``: table half k's
    bytes for code vector q): per half-group of the paired decode (lane t: bytes 4t..4t+3 of pairs 2h, 2h + 1, block
    ((t % 8) // 2, h)), or one for the GFNI decode (lane t: bytes 4t..4t+3 of all four code vectors, block
    (t // 4, t % 2); two chains per table half), or one per code vector of a compact last group (vector j: lane
    offset 16j, block (j, t % 2)). ``ks``: the table halves multiplied (``halves``; a half left out is zero)."""
    parts = [(16 * j, (j,)) for j in range(compact)] if compact else [(0, range(4))] if s.gfni else \
        [(16 * h, (2 * h, 2 * h + 1)) for h in range(2)]
    out = []
    for lane, qs in parts:
        acc = [[T.broadcast(T.int32(0), 16)] * 2 for _ in range(2)]   # [table half][q % chains]
        for q in qs:
            x = XP[m, T.ramp(GROUP * g + VEC * q, 1, VEC)]
            for k in ks:
                acc[k][q % chains] = _x86("avx512.vpdpbusd.512", "int32x16", acc[k][q % chains], looked(k, q), x)
        hi = T.shift_left(acc[1][0] + acc[1][1], T.broadcast(T.int32(8), 16))
        total = hi + acc[0][0] + acc[0][1] if 0 in ks else hi
        out.append((total - XC[m, T.ramp(32 * g + lane, 1, 16)], lane))
    return out


def _int8_row(s, looked, XP, SX, XC, ACC, g, m, base, compact: int = 0, chains: int = 2, ks: tuple = (0, 1)) -> None:
    """int8 mode: one row's int32 sums of a group, scaled per block of 32 activations, into its accumulator."""
    a = ACC[T.ramp(base, 1, 16)]
    for total, lane in _int8_sums(s, looked, XP, XC, g, m, compact, chains, ks):
        a = a + T.Cast("float32x16", total) * SX[m, T.ramp(32 * g + lane, 1, 16)]
    T.buffer_store(ACC, a, [T.ramp(base, 1, 16)])


def _group(s, b: int, rows: list, g, tail: int, bufs) -> None:
    PL, XP, SX, XC, TB, CB, VB, ACC, LK = bufs
    W = table_bytes(b)
    compact = tail if s.compact_tail and tail < 4 else 0
    NQ = compact or 4
    for r, n in enumerate(rows):   # 4 code vectors per row into CB (a compact last group: one per block)
        if s.gfni:
            codes = gfni_codes([_plane_vector(PL, p, n, g, tail) for p in range(b)], b, compact)
        else:
            for p in range(b):
                T.buffer_store(VB, widen(_plane_vector(PL, p, n, g, tail)), [T.ramp(VEC * p, 1, VEC)])
            codes = decode_pairs([VB[T.ramp(VEC * p, 1, VEC)] for p in range(b)], b)
        for q in range(NQ):
            T.buffer_store(CB, codes[q], [T.ramp(r * GROUP + VEC * q, 1, VEC)])

    def table(r):
        return lambda k: lambda t: T.reinterpret("int8x64", TB[T.ramp((2 * r + k) * W + VEC * t, 1, VEC)])

    R = len(rows)
    ks = halves(s, b)
    if LK is not None:   # int8, M > UNROLL_M: each row's looked-up bytes once into LK, then a loop over X's rows
        for r, k, q in [(r, k, q) for r in range(R) for k in ks for q in range(NQ)]:
            code = CB[T.ramp(r * GROUP + VEC * q, 1, VEC)]
            T.buffer_store(LK, lookup(table(r)(k), b, code), [T.ramp(((r * 2 + k) * 4 + q) * VEC, 1, VEC)])
        with T.serial(0, s.M) as m:
            for r in range(R):
                looked = lambda k, q, r=r: LK[T.ramp(((r * 2 + k) * 4 + q) * VEC, 1, VEC)]  # noqa: E731
                _int8_row(s, looked, XP, SX, XC, ACC, g, m, (r * s.M + m) * acc_width(s), compact, 1, ks)
        return
    for r, m in [(r, m) for r in range(R) for m in range(s.M)]:   # every row of X: the M = 1 order
        code = [CB[T.ramp(r * GROUP + VEC * q, 1, VEC)] for q in range(NQ)]
        base = (r * s.M + m) * acc_width(s)
        if s.mode == "int8":
            _int8_row(s, lambda k, q, r=r, code=code: lookup(table(r)(k), b, code[q]), XP, SX, XC, ACC, g, m, base,
                      compact, 2, ks)
            continue
        accs = [ACC[T.ramp(base + 16 * k, 1, 16)] for k in range(4)]
        for q in range(4):
            lo, hi = lookup(table(r)(0), b, code[q]), lookup(table(r)(1), b, code[q])
            ul, uh = _unpack(lo, hi, False), _unpack(lo, hi, True)
            vals = [_f32(ul, 0), _f32(ul, 1), _f32(uh, 0), _f32(uh, 1)]
            for k in range(4):
                accs[k] = accs[k] + vals[k] * XP[m, T.ramp(GROUP * g + VEC * q + 16 * k, 1, 16)]
        for k in range(4):
            T.buffer_store(ACC, accs[k], [T.ramp(base + 16 * k, 1, 16)])


def acc_width(s) -> int:
    """fp32 accumulator lanes per (row, row of X): four vectors in exact mode, one in int8 mode."""
    return VEC if s.mode == "exact" else 16


def body(s, b: int, R: int, PL, LUT, WS, XP, SX, XC, Y) -> None:
    """The b-bit GEMV / GEMM, tiles of R rows in parallel; M <= WIDE_MAX_M rows of X (verify, prefill) each decoded
    group serves every row of X, and each row's sums run in the M = 1 order, so a verify call's outputs equal
    decode calls' on the same rows bit for bit (self-speculative decoding's output is plain greedy's)."""
    NT = -(-s.N // R)
    with T.parallel(0, NT) as t:
        TB = _local((R * 2 * table_bytes(b),), "uint8")
        CB = _local((R * GROUP,), "uint8")
        VB = None if s.gfni else _local((VEC * b,), "uint8")
        ACC = _local((R * s.M * acc_width(s),), "float32")
        LK = _local((R * 8 * VEC,), "int8") if s.mode == "int8" and s.M > UNROLL_M else None
        rows = [T.min(t * R + r, s.N - 1) for r in range(R)]
        prefetch_row(s, b, PL, LUT, t * R)
        for r, n in enumerate(rows):
            prepare_tables(s, b, LUT, n, TB, r * 2 * table_bytes(b))
            for k in range(s.M * acc_width(s) // 16):
                T.buffer_store(ACC, T.broadcast(T.float32(0), 16), [T.ramp(r * s.M * acc_width(s) + 16 * k, 1, 16)])
        bufs = (PL, XP, SX, XC, TB, CB, VB, ACC, LK)
        each_group(s, lambda g, tail: _group(s, b, rows, g, tail, bufs))
        for r, m in [(r, m) for r in range(R) for m in range(s.M)]:
            with T.If(t * R + r < s.N):
                with T.Then():
                    base = (r * s.M + m) * acc_width(s)
                    total = ACC[T.ramp(base, 1, 16)]
                    for k in range(1, 4 if s.mode == "exact" else 1):   # exact mode: four accumulators
                        total = total + ACC[T.ramp(base + 16 * k, 1, 16)]
                    total = lane_reduce(total, 16)
                    if s.mode == "int8":
                        total = total * WS[rows[r], b - s.MINB]
                    T.buffer_store(Y, total, [m, t * R + r])
