"""Perplexity per bit-width with the tied lm_head/embedding fp32, pinned at P bits, or at the call's bits (torch,
the parent's dequantized children swapped in; the reference for choosing ``compile --lm-head-bits``).

    python -m benchmarks.lm_head_ppl [--parent DIR] [--pinned 5,6,7,8] [--windows 16] [--seqlen 128]

The parent must hold the lm_head (quantized with ``--quantize-lm-head``; the default is the one
``benchmarks.llamacpp --lm-head-bits`` compiles). Writes ``benchmarks/results/ppl-lm-head-pinned-<date>.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parent", default="artifacts/bench-llamacpp/anyprec-x86-lm8.parent")
    ap.add_argument("--pinned", default="5,6,7,8")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)

    from tvm_anyprec import data
    from tvm_anyprec.quant.model import Parent, perplexity, swapped_weights

    parent = Parent.load(args.parent)
    heads = [n for n in parent.layers if n.endswith("lm_head") or "embed" in n]
    if not heads:
        raise SystemExit(f"{args.parent} has no lm_head layer: quantize it with --quantize-lm-head")
    m, tok = data.load_model(parent.info.get("source", {}).get("model"))
    ids = data.token_windows(tok, data.EVAL_TEXT, args.windows, args.seqlen)
    pinned = [int(p) for p in args.pinned.split(",")]
    out = {"measured": time.strftime("%Y-%m-%d") + f", torch, {args.windows} x {args.seqlen} tokens of "
           f"{data.EVAL_TEXT}", "parent": str(args.parent), "lm_head": heads, "fp32": perplexity(m, ids)}
    print(f"fp32 {out['fp32']:.3f}", file=sys.stderr, flush=True)
    for b in parent.bit_widths:
        rest = {n: w for n, w in parent.dequantized(b).items() if n not in heads}
        row = {}
        with swapped_weights(m, rest):
            row["lm_head_fp32"] = perplexity(m, ids)
            for p in pinned + [b]:
                key = "lm_head_same_bits" if p == b and p not in pinned else f"lm_head_{p}bit"
                with swapped_weights(m, {n: parent.layers[n].dequantize(p) for n in heads}):
                    row[key] = perplexity(m, ids)
        if b in pinned:
            row["lm_head_same_bits"] = row[f"lm_head_{b}bit"]
        out[str(b)] = row
        print(b, {k: round(v, 3) for k, v in row.items()}, file=sys.stderr, flush=True)
    path = Path(args.out) / f"ppl-lm-head-pinned-{time.strftime('%Y-%m-%d')}.json"
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k not in ("measured", "parent")}))


if __name__ == "__main__":
    main()
