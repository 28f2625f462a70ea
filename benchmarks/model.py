"""Whole-model rows on the real model (SmolLM2-135M): decode tokens/s and prefill latency per bit-width vs
onnxruntime fp32 / 4-bit / 8-bit, perplexity vs bits (ours, ORT 4-bit, RTN) and memory vs bits.

Everything it needs is made once under ``workdir`` (default artifacts/bench, shared with decode_latency.py):
the ONNX export, the any-precision parent, the compiled artifacts (bitplane and fp32), and the onnxruntime
MatMulNBits graphs (onnxruntime's own quantizer on the exported graphs, lm_head kept in fp32 like ours).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from .common import measure

# onnxruntime weight-only configs for the whole model: (bits, block, accuracy_level). accuracy_level 4
# (int8 activations) is the setting onnxruntime's own LLM tooling uses for CPU int4.
ORT_MODEL_CONFIGS = [(4, 32, 4), (4, 128, 4), (8, 128, 4)]
KEEP_FP32 = ("lm_head", "embed_tokens")   # tied embedding / lm_head stays fp32 in both stacks


def ort_label(cfg) -> str:
    return "onnxruntime fp32" if cfg is None else f"onnxruntime {cfg[0]}-bit b{cfg[1]} acc{cfg[2]}"


CACHE_LEN = 512

# ----------------------------------------------------------------------------- artifacts
def ensure_artifacts(wd: Path, log=print) -> dict:
    from tvm_anyprec import api
    from tvm_anyprec.compiler import compile_model

    onnx_dir, parent, art, fp32_art = wd / "onnx", wd / "parent", wd / "anyprec-x86", wd / "fp32-x86"
    if not all((onnx_dir / f"{g}.onnx").exists() for g in ("decode", "prefill")):
        log("  exporting ONNX ...")
        # a 512-position cache: onnxruntime runs the attention op's dense definition (every row, and a copy
        # of the cache per call), so its rows compare fairly only at a short cache (ours: benchmarks.kv_cache)
        api.export(onnx_dir, max_len=CACHE_LEN)
    if not (parent / "manifest.json").exists():
        log("  quantizing the parent ...")
        api.quantize(parent, force=True, progress=False)
    if not (art / "manifest.json").exists():
        log("  compiling the bitplane artifact ...")
        api.compile(onnx_dir, art, parent=parent, force=True)
    if not (fp32_art / "manifest.json").exists():
        log("  compiling the fp32 artifact ...")
        compile_model(onnx_dir, fp32_art, exclude=(".*",), force=True, require_rewrite=False, tokenizer="smollm2")
    return {"onnx": onnx_dir, "parent": parent, "anyprec": art, "fp32": fp32_art}


def fold_weight_transposes(model):
    """Transpose(initializer [N, K]) -> MatMul becomes an initializer [K, N] (MatMulNBitsQuantizer only takes
    constant MatMul weights). The source initializer is dropped when nothing else reads it."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    folded = []
    for node in list(model.graph.node):
        if node.op_type != "Transpose" or node.input[0] not in inits:
            continue
        perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
        arr = numpy_helper.to_array(inits[node.input[0]])
        if arr.ndim != 2 or (perm and perm[0] != [1, 0]):
            continue
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(arr.T), node.output[0]))
        model.graph.node.remove(node)
        folded.append(node.input[0])
    used = {i for n in model.graph.node for i in n.input}
    for name in set(folded) - used:
        model.graph.initializer.remove(inits[name])
    return model


