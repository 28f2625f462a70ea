"""Integer kernels for low-bit activations (W4A8 / W4A4) in TVMScript (schedulable s_tir).

``act_quant`` (fused per-token activation quantization, one pass over X):

    XF[m, k]   = X[m, k] * INV[k]                      (outlier smoothing: INV = 1/f, ones without it)
    XS[m]      = max_k |XF[m, k]| / qmax               (1 when the token is all zeros)
    XQ[m, k]   = clip(nearbyint(XF[m, k] / XS[m]), -qmax, qmax)     int8 (INT4 values also live in int8)
    XSUM[m, g] = sum_{k in group g} XQ[m, k]           int32, for the weights' zero points

``int_gemm`` (INT4 weights packed two per byte, int32 accumulation, dequantize after):

    ACC[m, n, g] = sum_{k in group g} int32(XQ[m, k]) * int32(code(n, k))       exact int32
    Y[m, n]      = XS[m] * sum_g WS[n, g] * (ACC[m, n, g] - WZ[n, g] * XSUM[m, g])

* WP uint8 [N, K/2]: code(n, k) = (WP[n, k // 2] >> 4 * (k % 2)) & 15 (low nibble = even column).
* WS, WZ float32 [N, G]: w = WS * (code - WZ) per row-group of ``group_size`` columns (G = K / group_size).
* K must be a multiple of ``group_size`` and even.

On x86 without VNNI (AVX2 + FMA) the hand schedule vectorizes the 32-lane int8 x int4 products as int32
multiplies of sign/zero-extended bytes; LLVM turns those into ``vpmaddwd`` (16-bit lane multiply-add) since
both operands fit in 16 bits. ``make_int_gemm(..., out="acc")`` returns ACC itself (what the tests compare
bit-for-bit with numpy).
"""
from __future__ import annotations

from tvm.script import tirx as T


def _qmax(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"activation bit-width {bits} unsupported: use 4 or 8")
    return (1 << (bits - 1)) - 1


def check_shape(K: int, group_size: int) -> str | None:
    """Why (K, group_size) cannot use the integer kernels, or None when it can."""
    if group_size <= 0 or group_size % 2 or K % group_size:
        return f"K={K} is not a multiple of the weight group size {group_size} (even)"
    return None


def make_act_quant(M: int, K: int, bits: int, group_size: int):
    """PrimFunc (X f32 [M, K], INV f32 [K], XQ i8 [M, K], XS f32 [M], XSUM i32 [M, G])."""
    qm = _qmax(bits)
    why = check_shape(K, group_size)
    if why:
        raise ValueError(why)
    G, GS = K // group_size, group_size

    @T.prim_func(s_tir=True)
    def act_quant(X: T.Buffer((M, K), "float32"), INV: T.Buffer((K,), "float32"),
                  XQ: T.Buffer((M, K), "int8"), XS: T.Buffer((M,), "float32"), XSUM: T.Buffer((M, G), "int32")):
        T.func_attr({"tirx.noalias": True})
        AMAX = T.sblock_alloc_buffer((M,), "float32")
        for m, k in T.grid(M, K):
            with T.sblock("absmax"):
                vm, vk = T.axis.remap("SR", [m, k])
                with T.init():
                    AMAX[vm] = T.float32(0)
                AMAX[vm] = T.max(AMAX[vm], T.fabs(X[vm, vk] * INV[vk]))
        for m in range(M):
            with T.sblock("scale"):
                vm = T.axis.remap("S", [m])
                XS[vm] = T.if_then_else(AMAX[vm] > T.float32(0), AMAX[vm] / T.float32(qm), T.float32(1))
        for m, k in T.grid(M, K):
            with T.sblock("quant"):
                vm, vk = T.axis.remap("SS", [m, k])
                XQ[vm, vk] = T.Cast("int8", T.max(T.min(T.nearbyint(X[vm, vk] * INV[vk] / XS[vm]),
                                                        T.float32(qm)), T.float32(-qm)))
        for m, g, kk in T.grid(M, G, GS):
            with T.sblock("gsum"):
                vm, vg, vkk = T.axis.remap("SSR", [m, g, kk])
                with T.init():
                    XSUM[vm, vg] = 0
                XSUM[vm, vg] = XSUM[vm, vg] + T.Cast("int32", XQ[vm, vg * GS + vkk])

    return act_quant.without_attr("global_symbol")


