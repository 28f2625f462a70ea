"""Sampling (tvm_anyprec/sampling.py) against its definition: at temperature 1 the draws follow the softmax of
the logits (chi-square on a fixed context), top-k / top-p / min-p never emit a token outside their set, the
repetition penalty follows llama.cpp's rule, a seed reproduces the draws, stop strings are found and held back
while streaming."""
from __future__ import annotations

import numpy as np
import pytest

from tvm_anyprec.sampling import Sampler, SamplingParams, candidates, find_stop, holdback

pytestmark = pytest.mark.unit

V = 12
LOGITS = np.random.default_rng(0).standard_normal(V) * 1.5


def _softmax(x, t=1.0):
    e = np.exp((x - x.max()) / t)
    return e / e.sum()


def _draw(params, n=20000, logits=LOGITS, history=()):
    s = Sampler(params)
    return np.bincount([s(logits, history) for _ in range(n)], minlength=len(logits))


def test_temperature_one_matches_the_softmax():
    from scipy.stats import chisquare

    counts = _draw(SamplingParams(temperature=1.0, seed=1))
    expected = _softmax(LOGITS) * counts.sum()
    assert chisquare(counts, expected).pvalue > 1e-3
    # and a lower temperature is sharper: the top token's share grows
    sharp = _draw(SamplingParams(temperature=0.5, seed=1), n=5000)
    assert sharp.argmax() == LOGITS.argmax() and sharp.max() / 5000 > counts.max() / 20000


def test_top_k_top_p_min_p_sets():
    order = np.argsort(-LOGITS)
    p = _softmax(LOGITS)[order]
    counts = _draw(SamplingParams(temperature=1.0, top_k=3, seed=2), n=3000)
    assert set(np.nonzero(counts)[0]) <= set(order[:3])
    keep = int(np.searchsorted(np.cumsum(p), 0.6) + 1)           # smallest prefix with mass >= 0.6
    counts = _draw(SamplingParams(temperature=1.0, top_p=0.6, seed=3), n=3000)
    assert set(np.nonzero(counts)[0]) <= set(order[:keep]) and keep < V
    counts = _draw(SamplingParams(temperature=1.0, min_p=0.2, seed=4), n=3000)
    assert set(np.nonzero(counts)[0]) <= set(order[p >= 0.2 * p[0]])
    ids, probs = candidates(LOGITS, SamplingParams(temperature=1.0, top_k=5, top_p=0.9))
    assert len(ids) <= 5 and abs(probs.sum() - 1) < 1e-12


def test_greedy_and_seed():
    assert Sampler(SamplingParams())(LOGITS) == int(LOGITS.argmax())
    s1, s2 = Sampler(SamplingParams(temperature=0.8, seed=7)), Sampler(SamplingParams(temperature=0.8, seed=7))
    draws = [s1(LOGITS) for _ in range(50)]
    assert draws == [s2(LOGITS) for _ in range(50)] and len(set(draws)) > 1


def test_repeat_penalty_rule():
    x = np.array([2.0, -1.0, 0.5, 1.9])
    ids, _ = candidates(x, SamplingParams(repeat_penalty=2.0), history=[0, 1])
    assert ids[0] == 3                        # 2.0 / 2 = 1.0 < 1.9: the repeated token loses the top
    assert Sampler(SamplingParams(repeat_penalty=2.0))(x, [0]) == 3


def test_bad_values_are_errors():
    for kw in ({"temperature": -1}, {"top_p": 0}, {"min_p": 1.0}, {"top_k": -1}, {"repeat_penalty": 0}):
        with pytest.raises(ValueError):
            SamplingParams(**kw)


def test_stop_strings():
    assert find_stop("Hello world. Bye", ["world", "Bye"]) == 6 and find_stop("abc", ["x"]) == -1
    assert holdback("Hello wor", ["world"]) == 3 and holdback("Hello", ["world"]) == 0
