"""aarch64 variants of the INT4-weight integer GEMM (``make_int_gemm``): same buffers, same results.

Each maker returns a PrimFunc with exactly the signature of ``make_int_gemm(M, N, K, group_size, out)`` (so a
pass can swap it in), written as explicit loops over register tiles (not an s_tir schedule):

* the activations are re-laid out once per call (``XP``, M*K elements; tokens padded with zeros to the tile);
* tiles of ``RB`` weight rows run in parallel; inside a tile, for each block of ``MB`` tokens and each weight
  group, the int32 accumulators of the MB x RB tile live in registers (local buffers indexed by unrolled loops);
* the weights are never unpacked to memory: each 16-byte (or 8-byte) load of ``WP`` is split into its low
  nibbles (even k) and high nibbles (odd k) in registers. The dot product runs over k in that even/odd order;
  the re-laid-out activations use the same order, so the sum is the same;
* per group the accumulators give ACC[m, n, g] (``out="acc"``) or are dequantized at once
  (``out="float"``: Y[m, n] = sum_g XS[m] * WS[n, g] * (ACC - WZ[n, g] * XSUM[m, g]), as the x86 kernel).

Variants (``llvm.aarch64.neon.*`` intrinsics; building one for a CPU without the feature makes LLVM abort the
process, so ``schedules.intgemm_arm`` checks the target before it hands these out):

* ``sdot`` (+dotprod): ``sdot v.4s, w.16b, x.16b`` = 4 lanes, each a 4-element int8 dot product; one weight
  row x 16 k per instruction, the 4 lanes summed (addv) at the end of the group. Tile 4 rows x <= 4 tokens.
* ``smmla`` (+i8mm): ``smmla v.4s, x.16b, w.16b`` = (2 tokens x 8 k) . (8 k x 2 rows) -> 2x2 int32; the two
  rows' 8-byte halves are combined into one vector, the token pair is interleaved in XP. Tile 8 rows x 2 or 4
  tokens (an odd M gets a zero token; M=1 wastes half of every instruction).
* ``packed`` (W4A4 only, plain NEON): the Agile-Quant packed multiply. The codes of two neighbouring rows
  n, n+1 at the same k form one int16 lane w = w1 | w2 << 8; one 16-bit multiply by the activation a
  (|a| <= 7) gives p = a*w1 + 256*a*w2 exactly (|p| <= 26985). With |a*w1| <= 105 < 128 the high part is
  hi = (p + 128) >> 8 = a*w2 and the low part p - 256*hi = a*w1. Per 8 lanes and 16 k: two multiplies, the
  high parts accumulated in int16 (GS <= 2048 keeps them in range), p widened pairwise into int32 (saddlp);
  row n's sum is sum(p) - 256*sum(hi), row n+1's sum(hi). Wrong for |a| > 7, so A8 is refused.
"""
from __future__ import annotations

from types import SimpleNamespace

from tvm.script import tirx as T

from .intgemm import check_shape

ARM_KERNELS = ("sdot", "smmla", "packed")