def _code(WP, vn, vk):
    byte = WP[vn, vk // 2]
    return T.Cast("int32", T.bitwise_and(T.shift_right(byte, T.Cast("uint8", (vk % 2) * 4)), T.uint8(15)))


def make_int_gemm(M: int, N: int, K: int, group_size: int, out: str = "float"):
    """PrimFunc (XQ i8 [M, K], XS f32 [M], XSUM i32 [M, G], WP u8 [N, K/2], WS f32 [N, G], WZ f32 [N, G],
    Y f32 [M, N]); with ``out="acc"``: (XQ, WP, ACC i32 [M, N, G]) only."""
    why = check_shape(K, group_size)
    if why:
        raise ValueError(why)
    G, GS, KH = K // group_size, group_size, K // 2

    if out == "acc":
        @T.prim_func(s_tir=True)
        def int_gemm_acc(XQ: T.Buffer((M, K), "int8"), WP: T.Buffer((N, KH), "uint8"),
                         ACC: T.Buffer((M, N, G), "int32")):
            T.func_attr({"tirx.noalias": True})
            W8 = T.sblock_alloc_buffer((N, K), "uint8")
            for n, k in T.grid(N, K):
                with T.sblock("unpack"):
                    vn, vk = T.axis.remap("SS", [n, k])
                    W8[vn, vk] = T.Cast("uint8", _code(WP, vn, vk))
            for m, n, g, kk in T.grid(M, N, G, GS):
                with T.sblock("acc"):
                    vm, vn, vg, vkk = T.axis.remap("SSSR", [m, n, g, kk])
                    with T.init():
                        ACC[vm, vn, vg] = 0
                    ACC[vm, vn, vg] = ACC[vm, vn, vg] + T.Cast("int32", XQ[vm, vg * GS + vkk]) * \
                        T.Cast("int32", W8[vn, vg * GS + vkk])

        return int_gemm_acc.without_attr("global_symbol")
    if out != "float":
        raise ValueError(f"out must be 'float' or 'acc', got {out!r}")

    @T.prim_func(s_tir=True)
    def int_gemm(XQ: T.Buffer((M, K), "int8"), XS: T.Buffer((M,), "float32"), XSUM: T.Buffer((M, G), "int32"),
                 WP: T.Buffer((N, KH), "uint8"), WS: T.Buffer((N, G), "float32"), WZ: T.Buffer((N, G), "float32"),
                 Y: T.Buffer((M, N), "float32")):
        T.func_attr({"tirx.noalias": True})
        W8 = T.sblock_alloc_buffer((N, K), "uint8")
        ACC = T.sblock_alloc_buffer((M, N, G), "int32")
        for n, k in T.grid(N, K):
            with T.sblock("unpack"):
                vn, vk = T.axis.remap("SS", [n, k])
                W8[vn, vk] = T.Cast("uint8", _code(WP, vn, vk))
        for m, n, g, kk in T.grid(M, N, G, GS):
            with T.sblock("acc"):
                vm, vn, vg, vkk = T.axis.remap("SSSR", [m, n, g, kk])
                with T.init():
                    ACC[vm, vn, vg] = 0
                ACC[vm, vn, vg] = ACC[vm, vn, vg] + T.Cast("int32", XQ[vm, vg * GS + vkk]) * \
                    T.Cast("int32", W8[vn, vg * GS + vkk])
        for m, n, g in T.grid(M, N, G):
            with T.sblock("dequant"):
                vm, vn, vg = T.axis.remap("SSR", [m, n, g])
                with T.init():
                    Y[vm, vn] = T.float32(0)
                Y[vm, vn] = Y[vm, vn] + XS[vm] * WS[vn, vg] * (T.Cast("float32", ACC[vm, vn, vg])
                                                               - WZ[vn, vg] * T.Cast("float32", XSUM[vm, vg]))

    return int_gemm.without_attr("global_symbol")


def act_quant_name(M: int, K: int, bits: int, group_size: int) -> str:
    return f"act_quant_m{M}_k{K}_a{bits}_g{group_size}"


def int_gemm_name(M: int, N: int, K: int, group_size: int) -> str:
    return f"int_gemm_w4_m{M}_n{N}_k{K}_g{group_size}"
