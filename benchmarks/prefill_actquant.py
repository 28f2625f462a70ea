"""Prefill latency (one 32-token prefill call of the real model) side by side in ONE run, same machine/inputs:

  * W4A8  (low-bit activations: per-token INT8 activations x INT4 weights, integer GEMM)
  * W4A4  (INT4 activations after self-attention (o_proj), INT8 elsewhere: the paper's placement)
  * W4A16 bitplane (the any-precision artifact at 4 bits: float activations, LUT-decoded weights)
  * fp32  (same pipeline, every linear layer a dense W^T kernel)

Usage: python benchmarks/prefill_actquant.py --onnx DIR [--parent DIR] [--workdir artifacts/bench-act]
       [--reps 10] [--threads 2]
--onnx: an `export` directory (decode.onnx + prefill.onnx; verify.onnx is not needed). --parent: an
any-precision parent for the bitplane artifact (default: quantized into --workdir when missing). Artifacts
are compiled once into --workdir. Prints medians with the spread (min..max) and writes JSON there.
"""
from __future__ import annotations

import argparse
import shutil
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine_info, measure, pin_threads, threads_from_argv  # noqa: E402

pin_threads(threads_from_argv(sys.argv))

import numpy as np  # noqa: E402


def _onnx_subset(src: Path, dst: Path) -> Path:
    """decode + prefill graphs only (links), so nothing compiles the verify graph."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("decode.onnx", "prefill.onnx", "SOURCE"):
        if (src / name).exists() and not (dst / name).exists():
            (dst / name).symlink_to((src / name).resolve())
    data = src / "weights.data"   # the graphs' shared weights: onnx refuses a symbolic or hard link there
    if data.exists() and not (dst / data.name).exists():
        shutil.copyfile(data, dst / data.name)
    return dst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--parent")
    ap.add_argument("--workdir", default="artifacts/bench-act")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    from tvm_anyprec import api
    from tvm_anyprec.compiler import compile_model
    from tvm_anyprec.runtime import Session

    wd = Path(args.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    onnx_dir = _onnx_subset(Path(args.onnx), wd / "onnx")
    parent = Path(args.parent) if args.parent else wd / "parent"
    if not (parent / "manifest.json").exists():
        api.quantize(parent, force=True)
    arts = {"W4A8 (int GEMM)": (wd / "w4a8", 4), "W4A4 o_proj + A8 (int GEMM)": (wd / "w4a4", 4),
            "W4A16 bitplane (any-precision, 4-bit)": (wd / "bitplane", 4), "fp32 (dense W^T)": (wd / "fp32", None)}
    if not (wd / "w4a8" / "manifest.json").exists():
        api.compile(onnx_dir, wd / "w4a8", act_bits=8, force=True)
    if not (wd / "w4a4" / "manifest.json").exists():
        api.compile(onnx_dir, wd / "w4a4", act_bits=4, force=True)
    if not (wd / "bitplane" / "manifest.json").exists():
        compile_model(onnx_dir, wd / "bitplane", parent=parent, force=True, tokenizer="smollm2")
    if not (wd / "fp32" / "manifest.json").exists():
        compile_model(onnx_dir, wd / "fp32", exclude=(".*",), force=True, require_rewrite=False, tokenizer="smollm2")

    ids = np.arange(1000, 1032, dtype=np.int64)   # one full prefill chunk (32 tokens)
    rows = []
    for label, (path, bits) in arts.items():
        sess = Session(path)
        b = bits if bits is not None else sess.bit_widths[-1]
        st = measure(lambda: sess.forward_tokens(ids, b), args.reps, warmup=2)
        rows.append({"config": label, **st})
        print(f"{label:<40} {st['median_s'] * 1e3:8.1f} ms  ({st['min_s'] * 1e3:.1f}..{st['max_s'] * 1e3:.1f})",
              flush=True)
    fp = rows[-1]["median_s"]
    print(f"\n| config | prefill 32 tokens, ms (median, min..max of {args.reps}) | vs fp32 |\n|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['median_s'] * 1e3:.1f} ({r['min_s'] * 1e3:.1f}..{r['max_s'] * 1e3:.1f}) "
              f"| {fp / r['median_s']:.2f}x |")
    out = {"machine": machine_info(args.threads), "rows": rows}
    (wd / "prefill_actquant.json").write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
