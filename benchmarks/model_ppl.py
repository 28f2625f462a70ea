"""Perplexity per bit-width of any model source, compiled vs torch on the same dequantized weights (one run).

    python -m benchmarks.model_ppl --model gemma3-270m [--windows 4] [--seqlen 128] [--modes exact,int8]

Quantizes the model into an any-precision parent (Fisher from the calibration text, as ``quantize`` does),
evaluates it in torch (fp32, then each child's dequantized weights swapped in), exports the prefill graph only
(the perplexity windows need no decode graph) with a cache of one window, compiles it with the parent and
evaluates the artifact on the same windows, once per CPU accuracy mode (``--modes``). Writes
``benchmarks/results/ppl-<model>-<date>.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--calib-windows", type=int, default=4)
    ap.add_argument("--workdir", default="artifacts/ppl")
    ap.add_argument("--recompile", action="store_true", help="compile the artifacts again (after a kernel or table "
                    "change: a kept artifact measures the source that built it)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--modes", default="exact,int8", help="CPU accuracy modes, one artifact each (default both)")
    args = ap.parse_args(argv)

    from tvm_anyprec import api, data
    from tvm_anyprec.frontend.export import export_onnx
    from tvm_anyprec.runtime import Session

    name = str(args.model).replace("/", "_")
    wd = Path(args.workdir) / name
    parent, onnx = wd / "parent", wd / "onnx" / "prefill.onnx"
    modes = [m for m in args.modes.split(",") if m]
    t0 = time.time()
    if not (parent / "manifest.json").exists():
        log(f"quantizing {args.model} ...")
        api.quantize(parent, model=args.model, calib_windows=args.calib_windows, force=True)
    torch_rows = api.eval_torch(parent, windows=args.windows, seqlen=args.seqlen, baselines=False)
    if not onnx.exists():
        model, _ = data.load_model(args.model)
        export_onnx(model, onnx, 32, args.seqlen)
        (onnx.parent / api.SOURCE_MARKER).write_text(str(data.resolve_model(args.model)) + "\n")
        del model
    fp32 = next(r["ppl"] for r in torch_rows if r["config"] == "fp32")
    rows = [{"bits": r["bits"], "torch_dequantized": r["ppl"]} for r in torch_rows if r["bits"] != 32]
    for mode in modes:
        art = wd / f"art-{mode}"
        if args.recompile or not (art / "manifest.json").exists():   # a kept artifact has the kernels and tables
            api.compile(onnx, art, parent=parent, force=True, accuracy=mode)   # of the source that compiled it
        sess = Session(art)
        ids = data.token_windows(sess.tokenizer, data.EVAL_TEXT, args.windows, args.seqlen)
        for r in rows:
            r[mode] = sess.perplexity(ids, r["bits"])
            r[f"{mode}_vs_torch"] = r[mode] / r["torch_dequantized"] - 1
            if mode != modes[0]:
                r[f"{mode}_vs_{modes[0]}"] = r[mode] / r[modes[0]] - 1
        del sess
    print(f"{args.model}: perplexity on {data.EVAL_TEXT}, {args.windows} x {args.seqlen} tokens; torch fp32 {fp32:.3f}")
    print(f"{'bits':>5}{'torch (dequantized)':>21}" + "".join(f"{m:>11}" for m in modes) +
          "".join(f"{m + ' vs ' + modes[0]:>16}" for m in modes[1:]))
    for r in rows:
        print(f"{r['bits']:>5}{r['torch_dequantized']:>21.3f}" + "".join(f"{r[m]:>11.3f}" for m in modes) +
              "".join(f"{r[f'{m}_vs_{modes[0]}'] * 100:>+15.2f}%" for m in modes[1:]))
    out = Path(args.out) / f"ppl-{name}-{time.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "windows": args.windows, "seqlen": args.seqlen,
                               "torch_fp32": fp32, "rows": rows, "modes": modes,
                               "wall_s": time.time() - t0}, indent=1))
    log(f"wrote {out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
