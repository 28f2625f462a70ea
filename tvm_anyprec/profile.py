"""Where a compiled function's time goes: every call the Relax VM makes, timed through its instrument hook.

``profile(session, fname, inputs, bits)`` runs the function ``repeat`` times with a hook that stamps the time
before and after each call instruction (kernels, VM builtins such as allocation and reshape) and returns a
``Profile``: per callee its calls and time (median over the repeats), grouped into operator kinds. The hook
costs a Python call per instruction, so the sum of the parts is above the function's own time, which is
measured without the hook in the same run and reported beside it.
"""
from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass, field

# operator kind of a callee, from its symbol: our kernels by their spec's name prefix, TVM's fused ops by the
# Relax ops they fuse (FuseOps names them fused_<op>_<op>...), VM builtins by name
_KINDS = (
    ("bitplane linear", r"^anyprec_cpu|^anyprec_linear"),
    ("embedding (bitplane rows)", r"^anyprec_embed"),
    ("fp32 linear", r"^dense_nt|matmul"),
    ("attention + cache write", r"^cache_attention|attention"),
    ("allocation (VM)", r"^vm\.builtin\.(alloc|null)"),
    ("VM builtins (reshape views, tuples)", r"^vm\.builtin"),
    ("norm (mean, sqrt)", r"rms_norm|rsqrt|mean.*sqrt|sqrt.*mean|power.*mean"),
    ("rotary (sin, cos)", r"rotary|_sin|_cos"),
    ("softmax", r"softmax"),
    ("gather (fp32 embedding)", r"take|gather"),
    ("layout (transpose, concat, slices)", r"transpose|concat|split|squeeze|strided_slice|reshape"),
    ("elementwise", r"add|multiply|subtract|divide|silu|sigmoid|tanh|gelu|cast|where|clip|exp|negative|power"),
)


def kind_of(symbol: str) -> str:
    for kind, pat in _KINDS:
        if re.search(pat, symbol):
            return kind
    return "other"


@dataclass
class Profile:
    function: str
    bits: int
    repeat: int
    total_ms: float                     # the function without the hook (median)
    hooked_ms: float                    # with the hook (median)
    calls: dict = field(default_factory=dict)     # symbol -> calls per run
    ms: dict = field(default_factory=dict)        # symbol -> ms per run (median over the repeats)

    def by_kind(self) -> dict:
        out: dict = {}
        for sym, t in self.ms.items():
            k = kind_of(sym)
            c, ms = out.get(k, (0, 0.0))
            out[k] = (c + self.calls[sym], ms + t)
        return dict(sorted(out.items(), key=lambda kv: -kv[1][1]))

    def to_dict(self) -> dict:
        return {"function": self.function, "bits": self.bits, "repeat": self.repeat, "total_ms": self.total_ms,
                "hooked_ms": self.hooked_ms,
                "kinds": {k: {"calls": c, "ms": ms} for k, (c, ms) in self.by_kind().items()},
                "callees": {s: {"calls": self.calls[s], "ms": self.ms[s]} for s in self.ms}}

    def format(self, top: int = 12) -> str:
        parts = sum(self.ms.values())
        lines = [f"profile: {self.function} at {self.bits} bits, median of {self.repeat} runs: "
                 f"{self.total_ms:.2f} ms per call ({self.hooked_ms:.2f} ms with the timing hook; the parts "
                 f"below sum to {parts:.2f} ms)",
                 f"  {'operator kind':<40}{'calls':>7}{'ms':>9}{'share':>8}"]
        for k, (c, ms) in self.by_kind().items():
            lines.append(f"  {k:<40}{c:>7}{ms:>9.3f}{ms / max(parts, 1e-9):>8.1%}")
        lines.append(f"  {'slowest callees':<40}{'calls':>7}{'ms':>9}")
        for sym, ms in sorted(self.ms.items(), key=lambda kv: -kv[1])[:top]:
            name = sym if len(sym) <= 38 else sym[:35] + "..."
            lines.append(f"    {name:<38}{self.calls[sym]:>7}{ms:>9.3f}")
        return "\n".join(lines)


def _symbol(func, sym) -> str:
    s = str(sym) if sym is not None else ""
    return s or str(getattr(func, "name", "")) or "?"


def profile(session, fname: str, inputs: list, bits: int, repeat: int = 5, warmup: int = 2) -> Profile:
    """Time each call instruction of ``fname`` (inputs as for ``Session.call``; a local session)."""
    import tvm

    if session.remote is not None:
        raise ValueError("--profile times calls on this machine: run it on the device itself")
    args = [a if isinstance(a, tvm.runtime.Tensor) else tvm.runtime.tensor(a, session.dev) for a in inputs]

    def once():
        out = session.call(fname, args, bits)
        session.dev.sync()
        return out

    for _ in range(warmup):
        once()
    plain = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        once()
        plain.append(time.perf_counter() - t0)

    runs: list[dict] = []
    counts: dict = {}
    cur: dict = {}
    stack: list = []

    def hook(func, sym, before, ret, *rest):
        now = time.perf_counter()
        if before:
            stack.append(now)
        else:
            name = _symbol(func, sym)
            cur[name] = cur.get(name, 0.0) + now - stack.pop()
            if not runs:
                counts[name] = counts.get(name, 0) + 1
        return 0   # VMInstrumentReturnKind.kNoOp

    hooked = []
    session.vm.set_instrument(tvm.runtime.convert(hook))
    try:
        for _ in range(repeat):
            cur.clear()
            t0 = time.perf_counter()
            once()
            hooked.append(time.perf_counter() - t0)
            runs.append(dict(cur))
    finally:
        session.vm.set_instrument(None)
    ms = {s: 1e3 * statistics.median(r.get(s, 0.0) for r in runs) for s in counts}
    return Profile(fname, bits, repeat, 1e3 * statistics.median(plain), 1e3 * statistics.median(hooked),
                   counts, ms)


def profile_model(session, bits: int, prompt_ids, repeat: int = 5) -> list[Profile]:
    """A language model's decode step (after ``prompt_ids``) and one prefill chunk, each profiled."""
    import numpy as np

    ids = np.asarray(prompt_ids, np.int64)
    _, cache = session.forward_tokens(ids, bits, logits="last")
    pos = len(ids)
    out = [profile(session, "decode", [np.array([[int(ids[-1])]], np.int64), np.array([pos], np.int64), *cache],
                   bits, repeat)]
    fn = session._chunk_fn()
    if fn != "decode":
        S = session.spec(fn)["chunk"]
        chunk = np.resize(ids, S)[None]
        extra = [np.array([S], np.int64)] if any(i[0] == "n_valid" for i in session.functions[fn]["inputs"]) else []
        cache = session.empty_cache(fn)
        out.append(profile(session, fn, [chunk, np.array([0], np.int64), *extra, *cache], bits, repeat))
    return out
