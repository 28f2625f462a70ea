"""fp32 linear with the weight in torch layout: Y[m, n] = sum_k X[m, k] * W[n, k].

Used for weights that stay in full precision (e.g. a tied lm_head): it reads W [N, K] directly instead of
materializing permute_dims(W) on every call, which is what the default lowering of matmul(x, W^T) does.
"""
from __future__ import annotations

from tvm.script import tirx as T

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
