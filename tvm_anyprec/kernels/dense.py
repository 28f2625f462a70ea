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


MR, NR, KV = 4, 4, 16   # the CPU GEMM micro-tile: rows of X x rows of W, accumulators of KV lanes over k
TILED_MIN_M = 2 * MR    # from this M on the graph rewrite uses make_dense_nt_cpu on CPUs


def _lanes_sum(v, n: int):
    """The sum of the n lanes of v by halving (a shuffle and an add per step, not n - 1 scalar adds)."""
    while n > 1:
        n //= 2
        v = T.Shuffle([v], list(range(n))) + T.Shuffle([v], list(range(n, 2 * n)))
    return v


def make_dense_nt_cpu(M: int, N: int, K: int):
    """``make_dense_nt`` for CPUs at M > 1 (the graph rewrite uses it from TILED_MIN_M rows: prefill chunks) as
    explicit loops: tiles of NR rows of W in parallel; per tile, MR x NR accumulators of KV lanes over k (each
    loaded x and w vector feeds NR or MR FMAs) for every tile of MR rows of X, then one lane sum per output. The W tile (NR x K) stays in L1 across the
    rows of X. LLVM splits the KV lanes into the target's vectors (AVX-512: one, AVX2: two, NEON: four)."""
    from .lowering import STACK_LOCALS
    from .lut_layout import _local

    KF = K // KV
    NT, MT = -(-N // NR), -(-M // MR)

    def body(X, W, Y):
        with T.parallel(0, NT) as nt:
            ACC = _local((MR * NR * KV,), "float32")
            ns = [T.min(nt * NR + j, N - 1) for j in range(NR)]
            with T.serial(0, MT) as mt:
                ms = [T.min(mt * MR + i, M - 1) for i in range(MR)]
                for z in range(MR * NR):
                    T.buffer_store(ACC, T.broadcast(T.float32(0), KV), [T.ramp(z * KV, 1, KV)])
                with T.serial(0, KF) as kf:
                    ws = [W[n, T.ramp(kf * KV, 1, KV)] for n in ns]
                    for i, m in enumerate(ms):
                        x = X[m, T.ramp(kf * KV, 1, KV)]
                        for j in range(NR):
                            a = ACC[T.ramp((i * NR + j) * KV, 1, KV)]
                            T.buffer_store(ACC, a + x * ws[j], [T.ramp((i * NR + j) * KV, 1, KV)])
                for i, m in enumerate(ms):
                    for j, n in enumerate(ns):
                        total = _lanes_sum(ACC[T.ramp((i * NR + j) * KV, 1, KV)], KV)
                        for k in range(KF * KV, K):   # the last K % KV columns
                            total = total + X[m, k] * W[n, k]
                        with T.If(T.And(mt * MR + i < M, nt * NR + j < N)):
                            with T.Then():
                                T.buffer_store(Y, total, [m, n])

    @T.prim_func
    def dense_nt_cpu(X: T.Buffer((M, K), "float32"), W: T.Buffer((N, K), "float32"),
                     Y: T.Buffer((M, N), "float32")):
        T.func_attr({"tirx.noalias": True})
        body(X, W, Y)

    return dense_nt_cpu.without_attr("global_symbol").with_attr("tirx.is_scheduled", True) \
        .with_attr(STACK_LOCALS, True)


def kernel_name_cpu(M: int, N: int, K: int) -> str:
    return f"dense_nt_cpu_m{M}_n{N}_k{K}"


@register
@dataclass(frozen=True)
class DenseNTCPU(KernelSpec):
    """fp32 Y = X W^T on CPUs at M > 1: explicit register-tiled loops (``make_dense_nt_cpu``)."""
    family: ClassVar[str] = "dense_nt_cpu"
    M: int
    N: int
    K: int

    def name(self) -> str:
        return kernel_name_cpu(self.M, self.N, self.K)

    def make(self):
        return make_dense_nt_cpu(self.M, self.N, self.K)
