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

``words=True`` (GPU targets): the same arithmetic on 32-bit words, because WGSL has no 8-bit types (and a word
is what a GPU thread loads anyway): XQ is uint32 [M, K/4] (four int8 codes per word, code k in byte k % 4,
little-endian as in memory) and WP uint32 [N, K/8] (eight INT4 codes per word, code k in nibble k % 8: the
same bytes as the uint8 [N, K/2] form). Unpacked values live in int32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tvm.script import tirx as T

from .spec import KernelSpec, register


def _qmax(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"activation bit-width {bits} unsupported: use 4 or 8")
    return (1 << (bits - 1)) - 1


def check_shape(K: int, group_size: int) -> str | None:
    """Why (K, group_size) cannot use the integer kernels, or None when it can."""
    if group_size <= 0 or group_size % 2 or K % group_size:
        return f"K={K} is not a multiple of the weight group size {group_size} (even)"
    return None


def check_words(K: int) -> str | None:
    """Why K cannot use the word form (GPU) of the integer kernels, or None when it can."""
    return None if K % 8 == 0 else f"K={K} is not a multiple of 8 (eight INT4 codes per 32-bit word)"


def make_act_quant(M: int, K: int, bits: int, group_size: int, words: bool = False):
    """PrimFunc (X f32 [M, K], INV f32 [K], XQ i8 [M, K], XS f32 [M], XSUM i32 [M, G]); ``words``: XQ is
    uint32 [M, K/4] (module docstring)."""
    qm = _qmax(bits)
    why = check_shape(K, group_size) or (check_words(K) if words else None)
    if why:
        raise ValueError(why)
    G, GS = K // group_size, group_size
    xq_shape, xq_dtype = ((M, K // 4), "uint32") if words else ((M, K), "int8")
    # the max's identity: GPU cross-thread reductions need the reducer's own (|x| >= 0, so 0 is the same max)
    amax0 = T.min_value("float32") if words else T.float32(0)

    @T.prim_func(s_tir=True)
    def act_quant(X: T.Buffer((M, K), "float32"), INV: T.Buffer((K,), "float32"),
                  XQ: T.Buffer(xq_shape, xq_dtype), XS: T.Buffer((M,), "float32"), XSUM: T.Buffer((M, G), "int32")):
        T.func_attr({"tirx.noalias": True})
        AMAX = T.sblock_alloc_buffer((M,), "float32")
        for m, k in T.grid(M, K):
            with T.sblock("absmax"):
                vm, vk = T.axis.remap("SR", [m, k])
                with T.init():
                    AMAX[vm] = amax0
                AMAX[vm] = T.max(AMAX[vm], T.fabs(X[vm, vk] * INV[vk]))
        for m in range(M):
            with T.sblock("scale"):
                vm = T.axis.remap("S", [m])
                XS[vm] = T.if_then_else(AMAX[vm] > T.float32(0), AMAX[vm] / T.float32(qm), T.float32(1))
        if words:
            Q = T.sblock_alloc_buffer((M, K), "int32")
            for m, k in T.grid(M, K):
                with T.sblock("quant"):
                    vm, vk = T.axis.remap("SS", [m, k])
                    Q[vm, vk] = T.Cast("int32", T.max(T.min(T.nearbyint(X[vm, vk] * INV[vk] / XS[vm]),
                                                            T.float32(qm)), T.float32(-qm)))
            for m, w, j in T.grid(M, K // 4, 4):      # byte j of word w: the low 8 bits of code 4w + j
                with T.sblock("pack"):
                    vm, vw, vj = T.axis.remap("SSR", [m, w, j])
                    with T.init():
                        XQ[vm, vw] = T.uint32(0)
                    XQ[vm, vw] = XQ[vm, vw] + T.shift_left(
                        T.bitwise_and(T.reinterpret("uint32", Q[vm, vw * 4 + vj]), T.uint32(255)),
                        T.Cast("uint32", vj * 8))
            for m, g, kk in T.grid(M, G, GS):
                with T.sblock("gsum"):
                    vm, vg, vkk = T.axis.remap("SSR", [m, g, kk])
                    with T.init():
                        XSUM[vm, vg] = 0
                    XSUM[vm, vg] = XSUM[vm, vg] + Q[vm, vg * GS + vkk]
        else:
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


def _code(WP, vn, vk, words=False):
    if words:     # nibble k % 8 of word k // 8
        return T.Cast("int32", T.bitwise_and(T.shift_right(WP[vn, vk // 8], T.Cast("uint32", (vk % 8) * 4)),
                                             T.uint32(15)))
    byte = WP[vn, vk // 2]
    return T.Cast("int32", T.bitwise_and(T.shift_right(byte, T.Cast("uint8", (vk % 2) * 4)), T.uint8(15)))


def _xval(XQ, vm, vk, words=False):
    """Activation code k of token m as int32 (``words``: byte k % 4 of word k // 4, sign-extended by shifting
    it to the top byte and back)."""
    if words:
        return T.shift_right(T.reinterpret("int32", T.shift_left(XQ[vm, vk // 4], T.Cast("uint32", 24 - (vk % 4) * 8))),
                             24)
    return T.Cast("int32", XQ[vm, vk])


def make_int_gemm(M: int, N: int, K: int, group_size: int, out: str = "float", words: bool = False):
    """PrimFunc (XQ i8 [M, K], XS f32 [M], XSUM i32 [M, G], WP u8 [N, K/2], WS f32 [N, G], WZ f32 [N, G],
    Y f32 [M, N]); with ``out="acc"``: (XQ, WP, ACC i32 [M, N, G]) only. ``words``: XQ uint32 [M, K/4] and
    WP uint32 [N, K/8] (module docstring)."""
    why = check_shape(K, group_size) or (check_words(K) if words else None)
    if why:
        raise ValueError(why)
    G, GS = K // group_size, group_size
    xq_shape, xq_dtype = ((M, K // 4), "uint32") if words else ((M, K), "int8")
    wp_shape, wp_dtype = ((N, K // 8), "uint32") if words else ((N, K // 2), "uint8")
    wdt = "int32" if words else "uint8"      # unpacked weight codes (WGSL has no 8-bit type)

    if out == "acc":
        @T.prim_func(s_tir=True)
        def int_gemm_acc(XQ: T.Buffer(xq_shape, xq_dtype), WP: T.Buffer(wp_shape, wp_dtype),
                         ACC: T.Buffer((M, N, G), "int32")):
            T.func_attr({"tirx.noalias": True})
            W8 = T.sblock_alloc_buffer((N, K), wdt)
            for n, k in T.grid(N, K):
                with T.sblock("unpack"):
                    vn, vk = T.axis.remap("SS", [n, k])
                    W8[vn, vk] = T.Cast(wdt, _code(WP, vn, vk, words))
            for m, n, g, kk in T.grid(M, N, G, GS):
                with T.sblock("acc"):
                    vm, vn, vg, vkk = T.axis.remap("SSSR", [m, n, g, kk])
                    with T.init():
                        ACC[vm, vn, vg] = 0
                    ACC[vm, vn, vg] = ACC[vm, vn, vg] + _xval(XQ, vm, vg * GS + vkk, words) * \
                        T.Cast("int32", W8[vn, vg * GS + vkk])

        return int_gemm_acc.without_attr("global_symbol")
    if out != "float":
        raise ValueError(f"out must be 'float' or 'acc', got {out!r}")

    @T.prim_func(s_tir=True)
    def int_gemm(XQ: T.Buffer(xq_shape, xq_dtype), XS: T.Buffer((M,), "float32"), XSUM: T.Buffer((M, G), "int32"),
                 WP: T.Buffer(wp_shape, wp_dtype), WS: T.Buffer((N, G), "float32"), WZ: T.Buffer((N, G), "float32"),
                 Y: T.Buffer((M, N), "float32")):
        T.func_attr({"tirx.noalias": True})
        W8 = T.sblock_alloc_buffer((N, K), wdt)
        ACC = T.sblock_alloc_buffer((M, N, G), "int32")
        for n, k in T.grid(N, K):
            with T.sblock("unpack"):
                vn, vk = T.axis.remap("SS", [n, k])
                W8[vn, vk] = T.Cast(wdt, _code(WP, vn, vk, words))
        for m, n, g, kk in T.grid(M, N, G, GS):
            with T.sblock("acc"):
                vm, vn, vg, vkk = T.axis.remap("SSSR", [m, n, g, kk])
                with T.init():
                    ACC[vm, vn, vg] = 0
                ACC[vm, vn, vg] = ACC[vm, vn, vg] + _xval(XQ, vm, vg * GS + vkk, words) * \
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


@register
@dataclass(frozen=True)
class ActQuant(KernelSpec):
    """Per-token activation quantization to ``bits`` (8 or 4) with group sums of ``group_size``."""
    family: ClassVar[str] = "act_quant"
    M: int
    K: int
    bits: int
    group_size: int
    words: bool = False

    def name(self) -> str:
        return act_quant_name(self.M, self.K, self.bits, self.group_size)

    def make(self):
        return make_act_quant(self.M, self.K, self.bits, self.group_size, words=self.words)


@register
@dataclass(frozen=True)
class IntGemm(KernelSpec):
    """INT4 weights x quantized activations, exact int32 per weight group; ``out``: "float" or "acc"."""
    family: ClassVar[str] = "int_gemm"
    M: int
    N: int
    K: int
    group_size: int
    out: str = "float"
    words: bool = False

    def name(self) -> str:
        return int_gemm_name(self.M, self.N, self.K, self.group_size)

    def make(self):
        return make_int_gemm(self.M, self.N, self.K, self.group_size, self.out, words=self.words)
