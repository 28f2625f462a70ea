"""Whole-model speed against llama.cpp on the same GGUF file, in llama-bench's method and columns.

    python -m benchmarks.llamacpp [--artifact ART] [--rounds 3] [--threads 2] [--bits 3,4,8] [--no-ort]
                                  [--lm-head-bits 8]

llama.cpp's `llama-bench` (built by scripts/setup_llamacpp.sh from the PyPI llama-cpp-python sdist) runs on
the GGUF the artifact's parent came from; tvm-anyprec runs the artifact at each bit-width; onnxruntime fp32
and MatMulNBits 4-bit run our exported graphs (a 512-position cache, see benchmarks.model). Same threads for
all. Rounds are interleaved (llama-bench -r 1, then each of ours, then onnxruntime), so a noisy neighbour hits
every row alike. Reported like llama-bench: tokens/s mean +- sd over the rounds, for

  pp512   a 512-token prompt from an empty cache (ours: 16 calls of the 32-token prefill graph)
  tg128   128 tokens generated one at a time from an empty cache (one decode call per token)

and the ratio of each row to llama.cpp. Writes benchmarks/results/llamacpp-<date>.json; prints a table. Without
llama-bench it says so and measures the rest.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .common import DEFAULT_THREADS, machine_info, pin_threads, threads_from_argv

PP, TG = 512, 128


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def llama_bench(binary: Path, gguf: Path, threads: int, pp: int = PP, tg: int = TG) -> dict:
    """One llama-bench run (-r 1): {"pp512": tokens/s, "tg128": tokens/s, "info": its own fields}."""
    cmd = [str(binary), "-m", str(gguf), "-t", str(threads), "-p", str(pp), "-n", str(tg), "-r", "1",
           "-o", "json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({r.returncode}): {r.stderr[-2000:]}")
    out = {}
    for e in json.loads(r.stdout):
        key = f"pp{e['n_prompt']}" if e["n_gen"] == 0 else f"tg{e['n_gen']}"
        out[key] = float(e["avg_ts"])
        out["info"] = {k: e.get(k) for k in ("build_commit", "model_type", "model_size", "model_n_params",
                                             "backends", "cpu_info", "n_threads", "type_k", "n_batch")}
    return out


def ours_pp(sess, bits: int, n: int = PP) -> float:
    import numpy as np

    ids = np.random.default_rng(0).integers(100, 20000, n)
    cache = sess.empty_cache(sess._chunk_fn())
    t0 = time.perf_counter()
    sess.forward_tokens(ids, bits, cache=cache, logits="last")   # like llama-bench: the last token's logits only
    return n / (time.perf_counter() - t0)


def ours_tg(sess, bits: int, n: int = TG) -> float:
    cache = sess.empty_cache("decode")
    t0 = time.perf_counter()
    tok = 1
    for pos in range(n):
        lg, cache = sess.decode_step(tok, pos, cache, bits)
        tok = int(lg.argmax())
    return n / (time.perf_counter() - t0)


def ort_rows(wd: Path, threads: int):
    """{label: (pp512 fn, tg128 fn)} for onnxruntime fp32 and 4-bit (block 128, accuracy 4) on our graphs."""
    import numpy as np

    from tvm_anyprec import api

    from .model import CACHE_LEN, _ort_feeds, ort_chunk, ort_graph, ort_label, ort_session

    onnx_dir = wd / "onnx"
    if not all((onnx_dir / f"{g}.onnx").exists() for g in ("decode", "prefill")):
        log(f"  exporting ONNX with a {CACHE_LEN}-position cache for onnxruntime ...")
        api.export(onnx_dir, max_len=CACHE_LEN)
    rows = {}
    for cfg in (None, (4, 128, 4)):
        dec = ort_session(ort_graph(wd, onnx_dir, "decode", cfg, log), threads)
        pre = ort_session(ort_graph(wd, onnx_dir, "prefill", cfg, log), threads)

        def pp(pre=pre):
            chunk = ort_chunk(pre)
            ids = np.random.default_rng(0).integers(100, 20000, PP)
            t0 = time.perf_counter()
            for start in range(0, PP, chunk):
                pre.run(None, _ort_feeds(pre, ids[start:start + chunk], start))
            return PP / (time.perf_counter() - t0)

        def tg(dec=dec):
            feeds = _ort_feeds(dec, np.array([1]), 0)
            names = [o.name for o in dec.get_outputs()]
            t0 = time.perf_counter()
            for pos in range(TG):
                feeds["pos"] = np.array([pos], np.int64)
                outs = dec.run(None, feeds)
                for n, o in zip(names[1:], outs[1:]):   # the caches it returns feed the next step
                    if n in feeds:
                        feeds[n] = o
                feeds["input_ids"] = np.array([[int(outs[0][0, -1].argmax())]], np.int64)
            return TG / (time.perf_counter() - t0)

        rows[ort_label(cfg)] = (pp, tg)
    return rows


def _summary(samples: list[float]) -> dict:
    return {"mean": statistics.fmean(samples), "sd": statistics.stdev(samples) if len(samples) > 1 else 0.0,
            "samples": samples}


def measure_rounds(sessions, bits, rounds: int, binary, gguf, threads: int, ort: dict, pp: int = PP,
                   tg: int = TG):
    """Interleaved rounds of llama-bench (when built), ours per artifact (``sessions``: a Session, or
    [(label suffix, Session)]) and bit-width, and onnxruntime -> (rows, llama-bench info). Rows: {"config", "test",
    "tokens_per_s": {mean, sd, samples}, "vs_llama_cpp": per-round ratios}."""
    samples: dict = {}
    info = None
    sessions = [("", sessions)] if not isinstance(sessions, list) else sessions
    ptest, ttest = f"pp{pp}", f"tg{tg}"
    for r in range(rounds):
        log(f"[round {r + 1}/{rounds}]")
        if binary is not None:
            lb = llama_bench(binary, gguf, threads, pp, tg)
            info = lb.pop("info")
            for k, v in lb.items():
                samples.setdefault(("llama.cpp", k), []).append(v)
            log(f"  llama.cpp: {ptest} {lb.get(ptest, 0):.1f}, {ttest} {lb.get(ttest, 0):.1f} tokens/s")
        for suffix, sess in sessions:
            for b in bits:
                p, t = ours_pp(sess, b, pp), ours_tg(sess, b, tg)
                label = f"tvm-anyprec {b}-bit{suffix}"
                samples.setdefault((label, ptest), []).append(p)
                samples.setdefault((label, ttest), []).append(t)
                log(f"  {label}: {ptest} {p:.1f}, {ttest} {t:.1f} tokens/s")
        for label, (ppf, tgf) in ort.items():
            p, t = ppf(), tgf()
            samples.setdefault((label, ptest), []).append(p)
            samples.setdefault((label, ttest), []).append(t)
            log(f"  {label}: {ptest} {p:.1f}, {ttest} {t:.1f} tokens/s")
    rows = []
    for (cfg, test), s in samples.items():
        row = {"config": cfg, "test": test, "tokens_per_s": _summary(s)}
        ref = samples.get(("llama.cpp", test))
        if ref and cfg != "llama.cpp":
            row["vs_llama_cpp"] = _summary([a / b for a, b in zip(s, ref)])   # per round, measured side by side
        rows.append(row)
    return rows, info


def lm_head_of(manifest: dict):
    """The bit-width an artifact pins its tied lm_head at (None: fp32 or not pinned)."""
    return next((e["bits"] for e in manifest.get("layers", {}).values() if e.get("embedding") and "bits" in e), None)


def default_artifact(workdir, lm_head="auto") -> Path:
    """The artifact these benchmarks run: <workdir>/anyprec-x86, compiled from smollm2 with compile's defaults
    when missing (or when its lm_head differs from what the default gives on this CPU); ``lm_head`` B:
    anyprec-x86-lm<B>, the lm_head quantized and run at B bits; "fp32": anyprec-x86-lmfp32 (each its own parent)."""
    from tvm_anyprec import api
    from tvm_anyprec.artifact import read_manifest
    from tvm_anyprec.schemes.anyprec import auto_lm_head_bits

    art = Path(workdir) / ("anyprec-x86" + ("" if lm_head == "auto" else f"-lm{lm_head}"))
    stale = lm_head == "auto" and (art / "manifest.json").exists() and \
        lm_head_of(read_manifest(art, verify=False)) != auto_lm_head_bits("x86")
    if stale or not (art / "manifest.json").exists():
        log(f"compiling {art} from smollm2 (once; several minutes) ...")
        kw = {} if lm_head == "auto" else {"lm_head_bits": None} if lm_head == "fp32" else \
            {"exclude": (), "lm_head_bits": int(lm_head)}
        api.compile("smollm2", art, force=stale, **kw)
    return art


def gguf_of(sess) -> Path:
    """The GGUF an artifact's parent came from (the packaged SmolLM2 file when it records none)."""
    from tvm_anyprec import data

    src = (sess.manifest.get("parent") or {}).get("model")
    p = Path(str(src)) if src else None
    if p is None or p.suffix != ".gguf" or not p.exists():
        name = data.packaged_name(src) if src else None
        p = Path(data.resolve_model(name)) if name else data.smollm2_path()
    return p