def ort_graph(wd: Path, onnx_dir: Path, graph: str, cfg, log=print) -> Path:
    """Path of the ONNX graph for an onnxruntime config (None = the exported fp32 graph); the MatMulNBits
    graph is made once and cached under ``wd/ort``."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    src = onnx_dir / f"{graph}.onnx"
    if cfg is None:
        return src
    bits, block, acc = cfg
    dst = wd / "ort" / f"{graph}-q{bits}-b{block}-acc{acc}.onnx"
    if dst.exists() and dst.stat().st_mtime > src.stat().st_mtime:
        return dst
    log(f"  quantizing {graph}.onnx with onnxruntime's MatMulNBitsQuantizer ({bits}-bit, block {block}) ...")
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    model = fold_weight_transposes(onnx.load(str(src)))
    keep = [n.name for n in model.graph.node if n.op_type == "MatMul" and any(k in n.name for k in KEEP_FP32)]
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=False,
                             accuracy_level=acc or None, nodes_to_exclude=keep)
    q.process()
    n_q = sum(n.op_type == "MatMulNBits" for n in q.model.model.graph.node)
    if n_q == 0:
        raise RuntimeError(f"MatMulNBitsQuantizer quantized no MatMul of {src}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    onnx.save(q.model.model, str(tmp))
    tmp.replace(dst)
    log(f"    {n_q} MatMulNBits nodes, kept fp32: {keep}")
    return dst


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _ort_feeds(s, ids: np.ndarray, pos: int) -> dict:
    feeds = {}
    for i in s.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = ids.reshape(1, -1).astype(np.int64)
        elif i.name == "pos":
            feeds[i.name] = np.array([pos], np.int64)
        else:
            feeds[i.name] = np.zeros(i.shape, np.float32)
    return feeds


def ort_chunk(s) -> int:
    return int(next(i for i in s.get_inputs() if i.name == "input_ids").shape[1])


# ----------------------------------------------------------------------------- latency
def time_ours(sess, bits: int, steps: int, prefill_reps: int) -> dict:
    """Decode: ``steps`` timed steps (each feeds the previous step's cache) after a short prompt;
    prefill: one call of the prefill graph (one chunk of tokens) from position 0."""
    ids = np.arange(100, 108)
    _, cache = sess.forward_tokens(ids, bits, logits="last")
    state = {"pos": len(ids), "cache": cache}

    def step():
        _, state["cache"] = sess.decode_step(42, state["pos"], state["cache"], bits)
        state["pos"] += 1

    dec = measure(step, steps, warmup=3)
    chunk = sess.spec("prefill")["chunk"]
    buf = np.arange(200, 200 + chunk, dtype=np.int64).reshape(1, chunk)
    empty = sess.empty_cache("prefill")
    pre = measure(lambda: sess.call("prefill", [buf, np.array([0], np.int64), *empty], bits), prefill_reps, warmup=1)
    return {"decode": dec, "prefill": pre, "prefill_tokens": chunk}


def time_ort(decode_path: Path, prefill_path: Path, threads: int, steps: int, prefill_reps: int) -> dict:
    s = ort_session(decode_path, threads)
    feeds = _ort_feeds(s, np.array([42]), 8)
    dec = measure(lambda: s.run(None, feeds), steps, warmup=3)
    del s
    s = ort_session(prefill_path, threads)
    chunk = ort_chunk(s)
    feeds = _ort_feeds(s, np.arange(200, 200 + chunk), 0)
    pre = measure(lambda: s.run(None, feeds), prefill_reps, warmup=1)
    return {"decode": dec, "prefill": pre, "prefill_tokens": chunk}


def _latency_row(config: str, bits, r: dict) -> dict:
    d, p = r["decode"], r["prefill"]
    return {"config": config, "bits": bits, "decode": d, "decode_tokens_per_s": 1.0 / d["median_s"],
            "prefill": p, "prefill_tokens": r["prefill_tokens"],
            "prefill_tokens_per_s": r["prefill_tokens"] / p["median_s"]}


def bench_latency(wd: Path, threads: int, steps: int = 16, prefill_reps: int = 5, plain_tvm: bool = False,
                  log=print) -> list[dict]:
    from tvm_anyprec.runtime import Session

    paths = ensure_artifacts(wd, log)
    rows = []
    sess = Session(paths["anyprec"])
    for b in sess.bit_widths:
        rows.append(_latency_row(f"tvm-anyprec {b}-bit", b, time_ours(sess, b, steps, prefill_reps)))
        _log_latency(rows[-1], log)
    del sess
    fp = Session(paths["fp32"])
    rows.append(_latency_row("TVM fp32 (our pipeline, dense W^T)", 32,
                             time_ours(fp, fp.bit_widths[-1], steps, prefill_reps)))
    _log_latency(rows[-1], log)
    del fp
    if plain_tvm:
        from .decode_latency import bench_plain_tvm

        med, lo, hi = bench_plain_tvm(paths["onnx"] / "decode.onnx", 3, threads)
        rows.append({"config": "TVM fp32 (plain tvm.compile)", "bits": 32,
                     "decode": {"median_s": med, "min_s": lo, "max_s": hi, "n": 3},
                     "decode_tokens_per_s": 1 / med})
    for cfg in [None] + ORT_MODEL_CONFIGS:
        dec = ort_graph(wd, paths["onnx"], "decode", cfg, log)
        pre = ort_graph(wd, paths["onnx"], "prefill", cfg, log)
        rows.append(_latency_row(ort_label(cfg), 32 if cfg is None else cfg[0],
                                 time_ort(dec, pre, threads, steps, prefill_reps)))
        rows[-1]["ort_config"] = None if cfg is None else dict(zip(("bits", "block", "accuracy_level"), cfg))
        _log_latency(rows[-1], log)
    return rows


def _log_latency(r, log):
    d, p = r["decode"], r["prefill"]
    log(f"  {r['config']:<36} decode {d['median_s'] * 1e3:7.1f} ms [{d['min_s'] * 1e3:.1f}..{d['max_s'] * 1e3:.1f}]"
        f" = {r['decode_tokens_per_s']:6.1f} tok/s | prefill {r['prefill_tokens']} tok "
        f"{p['median_s'] * 1e3:7.1f} ms [{p['min_s'] * 1e3:.1f}..{p['max_s'] * 1e3:.1f}]")


# ----------------------------------------------------------------------------- perplexity
def ort_perplexity(path: Path, windows: np.ndarray, threads: int) -> float:
    """exp(mean NLL) of each window run through the prefill graph chunk by chunk, carrying the KV cache."""
    from tvm_anyprec.quant.model import nll_from_logits

    s = ort_session(path, threads)
    chunk = ort_chunk(s)
    out_names = [o.name for o in s.get_outputs()]
    cache_in = [i.name for i in s.get_inputs() if i.name not in ("input_ids", "pos")]
    nll, count = 0.0, 0
    for w in windows:
        w = np.asarray(w)
        feeds = _ort_feeds(s, np.zeros(chunk, np.int64), 0)
        logits = []
        for start in range(0, len(w), chunk):
            part = w[start:start + chunk]
            buf = np.zeros((1, chunk), np.int64)
            buf[0, :len(part)] = part
            feeds["input_ids"], feeds["pos"] = buf, np.array([start], np.int64)
            outs = dict(zip(out_names, s.run(None, feeds)))
            logits.append(outs["logits"][0, :len(part)])
            for name in cache_in:
                feeds[name] = outs[name + "_out"]
        a, c = nll_from_logits(np.concatenate(logits, 0), w)
        nll, count = nll + a, count + c
    return float(np.exp(nll / count))


def bench_perplexity(wd: Path, threads: int, windows: int = 16, seqlen: int = 128, log=print) -> dict:
    import torch

    from tvm_anyprec import data
    from tvm_anyprec.quant.model import perplexity, rtn_weights, swapped_weights
    from tvm_anyprec.runtime import Session

    torch.set_num_threads(threads)
    paths = ensure_artifacts(wd, log)
    sess = Session(paths["anyprec"])
    ids = data.token_windows(sess.tokenizer, data.EVAL_TEXT, windows, seqlen)
    rows = []

    def add(config, bits, ppl, t0, how):
        rows.append({"config": config, "bits": bits, "ppl": ppl, "seconds": time.time() - t0, "engine": how})
        log(f"  {config:<36} ppl {ppl:9.3f}  ({time.time() - t0:.0f}s, {how})")

    for b in sess.bit_widths:
        t0 = time.time()
        add(f"tvm-anyprec {b}-bit", b, sess.perplexity(ids, b), t0, "compiled artifact")
    del sess
    for cfg in [None] + [c for c in ORT_MODEL_CONFIGS if c[0] == 4]:
        t0 = time.time()
        add(ort_label(cfg), 32 if cfg is None else cfg[0],
            ort_perplexity(ort_graph(wd, paths["onnx"], "prefill", cfg, log), ids, threads), t0, "onnxruntime")
    t0 = time.time()
    m, _tok = data.load_model()
    with swapped_weights(m, rtn_weights(m, 4, 128)):
        add("RTN 4-bit g128 (torch)", 4, perplexity(m, ids), t0, "torch, dequantized")
    return {"text": data.EVAL_TEXT, "windows": windows, "seqlen": seqlen, "rows": rows}


# ----------------------------------------------------------------------------- memory
def memory_rows(shapes: list[dict], bit_widths=range(3, 9)) -> dict:
    """Weight bytes of the model's quantized linear layers per config (LUTs / scales / zero points counted).
    ``shapes`` carry a layer ``count`` (model_layer_shapes)."""
    from tvm_anyprec.quant.anyprec import layer_bytes, parent_bytes

    from .kernels import bitplane_bytes, io_bytes, nbits_bytes

    def total(f):
        return int(sum(s["count"] * f(s["N"], s["K"]) for s in shapes))

    lo, hi = min(bit_widths), max(bit_widths)
    rows = [{"config": "fp32", "bits": 32, "bytes": total(lambda n, k: 4 * n * k)},
            {"config": "fp16", "bits": 16, "bytes": total(lambda n, k: 2 * n * k)}]
    for b in bit_widths:
        rows.append({"config": f"tvm-anyprec {b}-bit (read per token: {b} planes + {b}-bit LUT)", "bits": b,
                     "kind": "anyprec-read", "bytes": total(lambda n, k: bitplane_bytes(1, n, k, b) - io_bytes(1, n, k))})
        rows.append({"config": f"separate {b}-bit non-uniform model (packed codes + LUT)", "bits": b,
                     "kind": "separate", "bytes": total(lambda n, k: layer_bytes(n, k, b))})
    rows.append({"config": f"tvm-anyprec parent (serves {lo}..{hi} bits)", "bits": hi, "kind": "anyprec-parent",
                 "bytes": total(lambda n, k: parent_bytes(n, k, lo, hi))})
    for bits, block in ((4, 32), (4, 128), (8, 32), (8, 128)):
        rows.append({"config": f"onnxruntime MatMulNBits {bits}-bit b{block}", "bits": bits, "kind": "ort-nbits",
                     "block": block,
                     "bytes": total(lambda n, k: nbits_bytes(1, n, k, bits, block) - io_bytes(1, n, k))})
    rows.append({"config": "RTN 4-bit g128 (4-bit codes + fp16 scale and zero per group)", "bits": 4, "kind": "rtn",
                 "bytes": total(lambda n, k: (4 * n * k + 7) // 8 + n * -(-k // 128) * 4)})
    fp32 = rows[0]["bytes"]
    for r in rows:
        r["MiB"] = r["bytes"] / 2 ** 20
        r["vs_fp32"] = r["bytes"] / fp32
    return {"layers": int(sum(s["count"] for s in shapes)), "rows": rows,
            "note": "linear layers only; the tied embedding/lm_head stays fp32 in every config"}
