"""Token sampling with the ecosystem's options (llama.cpp's and transformers' names and order), numpy only.

``SamplingParams``: temperature (0: greedy, the default), top_k, top_p, min_p, repeat_penalty (over the last
``repeat_last_n`` tokens, llama.cpp's rule: positive logits divided, negative multiplied), seed (a run with
the same seed and prompt gives the same tokens), stop strings, max_new_tokens. ``Sampler`` applies them to
one logits row at a time, in llama.cpp's order: repetition penalty, top-k, top-p, min-p, temperature.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0                 # 0: off
    top_p: float = 1.0             # 1: off
    min_p: float = 0.0             # 0: off
    repeat_penalty: float = 1.0    # 1: off
    repeat_last_n: int = 64
    seed: int | None = None
    stop: list = field(default_factory=list)
    max_new_tokens: int = 32

    def __post_init__(self):
        checks = [(self.temperature >= 0, "temperature must be >= 0"), (self.top_k >= 0, "top_k must be >= 0"),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1]"), (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
                  (self.repeat_penalty > 0, "repeat_penalty must be > 0"),
                  (self.repeat_last_n >= 0, "repeat_last_n must be >= 0"),
                  (self.max_new_tokens >= 0, "max_new_tokens must be >= 0")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def candidates(logits: np.ndarray, p: SamplingParams, history=()) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, probabilities) the sampler draws from for one logits row (after every filter)."""
    x = np.asarray(logits, np.float64).copy()
    if p.repeat_penalty != 1.0 and p.repeat_last_n and len(history):
        seen = np.unique(np.asarray(list(history)[-p.repeat_last_n:], np.int64))
        v = x[seen]
        x[seen] = np.where(v > 0, v / p.repeat_penalty, v * p.repeat_penalty)
    ids = np.argsort(-x, kind="stable")
    if p.top_k:
        ids = ids[:p.top_k]
    z = x[ids] / max(p.temperature, 1e-6) if not p.greedy else x[ids]
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if p.top_p < 1.0:   # the smallest prefix (by probability) whose mass reaches top_p
        keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
        ids, probs = ids[:keep], probs[:keep]
    if p.min_p > 0:     # tokens at least min_p times as likely as the most likely one
        m = probs >= p.min_p * probs[0]
        ids, probs = ids[m], probs[m]
    return ids, probs / probs.sum()


class Sampler:
    """Draws tokens for one sequence: greedy, or seeded random draws from ``candidates``."""

    def __init__(self, params: SamplingParams | None = None):
        self.params = params or SamplingParams()
        self.rng = np.random.default_rng(self.params.seed)

    def __call__(self, logits: np.ndarray, history=()) -> int:
        p = self.params
        if p.greedy and p.repeat_penalty == 1.0:
            return int(np.argmax(logits))
        ids, probs = candidates(logits, p, history)
        if p.greedy:
            return int(ids[0])
        return int(ids[self.rng.choice(len(ids), p=probs)])


def find_stop(text: str, stops) -> int:
    """Index where the first stop string starts in ``text`` (-1: none)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def holdback(text: str, stops) -> int:
    """How many trailing characters of ``text`` could begin a stop string (kept back while streaming)."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n