QUICK_PP, QUICK_TG = 128, 32


def quick(threads: int, workdir="artifacts/bench-llamacpp", bits=(3, 4, 8)) -> dict:
    """``bench --quick``'s whole-model lines: prefill (pp128) and decode (tg32) tokens/s per bit-width, one
    round, and llama.cpp's on the same GGUF with the ratios when llama-bench is built (else a note saying how
    to build it). -> {"tokens_per_s": {config: {test: t/s}}, "vs_llama_cpp": {...}, "llama_cpp": ...}"""
    from tvm_anyprec.env import llama_bench as find_llama_bench
    from tvm_anyprec.runtime import Session

    sess = Session(default_artifact(workdir))
    binary = find_llama_bench()
    rows, info = measure_rounds(sess, list(bits), 1, binary, gguf_of(sess), threads, {}, QUICK_PP, QUICK_TG)
    out = {"tokens_per_s": {}, "vs_llama_cpp": {}}
    for r in rows:
        out["tokens_per_s"].setdefault(r["config"], {})[r["test"]] = round(r["tokens_per_s"]["mean"], 2)
        if "vs_llama_cpp" in r:
            out["vs_llama_cpp"].setdefault(r["config"], {})[r["test"]] = round(r["vs_llama_cpp"]["mean"], 3)
    out["llama_cpp"] = "llama-bench " + str((info or {}).get("build_commit")) if binary is not None else \
        "not set up: bash scripts/setup_llamacpp.sh builds llama-bench (about 7 minutes)"
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m benchmarks.llamacpp", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", default=None, help="compiled artifact (default: <workdir>/anyprec-x86, "
                    "compiled from smollm2 when missing)")
    ap.add_argument("--gguf", default=None, help="the GGUF llama.cpp runs (default: the artifact's source)")
    ap.add_argument("--bits", default="3,4,5,6,7,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    ap.add_argument("--no-ort", action="store_true", help="leave out the onnxruntime rows")
    ap.add_argument("--lm-head-bits", default=None, help="also an artifact with the lm_head quantized and pinned "
                    "at this bit-width (compile --lm-head-bits), rows '<b>-bit, lm_head <B>-bit'; fp32: one with the "
                    "lm_head in fp32")
    ap.add_argument("--workdir", default="artifacts/bench-llamacpp")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)

    from tvm_anyprec.env import llama_bench as find_llama_bench
    from tvm_anyprec.runtime import Session

    wd = Path(args.workdir)
    art = Path(args.artifact) if args.artifact else default_artifact(wd)
    sess = Session(art)
    gguf = Path(args.gguf) if args.gguf else gguf_of(sess)
    binary = find_llama_bench()
    if binary is None:
        log("llama-bench is not built (bash scripts/setup_llamacpp.sh): measuring tvm-anyprec and onnxruntime only")
    bits = [int(b) for b in args.bits.split(",")]
    ort = {} if args.no_ort else ort_rows(wd, args.threads)
    sessions = [("", sess)]
    if args.lm_head_bits:
        label = "fp32" if args.lm_head_bits == "fp32" else f"{int(args.lm_head_bits)}-bit"
        sessions.append((f", lm_head {label}", Session(default_artifact(wd, args.lm_head_bits))))
    rows, info = measure_rounds(sessions, bits, args.rounds, binary, gguf, args.threads, ort)
    result = {"machine": machine_info(args.threads), "command": "python -m benchmarks.llamacpp " + " ".join(argv),
              "method": "llama-bench -r 1 per round (pp512, tg128); ours: forward_tokens of 512 tokens (logits of the "
                        "last token only, as llama-bench: the chunks before the last run prefill_cache when the "
                        "artifact has it) / 128 decode_step calls from an empty cache; rounds interleaved; "
                        "tokens/s mean +- sd",
              "artifact": str(art), "gguf": str(gguf), "llama_bench": str(binary) if binary else None,
              "llama_bench_info": info, "rounds": args.rounds, "rows": rows,
              "artifact_layers_fp32": sorted(sess.manifest.get("kept_fp32", {})),
              "artifact_lm_head_bits": lm_head_of(sess.manifest)}
    out = Path(args.out) / f"llamacpp-{time.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(format_table(rows))
    log(f"wrote {out}")
    return 0


def format_table(rows: list[dict]) -> str:
    lines = [f"| {'config':<34} | {'test':>6} | {'t/s':>16} | {'vs llama.cpp':>14} |",
             f"| {'-' * 34} | {'-' * 6}:| {'-' * 16}:| {'-' * 14}:|"]
    for r in rows:
        t = r["tokens_per_s"]
        v = r.get("vs_llama_cpp")
        lines.append(f"| {r['config']:<34} | {r['test']:>6} | {t['mean']:>8.2f} +- {t['sd']:<5.2f} | "
                     + (f"{v['mean']:>6.2f} +- {v['sd']:<4.2f}" if v else f"{'':>14}") + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    pin_threads(threads_from_argv(sys.argv[1:]))
    sys.exit(main())
