"""Perplexity with token pruning (Agile-Quant, issue 6) on the real model, torch side, same windows as the README's
low-bit table (Hamlet, 16 windows x 128 tokens; calibration Richard III, 8 windows).

Each window runs through the exported graph's torch module (frontend/export.py StaticCacheLM) in prefill
chunks of 32 tokens with the static cache, so pruning applies within each chunk, exactly as the compiled
prefill graph does it; weights/activations are fake-quantized with the same rules as the kernels
(quant/activations.py). R = 0 rows are the same chunked pipeline without pruning (they reproduce the README's
full-window numbers up to float order). Two numbers per row: ppl over every position (a pruned token's
prediction comes from its hidden state frozen at the prune layer: final norm + lm_head), and ppl over the
positions whose prediction went through every layer (kept tokens; the selection is by attention received, so
this subset is not a random sample).

Usage: python benchmarks/prune_ppl.py [--ratios 0,0.1,0.25] [--layer 15] [--layers-sweep 4,8,22]
       [--json out.json] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="0,0.1,0.25")
    ap.add_argument("--layer", type=int, default=15, help="first layer that processes fewer tokens")
    ap.add_argument("--layers-sweep", default="", help="extra prune layers for W4A8 (smoothing) at the largest ratio")
    ap.add_argument("--configs", default="fp32,w4a16,w4a8-none,w4a8,w4a4-none,w4a4")
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--json")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from tvm_anyprec import api, data
    from tvm_anyprec.frontend.export import StaticCacheLM, spec_from_hf
    from tvm_anyprec.quant import activations as A
    from tvm_anyprec.quant.model import nll_from_logits

    m, tok = data.load_model()
    ids = data.token_windows(tok, data.EVAL_TEXT, api.EVAL_WINDOWS, api.EVAL_SEQLEN)
    stats = api.calibrate_activations(None)
    cfgs = {"fp32": None, "w4a16": (A.ActQuantConfig(8, a16_layers=(".*",), outlier="none"), None),
            "w4a8-none": (A.preset(8, "none"), None), "w4a8": (A.preset(8), stats),
            "w4a4-none": (A.preset(4, "none"), None), "w4a4": (A.preset(4), stats)}
    ratios = [float(r) for r in args.ratios.split(",")]
    runs = [(c, r, args.layer) for c in args.configs.split(",") for r in ratios]
    runs += [("w4a8", max(ratios), int(L)) for L in args.layers_sweep.split(",") if L]

    @torch.no_grad()
    def ppl(ratio, layer):
        sp = spec_from_hf(m, api.EVAL_SEQLEN, args.chunk, ratio, layer if ratio else None)
        lm = StaticCacheLM(m, sp).eval()
        nll = cnt = nll_k = cnt_k = 0
        for w in ids:
            cache = [torch.zeros(sp.cache_shape()) for _ in range(2 * sp.n_layers)]
            out, kept = [], []
            for s in range(0, len(w), args.chunk):
                c = torch.from_numpy(np.asarray(w[s:s + args.chunk]))[None]
                valid = [torch.tensor([c.shape[1]])] if sp.n_pruned else []
                lg, *cache = lm(c, torch.tensor([s]), *valid, *cache)
                out.append(lg[0].numpy())
                k = np.zeros(c.shape[1], bool)
                k[lm.kept_rows.numpy() if sp.n_pruned else slice(None)] = True
                kept.append(k)
            lg = np.concatenate(out)
            a, n = nll_from_logits(lg, w)
            nll, cnt = nll + a, cnt + n
            sel = np.concatenate(kept)[:-1]          # predictions made by tokens that went through every layer
            b, n2 = nll_from_logits(np.concatenate([lg[:-1][sel], lg[-1:]]), np.concatenate([[0], w[1:][sel]]))
            nll_k, cnt_k = nll_k + b, cnt_k + n2
        return float(np.exp(nll / cnt)), float(np.exp(nll_k / cnt_k)), cnt_k / cnt

    rows = []
    prepared = {}
    for name, ratio, layer in runs:
        t0 = time.time()
        if cfgs[name] is None:
            p = ppl(ratio, layer)
        else:
            if name not in prepared:
                cfg, st = cfgs[name]
                prepared[name] = A.prepare_model(m, cfg, st)
            with A.fake_quantized(m, prepared[name]):
                p = ppl(ratio, layer)
        rows.append({"config": name, "prune_ratio": ratio, "prune_layer": layer if ratio else None, "ppl": p[0],
                     "ppl_kept": p[1], "kept_fraction": p[2]})
        print(f"{name:<10} R={ratio:<5g} L={layer if ratio else '-':<3} ppl {p[0]:8.2f}  kept-only ppl {p[1]:8.2f} "
              f"({p[2]:.0%} of positions)  ({time.time() - t0:.0f}s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
