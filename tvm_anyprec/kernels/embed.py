"""The embedding lookup of a tied embedding / lm_head, decoded from the lm_head's bitplanes (CPU layout).

    Y[s, k] = LUT_b[n, code_b(n, k)],   n = IDS[s],   b = NBITS[0] clamped to min_bits..max_bits

The weight [N = vocabulary, K = hidden] is one any-precision layer: the lm_head's product reads every row
through the bitplane operator (``kernels.lut_cpu``) and this kernel decodes the rows of the tokens, so the
embedding costs no memory of its own and a b-bit call embeds with the same b-bit child the lm_head uses.

Buffers: IDS int64 [S] (negative ids count from the end, as ONNX Gather's; then clipped to 0..N-1); PLANES
uint8 [B, N, 8*ceil(K/64)] (byte-sliced, ``quant.byteslice``: bit (k % 64) // 8 of byte 8*(k // 64) + k % 8
of a row); NBITS int32 [1]; Y fp32 [S, K]; and the mode's tables: LUTS fp16 [N, W] (``exact``) or TABS int16
[N, W] + SCALES fp32 [N, B - min_bits + 1] (``int8``: the centroid is table value x the row's scale, the
values the int8 lm_head multiplies with).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tvm.script import tirx as T

from ..quant.byteslice import TABLE_DTYPE, row_bytes
from .spec import KernelSpec, register


def make_embed(S: int, N: int, K: int, B: int, MINB: int, width: int, mode: str):
    RB = row_bytes(K)

    def code(PL, n, k, nb):
        """The top-nb-bit code of weight (n, k); planes >= nb are not read."""
        c = T.int32(0)
        for p in range(B):
            bit = T.Cast("int32", T.bitwise_and(T.shift_right(PL[p, n, 8 * (k // 64) + k % 8],
                                                              T.Cast("uint8", (k % 64) // 8)), T.uint8(1)))
            c = T.if_then_else(p < nb, T.shift_left(c, 1) | bit, c)
        return c

    def row(IDS, s):
        i = IDS[s]
        i = T.if_then_else(i < 0, i + N, i)
        return T.Cast("int32", T.max(T.min(i, T.int64(N - 1)), T.int64(0)))

    def rows(IDS, PL, NBITS, Y, value):
        """Y[s, k] = value(n, code index into the row's tables, b - MINB) for every token s (TIR loops)."""
        nb = T.min(T.max(NBITS[0], MINB), B)
        off = T.shift_left(1, nb) - (1 << MINB)
        with T.serial(0, S) as s:
            n = row(IDS, s)
            with T.serial(0, K) as k:
                T.buffer_store(Y, value(n, off + code(PL, n, k, nb), nb - MINB), [s, k])

    if mode == "exact":
        @T.prim_func(s_tir=True)
        def embed(IDS: T.Buffer((S,), "int64"), PL: T.Buffer((B, N, RB), "uint8"),
                  LUTS: T.Buffer((N, width), "float16"), NBITS: T.Buffer((1,), "int32"),
                  Y: T.Buffer((S, K), "float32")):
            T.func_attr({"tirx.noalias": True})
            rows(IDS, PL, NBITS, Y, lambda n, c, _w: T.Cast("float32", LUTS[n, c]))
        return embed.without_attr("global_symbol")

    @T.prim_func(s_tir=True)
    def embed_int8(IDS: T.Buffer((S,), "int64"), PL: T.Buffer((B, N, RB), "uint8"),
                   TABS: T.Buffer((N, width), TABLE_DTYPE), SCALES: T.Buffer((N, B - MINB + 1), "float32"),
                   NBITS: T.Buffer((1,), "int32"), Y: T.Buffer((S, K), "float32")):
        T.func_attr({"tirx.noalias": True})
        rows(IDS, PL, NBITS, Y, lambda n, c, w: T.Cast("float32", TABS[n, c]) * SCALES[n, w])
    return embed_int8.without_attr("global_symbol")


@register
@dataclass(frozen=True)
class AnyPrecEmbed(KernelSpec):
    """Rows ``IDS`` of a byte-sliced any-precision weight [N, K], decoded at the call's bit-width."""
    family: ClassVar[str] = "anyprec_embed"
    S: int
    N: int
    K: int
    max_bits: int
    min_bits: int
    width: int
    mode: str = "exact"

    def name(self) -> str:
        return f"anyprec_embed_s{self.S}_n{self.N}_k{self.K}_b{self.min_bits}to{self.max_bits}_{self.mode}"

    def make(self):
        return make_embed(self.S, self.N, self.K, self.max_bits, self.min_bits, self.width, self.mode)
