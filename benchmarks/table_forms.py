"""How precisely each candidate form of int8 mode's centroid tables holds a real parent's LUTs, at 5..8 bits
(no kernel runs; numpy only). The question it answers: AVX2 looks up a 16-bit table as two byte tables, each a
blend tree of 2^(b-4) ``vpshufb`` tables, which bounds its 5..8-bit GEMV (README, "The AVX2 bodies against the
issue's goals"). A table whose values are q = 16 A[code >> (b-4)] + r[code] (A and r int8, |r| <= 127) is still an
int16 table for every other body, and AVX2 looks up one 16-entry table and one byte tree (``int_tables`` builds
the tables in this form since 2026-12-08: ``byteslice.form_table``, measured here). This prints the
RMS error of each form's values over sampled rows, relative to the int8 table's (scale max / 127, which costs
+0.9..1.2% perplexity on SmolLM2-135M, ``byteslice.int_tables``), and each form's step / row max.

    python -m benchmarks.table_forms --parent artifacts/smollm2-x86.parent [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def uniform_error(part: np.ndarray, qmax: int) -> float:
    s = np.maximum(np.abs(part).max(1, keepdims=True), 1e-30) / qmax
    return float(((part - s * np.round(part / s)) ** 2).sum())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.table_forms", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parent", required=True, help="a parent directory (quantize's output)")
    ap.add_argument("--rows", type=int, default=48, help="rows sampled per layer")
    ap.add_argument("--every", type=int, default=5, help="every n-th layer")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from safetensors.numpy import load_file

    from tvm_anyprec.quant.byteslice import form_table

    w = load_file(f"{args.parent}/weights.safetensors")
    layers = sorted({k.rsplit(".", 1)[0] for k in w if k.endswith(".lut8")})[::args.every]
    if not layers:
        raise SystemExit(f"{args.parent}: no 8-bit LUTs (a non-uniform parent with max_bits 8 is needed)")
    rng = np.random.default_rng(0)
    rows = []
    for b in (5, 6, 7, 8):
        e16 = e8 = es = 0.0
        steps = []
        for name in layers:
            part = w[f"{name}.lut{b}"].astype(np.float32)
            part = part[rng.choice(part.shape[0], min(args.rows, part.shape[0]), replace=False)]
            e16 += uniform_error(part, 32767)
            e8 += uniform_error(part, 127)
            q, sc = form_table(part, b)
            es += float(((part - q * sc[:, None]) ** 2).sum())
            steps += list(sc / np.maximum(np.abs(part).max(1), 1e-30))
        row = {"bits": b, "rms_vs_int8_table": {"int16": (e16 / e8) ** 0.5, "16A+r": (es / e8) ** 0.5},
               "step_over_row_max": {"int8": 1 / 127, "16A+r median": float(np.median(steps)),
                                     "16A+r max": float(np.max(steps))}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"parent": args.parent, "layers": len(layers), "rows_per_layer": args.rows, "bits": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
