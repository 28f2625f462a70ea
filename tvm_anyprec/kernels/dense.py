"""fp32 linear with the weight in torch layout: Y[m, n] = sum_k X[m, k] * W[n, k].

Used for weights that stay in full precision (e.g. a tied lm_head): it reads W [N, K] directly instead of
materializing permute_dims(W) on every call, which is what the default lowering of matmul(x, W^T) does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tvm.script import tirx as T

from .spec import KernelSpec, register

from ..quant.bitplanes import WORD, num_words


def make_dense_nt(M: int, N: int, K: int):
    KP = num_words(K) * WORD

    @T.prim_func(s_tir=True)
    def dense_nt(X: T.Buffer((M, K), "float32"), W: T.Buffer((N, K), "float32"), Y: T.Buffer((M, N), "float32")):
        T.func_attr({"tirx.noalias": True})
        for m, n, k in T.grid(M, N, KP):
            with T.sblock("matmul"):
                vm, vn, vk = T.axis.remap("SSR", [m, n, k])
                with T.init():
                    Y[vm, vn] = T.float32(0)
                Y[vm, vn] = Y[vm, vn] + T.if_then_else(vk < K, X[vm, T.min(vk, K - 1)] * W[vn, T.min(vk, K - 1)],
                                                       T.float32(0))

    return dense_nt.without_attr("global_symbol")


def kernel_name(M: int, N: int, K: int) -> str:
    return f"dense_nt_m{M}_n{N}_k{K}"


def make_dense_nt_staged(M: int, N: int, K: int):
    """make_dense_nt with the zero padding of K moved into a "decode" block that copies W into
    a [N, KP] buffer (the same two-block form as the bitplane kernel). Staging a W tile in shared memory needs
    it: a cache_read of W[n, min(k, K-1)] has a non-constant region, so the buffer would not shrink to a tile."""
    KP = num_words(K) * WORD

    @T.prim_func(s_tir=True)
    def dense_nt(X: T.Buffer((M, K), "float32"), W: T.Buffer((N, K), "float32"), Y: T.Buffer((M, N), "float32")):
        T.func_attr({"tirx.noalias": True})
        WP = T.sblock_alloc_buffer((N, KP), "float32")
        for n, k in T.grid(N, KP):
            with T.sblock("decode"):
                vn, vk = T.axis.remap("SS", [n, k])
                WP[vn, vk] = T.if_then_else(vk < K, W[vn, T.min(vk, K - 1)], T.float32(0))
        for m, n, k in T.grid(M, N, KP):
            with T.sblock("matmul"):
                vm, vn, vk = T.axis.remap("SSR", [m, n, k])
                with T.init():
                    Y[vm, vn] = T.float32(0)
                Y[vm, vn] = Y[vm, vn] + T.if_then_else(vk < K, X[vm, T.min(vk, K - 1)], T.float32(0)) * WP[vn, vk]

    return dense_nt.without_attr("global_symbol")


@register
@dataclass(frozen=True)
class DenseNT(KernelSpec):
    """fp32 Y = X W^T with W in torch layout (layers kept in full precision)."""
    family: ClassVar[str] = "dense_nt"
    M: int
    N: int
    K: int

    def name(self) -> str:
        return kernel_name(self.M, self.N, self.K)

    def make(self):
        return make_dense_nt(self.M, self.N, self.K)
