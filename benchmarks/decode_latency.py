"""Per-token decode latency of the real model, side by side in ONE run (same machine, same inputs):

  * tvm-anyprec artifact at every bit-width (bitplane kernels, hand schedule or tuned)
  * the same graph with every linear layer in fp32, compiled by TVM with our pipeline (dense W^T kernels)
  * the fp32 ONNX compiled by plain TVM (tvm.compile, default CPU pipeline)
  * the fp32 ONNX in onnxruntime

Usage: python benchmarks/decode_latency.py [--workdir artifacts/bench] [--steps 16] [--threads 2]
Creates (once) the ONNX export, the parent and the artifacts it needs under --workdir. Prints a table with
medians and spread (min..max over repeats) and ratios to the ORT fp32 step; writes JSON next to it.
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


def _median_spread(ts):
    return statistics.median(ts), min(ts), max(ts)


def bench_session(sess, bits, steps, warm=3):
    """Median seconds per decode step over ``steps`` steps (cache filled with a short prompt first)."""
    ids = np.arange(100, 108)
    _, cache = sess.forward_tokens(ids, bits, logits="last")
    pos, tok = len(ids), 42
    times = []
    for i in range(warm + steps):
        t0 = time.perf_counter()
        _, cache = sess.decode_step(tok, pos + i, cache, bits)
        if i >= warm:
            times.append(time.perf_counter() - t0)
    return _median_spread(times)


def bench_plain_tvm(onnx_path, steps, threads, warm=2):
    import tvm
    from tvm import relax

    from tvm_anyprec.frontend.onnx_import import import_onnx
    from tvm_anyprec.targets import preset

    imp = import_onnx(onnx_path, attention="inline")   # plain TVM: the ops' dense ONNX definition
    fname = next(iter(imp.specs))
    target = tvm.target.Target(preset("x86")["target"])
    ex = tvm.compile(imp.mod, target=target)
    dev = tvm.cpu()
    vm = relax.VirtualMachine(ex, dev)
    func = imp.mod[fname]
    n_in = int(func.attrs["num_input"])
    params = [tvm.runtime.tensor(imp.weights[p.name], dev) for p in func.params[n_in:]]
    inputs = [tvm.runtime.tensor(np.zeros(shape, dtype), dev) for _n, shape, dtype in imp.inputs[fname]]
    times = []
    for i in range(warm + steps):
        t0 = time.perf_counter()
        vm[fname](*inputs, *params)
        if i >= warm:
            times.append(time.perf_counter() - t0)
    return _median_spread(times)


def bench_ort(onnx_path, steps, threads, warm=2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    s = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    feeds = {}
    for i in s.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        feeds[i.name] = np.zeros(shape, np.int64 if "int64" in i.type else np.float32)
    times = []
    for k in range(warm + steps):
        t0 = time.perf_counter()
        s.run(None, feeds)
        if k >= warm:
            times.append(time.perf_counter() - t0)
    return _median_spread(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="artifacts/bench")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-plain-tvm", action="store_true", help="skip the slow plain-TVM fp32 baseline")
    args = ap.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))

    from tvm_anyprec import api
    from tvm_anyprec.compiler import compile_model
    from tvm_anyprec.runtime import Session

    wd = Path(args.workdir)
    onnx_dir, parent, art, fp32_art = wd / "onnx", wd / "parent", wd / "anyprec-x86", wd / "fp32-x86"
    if not (onnx_dir / "decode.onnx").exists():
        api.export(onnx_dir, max_len=512)   # as benchmarks.model: onnxruntime runs the dense cache form
    if not (parent / "manifest.json").exists():
        api.quantize(parent, force=True)
    if not (art / "manifest.json").exists():
        api.compile(onnx_dir, art, parent=parent, force=True)
    if not (fp32_art / "manifest.json").exists():
        compile_model(onnx_dir, fp32_art, exclude=(".*",), force=True, require_rewrite=False, tokenizer="smollm2")

    rows = []
    sess = Session(art)
    for b in sess.bit_widths:
        rows.append((f"tvm-anyprec {b}-bit", *bench_session(sess, b, args.steps)))
    del sess
    fp = Session(fp32_art)
    rows.append(("tvm fp32 (our pipeline, dense W^T)", *bench_session(fp, fp.bit_widths[-1], args.steps)))
    del fp
    if not args.skip_plain_tvm:
        rows.append(("tvm fp32 (plain tvm.compile)", *bench_plain_tvm(onnx_dir / "decode.onnx", 3, args.threads)))
    rows.append(("onnxruntime fp32", *bench_ort(onnx_dir / "decode.onnx", args.steps, args.threads)))

    ort_med = rows[-1][1]
    print(f"decode latency per token, SmolLM2-135M, cache {Session(art).spec('decode')['max_len']}, "
          f"{args.threads} threads, "
          f"{platform.machine()} {platform.processor() or ''}, {time.strftime('%Y-%m-%d')}")
    print(f"{'config':<38}{'median ms':>10}{'min..max ms':>18}{'vs ORT fp32':>13}")
    for name, med, lo, hi in rows:
        print(f"{name:<38}{med * 1e3:>10.2f}{f'{lo * 1e3:.1f}..{hi * 1e3:.1f}':>18}{ort_med / med:>12.2f}x")
    out = wd / "decode_latency.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "threads": args.threads, "steps": args.steps,
                               "rows": [dict(zip(("config", "median_s", "min_s", "max_s"), r)) for r in rows]},
                              indent=1))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
