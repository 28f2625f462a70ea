"""tvm-anyprec command line: quantize | export | compile | tune | run | bench | eval | inspect.

`tvm-anyprec bench [--quick] ...` runs the benchmarks of the source checkout (python -m benchmarks)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .cli_generate import add_threads_arg


def _bits_list(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {s!r}")


def _target_help() -> str:
    """The presets and what each is, from the preset tables (no TVM import: --help stays fast)."""
    from .targets import GPU_PRESETS, PRESETS

    return ("; ".join(f"{n} ({desc})" for n, (_arch, desc, _mk) in {**PRESETS, **GPU_PRESETS}.items())
            + ". aarch64 presets cross-compile with aarch64-linux-gnu-g++; cuda-* need nvcc and run on an NVIDIA "
            "GPU; vulkan needs a TVM built with Vulkan")


MODEL_HELP = ("'smollm2' (the packaged SmolLM2-135M), 'gemma3-270m' (the packaged Gemma 3 270M), a .gguf file "
              "or a transformers model directory (what save_pretrained writes)")


def _add_exclude(p, what: str) -> None:
    p.add_argument("--exclude", action="append", default=None, help=f"{what} (repeatable; default: lm_head, "
                   "which also matches an embedding tied to it)")
    p.add_argument("--quantize-lm-head", action="store_true", help="quantize the lm_head too (a tied embedding "
                   "then decodes its rows from the same planes); see the README for what it costs in quality")


def _exclude(args, default=None):
    """The exclude patterns of --exclude / --quantize-lm-head (``default`` when neither is given)."""
    from .quant.patterns import DEFAULT_EXCLUDE

    pats = tuple(args.exclude) if args.exclude else (default if default is not None else DEFAULT_EXCLUDE)
    if args.quantize_lm_head or isinstance(getattr(args, "lm_head_bits", None), int):
        pats = tuple(p for p in (pats or ()) if p != "lm_head")
    return pats


def _lm_head_bits(v: str):
    """--lm-head-bits: "auto", "fp32" (None) or a bit-width."""
    if v in ("auto", "fp32"):
        return None if v == "fp32" else v
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, fp32 or a bit-width, got {v!r}") from None


def _add_quantize(sub):
    p = sub.add_parser("quantize", help="quantize a model into an any-precision parent (bitplanes + LUTs)")
    p.add_argument("--model", default="smollm2", help=MODEL_HELP)
    p.add_argument("--out", "-o", required=True, help="output directory (written atomically)")
    p.add_argument("--scheme", choices=["nonuniform", "uniform"], default="nonuniform")
    p.add_argument("--seed-bits", type=int, default=3, help="seed (smallest child) bit-width, 2..4")
    p.add_argument("--max-bits", type=int, default=8, help="parent bit-width, up to 8")
    p.add_argument("--group-size", type=int, default=128, help="uniform scheme: row-group size")
    p.add_argument("--calib-windows", type=int, default=8, help="calibration windows for the Fisher "
                   "sensitivity (0: plain k-means)")
    _add_exclude(p, "layer name pattern to keep in full precision")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")


def _add_eval(sub):
    p = sub.add_parser("eval", help="perplexity per bit-width (parent: torch reference; artifact: compiled)")
    p.add_argument("path", help="a parent directory (from quantize) or a compiled artifact (from compile)")
    p.add_argument("--bits", type=_bits_list, default=None, help="e.g. 3,4,8 (default: all)")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--no-baselines", action="store_true", help="skip the RTN 4-bit baseline (parent only)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    add_threads_arg(p)


def _add_export(sub):
    p = sub.add_parser("export", help="export a model to ONNX with a KV cache (decode.onnx, prefill.onnx, "
                       "verify*.onnx)")
    p.add_argument("--model", default="smollm2", help=MODEL_HELP)
    p.add_argument("--out", "-o", required=True)
    p.add_argument("--chunk", type=int, default=32, help="tokens per prefill call")
    p.add_argument("--max-len", type=int, default=None, help="KV cache length: the longest context (default: the "
                   "model's, at most 8192; a step costs what its position costs, not this)")
    p.add_argument("--verify-chunk", type=_bits_list, default=None, help="tokens per call of the verify graphs, the "
                   "verifying pass of self-speculative decoding, comma-separated (default 3,5: verify_3.onnx and "
                   "verify.onnx; a round runs the smallest that holds its drafts; 0: no verify graph)")
    _add_prune(p, "the prefill graph drops this fraction of each chunk's least-attended tokens (Agile-Quant "
               "token pruning; 0..1, default 0: none)")


def _add_prune(p, ratio_help: str) -> None:
    p.add_argument("--prune-ratio", type=float, default=None, help=ratio_help)
    p.add_argument("--prune-layer", type=int, default=None, help="first layer that processes fewer tokens "
                   "(1..layers-1; importance from the layer before; default: the middle layer)")


def _add_compile(sub):
    p = sub.add_parser("compile", help="ONNX (file or directory) or a model -> deployable artifact directory")
    p.add_argument("source", help="an .onnx file, a directory of .onnx files (from export), or a model "
                   "('smollm2', .gguf): then export and quantize run first when their outputs are missing")
    p.add_argument("--out", "-o", required=True)
    p.add_argument("--target", default="x86", help="target preset: " + _target_help())
    p.add_argument("--parent", help="any-precision parent from `quantize` (default: quantize the graph's "
                   "weights with plain k-means, or make one when compiling a model)")
    _add_exclude(p, "weight name pattern kept in fp32")
    p.add_argument("--tokenizer", help="model whose tokenizer `run`/`eval` use (default: from the parent)")
    p.add_argument("--input-shape", action="append", default=None, metavar="NAME=D0,D1,...",
                   help="static shape of a graph input with dynamic dimensions (repeatable; ONNX from elsewhere)")
    p.add_argument("--tuning-log", help="MetaSchedule database directory (default: tuning_logs/<target>/)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--lm-head-bits", type=_lm_head_bits, default="auto", help="quantize the tied lm_head/embedding "
                   "too and run it at this bit-width whatever --bits a call uses (8: about fp32's perplexity, a "
                   "quarter of its bytes per token); fp32: keep it fp32; auto (default): 7 on CPUs with the AVX-512 "
                   "bodies when the parent has the lm_head (one made by compile from a model does), else fp32")
    p.add_argument("--accuracy", choices=("int8", "exact"), default=None,
                   help="CPU bitplane kernel: int8 (the default: int8 activations per block of 32 x int16 "
                   "centroid tables; faster, within 0.5%% of exact's perplexity on SmolLM2) or exact (fp32 math on "
                   "the fp16 LUTs). GPU targets compute exactly")
    p.add_argument("--act-bits", type=int, choices=(8, 4), help="low-bit activations instead of any-precision "
                   "weights: INT4 weights x per-token INT8 activations (8), or INT4 activations after "
                   "self-attention (4); the artifact then runs at --bits 4 only")
    p.add_argument("--act-outlier", choices=("smooth", "none"), default="smooth",
                   help="activation outlier handling: power-of-two per-channel smoothing calibrated on text")
    p.add_argument("--act-int4-all", action="store_true", help="with --act-bits 4: INT4 activations everywhere")
    _add_prune(p, "token pruning in prefill (see export --prune-ratio): a model source is exported with it; "
               "ONNX graphs must have been exported with the same setting (checked)")


def _add_tune(sub):
    p = sub.add_parser("tune", help="auto-tune the model's kernels with MetaSchedule (XGBoost cost model)")
    p.add_argument("source", help="a compiled artifact, ONNX (file or directory) or a model ('smollm2'); a "
                   "compiled artifact's CPU bitplane kernels: measure their rows per task per bit-width on this CPU; "
                   "an artifact compiled with --act-bits for an ARM preset: measure its integer GEMM variants "
                   "(neon/sdot/smmla/packed) and keep the fastest per kernel")
    p.add_argument("--target", default="x86", help="target preset (records go to tuning_logs/<target>/)")
    p.add_argument("--trials", type=int, default=8, help="measured trials per distinct kernel; a second run "
                   "with the same budget reuses the records, a larger one adds the difference")
    p.add_argument("--log-dir", help="database directory (default: tuning_logs/<target>/ of this checkout)")
    p.add_argument("--only", help="tune only kernels whose name contains this text")
    _add_exclude(p, "weight name pattern kept in fp32, as compile's (their dense kernels are what x86 tunes)")
    p.add_argument("--space", choices=["project", "generic"], default="project", help="design space: the "
                   "project's linear-kernel space (tiling, vector widths, unroll) or MetaSchedule's generic rules")
    p.add_argument("--rpc-tracker", help="HOST:PORT of a TVM RPC tracker: measure on its devices")
    p.add_argument("--rpc-key", help="device key registered at the tracker")
    p.add_argument("--rpc-workers", type=int, default=1, help="parallel measurement sessions (devices)")


def _add_run(sub):
    p = sub.add_parser("run", help="generate text from an artifact at a bit-width chosen now (or, with "
                       "--inputs, run any compiled graph on arrays)")
    p.add_argument("artifact")
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--prompt", help="text to continue (language models)")
    p.add_argument("--inputs", help="a graph's inputs: .npz (arrays by input name) or .npy (the only input)")
    p.add_argument("--outputs", help="with --inputs: save the outputs here (.npz, by output name)")
    p.add_argument("--function", help="with --inputs: the graph to run (default: the only one)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    add_threads_arg(p)
    p.add_argument("--draft-bits", type=lambda v: v if v == "auto" else int(v),
                   help="self-speculative decoding: draft with this lower bit-width (same weights) and verify at "
                   "--bits; the output is plain greedy decoding at --bits. 'auto': draft bits and length chosen "
                   "from measured step, verify and acceptance costs (or plain decoding when that is faster)")
    p.add_argument("--draft-len", type=int, default=4, help="tokens drafted per round (speculative decoding)")
    p.add_argument("--max-ms-per-token", type=float, help="latency budget: the precision policy picks the "
                   "highest bit-width whose measured step time fits (re-chosen every step); overrides --bits")
    p.add_argument("--max-bytes-per-token", type=float, help="weight bytes read per token budget for the policy")
    from .cli_generate import add_chat_args, add_sampling_args
    add_chat_args(p)
    add_sampling_args(p)
    p.add_argument("--profile", action="store_true", help="instead of generating: time every operator of a "
                   "decode step (after the prompt) and of a prefill chunk at --bits, and print where time goes")
    p.add_argument("--profile-json", help="with --profile: also write the report here (JSON)")
    p.add_argument("--remote", help="run on another device: 'qemu' or 'qemu:<cpu>' (the emulated aarch64 board "
                   "of scripts/setup_arm.sh; the default for an aarch64 artifact on x86) or HOST:PORT of a TVM "
                   "RPC server on the device")


def _shapes(items) -> dict | None:
    if not items:
        return None
    out = {}
    for it in items:
        name, _, dims = it.rpartition("=")
        try:
            out[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            raise ValueError(f"--input-shape {it!r}: expected NAME=D0,D1,... with integer dimensions") from None
        if not name or any(d <= 0 for d in out[name]):
            raise ValueError(f"--input-shape {it!r}: expected NAME=D0,D1,... with positive dimensions")
    return out


def _run_arrays(api, args) -> None:
    import numpy as np

    sess = api.load(args.artifact, args.remote)
    path = Path(args.inputs)
    if not path.exists():
        raise FileNotFoundError(f"--inputs {path} not found")
    if path.suffix == ".npz":
        with np.load(path) as z:
            inputs = {k: z[k] for k in z.files}
    else:
        inputs = [np.load(path)]
    t0 = time.time()
    out = sess.run(inputs, args.bits, args.function)
    dt = time.time() - t0
    for name, a in out.items():
        print(f"{name}: {a.dtype} {list(a.shape)}  mean {float(np.mean(a)):.6g}  std {float(np.std(a)):.6g}")
    if args.outputs:
        np.savez(args.outputs, **out)
        print(f"saved {', '.join(out)} to {args.outputs}", file=sys.stderr)
    print(f"[{args.bits}-bit; {dt * 1e3:.1f} ms]", file=sys.stderr)


def _tune(args) -> None:
    from . import api
    from .env import default_log_dir
    from .tune import RPC, VARIANTS_FILE

    rpc = RPC.parse(args.rpc_tracker, args.rpc_key, args.rpc_workers) if args.rpc_tracker else None
    log_dir = args.log_dir or default_log_dir(args.target)
    t0 = time.time()
    if api.is_act_artifact(args.source):       # low-bit activations: choose among the integer GEMM variants
        rows = api.tune_variants(args.source, args.target, log_dir, rpc=rpc)
        print(f"{'kernel':<40}{'variant':>8}  measured ms per variant")
        for r in rows:
            print(f"{r['kernel']:<40}{r['variant']:>8}  " + ", ".join(f"{v} {t:.3f}" for v, t in r["ms"].items()))
        print(f"chose variants for {len(rows)} kernels in {time.time() - t0:.0f}s; in {log_dir}/"
              f"{VARIANTS_FILE} (compile --target {args.target} applies them)", file=sys.stderr)
        return
    if _tune_bitplane_rows(args, log_dir):   # an artifact with only bitplane kernels: nothing for MetaSchedule
        return
    try:
        rows = api.tune(args.source, args.target, args.trials, log_dir, rpc=rpc, only=args.only, space=args.space,
                        exclude=_exclude(args))
    except KeyboardInterrupt:
        print(f"tvm-anyprec tune: interrupted; finished records are kept in {log_dir}: run the same command "
              "again to resume", file=sys.stderr)
        raise
    print(f"{'kernel':<40}{'records':>8}{'new':>6}{'best ms':>10}")
    for r in rows:
        print(f"{r['kernel']:<40}{r['records']:>8}{r['trials_now']:>6}{r['best_ms']:>10.3f}"
              + ("  (reused)" if r["reused"] else ""))
    print(f"tuned {len(rows)} kernels in {time.time() - t0:.0f}s; records in {log_dir} "
          f"(compile --target {args.target} applies them)", file=sys.stderr)


def _tune_bitplane_rows(args, log_dir) -> bool:
    """A compiled artifact's CPU bitplane kernels: measure their rows per task (``tune.bitplane``). Returns True
    when the artifact has no kernel with a MetaSchedule space left to tune."""
    from .tune.bitplane import artifact_specs, tune_bitplane_rows
    from .tune.records import ROWS_FILE

    specs = {k: s for k, s in artifact_specs(args.source).items() if not args.only or args.only in k}
    bitplane = {k: s for k, s in specs.items() if s.family == "anyprec_cpu"}
    if not bitplane:
        return False
    t0 = time.time()
    print(f"{'bitplane kernel':<52}rows per task by bit-width (us per call, cold: rows=1 / 2 / 4)")
    for r in tune_bitplane_rows(bitplane, args.target, log_dir):
        print(f"{r['kernel']:<52}" + "  ".join(
            f"{b}:{n} (" + "/".join(f"{t:.0f}" for t in r["us"][b].values()) + ")" for b, n in r["rows"].items()))
    print(f"measured {len(bitplane)} bitplane kernels in {time.time() - t0:.0f}s; in {log_dir}/{ROWS_FILE} "
          f"(compile --target {args.target} applies them)", file=sys.stderr)
    return not any(s.family in ("anyprec_linear", "dense_nt") for s in specs.values())


def _run_summary(args, stats: dict) -> str:
    """The policy run's summary line (plain and speculative runs print generate.Stats.line)."""
    steps = stats.get("steps")
    if steps:
        used = sorted({b for b, _ in steps})
        ms = sum(t for _, t in steps) / len(steps)
        return f"policy chose {','.join(map(str, used))}-bit, {ms:.1f} ms/step"
    return f"{args.bits}-bit"


