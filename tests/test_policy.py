"""The run-time precision policy with synthetic latencies (a fake clock: no timing of real code)."""
import pytest

from tvm_anyprec.policy import (BudgetError, PrecisionPolicy, expected_tokens, measure, plan_speculation,
                                run_with_policy)

LAT = {3: 10.0, 4: 12.0, 5: 14.0, 6: 17.0, 7: 20.0, 8: 24.0}     # ms per token, unloaded
BYTES = {b: 1000 * b + 500 for b in LAT}


class FakeMachine:
    """A decode step at b bits takes LAT[b] x load ms on a fake clock; ``load`` follows a schedule by step."""

    def __init__(self, loads):
        self.t, self.i, self.loads = 0.0, 0, loads

    def clock(self):
        return self.t / 1e3

    def step(self, b):
        self.t += LAT[b] * self.loads(self.i)
        self.i += 1
        return True


def test_choose_highest_that_fits():
    p = PrecisionPolicy(list(LAT), dict(LAT), dict(BYTES))
    assert p.choose(22).bits == 7 and p.choose(22).met
    assert p.choose(24).bits == 8
    assert p.choose(1000).bits == 8
    assert p.choose(11).bits == 3
    c = p.choose(5)                                     # nothing fits: lowest, and says so
    assert (c.bits, c.met) == (3, False)
    assert p.choose(max_bytes_per_token=5600).bits == 5
    assert p.choose(22, 4600).bits == 4                 # both budgets: the tighter wins


def test_bad_budgets_are_clear_errors():
    p = PrecisionPolicy(list(LAT), {3: 10.0}, dict(BYTES))
    with pytest.raises(BudgetError, match="give a budget"):
        p.choose()
    with pytest.raises(BudgetError, match="positive"):
        p.choose(-1)
    with pytest.raises(BudgetError, match=r"no latency measured for bit-widths \[4, 5, 6, 7, 8\]"):
        p.choose(20)


def test_measure_takes_medians_on_the_clock():
    m = FakeMachine(lambda i: 1.0)
    got = measure(m.step, list(LAT), steps=3, clock=m.clock)
    assert got == pytest.approx(LAT)


def test_per_step_policy_meets_budget_through_a_slowdown():
    """Steps 0-29 unloaded, 30-59 everything 1.5x slower (a busy core), 60-99 unloaded again. Budget 22 ms:
    7 bits fit when unloaded (20 ms), only 5 bits when loaded (14 x 1.5 = 21 ms)."""
    def loads(i):
        return 1.5 if 30 <= i < 60 else 1.0

    m = FakeMachine(loads)
    trace = run_with_policy(m.step, 100, PrecisionPolicy(list(LAT), dict(LAT)), 22.0, clock=m.clock)
    bits = [b for b, _ in trace]
    ms = [t for _, t in trace]
    settle = 6                                         # steps the smoothed load factor needs to follow a change
    assert set(bits[:30]) == {7}
    assert set(bits[30 + settle:60]) == {5}
    assert set(bits[60 + settle:]) == {7}
    assert max(ms[30 + settle:60]) <= 22.0 and max(ms[60 + settle:]) <= 22.0
    assert sum(ms) / len(ms) <= 22.0

    # chosen once per request instead: the slowdown breaks the budget for the whole loaded phase
    m = FakeMachine(loads)
    fixed = run_with_policy(m.step, 100, PrecisionPolicy(list(LAT), dict(LAT)), 22.0, per_step=False, clock=m.clock)
    assert {b for b, _ in fixed} == {7}
    assert min(t for _, t in fixed[30:60]) > 22.0


def test_step_can_stop_early():
    n = []

    def step(b):
        n.append(b)
        return len(n) < 3

    assert len(run_with_policy(step, 10, PrecisionPolicy([3, 8], {3: 1.0, 8: 2.0}), 5.0)) == 3


def test_expected_tokens_per_round():
    assert expected_tokens(0.0, 4) == 1.0 and expected_tokens(1.0, 4) == 5.0
    assert abs(expected_tokens(0.5, 2) - 1.75) < 1e-12          # 1 + 0.5 + 0.25


def test_speculation_plan_from_measured_costs():
    lat = {3: 10.0, 4: 12.0, 8: 40.0}
    verify = {k: 45.0 for k in range(1, 5)}
    plan = plan_speculation(8, lat, verify, {3: 0.6, 4: 0.8})
    # brute force, from the definition: tokens per round x plain step time / round time
    best = max(((d, k) for d in (3, 4) for k in range(1, 5)),
               key=lambda dk: sum({3: 0.6, 4: 0.8}[dk[0]] ** i for i in range(dk[1] + 1)) * 40.0
               / (dk[1] * lat[dk[0]] + 45.0))
    assert (plan.draft_bits, plan.draft_len) == best and plan.speedup > 1.05
    # drafts rarely kept, or a verify call as dear as many steps: plain decoding wins
    assert plan_speculation(8, lat, verify, {3: 0.05, 4: 0.1}).draft_bits is None
    assert plan_speculation(8, lat, {k: 400.0 for k in range(1, 5)}, {3: 0.6, 4: 0.8}).draft_bits is None
    assert plan_speculation(3, lat, verify, {3: 0.9}).draft_bits is None   # nothing below 3 bits


def test_verify_graph_names_and_choice():
    """An export's verify graphs (the largest keeps the name ``verify``) and the one a round of k drafts runs:
    the smallest that holds the current token and the drafts."""
    from tvm_anyprec.frontend.onnx_import import graph_names
    from tvm_anyprec.speculative import verify_fn

    assert graph_names(32) == [("decode", 1), ("prefill", 32), ("verify_3", 3), ("verify", 5)]
    assert graph_names(16, 5) == [("decode", 1), ("prefill", 16), ("verify", 5)]
    assert graph_names(32, 0) == graph_names(32, ()) == [("decode", 1), ("prefill", 32)]
    assert graph_names(32, (4, 2, 4)) == [("decode", 1), ("prefill", 32), ("verify_2", 2), ("verify", 4)]
    graphs = [(3, "verify_3"), (5, "verify")]
    assert [verify_fn(graphs, k + 1) for k in range(1, 5)] == [(3, "verify_3")] * 2 + [(5, "verify")] * 2
    with pytest.raises(ValueError, match="no verify graph takes 6 tokens"):
        verify_fn(graphs, 6)
