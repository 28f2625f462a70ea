"""A decode step's cost against the cache length and the position (SmolLM2-135M, one run, rounds interleaved).

Three artifacts of the same decode graph and parent, at one bit-width:

  * cache 512, in place      the attention kernel reads the rows up to the position (kernels/attention.py)
  * cache 8192, in place     the same, with the model's whole context
  * cache 8192, dense        the exporter's dense definition of the op (what onnxruntime and GPU targets run,
                             and what every artifact did before): a one-hot write and attention over all rows

Each round times one decode step of every configuration at position 64, then the 8192 in-place artifact at
later positions. Reported: median ms (min..max), the ratio 8192/512 at position 64 (issue 17's goal: within
1.2x) and the cache bytes a step reads: in place 2 x layers x kv heads x (pos + 1) x head_dim x 4, dense the
whole cache (read and written back).

Usage: python -m benchmarks.kv_cache [--workdir artifacts/bench] [--bits 4] [--rounds 15] [--threads 2]
The parent is ``<workdir>/parent`` (quantized once, as ``benchmarks.decode_latency`` does); JSON goes to
``benchmarks/results/kv-cache-<date>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

POSITIONS = (64, 1024, 4096, 8000)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def _artifacts(wd: Path):
    from tvm_anyprec import api, data
    from tvm_anyprec.compiler import compile_model
    from tvm_anyprec.frontend.export import export_onnx

    parent = wd / "parent"
    if not (parent / "manifest.json").exists():
        log("quantizing the parent (once) ...")
        api.quantize(parent, force=True)
    model = None
    arts = {}
    for name, T, attention in (("cache 512, in place", 512, "kernel"), ("cache 8192, in place", 8192, "kernel"),
                               ("cache 8192, dense", 8192, "inline")):
        onnx = wd / f"kv-decode-{T}" / "decode.onnx"
        if not onnx.exists():
            if model is None:
                model, _ = data.load_model()
            export_onnx(model, onnx, 1, T)
        art = wd / f"kv-{T}-{attention}"
        if not (art / "manifest.json").exists():
            log(f"compiling {name} ...")
            compile_model(onnx, art, parent=parent, force=True, tokenizer="smollm2", attention=attention)
        arts[name] = art
    return arts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="artifacts/bench")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    import tvm

    from tvm_anyprec.runtime import Session

    from .common import machine_info

    arts = _artifacts(Path(args.workdir))
    sessions = {k: Session(v) for k, v in arts.items()}
    caches = {}
    for k, s in sessions.items():   # zeroed: the dense definition reads every row
        sp = s.spec("decode")
        z = np.zeros((sp["n_kv_heads"], sp["max_len"], sp["head_dim"]), np.float32)
        caches[k] = [tvm.runtime.tensor(z, s.dev) for _ in range(2 * sp["n_layers"])]
    cases = [(k, 64) for k in sessions] + [("cache 8192, in place", p) for p in POSITIONS[1:]]
    times = {c: [] for c in cases}
    for r in range(args.rounds + 2):
        for k, pos in cases:
            t0 = time.perf_counter()
            _, caches[k] = sessions[k].decode_step(42, pos, caches[k], args.bits)
            if r >= 2:   # two warm-up rounds
                times[(k, pos)].append(time.perf_counter() - t0)
    sp = sessions["cache 8192, in place"].spec("decode")
    row_bytes = 2 * sp["n_layers"] * sp["n_kv_heads"] * sp["head_dim"] * 4
    rows = []
    for (k, pos), ts in times.items():
        T = sessions[k].spec("decode")["max_len"]
        read = row_bytes * (pos + 1) if "in place" in k else 2 * row_bytes * T
        rows.append({"config": k, "pos": pos, "median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3,
                     "max_ms": max(ts) * 1e3, "cache_bytes_per_step": read})
    med = {(r["config"], r["pos"]): r["median_ms"] for r in rows}
    ratio = med[("cache 8192, in place", 64)] / med[("cache 512, in place", 64)]
    print(f"decode step, SmolLM2-135M at {args.bits} bits, {args.threads} threads, {args.rounds} rounds")
    print(f"{'config':<24}{'pos':>6}{'median ms':>11}{'min..max ms':>16}{'cache MB read':>15}")
    for r in rows:
        spread = f"{r['min_ms']:.1f}..{r['max_ms']:.1f}"
        print(f"{r['config']:<24}{r['pos']:>6}{r['median_ms']:>11.2f}{spread:>16}"
              f"{r['cache_bytes_per_step'] / 1e6:>15.2f}")
    print(f"8192 / 512 at position 64: {ratio:.3f} (goal <= 1.2); dense 8192 / in place 8192 at 64: "
          f"{med[('cache 8192, dense', 64)] / med[('cache 8192, in place', 64)]:.2f}")
    out = Path(args.out) / f"kv-cache-{time.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine_info(args.threads), "bits": args.bits, "threads": args.threads,
                               "rounds": args.rounds, "rows": rows, "ratio_8192_over_512_at_64": ratio,
                               "goal": "<= 1.2"}, indent=1))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
