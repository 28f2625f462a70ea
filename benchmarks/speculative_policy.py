"""Self-speculative decoding and the run-time precision policy on the real model, in ONE run.

  * speculative: for each draft bit-width (and draft length), acceptance rate and tokens/s of greedy
    generation verified at --bits, vs plain greedy decoding at --bits (same prompts, same session, same
    outputs: each speculative output is checked equal to the plain one);
  * policy: per-bit decode-step latencies measured, then for budgets between them, generation with the
    per-step policy: the bit-widths it used, the mean and max ms per step, and whether the budget was met.

Usage: python benchmarks/speculative_policy.py [--artifact artifacts/bench/anyprec-x86] [--tokens 32]
       [--threads 2]. The artifact is built (export + quantize + compile of SmolLM2) when missing.
Prints tables; writes JSON next to the artifact (speculative_policy.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

PROMPTS = ["To be, or not to be, that is the question:",
           "The capital of France is",
           "def fibonacci(n):",
           "Once upon a time, in a small village,"]


def bench_speculative(sess, prompts, tokens, bits, drafts, draft_lens, repeats):
    """Plain and speculative greedy decoding of every prompt, rounds interleaved: after one untimed warm-up run of
    each config, each round times every config on every prompt (the configs' order rotated per round), so a slow
    phase of the machine or a first-call cost falls on no config alone. Per config: the sum over prompts of each
    prompt's median time (min / max: the sums of the fastest / slowest rounds' times), end to end and for the
    generation alone (the prompt's prefill, the same work in every config, taken out: llama-bench's tg)."""
    configs = [None] + [(d, k) for d in drafts for k in draft_lens]

    def run(cfg, ids, st):
        if cfg is None:
            return sess.generate_ids(ids, tokens, bits, stats=st)
        return sess.generate_speculative(ids, tokens, bits, cfg[0], cfg[1], stats=st)

    for cfg in configs:   # warm-up (first calls of each graph and bit-width), untimed
        run(cfg, prompts[0], {})
    times = {cfg: [[] for _ in prompts] for cfg in configs}
    gen = {cfg: [[] for _ in prompts] for cfg in configs}    # the same minus the prompt's prefill
    stats = {cfg: {"drafted": 0, "accepted": 0, "rounds": 0, "draft_s": 0.0, "verify_s": 0.0} for cfg in configs}
    outs = {cfg: [None] * len(prompts) for cfg in configs}   # the last round's outputs
    for rnd in range(repeats):
        for cfg in configs[rnd % len(configs):] + configs[:rnd % len(configs)]:
            for i, ids in enumerate(prompts):
                st = {}
                t0 = time.perf_counter()
                o = run(cfg, ids, st)
                times[cfg][i].append(time.perf_counter() - t0)
                gen[cfg][i].append(times[cfg][i][-1] - st["prompt_s"])
                outs[cfg][i] = o
                if cfg is not None and rnd == repeats - 1:   # the counts and times of one round (generate_speculative resets st)
                    for key in stats[cfg]:
                        stats[cfg][key] += st[key]
    plain_out = outs[None]
    for cfg in configs[1:]:   # every speculative output checked against plain greedy (the last round's)
        if outs[cfg] != plain_out:
            raise AssertionError(f"speculative {cfg[0]}->{bits} output differs from plain greedy decoding")
    n_tok = sum(len(o) for o in plain_out)
    n_gen = n_tok - len(prompts)     # the first token of each comes from the prompt's logits

    def summed(t, cfg, f=statistics.median):
        return sum(f(x) for x in t[cfg])

    def per_round(t, cfg):
        return [sum(x[r] for x in t[None]) / sum(x[r] for x in t[cfg]) for r in range(repeats)]

    rows = []
    for cfg in configs:
        row = {"config": f"plain {bits}-bit" if cfg is None else f"draft {cfg[0]}-bit x{cfg[1]}, verify {bits}-bit",
               "tokens": n_tok, "seconds": summed(times, cfg), "min_s": summed(times, cfg, min),
               "max_s": summed(times, cfg, max), "tokens_per_s": n_tok / summed(times, cfg),
               "acceptance": None, "vs_plain": summed(times, None) / summed(times, cfg),
               "vs_plain_per_round": per_round(times, cfg),
               "gen_tokens": n_gen, "gen_seconds": summed(gen, cfg), "gen_tokens_per_s": n_gen / summed(gen, cfg),
               "gen_vs_plain": summed(gen, None) / summed(gen, cfg), "gen_vs_plain_per_round": per_round(gen, cfg)}
        if cfg is not None:
            tot = stats[cfg]
            row.update({"acceptance": tot["accepted"] / max(tot["drafted"], 1), "rounds": tot["rounds"],
                        "draft_s_per_round": tot["draft_s"] / max(tot["rounds"], 1),
                        "verify_s_per_round": tot["verify_s"] / max(tot["rounds"], 1)})
        rows.append(row)
    return rows


def bench_policy(sess, prompt_ids, tokens):
    lat = sess.measure_latencies(steps=8)
    levels = sorted(set(round(v, 3) for v in lat.values()))
    # one budget below every measured latency (infeasible: the policy must fall back to the lowest width and
    # warn), one 10% above each measured level (feasible), and one halfway between neighbouring levels
    # (feasible only if the machine is as fast as when measured: levels within noise make it a coin toss)
    budgets = sorted([levels[0] * 0.8] + [v * 1.1 for v in levels]
                     + [(a + b) / 2 for a, b in zip(levels, levels[1:])])
    rows = []
    for budget in budgets:
        trace = []
        sess.generate_ids(prompt_ids, tokens, max_ms_per_token=budget, trace=trace)
        steps = [ms for _b, ms in trace[:-1]] or [ms for _b, ms in trace]   # the last step stops, decodes nothing
        rows.append({"budget_ms": budget, "feasible": budget >= levels[0], "bits_used": sorted({b for b, _ in trace}),
                     "mean_ms": statistics.mean(steps), "max_ms": max(steps),
                     "met": statistics.mean(steps) <= budget})
    return lat, rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", default="artifacts/bench/anyprec-x86")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--bits", type=int, default=8, help="verifying bit-width")
    ap.add_argument("--drafts", default="3,4,5", help="draft bit-widths")
    ap.add_argument("--draft-lens", default="2,4", help="tokens drafted per round")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--policy-only", action="store_true", help="skip the speculative part")
    args = ap.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))

    from tvm_anyprec import api
    from tvm_anyprec.runtime import Session
    from tvm_anyprec.speculative import verify_graphs

    art = Path(args.artifact)
    if not (art / "manifest.json").exists():
        api.compile("smollm2", art)
    sess = Session(art)
    prompts = [sess.tokenizer(p)["input_ids"] for p in PROMPTS]
    drafts = [int(x) for x in args.drafts.split(",")]
    lens = [int(x) for x in args.draft_lens.split(",")]
    spec = [] if args.policy_only else bench_speculative(sess, prompts, args.tokens, args.bits, drafts, lens,
                                                         args.repeats)
    lat, pol = bench_policy(sess, prompts[0], args.tokens)

    head = (f"SmolLM2-135M, {len(PROMPTS)} prompts x {args.tokens} new tokens, {args.threads} threads, "
            f"{platform.machine()}, {time.strftime('%Y-%m-%d')}, verify graphs: "
            + ", ".join(f"{fn} ({chunk} tokens)" for chunk, fn in verify_graphs(sess)))
    print("self-speculative decoding (outputs checked equal to plain greedy): " + head)
    print("end to end (prompt + generation) and generation alone (the prompt's prefill taken out, as llama-bench's tg)")
    print(f"{'config':<34}{'tok/s':>8}{'accept':>8}{'vs plain':>10}{'per round':>13}{'gen tok/s':>11}{'gen vs plain':>14}"
          f"{'per round':>13}{'draft ms/rnd':>14}{'verify ms/rnd':>15}")
    for r in spec:
        acc = "" if r["acceptance"] is None else f"{r['acceptance']:.0%}"
        dr = f"{r['draft_s_per_round'] * 1e3:.0f}" if "draft_s_per_round" in r else ""
        vr = f"{r['verify_s_per_round'] * 1e3:.0f}" if "verify_s_per_round" in r else ""
        spread = f"{min(r['vs_plain_per_round']):.2f}-{max(r['vs_plain_per_round']):.2f}"
        gspread = f"{min(r['gen_vs_plain_per_round']):.2f}-{max(r['gen_vs_plain_per_round']):.2f}"
        print(f"{r['config']:<34}{r['tokens_per_s']:>8.2f}{acc:>8}{r['vs_plain']:>9.2f}x{spread:>13}"
              f"{r['gen_tokens_per_s']:>11.2f}{r['gen_vs_plain']:>13.2f}x{gspread:>13}{dr:>14}{vr:>15}")
    print("\nprecision policy, per-step (decode-step latency measured per bit-width: "
          + ", ".join(f"{b}: {v:.1f} ms" for b, v in lat.items()) + ")")
    print(f"{'budget ms':>10}{'feasible':>9}{'bits used':>14}{'mean ms':>9}{'max ms':>8}{'met':>6}")
    for r in pol:
        print(f"{r['budget_ms']:>10.1f}{'yes' if r['feasible'] else 'no':>9}{','.join(map(str, r['bits_used'])):>14}"
              f"{r['mean_ms']:>9.1f}{r['max_ms']:>8.1f}{'yes' if r['met'] else 'NO':>6}")
    out = art.parent / ("policy.json" if args.policy_only else "speculative_policy.json")
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
                               "threads": args.threads, "tokens": args.tokens, "prompts": PROMPTS,
                               "speculative": spec, "latency_ms": lat, "policy": pol}, indent=1))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