def _bench(rest: list[str]) -> int:
    """`bench`: the benchmarks entry point of the source checkout (python -m benchmarks), run as a child so
    that its thread settings take effect before numpy loads."""
    import subprocess

    from .env import benchmarks_dir

    bench = benchmarks_dir()
    if bench is None:
        print("tvm-anyprec bench: error: the benchmarks live in the source checkout (benchmarks/), which this "
              "installation does not have: run it from a clone of the repository", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, "-m", "benchmarks", *rest], cwd=bench.parent)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:        # everything after `bench` belongs to the benchmarks' own parser
        return _bench(argv[1:])
    ap = argparse.ArgumentParser(prog="tvm-anyprec", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    _add_quantize(sub)
    _add_export(sub)
    _add_compile(sub)
    _add_tune(sub)
    _add_run(sub)
    from .cli_generate import add_chat_verb, add_serve_verb
    add_chat_verb(sub)
    add_serve_verb(sub)
    _add_eval(sub)
    p = sub.add_parser("inspect", help="print an artifact's manifest after verifying its checksums")
    p.add_argument("path")
    args = ap.parse_args(argv)

    from . import api
    if getattr(args, "threads", None) is not None:
        from .env import set_threads
        set_threads(args.threads)
    from .errors import AnyPrecError

    try:
        if args.cmd == "quantize":
            parent, _ = api.quantize(args.out, model=args.model, scheme=args.scheme, seed_bits=args.seed_bits,
                                     max_bits=args.max_bits, group_size=args.group_size,
                                     calib_windows=args.calib_windows, exclude=_exclude(args),
                                     force=args.force)
            print(api.format_memory_report(parent))
        elif args.cmd == "export":
            api.export(args.out, model=args.model, chunk=args.chunk, max_len=args.max_len,
                       verify_chunk=args.verify_chunk, prune_ratio=args.prune_ratio or 0.0,
                       prune_layer=args.prune_layer)
        elif args.cmd == "compile":
            api.compile(args.source, args.out, target=args.target, parent=args.parent,
                        exclude=_exclude(args) if args.exclude or args.quantize_lm_head or
                        isinstance(args.lm_head_bits, int) else None,
                        force=args.force, tuning_log=args.tuning_log, tokenizer=args.tokenizer,
                        act_bits=args.act_bits, act_outlier=args.act_outlier, act_int4_all=args.act_int4_all,
                        prune_ratio=args.prune_ratio, prune_layer=args.prune_layer, accuracy=args.accuracy,
                        input_shapes=_shapes(args.input_shape), lm_head_bits=args.lm_head_bits)
        elif args.cmd == "tune":
            _tune(args)
        elif args.cmd == "run" and args.inputs:
            _run_arrays(api, args)
        elif args.cmd == "run":
            if not args.prompt:
                raise ValueError("give --prompt (text generation) or --inputs (arrays for any graph)")
            sess = api.load(args.artifact, args.remote)
            sess.check_bits(args.bits)
            if args.profile:
                from .profile import profile_model
                reports = profile_model(sess, args.bits, sess.tokenizer(args.prompt)["input_ids"])
                print("\n\n".join(r.format() for r in reports))
                if args.profile_json:
                    with open(args.profile_json, "w") as f:
                        json.dump([r.to_dict() for r in reports], f, indent=1)
                return 0
            if args.max_ms_per_token is not None or args.max_bytes_per_token is not None:
                stats = {}
                t0 = time.time()
                text = sess.generate(args.prompt, args.max_new_tokens, args.bits, args.draft_bits, args.draft_len,
                                     args.max_ms_per_token, args.max_bytes_per_token, stats=stats)
                print(args.prompt + text)
                print(f"[{_run_summary(args, stats)}; {time.time() - t0:.1f}s]", file=sys.stderr)
            else:
                from .cli_generate import run_text
                return run_text(sess, args)
        elif args.cmd in ("chat", "serve"):
            from . import cli_generate
            if args.cmd == "serve":
                return cli_generate.serve(args)
            return cli_generate.chat(api.load(args.artifact), args)
        elif args.cmd == "eval":
            rows = api.evaluate(args.path, args.bits, args.windows, args.seqlen, baselines=not args.no_baselines)
            print(api.format_table(rows))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)
        elif args.cmd == "inspect":
            print(json.dumps(api.inspect(args.path), indent=1))
    except (AnyPrecError, FileNotFoundError, ValueError) as e:
        print(f"tvm-anyprec {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tvm-anyprec {args.cmd}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
