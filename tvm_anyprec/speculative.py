"""Self-speculative decoding: drafts from a lower child of the same weights, checked in one pass at the verifying
bit-width, and the plan (draft bits and length) chosen from measured costs.

An export may hold several verify graphs (``verify`` and ``verify_<n>``, n tokens per call: the current token
and up to n - 1 drafts). A round runs the smallest that holds its drafts: a verify call's cost grows with its
rows whether they are real or padding (measured on SmolLM2-135M, Zen 4, 8 bits: 17-19 ms for 3 rows against 20
ms for 5), so two drafts in a 5-row graph waste what speculation gains.
"""
from __future__ import annotations

import time

import numpy as np

def verify_graphs(sess) -> list[tuple[int, str]]:
    """[(tokens per call, function)] of the artifact's verify graphs, smallest first; an artifact without one
    verifies in its prompt function (prefill's chunk)."""
    from .frontend.onnx_import import is_verify_name

    found = sorted((sess.spec(f)["chunk"], f) for f in sess.functions
                   if is_verify_name(f) and sess.functions[f].get("spec"))
    if found:
        return found
    fn = sess._chunk_fn()
    return [(sess.spec(fn)["chunk"], fn)]


def verify_fn(graphs: list[tuple[int, str]], tokens: int) -> tuple[int, str]:
    """The smallest verify graph that takes ``tokens`` tokens (the current token and the drafts)."""
    for chunk, fn in graphs:
        if chunk >= tokens:
            return chunk, fn
    raise ValueError(f"no verify graph takes {tokens} tokens (the largest takes {graphs[-1][0]})")


def max_draft_len(sess) -> int:
    return verify_graphs(sess)[-1][0] - 1


def generate_speculative(sess, prompt_ids: np.ndarray, max_new_tokens: int, bits: int, draft_bits: int, draft_len: int = 4,
                         eos: int | None = None, stats: dict | None = None) -> list[int]:
    """``runtime.Session.generate_speculative`` (which checks the prompt): greedy decoding at ``bits`` with drafts
    at ``draft_bits``.

    Each round: draft k tokens one by one at draft_bits (starting from the verifier's cache), run the smallest
    verify graph that holds [current token, drafts] at bits, keep the drafts up to the first one the verifier
    would not have chosen, then take the verifier's own token there. Every kept token is the verifier's argmax,
    so the output is plain greedy decoding at ``bits`` (up to float reordering between a chunked and a
    one-token pass). The verifier's cache rows past the kept tokens hold rejected drafts; they are masked (keys
    past the position are never read) and overwritten by the next round.
    ``stats`` (a dict) receives drafted/accepted counts, misses (rounds ending at a rejected draft), rounds,
    plain steps, the time in each phase (prompt_s, draft_s, verify_s) and the rounds per verify graph
    (``verify_calls``)."""
    sess.check_bits(bits)
    sess.check_bits(draft_bits)
    graphs = verify_graphs(sess)
    if not 1 <= draft_len < graphs[-1][0]:
        raise ValueError(f"draft_len must be in 1..{graphs[-1][0] - 1} (the {graphs[-1][1]} graph checks "
                         f"{graphs[-1][0]} tokens per call)")
    st = stats if stats is not None else {}
    st.update(drafted=0, accepted=0, misses=0, rounds=0, plain_steps=0, draft_s=0.0, verify_s=0.0,
              verify_calls={}, prompt_s=0.0)
    if max_new_tokens <= 0:
        return []
    t0 = time.perf_counter()
    logits, cache = sess.forward_tokens(prompt_ids, bits, fn=sess.prompt_fn, logits="last")
    st["prompt_s"] = time.perf_counter() - t0
    pos = len(prompt_ids)
    max_len = sess.spec("decode")["max_len"]
    out: list[int] = []
    nxt = int(np.argmax(logits[-1]))
    while True:
        out.append(nxt)                              # nxt sits at position pos, not yet in the cache
        if nxt == eos or len(out) >= max_new_tokens or pos >= max_len:
            break
        # a round yields the kept drafts plus the verifier's next token: never more than still needed
        k = min(draft_len, max_new_tokens - len(out) - 1)
        if k == 0 or pos + verify_fn(graphs, k + 1)[0] > max_len:   # last token, or no room: a plain step
            lg, cache = sess.decode_step(nxt, pos, cache, bits)
            st["plain_steps"] += 1
            pos, nxt = pos + 1, int(np.argmax(lg))
            continue
        t0 = time.perf_counter()
        drafts, dcache, tok = [], cache, nxt
        for i in range(k):
            lg, dcache = sess.decode_step(tok, pos + i, dcache, draft_bits)
            tok = int(np.argmax(lg))
            drafts.append(tok)
            if tok == eos:
                break
        del dcache
        t1 = time.perf_counter()
        vfn = verify_fn(graphs, len(drafts) + 1)[1]
        lg, cache = sess.forward_tokens(np.array([nxt] + drafts), bits, pos, cache, fn=vfn)
        preds = lg.argmax(-1)
        st["verify_s"] += time.perf_counter() - t1
        st["draft_s"] += t1 - t0
        st["verify_calls"][vfn] = st["verify_calls"].get(vfn, 0) + 1
        a = 0
        while a < len(drafts) and int(preds[a]) == drafts[a]:
            a += 1
        st["rounds"] += 1
        st["drafted"] += len(drafts)
        st["accepted"] += a
        st["misses"] += a < len(drafts)   # the first rejected draft (the ones after it are not judged)
        for tok in drafts[:a]:
            out.append(tok)
            if tok == eos:
                return out
        pos += a + 1
        nxt = int(preds[a])
    return out


def verify_costs(sess, bits: int, prompt_ids, calls: int = 4) -> dict[int, float]:
    """Median ms of one call of each verify graph at ``bits`` -> {draft length k: ms of the graph a round of k
    drafts runs}."""
    from .policy import measure

    graphs = verify_graphs(sess)
    fns = dict(graphs)
    caches = {chunk: sess.empty_cache(fn) for chunk, fn in graphs}
    ms = measure(lambda c: sess.forward_tokens(np.resize(np.asarray(prompt_ids, np.int64), c), bits, 0, caches[c],
                                               fn=fns[c]), fns, steps=calls)
    return {k: ms[verify_fn(graphs, k + 1)[0]] for k in range(1, graphs[-1][0])}


def plan_speculation(sess, bits: int, prompt_ids, tokens: int = 24, drafts=None):
    """Measured costs -> the draft bit-width and length to use at ``bits`` (``policy.plan_speculation``):
    decode-step latency per bit-width, the verify call a round of each draft length runs at ``bits``, and per
    draft bit-width the acceptance rate on ``prompt_ids`` (a speculative run of ``tokens`` tokens with the
    longest drafts: the rate a draft is kept given the ones before it were).
    Returns (plan, step ms per bit-width, verify ms per draft length, acceptance per draft bit-width)."""
    from .policy import plan_speculation as plan

    drafts = [d for d in (drafts or sess.bit_widths) if d < bits]
    lat = sess.measure_latencies(set(drafts) | {bits})
    verify = verify_costs(sess, bits, prompt_ids)
    acc = {}
    for d in drafts:
        st: dict = {}
        sess.generate_speculative(prompt_ids, tokens, bits, d, max_draft_len(sess), stats=st)
        acc[d] = st["accepted"] / max(st["accepted"] + st["misses"], 1)
    return plan(bits, lat, verify, acc), lat, verify, acc
