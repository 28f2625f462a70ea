"""What one loaded artifact makes possible on the real model: self-speculative decoding across bit-widths, the
run-time precision policy, and the C++ example app (TVM runtime only, no Python), each checked against plain
greedy decoding in the Python runtime."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tvm_anyprec.quant.model import Parent

PROMPTS = ["To be, or not to be, that is the question:",
           "The capital of France is",
           "def fibonacci(n):"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prompt_ids(session):
    return [session.tokenizer(p)["input_ids"] for p in PROMPTS]


@pytest.mark.parametrize("bits,draft,draft_len", [(8, 3, 4), (6, 4, 4), (8, 4, 2)])
def test_speculative_equals_greedy(session, prompt_ids, bits, draft, draft_len):
    """Output equal to plain greedy decoding; rounds of 2 drafts run the 3-token verify graph (verify_3), rounds
    of 4 the 5-token one (the last rounds may draft fewer)."""
    total = {"drafted": 0, "accepted": 0}
    for ids in prompt_ids:
        plain = session.generate_ids(ids, 16, bits)
        st = {}
        spec = session.generate_speculative(ids, 16, bits, draft, draft_len=draft_len, stats=st)
        assert spec == plain, f"{draft}->{bits} bits: {spec} != {plain}"
        assert 0 <= st["accepted"] <= st["drafted"] and st["rounds"] > 0
        assert sum(st["verify_calls"].values()) == st["rounds"]
        assert set(st["verify_calls"]) == {"verify_3"} if draft_len == 2 else st["verify_calls"]["verify"] > 0
        for k in total:
            total[k] += st[k]
    # a 3- or 4-bit child agrees with the verifier often enough to save passes (measured: well above 30%)
    assert total["accepted"] / total["drafted"] > 0.3, total


def test_speculative_with_same_bits_accepts_everything(session, prompt_ids):
    """Drafting with the verifier's own bit-width: every draft must be accepted (a wrong cache position, a
    wrong verify row or an off-by-one in the acceptance rule would reject some)."""
    st = {}
    out = session.generate_speculative(prompt_ids[0], 16, 5, 5, draft_len=4, stats=st)
    assert out == session.generate_ids(prompt_ids[0], 16, 5)
    # the prefill's token, then 3 rounds of 4 drafts + the verifier's next token
    assert st["accepted"] == st["drafted"] == 12 and st["rounds"] == 3 and st["verify_calls"] == {"verify": 3}


def test_decode_logits_are_not_overwritten_by_the_next_step(session, prompt_ids):
    """decode_step returns its logits without a copy (a view of the call's output) and the in-place cache it was
    given: the next step must neither overwrite those logits nor lose the cache rows."""
    ids = np.array(prompt_ids[0])
    _, cache = session.forward_tokens(ids, 4, logits="last")
    a, cache2 = session.decode_step(int(ids[-1]), len(ids), cache, 4)
    keep = a.copy()
    b, _ = session.decode_step(int(a.argmax()), len(ids) + 1, cache2, 4)
    assert np.array_equal(a, keep) and not np.array_equal(a, b)
    full, _ = session.forward_tokens(np.append(ids, [ids[-1], a.argmax()]), 4)   # a fresh cache, one pass
    np.testing.assert_allclose(b, full[-1], rtol=1e-3, atol=1e-3 * np.abs(full[-1]).max())


def test_speculation_plan_measures_each_verify_graph(session, prompt_ids):
    """``run --draft-bits auto``: rounds of 1-2 drafts are costed at the 3-token graph, 3-4 at the 5-token one."""
    from tvm_anyprec.speculative import plan_speculation

    plan, lat, verify, acc = plan_speculation(session, 8, prompt_ids[0], tokens=8, drafts=[4])
    assert sorted(verify) == [1, 2, 3, 4] and verify[1] == verify[2] and verify[3] == verify[4]
    assert min(verify.values()) > 0 and set(lat) == {4, 8} and 0.0 <= acc[4] <= 1.0
    assert plan.draft_bits in (None, 4) and set(plan.table) == {(4, k) for k in range(1, 5)}


def test_speculative_bad_arguments(session, prompt_ids):
    with pytest.raises(ValueError, match="draft_len must be in 1..4"):
        session.generate_speculative(prompt_ids[0], 4, 8, 3, draft_len=5)
    with pytest.raises(ValueError, match="bit-width 9"):
        session.generate_speculative(prompt_ids[0], 4, 8, 9)


def test_cli_run_speculative(session, real_artifact):
    r = subprocess.run([sys.executable, "-m", "tvm_anyprec.cli", "run", str(real_artifact), "--bits", "8",
                        "--draft-bits", "3", "--prompt", PROMPTS[0], "--max-new-tokens", "12"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == PROMPTS[0] + session.generate(PROMPTS[0], 12, 8)
    assert "accepted" in r.stderr and "drafts at 3 bits" in r.stderr


def test_weight_bytes_per_token_from_the_parent(session, real_parent):
    """The policy's byte count vs. the parent's own arrays: b planes (byte-sliced: whole blocks of 64 weights)
    + the b-bit LUT per layer (fp16 in exact mode, the fixture's), plus every fp32 tensor the decode graph reads."""
    parent = Parent.load(real_parent)
    assert session.manifest["accuracy"] == "exact"
    fp32 = sum(int(np.prod(session.weights[n].shape)) * 4 for n in session.functions["decode"]["params"]
               if not n.endswith((".planes", ".luts")))
    for b in (3, 5, 8):
        want = fp32 + sum(b * n * 8 * -(-k // 64) + layer.luts[b].astype(np.float16).nbytes
                          for (n, k), layer in ((lay.shape, lay) for lay in parent.layers.values()))
        assert session.weight_bytes_per_token(b) == want


def test_policy_on_the_real_model(session, prompt_ids):
    """A byte budget picks the bit-width deterministically: output equals plain decoding at that width. A
    latency budget above every measured latency picks the top width."""
    ids = prompt_ids[1]
    trace = []
    out = session.generate_ids(ids, 6, max_bytes_per_token=session.weight_bytes_per_token(5), trace=trace)
    assert {b for b, _ in trace} == {5}
    assert out == session.generate_ids(ids, 6, 5)
    lat = session.measure_latencies()
    assert set(lat) == set(session.bit_widths) and all(v > 0 for v in lat.values())
    trace = []
    out = session.generate_ids(ids, 6, max_ms_per_token=1e6, trace=trace)
    assert {b for b, _ in trace} == {8} and out == session.generate_ids(ids, 6, 8)


def test_cpp_example_matches_python(session, real_artifact, prompt_ids, tmp_path):
    """examples/cpp: built with g++ against the wheel's TVM runtime; one load, two bit-widths chosen at run
    time; the tokens equal the Python runtime's."""
    exe = tmp_path / "anyprec_generate"
    b = subprocess.run(["bash", str(ROOT / "examples/cpp/build.sh"), str(exe)], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert b.returncode == 0, b.stderr[-3000:]
    ids = prompt_ids[0]
    r = subprocess.run([str(exe), str(real_artifact), "--prompt-ids", ",".join(map(str, ids)), "--bits", "3,8",
                        "--max-new-tokens", "10"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(" ", 1) for line in r.stdout.strip().splitlines())
    for bits in (3, 8):
        got = [int(t) for t in lines[f"bits={bits}"].removeprefix("ids=").split()]
        assert got == session.generate_ids(ids, 10, bits), f"{bits}-bit"
    bad = subprocess.run([str(exe), str(real_artifact), "--prompt-ids", "1,2", "--bits", "9"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "bit-width 9 is not served" in bad.stderr
