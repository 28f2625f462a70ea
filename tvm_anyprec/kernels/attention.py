"""Attention over a KV cache that is written in place and read only up to the current position (CPUs).

One call serves one layer for a chunk of S tokens at positions pos..pos+S-1 (pos is run-time data):

    KC[h, pos + s] = KN[h, s];  VC[h, pos + s] = VN[h, s]            (rows past the cache are dropped)
    O[q, s] = sum_t softmax_t(scale * Q[q, s] . KC[h, t]) VC[h, t],   h = q // (H / Hkv),
              t from max(0, pos + s - window + 1) (window > 0: sliding-window layers) to pos + s

Buffers: Q fp32 [H, S, D], KN / VN fp32 [Hkv, S, D] (the chunk's keys after rotary, and values), KC / VC fp32
[Hkv, T, D] (the caches: updated in place, ``relax.call_tir_inplace``), POS int64 [1], O fp32 [H, S, D].

The cost follows the position, not the cache size: a decode step at position p reads p + 1 rows per head. Rows
past the position are never read (padding and rejected drafts leave junk there; the next write replaces it).
Grouped-query attention reads each cache row once per query head of its group, with no repeated copy.

The softmax is computed online in blocks of ``BLOCK`` positions (scores of a block in a small stack buffer,
one rescale of the running sum and output per block; e^x by ``fastmath.exp_f32``, not libm's ``expf``; each
score's dot product summed as a tree, not as an ordered lane reduction: 821 -> 682 us for a 32-token chunk at
position 480, SmolLM2's shape, Zen 4, 2 threads). ``softcap`` > 0: scores go through softcap * tanh(score /
softcap) (Gemma 2). Tasks (query head, token) run in parallel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tvm.script import tirx as T

from .attention_rows import MIN_S, cache_attention_func, make_cache_attention_rows
from .fastmath import exp_f32
from .lowering import KEEP
from .lut_isa import lane_reduce
from .spec import KernelSpec, register

BLOCK = 32
NEG = -3.0e38


def _lanes(D: int) -> int:
    return 8 if D % 8 == 0 else 1


def _local(n: int, dtype: str = "float32"):
    return T.alloc_local((n,), dtype, annotations=KEEP)


def make_cache_attention(H: int, Hkv: int, S: int, Tn: int, D: int, scale: float, window: int = 0,
                         softcap: float = 0.0):
    """PrimFunc (no global_symbol) of one layer's cache write and attention; see the module docstring.
    Chunks of at least ``attention_rows.MIN_S`` tokens (prefill) get ``attention_rows``' kernel."""
    if S >= MIN_S:
        return make_cache_attention_rows(H, Hkv, S, Tn, D, scale, window, softcap)
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    G = H // Hkv
    L = _lanes(D)
    C = D // L

    def vec(buf, i, j, c):
        return buf[i, j, T.ramp(c * L, 1, L)] if L > 1 else buf[i, j, c]

    def bcast(x):
        return T.broadcast(x, L) if L > 1 else x

    def dot(Q, KC, q, s, h, t):
        parts = [vec(Q, q, s, c) * vec(KC, h, t, c) for c in range(C)]
        while len(parts) > 1:   # pairwise (a tree, not a chain of C dependent adds)
            parts = [parts[i] + parts[i + 1] if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
        acc = lane_reduce(parts[0], L)   # by halving (an ordered llvm.vector.reduce.fadd is L dependent adds)
        return acc if L == 1 else T.Shuffle([acc], [0])

    def capped(x):
        if softcap > 0:
            return T.float32(softcap) * T.tanh(x / T.float32(softcap))
        return x

    def task_body(Q, KC, VC, O, p0, task):
        q = task // S
        s = task % S
        h = q // G
        qp = p0 + s
        hi = T.min(qp, Tn - 1) + 1                                    # exclusive
        lo = T.max(qp - (window - 1), 0) if window > 0 else 0
        m, lsum, mb = _local(1), _local(1), _local(1)
        acc, sc = _local(D), _local(BLOCK)
        T.buffer_store(m, T.float32(NEG), [0])
        T.buffer_store(lsum, T.float32(0), [0])
        with T.serial(0, C) as c:
            T.buffer_store(acc, bcast(T.float32(0)), [T.ramp(c * L, 1, L)] if L > 1 else [c])
        with T.serial(0, T.truncdiv(hi - lo + (BLOCK - 1), BLOCK)) as bi:
            t0 = lo + bi * BLOCK
            n = T.min(BLOCK, hi - t0)
            T.buffer_store(mb, T.float32(NEG), [0])
            with T.serial(0, n) as j:
                val = capped(dot(Q, KC, q, s, h, t0 + j) * T.float32(scale))
                T.buffer_store(sc, val, [j])
                T.buffer_store(mb, T.max(mb[0], sc[j]), [0])
            mnew = T.max(m[0], mb[0])
            corr = exp_f32(m[0] - mnew)
            T.buffer_store(lsum, lsum[0] * corr, [0])
            with T.serial(0, C) as c:
                idx = [T.ramp(c * L, 1, L)] if L > 1 else [c]
                T.buffer_store(acc, acc[tuple(idx)] * bcast(corr), idx)
            with T.serial(0, n) as j:
                pj = exp_f32(sc[j] - mnew)
                T.buffer_store(lsum, lsum[0] + pj, [0])
                with T.serial(0, C) as c:
                    idx = [T.ramp(c * L, 1, L)] if L > 1 else [c]
                    T.buffer_store(acc, acc[tuple(idx)] + bcast(pj) * vec(VC, h, t0 + j, c), idx)
            T.buffer_store(m, mnew, [0])
        inv = T.float32(1) / lsum[0]
        with T.serial(0, C) as c:
            idx = [T.ramp(c * L, 1, L)] if L > 1 else [c]
            out = [q, s, T.ramp(c * L, 1, L)] if L > 1 else [q, s, c]
            T.buffer_store(O, acc[tuple(idx)] * bcast(inv), out)

    return cache_attention_func(H, Hkv, S, Tn, D, H * S, task_body)


def kernel_name(H, Hkv, S, Tn, D, window) -> str:
    return f"cache_attention_h{H}_kv{Hkv}_s{S}_t{Tn}_d{D}" + (f"_w{window}" if window else "")


@register
@dataclass(frozen=True)
class CacheAttention(KernelSpec):
    """One layer's in-place cache write and attention up to the current position (``make_cache_attention``)."""
    family: ClassVar[str] = "cache_attention"
    H: int
    Hkv: int
    S: int
    T: int
    D: int
    scale: float
    window: int = 0
    softcap: float = 0.0

    def name(self) -> str:
        scale = "" if abs(self.scale - self.D ** -0.5) < 1e-9 else f"_sc{self.scale:.6g}"
        return kernel_name(self.H, self.Hkv, self.S, self.T, self.D, self.window) + scale + \
            (f"_c{self.softcap:g}" if self.softcap else "")

    def make(self):
        return make_cache_attention(self.H, self.Hkv, self.S, self.T, self.D, self.scale, self.window,
                                    self.softcap)