def _pad(x: int, m: int) -> int:
    return -(-x // m) * m


def _sdot(acc, a, b):
    return T.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.sdot.v4i32.v16i8", acc, a, b)


def _smmla(acc, a, b):
    return T.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.smmla.v4i32.v16i8", acc, a, b)


def _saddlp(v):
    return T.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.saddlp.v4i32.v8i16", v)


def _hsum(v, lanes: int):
    return T.call_llvm_pure_intrin("int32", f"llvm.vector.reduce.add.v{lanes}i32", v)


def _lo(w, lanes: int):   # low nibbles (even k) as int8 lanes
    return T.reinterpret(f"int8x{lanes}", T.bitwise_and(w, T.broadcast(T.uint8(15), lanes)))


def _hi(w, lanes: int):   # high nibbles (odd k)
    return T.reinterpret(f"int8x{lanes}", T.shift_right(w, T.broadcast(T.uint8(4), lanes)))


def unsupported(variant: str, K: int, group_size: int, act_bits: int | None = None) -> str | None:
    """Why ``variant`` cannot build (K, group_size[, act_bits]), or None when it can."""
    if variant not in ARM_KERNELS:
        return f"unknown ARM kernel variant {variant!r} (kernels: {', '.join(ARM_KERNELS)})"
    why = check_shape(K, group_size)
    if why:
        return why
    if variant in ("sdot", "smmla") and group_size % 32:
        return f"the {variant} kernel works on 32-column chunks: group size {group_size} is not a multiple of 32"
    if variant == "packed":
        if act_bits != 4:
            return (f"the packed kernel multiplies two 4-bit products in one 16-bit lane, exact only for 4-bit "
                    f"activations (|a| <= 7); got {act_bits}-bit activations (use sdot/smmla/neon for A8)")
        if group_size % 16 or group_size > 2048:
            return f"the packed kernel needs a group size that is a multiple of 16 and <= 2048, got {group_size}"
    return None


def _parts(variant: str, M: int, N: int, K: int):
    """Tile sizes, the activation re-layout and the per-chunk step of one variant."""
    if variant == "sdot":
        MB, RB, CK = min(M, 4), 4, 32
        Mp = _pad(M, MB)

        @T.macro
        def prepack(XQ, XP):   # per 32-column chunk: the 16 even columns, then the 16 odd ones
            for m, c, i in T.grid(Mp, K // 32, 16):
                XP[m * K + c * 32 + i] = T.if_then_else(m < M, XQ[T.min(m, M - 1), c * 32 + 2 * i], T.int8(0))
                XP[m * K + c * 32 + 16 + i] = T.if_then_else(m < M, XQ[T.min(m, M - 1), c * 32 + 2 * i + 1],
                                                             T.int8(0))

        @T.macro
        def step(XP, WP, A32, A16, nb, mb, k0):
            for r in T.unroll(RB):
                w = WP[T.min(nb * RB + r, N - 1), T.ramp(k0 // 2, 1, 16)]
                wl = _lo(w, 16)
                wh = _hi(w, 16)
                for mi in T.unroll(MB):
                    A32[T.ramp((mi * RB + r) * 4, 1, 4)] = _sdot(
                        _sdot(A32[T.ramp((mi * RB + r) * 4, 1, 4)], wl, XP[T.ramp((mb * MB + mi) * K + k0, 1, 16)]),
                        wh, XP[T.ramp((mb * MB + mi) * K + k0 + 16, 1, 16)])

        def total(A32, A16, mi, r):
            return _hsum(A32[T.ramp((mi * RB + r) * 4, 1, 4)], 4)

        return SimpleNamespace(MB=MB, RB=RB, CK=CK, Mp=Mp, xp=(Mp * K, "int8"), a32=MB * RB * 4, a16=1,
                               prepack=prepack, step=step, total=total)

    if variant == "smmla":
        MB, RB, CK = (2 if M <= 2 else 4), 8, 32
        Mp, KH16 = _pad(M, MB), K // 16

        @T.macro
        def prepack(XQ, XP):   # [token pair][16-column chunk][even|odd][token of the pair][8 columns]
            for mp, h, p, t, i in T.grid(Mp // 2, KH16, 2, 2, 8):
                XP[(((mp * KH16 + h) * 2 + p) * 2 + t) * 8 + i] = T.if_then_else(
                    mp * 2 + t < M, XQ[T.min(mp * 2 + t, M - 1), h * 16 + 2 * i + p], T.int8(0))

        @T.macro
        def step(XP, WP, A32, A16, nb, mb, k0):
            for rp in T.unroll(RB // 2):
                for hh in T.unroll(2):
                    w = T.vectorcombine("uint8x16", WP[T.min(nb * RB + 2 * rp, N - 1), T.ramp(k0 // 2 + hh * 8, 1, 8)],
                                        WP[T.min(nb * RB + 2 * rp + 1, N - 1), T.ramp(k0 // 2 + hh * 8, 1, 8)])
                    wl = _lo(w, 16)
                    wh = _hi(w, 16)
                    for tp in T.unroll(MB // 2):
                        A32[T.ramp((tp * (RB // 2) + rp) * 4, 1, 4)] = _smmla(
                            _smmla(A32[T.ramp((tp * (RB // 2) + rp) * 4, 1, 4)],
                                   XP[T.ramp((((mb * (MB // 2) + tp) * KH16 + k0 // 16 + hh) * 2) * 16, 1, 16)], wl),
                            XP[T.ramp((((mb * (MB // 2) + tp) * KH16 + k0 // 16 + hh) * 2 + 1) * 16, 1, 16)], wh)

        def total(A32, A16, mi, r):   # lanes: [t0 r0, t0 r1, t1 r0, t1 r1]
            return A32[((mi // 2) * (RB // 2) + r // 2) * 4 + (mi % 2) * 2 + r % 2]

        return SimpleNamespace(MB=MB, RB=RB, CK=CK, Mp=Mp, xp=(Mp * K, "int8"), a32=(MB // 2) * (RB // 2) * 4,
                               a16=1, prepack=prepack, step=step, total=total)

    if variant == "packed":
        MB, RB, CK = min(M, 4), 4, 16
        Mp, RP = _pad(M, MB), RB // 2

        @T.macro
        def prepack(XQ, XP):   # int16; per 16-column chunk: the 8 even columns, then the 8 odd ones
            for m, c, i in T.grid(Mp, K // 16, 8):
                XP[m * K + c * 16 + i] = T.if_then_else(
                    m < M, T.Cast("int16", XQ[T.min(m, M - 1), c * 16 + 2 * i]), T.int16(0))
                XP[m * K + c * 16 + 8 + i] = T.if_then_else(
                    m < M, T.Cast("int16", XQ[T.min(m, M - 1), c * 16 + 2 * i + 1]), T.int16(0))

        @T.macro
        def step(XP, WP, A32, A16, nb, mb, k0):
            for rp in T.unroll(RP):
                # one uint16 lane per byte column: row n's byte low, row n+1's byte high
                w = T.bitwise_or(T.Cast("uint16x8", WP[T.min(nb * RB + 2 * rp, N - 1), T.ramp(k0 // 2, 1, 8)]),
                                 T.shift_left(T.Cast("uint16x8", WP[T.min(nb * RB + 2 * rp + 1, N - 1),
                                                                    T.ramp(k0 // 2, 1, 8)]),
                                              T.broadcast(T.uint16(8), 8)))
                we = T.reinterpret("int16x8", T.bitwise_and(w, T.broadcast(T.uint16(0x0F0F), 8)))
                wo = T.reinterpret("int16x8", T.bitwise_and(T.shift_right(w, T.broadcast(T.uint16(4), 8)),
                                                            T.broadcast(T.uint16(0x0F0F), 8)))
                for mi in T.unroll(MB):
                    pe = XP[T.ramp((mb * MB + mi) * K + k0, 1, 8)] * we
                    po = XP[T.ramp((mb * MB + mi) * K + k0 + 8, 1, 8)] * wo
                    A32[T.ramp((mi * RP + rp) * 4, 1, 4)] = A32[T.ramp((mi * RP + rp) * 4, 1, 4)] + \
                        _saddlp(pe) + _saddlp(po)
                    A16[T.ramp((mi * RP + rp) * 8, 1, 8)] = A16[T.ramp((mi * RP + rp) * 8, 1, 8)] + \
                        T.shift_right(pe + T.broadcast(T.int16(128), 8), T.broadcast(T.int16(8), 8)) + \
                        T.shift_right(po + T.broadcast(T.int16(128), 8), T.broadcast(T.int16(8), 8))

        def total(A32, A16, mi, r):
            hi = _hsum(T.Cast("int32x8", A16[T.ramp((mi * RP + r // 2) * 8, 1, 8)]), 8)
            full = _hsum(A32[T.ramp((mi * RP + r // 2) * 4, 1, 4)], 4)
            return T.Select(r % 2 == 0, full - hi * 256, hi)

        return SimpleNamespace(MB=MB, RB=RB, CK=CK, Mp=Mp, xp=(Mp * K, "int16"), a32=MB * RP * 4, a16=MB * RP * 8,
                               prepack=prepack, step=step, total=total)
    raise ValueError(f"unknown ARM kernel variant {variant!r} (kernels: {', '.join(ARM_KERNELS)})")


def make_int_gemm_arm(M: int, N: int, K: int, group_size: int, out: str = "float", variant: str = "sdot",
                      act_bits: int | None = None):
    """The ``variant`` kernel ("sdot", "smmla" or "packed"; see the module docstring) with the buffers of
    ``make_int_gemm(M, N, K, group_size, out)``. ``act_bits``: the activations' bit-width, required to be 4
    by "packed" (ValueError otherwise)."""
    why = unsupported(variant, K, group_size, act_bits)
    if why:
        raise ValueError(why)
    if out not in ("float", "acc"):
        raise ValueError(f"out must be 'float' or 'acc', got {out!r}")
    G, GS, KH = K // group_size, group_size, K // 2
    v = _parts(variant, M, N, K)
    MB, RB, CK, Mp = v.MB, v.RB, v.CK, v.Mp
    NB, A32N, A16N = -(-N // RB), v.a32, v.a16
    XPN, XPT = v.xp
    prepack, step, total = v.prepack, v.step, v.total

    @T.macro
    def group(XP, WP, A32, A16, nb, mb, g):
        for i in T.vectorized(A32N):
            A32[i] = 0
        for i in T.vectorized(A16N):
            A16[i] = T.int16(0)
        for c in range(GS // CK):
            step(XP, WP, A32, A16, nb, mb, g * GS + c * CK)

    if out == "acc":
        @T.prim_func
        def int_gemm_acc(XQ: T.Buffer((M, K), "int8"), WP: T.Buffer((N, KH), "uint8"),
                         ACC: T.Buffer((M, N, G), "int32")):
            T.func_attr({"tirx.noalias": True})
            XP = T.alloc_buffer((XPN,), XPT)
            prepack(XQ, XP)
            for nb in T.parallel(NB):
                A32 = T.alloc_local((A32N,), "int32")
                A16 = T.alloc_local((A16N,), "int16")
                for mb, g in T.grid(Mp // MB, G):
                    group(XP, WP, A32, A16, nb, mb, g)
                    for mi in T.unroll(MB):
                        for r in T.unroll(RB):
                            if mb * MB + mi < M and nb * RB + r < N:
                                ACC[mb * MB + mi, nb * RB + r, g] = total(A32, A16, mi, r)

        return int_gemm_acc.without_attr("global_symbol").with_attr("tvm_anyprec.arm_kernel", variant)

    @T.prim_func
    def int_gemm(XQ: T.Buffer((M, K), "int8"), XS: T.Buffer((M,), "float32"), XSUM: T.Buffer((M, G), "int32"),
                 WP: T.Buffer((N, KH), "uint8"), WS: T.Buffer((N, G), "float32"), WZ: T.Buffer((N, G), "float32"),
                 Y: T.Buffer((M, N), "float32")):
        T.func_attr({"tirx.noalias": True})
        XP = T.alloc_buffer((XPN,), XPT)
        prepack(XQ, XP)
        for nb in T.parallel(NB):
            A32 = T.alloc_local((A32N,), "int32")
            A16 = T.alloc_local((A16N,), "int16")
            YA = T.alloc_local((MB * RB,), "float32")
            for mb in range(Mp // MB):
                for i in T.vectorized(MB * RB):
                    YA[i] = T.float32(0)
                for g in range(G):
                    group(XP, WP, A32, A16, nb, mb, g)
                    for mi in T.unroll(MB):
                        for r in T.unroll(RB):
                            YA[mi * RB + r] = YA[mi * RB + r] + XS[T.min(mb * MB + mi, M - 1)] * \
                                WS[T.min(nb * RB + r, N - 1), g] * (
                                    T.Cast("float32", total(A32, A16, mi, r))
                                    - WZ[T.min(nb * RB + r, N - 1), g]
                                    * T.Cast("float32", XSUM[T.min(mb * MB + mi, M - 1), g]))
                for mi in T.unroll(MB):
                    for r in T.unroll(RB):
                        if mb * MB + mi < M and nb * RB + r < N:
                            Y[mb * MB + mi, nb * RB + r] = YA[mi * RB + r]

    return int_gemm.without_attr("global_symbol").with_attr("tvm_anyprec.arm_kernel", variant)
