"""The bitplane any-precision linear operator in TVMScript (schedulable s_tir).

    Y[m, n] = sum_k X[m, k] * LUTS[n, off(b) + code_b(n, k)]

* PLANES uint32 [B, N, KW] (KW = ceil(K/32)); plane 0 holds the MSB; bit k % 32 of word k // 32.
* LUTS float16 [N, 2^(B+1) - 2^MINB]: the LUT of bit-width b starts at off(b) = 2^b - 2^MINB and has 2^b
  entries (b = MINB..B), i.e. the parent's per-bit LUTs concatenated.
* NBITS int32 [1]: the bit-width, chosen at run time per call (clamped to MINB..B). Planes past the
  chosen bit-width are not loaded (``if_then_else`` is a branch), so a b-bit call reads b planes.
  A tensor, not a scalar: MetaSchedule's runner only feeds tensors.
* K need not be a multiple of 32: the reduction runs over KW*32 and X is read as 0 past K.

Two blocks: "decode" (W[n, k] = LUT value, fp32) and "matmul". The schedules in
``tvm_anyprec.schedules`` decode one tile of rows at a time and reuse it for every row of X.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tvm.script import tirx as T

from .spec import KernelSpec, register

from ..quant.bitplanes import WORD, num_words


def lut_offset(bits: int, min_bits: int) -> int:
    return (1 << bits) - (1 << min_bits)


def lut_width(max_bits: int, min_bits: int) -> int:
    return lut_offset(max_bits + 1, min_bits)


def _code(PLANES, vn, vk, nb, B):
    """The top-nb-bit code of weight (n, k) as an int32 PrimExpr; planes >= nb are not loaded."""
    full = None
    for b in range(B):
        word = T.if_then_else(b < nb, PLANES[b, vn, vk // WORD], T.uint32(0))
        bit = T.bitwise_and(T.shift_right(word, T.Cast("uint32", vk % WORD)), T.uint32(1))
        term = T.shift_left(T.Cast("int32", bit), B - 1 - b)
        full = term if full is None else T.bitwise_or(full, term)
    return T.shift_right(full, B - nb)


def _weight(PLANES, LUTS, NBITS, vn, vk, B, MINB):
    nb = T.min(T.max(NBITS[0], MINB), B)
    idx = T.shift_left(1, nb) - (1 << MINB) + _code(PLANES, vn, vk, nb, B)
    return T.Cast("float32", LUTS[vn, idx])


def make_anyprec_linear(M: int, N: int, K: int, max_bits: int = 8, min_bits: int = 3, lut_dtype: str = "float16"):
    """PrimFunc (X, PLANES, LUTS, NBITS, Y) for static M, N, K (no global_symbol). A bias stays a Relax add
    after the call (it fuses with the neighbouring elementwise ops)."""
    B, MINB = max_bits, min_bits
    KW = num_words(K)
    KP = KW * WORD
    L = lut_width(B, MINB)

    @T.prim_func(s_tir=True)
    def anyprec_linear(X: T.Buffer((M, K), "float32"), PLANES: T.Buffer((B, N, KW), "uint32"),
                       LUTS: T.Buffer((N, L), lut_dtype), NBITS: T.Buffer((1,), "int32"),
                       Y: T.Buffer((M, N), "float32")):
        T.func_attr({"tirx.noalias": True})
        W = T.sblock_alloc_buffer((N, KP), "float32")
        for n, k in T.grid(N, KP):
            with T.sblock("decode"):
                vn, vk = T.axis.remap("SS", [n, k])
                W[vn, vk] = _weight(PLANES, LUTS, NBITS, vn, vk, B, MINB)
        for m, n, k in T.grid(M, N, KP):
            with T.sblock("matmul"):
                vm, vn, vk = T.axis.remap("SSR", [m, n, k])
                with T.init():
                    Y[vm, vn] = T.float32(0)
                Y[vm, vn] = Y[vm, vn] + T.if_then_else(vk < K, X[vm, T.min(vk, K - 1)], T.float32(0)) * W[vn, vk]

    return anyprec_linear.without_attr("global_symbol")


def kernel_name(M: int, N: int, K: int, max_bits: int, min_bits: int) -> str:
    return f"anyprec_linear_m{M}_n{N}_k{K}_b{min_bits}to{max_bits}"


@register
@dataclass(frozen=True)
class AnyPrecLinear(KernelSpec):
    """The bitplane operator for static M, N, K serving bit-widths ``min_bits``..``max_bits``."""
    family: ClassVar[str] = "anyprec_linear"
    M: int
    N: int
    K: int
    max_bits: int = 8
    min_bits: int = 3

    def name(self) -> str:
        return kernel_name(self.M, self.N, self.K, self.max_bits, self.min_bits)

    def make(self):
        return make_anyprec_linear(self.M, self.N, self.K, self.max_bits, self.min_bits)
