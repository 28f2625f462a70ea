"""Run-time precision policy: pick the bit-width per request or per decode step from a budget.

The any-precision artifact serves every bit-width from the same weight buffers, so the choice is free at run
time. The policy holds a measured latency per bit-width and a load factor (observed / measured, smoothed over
the steps run so far; 1 at start), and picks the highest bit-width that fits the budget:

  * ``max_ms_per_token``: measured latency x load factor must not exceed the budget;
  * ``max_bytes_per_token``: the weight bytes one decode step reads at that bit-width (b bitplanes + the
    b-bit LUTs of every rewritten layer, plus the fp32 tensors kept) must not exceed the budget: the
    figure that decides speed on a memory-bound device and energy on a phone.

When no bit-width fits, the lowest one is used and ``met`` is False (the caller is told, nothing fails).
Per-step adaptation re-chooses after every step: a slowdown (a busy core, a thermal limit) raises the load
factor and moves the choice down; a recovery, seen at the lower bit-width, lowers it and moves it back up.
No TVM import: the policy is plain Python and is tested with synthetic latencies.
"""
from __future__ import annotations

from .errors import BudgetError  # noqa: F401  (re-exported)

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Choice:
    bits: int
    met: bool           # False: no bit-width fits the budget; the lowest was taken
    estimate_ms: float | None


@dataclass
class PrecisionPolicy:
    bit_widths: list[int]
    latency_ms: dict[int, float] = field(default_factory=dict)      # measured (unloaded) ms per step
    bytes_per_token: dict[int, int] = field(default_factory=dict)
    smoothing: float = 0.3        # weight of a new observation in the load factor
    load: float = 1.0             # observed / measured latency, smoothed

    def __post_init__(self):
        self.bit_widths = sorted(self.bit_widths)
        if not self.bit_widths:
            raise BudgetError("the policy needs at least one bit-width")

    def estimate_ms(self, bits: int) -> float:
        return self.latency_ms[bits] * self.load

    def observe(self, bits: int, ms: float) -> None:
        """Fold one measured step (milliseconds at ``bits``) into the load factor."""
        if self.latency_ms.get(bits):
            self.load = (1 - self.smoothing) * self.load + self.smoothing * ms / self.latency_ms[bits]

    def choose(self, max_ms_per_token: float | None = None, max_bytes_per_token: float | None = None) -> Choice:
        if max_ms_per_token is None and max_bytes_per_token is None:
            raise BudgetError("give a budget: max_ms_per_token and/or max_bytes_per_token")
        for name, v in (("max_ms_per_token", max_ms_per_token), ("max_bytes_per_token", max_bytes_per_token)):
            if v is not None and not v > 0:
                raise BudgetError(f"{name} must be positive, got {v}")
        if max_ms_per_token is not None:
            missing = [b for b in self.bit_widths if b not in self.latency_ms]
            if missing:
                raise BudgetError(f"no latency measured for bit-widths {missing}: measure them first")
        if max_bytes_per_token is not None:
            missing = [b for b in self.bit_widths if b not in self.bytes_per_token]
            if missing:
                raise BudgetError(f"no byte count for bit-widths {missing}")

        def fits(b):
            return ((max_ms_per_token is None or self.estimate_ms(b) <= max_ms_per_token)
                    and (max_bytes_per_token is None or self.bytes_per_token[b] <= max_bytes_per_token))

        ok = [b for b in self.bit_widths if fits(b)]
        b = ok[-1] if ok else self.bit_widths[0]
        return Choice(b, bool(ok), self.estimate_ms(b) if b in self.latency_ms else None)


def measure(step: Callable[[int], object], bit_widths, steps: int = 4, warm: int = 1,
            clock: Callable[[], float] = time.perf_counter) -> dict[int, float]:
    """Median milliseconds of ``step(bits)`` per bit-width (after ``warm`` unmeasured calls)."""
    out = {}
    for b in bit_widths:
        ts = []
        for i in range(warm + steps):
            t0 = clock()
            step(b)
            if i >= warm:
                ts.append((clock() - t0) * 1e3)
        out[b] = statistics.median(ts)
    return out


def run_with_policy(step: Callable[[int], bool], n_steps: int, policy: PrecisionPolicy,
                    max_ms_per_token: float | None = None, max_bytes_per_token: float | None = None,
                    per_step: bool = True, clock: Callable[[], float] = time.perf_counter) -> list[tuple[int, float]]:
    """Call ``step(bits)`` up to ``n_steps`` times (it returns False to stop early), choosing the bit-width from
    the policy: once for the whole request, or before every step (``per_step``) with each step's measured
    time folded into the load factor. Returns [(bits, ms)] per step."""
    choice = policy.choose(max_ms_per_token, max_bytes_per_token)
    trace = []
    for _ in range(n_steps):
        t0 = clock()
        more = step(choice.bits)
        ms = (clock() - t0) * 1e3
        trace.append((choice.bits, ms))
        policy.observe(choice.bits, ms)
        if more is False:
            break
        if per_step:
            choice = policy.choose(max_ms_per_token, max_bytes_per_token)
    return trace


@dataclass
class SpeculationPlan:
    draft_bits: int | None      # None: plain decoding is expected to be faster
    draft_len: int
    speedup: float              # expected tokens/s over plain decoding at the verifying bit-width
    table: dict = field(default_factory=dict)   # (draft bits, draft len) -> expected speedup


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a round yields with k drafts, each kept with probability ``acceptance`` until the first miss,
    plus the verifier's own token: 1 + a + a^2 + ... + a^k."""
    a = min(max(acceptance, 0.0), 1.0)
    return float(k + 1) if a == 1.0 else (1 - a ** (k + 1)) / (1 - a)


def plan_speculation(bits: int, latency_ms: dict, verify_ms: dict, acceptance: dict,
                     min_speedup: float = 1.05) -> SpeculationPlan:
    """The draft bit-width and length with the highest expected speedup over plain decoding at ``bits``:
    per round k draft steps at ``latency_ms[d]`` plus one verify call of k + 1 tokens (``verify_ms[k]``),
    yielding ``expected_tokens(acceptance[d], k)`` tokens. ``acceptance``: measured per draft bit-width.
    Below ``min_speedup`` the plan is plain decoding (draft_bits None)."""
    plain = latency_ms[bits]
    table = {}
    for d, a in acceptance.items():
        if d >= bits or d not in latency_ms:
            continue
        for k, v in verify_ms.items():
            table[(d, k)] = expected_tokens(a, k) * plain / (k * latency_ms[d] + v)
    if not table:
        return SpeculationPlan(None, 0, 1.0, table)
    (d, k), s = max(table.items(), key=lambda kv: kv[1])
    return SpeculationPlan(d, k, s, table) if s >= min_speedup else SpeculationPlan(None, 0, 1.0, table)
