"""Tuned vs. untuned (hand schedule) latency of every kernel of the real model, side by side in ONE run.

For each distinct kernel of the artifact (bitplane GEMV/GEMM per layer shape and rows, fp32 dense for the
kept lm_head): the hand schedule and the best record of the tuning log are compiled and timed on the same
inputs (random bitplanes, the LUTs of a real quantization of random rows) at 3 and 8 bits; the outputs of
the two are checked equal first. Kernels without a record are listed as such.

Usage: python benchmarks/tuning_speedup.py [--artifact artifacts/bench/anyprec-x86] [--log tuning_logs/x86]
       [--target x86] [--threads 2] [--repeat 5]
Writes JSON next to the artifact (tuning_speedup.json).
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

import numpy as np


def kernel_inputs(func, rng):
    """Arguments for a kernel from its buffer shapes: planes random bits, LUTs sorted random values."""
    args = []
    for buf in func.params:            # TVM 0.27: PrimFunc parameters are the buffers
        shape = [int(d) for d in buf.shape]
        dt = str(buf.dtype)
        if buf.name == "NBITS":
            args.append(np.array([8], np.int32))
        elif dt == "uint32":
            args.append(rng.integers(0, 2**32, size=shape, dtype=np.uint32))
        elif buf.name == "LUTS":
            args.append(np.sort(rng.standard_normal(shape), axis=1).astype(dt))
        else:
            args.append(rng.standard_normal(shape).astype(dt))
    return args


def time_kernel(func, target, args, bits, repeat):
    import tvm

    dev = tvm.cpu()
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target).jit()
    targs = [tvm.runtime.tensor(a, dev) for a in args]
    for i, buf in enumerate(func.params):
        if buf.name == "NBITS":
            targs[i] = tvm.runtime.tensor(np.array([bits], np.int32), dev)
    lib["main"](*targs)
    out = targs[-1].numpy().copy()
    ev = lib.time_evaluator("main", dev, number=20, repeat=repeat, min_repeat_ms=50)
    res = ev(*targs).results
    return statistics.median(res), min(res), max(res), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", default="artifacts/bench/anyprec-x86")
    ap.add_argument("--log", help="tuning log directory (default: tuning_logs/<target>/)")
    ap.add_argument("--target", default="x86")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))

    import tvm

    from tvm_anyprec import api
    from tvm_anyprec.schedules.cpu import schedule_linear_cpu
    from tvm_anyprec.targets import preset
    from tvm_anyprec.api import model_kernels
    from tvm_anyprec.tune import default_log_dir, load_database, query_database

    art = Path(args.artifact)
    if not (art / "manifest.json").exists():
        api.compile("smollm2", art)
    target = tvm.target.Target(preset(args.target)["target"])
    log = Path(args.log) if args.log else default_log_dir(args.target)
    db = load_database(log, warn=lambda m: print(m, file=sys.stderr))
    if db is None:
        sys.exit(f"no tuning log at {log}: run `tvm-anyprec tune {art} --target {args.target}` first")
    rng = np.random.default_rng(0)
    rows = []
    for name, f in sorted(model_kernels(art).items()):
        tuned = query_database(db, f, target)
        if tuned is None:
            rows.append({"kernel": name, "tuned": False})
            continue
        inputs = kernel_inputs(f, rng)
        row = {"kernel": name, "tuned": True}
        for bits in ((3, 8) if name.startswith("anyprec") else (8,)):
            h = time_kernel(schedule_linear_cpu(f), target, inputs, bits, args.repeat)
            t = time_kernel(tuned, target, inputs, bits, args.repeat)
            np.testing.assert_allclose(t[3], h[3], rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(h[3]).max())))
            row[f"hand_ms_{bits}"] = h[0] * 1e3
            row[f"hand_spread_{bits}"] = [h[1] * 1e3, h[2] * 1e3]
            row[f"tuned_ms_{bits}"] = t[0] * 1e3
            row[f"tuned_spread_{bits}"] = [t[1] * 1e3, t[2] * 1e3]
            row[f"speedup_{bits}"] = h[0] / t[0]
        rows.append(row)
        print(f"  {name}: " + ", ".join(f"{b}-bit {row[f'hand_ms_{b}']:.3f} -> {row[f'tuned_ms_{b}']:.3f} ms "
                                         f"({row[f'speedup_{b}']:.2f}x)" for b in (3, 8) if f"hand_ms_{b}" in row),
              file=sys.stderr)

    print(f"tuned vs hand schedule, {args.target} ({target.attrs.get('mcpu', '')}), {args.threads} threads, "
          f"median of {args.repeat}, {time.strftime('%Y-%m-%d')}, log {log}")
    print(f"{'kernel':<40}{'hand 3b':>9}{'tuned 3b':>9}{'x':>6}{'hand 8b':>9}{'tuned 8b':>9}{'x':>6}")
    for r in rows:
        if not r["tuned"]:
            print(f"{r['kernel']:<40}  (no record: hand schedule)")
            continue

        def cell(b):
            if f"hand_ms_{b}" not in r:
                return f"{'':>9}{'':>9}{'':>6}"
            return f"{r[f'hand_ms_{b}']:>9.3f}{r[f'tuned_ms_{b}']:>9.3f}{r[f'speedup_{b}']:>6.2f}"

        print(f"{r['kernel']:<40}{cell(3)}{cell(8)}")
    sp = [r[k] for r in rows if r["tuned"] for k in ("speedup_3", "speedup_8") if k in r]
    if sp:
        print(f"geometric mean speedup: {float(np.exp(np.mean(np.log(sp)))):.2f}x over {len(sp)} kernel/bit pairs")
    out = art.parent / "tuning_speedup.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
                               "target": args.target, "threads": args.threads, "log": str(log), "rows": rows},
                              indent=1))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
