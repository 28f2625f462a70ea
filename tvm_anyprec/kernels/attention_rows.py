"""Attention over the KV cache for a chunk of many tokens (prefill), as small matrix products (CPUs).

The same contract as ``attention.make_cache_attention`` (which dispatches here for S >= ``MIN_S``); the
arithmetic is organised like a GEMM instead of one dot product per (query, position):

- A task is one key/value head and ``VW`` consecutive tokens of the chunk; its rows are the G query heads of
  that group times those tokens, held as G vectors of ``VW`` lanes (one lane per token). The queries are copied
  once per task, transposed and pre-scaled, so each lane is a token.
- Scores of BJ cache positions for the G heads' ``VW`` tokens: for each d, one broadcast key value times the G
  query vectors, into G x BJ accumulators (no horizontal sums). The causal / window mask is a per-lane select.
- Online softmax per lane (running max and sum as vectors; e^x by ``fastmath.exp_f32`` on vectors), and the
  output accumulated transposed, [d][token], with one broadcast value per (position, d).

Each cache row is read by G * VW query rows per load instead of one: a 32-token chunk of SmolLM2-135M at position
480 (9 heads, 3 key/value heads, D = 64) takes 0.26-0.31 ms per layer against 0.54-0.60 ms for the per-(head,
token) kernel (Zen 4, 2 threads). Lanes past the chunk's last token repeat it and are not stored. Rows of the
cache are read only up to the task's last position (indices clamped; masked lanes get weight 0), so junk past the
chunk is never touched.
"""
from __future__ import annotations

from tvm.script import tirx as T

from .fastmath import exp_f32
from .lowering import KEEP, STACK_LOCALS

VW = 8      # tokens per vector (one ymm of fp32; AVX-512 machines run two of these per cycle as well)
ACC_VECTORS = 12   # score vectors held in registers per block: G heads x BJ positions (12 + G queries + a key
                   # fit AVX2's 16 registers; SmolLM2's G = 3: 4 positions, 4-7% faster than 8 (Zen 4))
MIN_S = 8   # chunks of at least this many tokens use this kernel
NEG = -3.0e38


def _local(n: int):
    return T.alloc_local((n,), "float32", annotations=KEEP)


def make_cache_attention_rows(H: int, Hkv: int, S: int, Tn: int, D: int, scale: float, window: int = 0,
                              softcap: float = 0.0, VW: int = VW, BJ: int | None = None):
    """PrimFunc (no global_symbol) of one layer's cache write and attention; see the module docstring."""
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    G = H // Hkv
    NSB = (S + VW - 1) // VW
    BJ = BJ or max(2, min(8, ACC_VECTORS // G))   # cache positions per block

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
        m, lsum, sc, mb, cr = _local(G * VW), _local(G * VW), _local(G * BJ * VW), _local(VW), _local(G * VW)

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
            rows = [t0 + j for j in range(BJ)]

            def at(g, j):   # score / weight vector (head g of the group, position t0 + j): constant indices only,
                return [lanes((g * BJ + j) * VW)]   # so LLVM keeps all G * BJ of them in registers

            for g, j in [(g, j) for g in range(G) for j in range(BJ)]:
                T.buffer_store(sc, vb(T.float32(0)), at(g, j))
            with T.serial(0, D) as d:   # each key value broadcast once for the G heads
                qv = [qt[lanes((g * D + d) * VW)] for g in range(G)]
                for j in range(BJ):
                    key = vb(KC[h, T.min(rows[j], hi - 1), d])
                    for g in range(G):
                        T.buffer_store(sc, sc[at(g, j)[0]] + key * qv[g], at(g, j))
            for g in range(G):
                T.buffer_store(mb, vb(T.float32(NEG)), [lanes(0)])
                for j in range(BJ):
                    x = T.Select(valid(j, t0), capped(sc[at(g, j)[0]]), vb(T.float32(NEG)))
                    T.buffer_store(mb, T.max(mb[lanes(0)], x), [lanes(0)])   # (x reads sc[j]: before the store)
                    T.buffer_store(sc, x, at(g, j))
                mnew = T.max(m[lanes(g * VW)], mb[lanes(0)])
                T.buffer_store(cr, exp_f32(m[lanes(g * VW)] - mnew), [lanes(g * VW)])
                T.buffer_store(m, mnew, [lanes(g * VW)])
                T.buffer_store(lsum, lsum[lanes(g * VW)] * cr[lanes(g * VW)], [lanes(g * VW)])
                for j in range(BJ):
                    pj = T.Select(valid(j, t0), exp_f32(sc[at(g, j)[0]] - m[lanes(g * VW)]), vb(T.float32(0)))
                    T.buffer_store(lsum, lsum[lanes(g * VW)] + pj, [lanes(g * VW)])
                    T.buffer_store(sc, pj, at(g, j))
            with T.serial(0, D) as d:   # each value broadcast once for the G heads
                vals = [vb(VC[h, T.min(rows[j], hi - 1), d]) for j in range(BJ)]
                for g in range(G):
                    a = acc[lanes((g * D + d) * VW)] * cr[lanes(g * VW)]
                    for j in range(BJ):
                        a = a + vals[j] * sc[at(g, j)[0]]
                    T.buffer_store(acc, a, [lanes((g * D + d) * VW)])
        with T.serial(0, G) as g:
            with T.serial(0, VW) as ln:
                with T.If(s0 + ln < S), T.Then():
                    inv = T.float32(1) / lsum[g * VW + ln]
                    with T.serial(0, D) as d:
                        T.buffer_store(O, acc[(g * D + d) * VW + ln] * inv, [h * G + g, s0 + ln, d])

    return cache_attention_func(H, Hkv, S, Tn, D, Hkv * NSB, task_body)


def cache_attention_func(H: int, Hkv: int, S: int, Tn: int, D: int, tasks: int, task_body):
    """The PrimFunc both attention kernels share: the chunk's keys and values written into the caches (rows past
    the cache dropped), then ``task_body(Q, KC, VC, O, p0, task)`` for ``tasks`` tasks in parallel."""
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
        for task in T.parallel(tasks):
            task_body(Q, KC, VC, O, p0, task)

    return cache_attention.without_attr("global_symbol").with_attr("tirx.is_scheduled", True) \
        .with_attr(STACK_LOCALS, True)
