"""Attention over the KV cache for a chunk of many tokens (prefill), as small matrix products (CPUs).

The same contract as ``attention.make_cache_attention`` (which dispatches here for S >= ``MIN_S``); the
arithmetic is organised like a GEMM instead of one dot product per (query, position):

- A task is one key/value head and ``VW`` consecutive tokens of the chunk; its rows are the G query heads of
  that group times those tokens, held as G vectors of ``VW`` lanes (one lane per token). The queries are copied
  once per task, transposed and pre-scaled, so each lane is a token.
- Scores of ``BJ`` cache positions for one head's ``VW`` tokens: for each d, one broadcast key value times the
  query vector, into BJ accumulators (no horizontal sums). The causal / window mask is a per-lane select.
- Online softmax per lane (running max and sum as vectors; e^x by ``fastmath.exp_f32`` on vectors), and the
  output accumulated transposed, [d][token], with one broadcast value per (position, d).

Each cache row is read by G * VW query rows per load instead of one: a 32-token chunk of SmolLM2-135M at position
480 (9 heads, 3 key/value heads, D = 64) takes ~0.2 ms per layer instead of ~0.7 (Zen 4, 2 threads). Lanes past
the chunk's last token repeat it and are not stored. Rows of the cache are read only up to the task's last
position (indices clamped; masked lanes get weight 0), so junk past the chunk is never touched.
"""
from __future__ import annotations

from tvm.script import tirx as T

from .fastmath import exp_f32
from .lowering import KEEP, STACK_LOCALS

VW = 8      # tokens per vector (one ymm of fp32; AVX-512 machines run two of these per cycle as well)
BJ = 8      # cache positions per block (BJ score vectors stay in registers)
MIN_S = 8   # chunks of at least this many tokens use this kernel
NEG = -3.0e38


def _local(n: int):
    return T.alloc_local((n,), "float32", annotations=KEEP)


def make_cache_attention_rows(H: int, Hkv: int, S: int, Tn: int, D: int, scale: float, window: int = 0,
                              softcap: float = 0.0, VW: int = VW, BJ: int = BJ):
    """PrimFunc (no global_symbol) of one layer's cache write and attention; see the module docstring."""
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    G = H // Hkv
    NSB = (S + VW - 1) // VW

    def vb(x):
        return T.broadcast(x, VW)

    def lanes(base):
        return T.ramp(base, 1, VW)

    def capped(x):
        if softcap > 0:
            return vb(T.float32(softcap)) * T.tanh(x / vb(T.float32(softcap)))
        return x

    def task_body(Q, KC, VC, O, p0, task):
        h = task // NSB
        s0 = (task % NSB) * VW
        s_last = T.min(s0 + VW - 1, S - 1)
        qpos = vb(p0) + T.min(lanes(s0), vb(S - 1))            # each lane's position (past S: the last token)
        top = T.min(qpos, vb(Tn - 1))                           # its last readable cache row
        low = T.max(qpos - vb(window - 1), vb(0)) if window > 0 else None
        hi = T.min(p0 + s_last, Tn - 1) + 1                     # exclusive, for the whole task
        lo = T.max(p0 + s0 - (window - 1), 0) if window > 0 else 0
        qt, acc = _local(G * D * VW), _local(G * D * VW)
        m, lsum, sc, mb, cr = _local(G * VW), _local(G * VW), _local(BJ * VW), _local(VW), _local(VW)

        def valid(j, t0):
            tv = vb(t0 + j)
            ok = tv <= top
            return T.And(ok, tv >= low) if window > 0 else ok

        with T.serial(0, G) as g:
            with T.serial(0, D) as d:
                for ln in range(VW):
                    T.buffer_store(qt, Q[h * G + g, T.min(s0 + ln, S - 1), d] * T.float32(scale),
                                   [(g * D + d) * VW + ln])
                T.buffer_store(acc, vb(T.float32(0)), [lanes((g * D + d) * VW)])
            T.buffer_store(m, vb(T.float32(NEG)), [lanes(g * VW)])
            T.buffer_store(lsum, vb(T.float32(0)), [lanes(g * VW)])
        with T.serial(0, T.truncdiv(hi - lo + (BJ - 1), BJ)) as bi:
            t0 = lo + bi * BJ
            with T.serial(0, G) as g:
                for j in range(BJ):
                    T.buffer_store(sc, vb(T.float32(0)), [lanes(j * VW)])
                with T.serial(0, D) as d:
                    qv = qt[lanes((g * D + d) * VW)]
                    for j in range(BJ):
                        key = KC[h, T.min(t0 + j, hi - 1), d]
                        T.buffer_store(sc, sc[lanes(j * VW)] + vb(key) * qv, [lanes(j * VW)])
                T.buffer_store(mb, vb(T.float32(NEG)), [lanes(0)])
                for j in range(BJ):
                    x = T.Select(valid(j, t0), capped(sc[lanes(j * VW)]), vb(T.float32(NEG)))
                    T.buffer_store(mb, T.max(mb[lanes(0)], x), [lanes(0)])   # (x reads sc[j]: before the store)
                    T.buffer_store(sc, x, [lanes(j * VW)])
                mnew = T.max(m[lanes(g * VW)], mb[lanes(0)])
                T.buffer_store(cr, exp_f32(m[lanes(g * VW)] - mnew), [lanes(0)])
                T.buffer_store(m, mnew, [lanes(g * VW)])
                T.buffer_store(lsum, lsum[lanes(g * VW)] * cr[lanes(0)], [lanes(g * VW)])
                for j in range(BJ):
                    pj = T.Select(valid(j, t0), exp_f32(sc[lanes(j * VW)] - m[lanes(g * VW)]),
                                  vb(T.float32(0)))
                    T.buffer_store(lsum, lsum[lanes(g * VW)] + pj, [lanes(g * VW)])
                    T.buffer_store(sc, pj, [lanes(j * VW)])
                with T.serial(0, D) as d:
                    a = acc[lanes((g * D + d) * VW)] * cr[lanes(0)]
                    for j in range(BJ):
                        a = a + vb(VC[h, T.min(t0 + j, hi - 1), d]) * sc[lanes(j * VW)]
                    T.buffer_store(acc, a, [lanes((g * D + d) * VW)])
        with T.serial(0, G) as g:
            with T.serial(0, VW) as ln:
                with T.If(s0 + ln < S), T.Then():
                    inv = T.float32(1) / lsum[g * VW + ln]
                    with T.serial(0, D) as d:
                        T.buffer_store(O, acc[(g * D + d) * VW + ln] * inv, [h * G + g, s0 + ln, d])

    @T.prim_func
    def cache_attention(Q: T.Buffer((H, S, D), "float32"), KN: T.Buffer((Hkv, S, D), "float32"),
                        VN: T.Buffer((Hkv, S, D), "float32"), KC: T.Buffer((Hkv, Tn, D), "float32"),
                        VC: T.Buffer((Hkv, Tn, D), "float32"), POS: T.Buffer((1,), "int64"),
                        O: T.Buffer((H, S, D), "float32")):
        T.func_attr({"tirx.noalias": False})
        p0 = T.Cast("int32", POS[0])
        for h, s in T.grid(Hkv, S):
            if p0 + s < Tn:
                for d in T.serial(D):
                    KC[h, p0 + s, d] = KN[h, s, d]
                    VC[h, p0 + s, d] = VN[h, s, d]
        for task in T.parallel(Hkv * NSB):
            task_body(Q, KC, VC, O, p0, task)

    return cache_attention.without_attr("global_symbol").with_attr("tirx.is_scheduled", True) \
        .with_attr(STACK_LOCALS, True)
