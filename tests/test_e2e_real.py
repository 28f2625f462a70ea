"""The product's main job on the real model (SmolLM2-135M): ONNX export with a KV cache -> compile for x86
-> run. Checked against onnxruntime (same ONNX, dequantized weights) and the torch perplexities."""
import numpy as np
import pytest

from tvm_anyprec import api, data
from tvm_anyprec.frontend.reference import dequantized_onnx, ort_session
from tvm_anyprec.quant.model import Parent
from tvm_anyprec.runtime import Session

PROMPT = "To be, or not to be, that is the question:"


def test_artifact_layout(real_artifact):
    m = api.inspect(real_artifact)
    assert m["kind"] == "compiled" and m["bit_widths"] == [3, 4, 5, 6, 7, 8]
    assert len(m["layers"]) == 210 and set(m["functions"]) == {"decode", "prefill", "prefill_cache", "verify_3", "verify"}
    twin = m["functions"]["prefill_cache"]
    assert twin["logits"] is False and twin["outputs"] == m["functions"]["prefill"]["outputs"][1:]
    assert twin["inputs"] == m["functions"]["prefill"]["inputs"]
    # tied with the lm_head, which stays fp32 by default (--quantize-lm-head: test_families)
    assert "excluded" in m["kept_fp32"]["model.embed_tokens.weight"]
    assert {"lib.so", "weights.safetensors"} <= set(m["files"])


def test_prompt_without_logits_before_the_last_chunk(session):
    """logits="last": the chunks before the last run prefill_cache (no lm_head); the last token's logits and
    every cache row equal the full prefill path's, bit for bit (the same kernels on the same inputs)."""
    ids = np.random.default_rng(3).integers(100, 20000, 70)   # 3 chunks of 32, the last one padded
    full, cache_full = session.forward_tokens(ids, 4)
    last, cache_last = session.forward_tokens(ids, 4, logits="last")
    assert full.shape[0] == 70 and last.shape[0] == 70 - 64
    np.testing.assert_array_equal(last, full[64:])
    for a, b in zip(cache_full, cache_last):
        np.testing.assert_array_equal(a.numpy()[:, :70], b.numpy()[:, :70])
    with pytest.raises(ValueError, match="logits"):
        session.forward_tokens(ids, 4, logits="first")


def test_logits_match_onnxruntime_per_bit_width(session, real_artifact_int8, real_onnx, real_parent):
    """Prefill graph, 32 tokens: TVM (the CPU bitplane kernel, default exact mode) vs ORT on the same ONNX with
    dequantized weights: within fp32 reordering. The int8 mode: within the int8 roundings, the same top tokens
    almost everywhere."""
    parent = Parent.load(real_parent)
    exact, int8 = session, Session(real_artifact_int8)
    ids = session.tokenizer(PROMPT * 3)["input_ids"][:32]
    spec = session.spec("prefill")
    zeros = np.zeros((spec["n_kv_heads"], spec["max_len"], spec["head_dim"]), np.float32)
    feeds = {"input_ids": np.array([ids], np.int64), "pos": np.array([0], np.int64)}
    for i in range(spec["n_layers"]):
        feeds[f"key_{i}"] = feeds[f"value_{i}"] = zeros
    for b in (3, 4, 8):
        ref = ort_session(dequantized_onnx(real_onnx / "prefill.onnx", parent.layers, b, tied=parent.tied)).run(["logits"], feeds)[0][0]
        out, _ = exact.forward_tokens(np.array(ids), b)
        # 30 layers of fp32 arithmetic in different orders: compare against the logit scale
        err = np.abs(out - ref).max() / np.abs(ref).max()
        assert err < 1e-3, f"{b}-bit: max relative logit error {err:.2e}"
        assert (out.argmax(-1) == ref.argmax(-1)).mean() > 0.95
        q, _ = int8.forward_tokens(np.array(ids), b)
        assert (q.argmax(-1) == ref.argmax(-1)).mean() > 0.8, f"{b}-bit int8 mode"


def test_perplexity_matches_torch(session, real_artifact_int8, real_parent):
    """Same windows of the corpus: compiled model vs torch with the dequantized weights, within 1% in the
    default exact mode (the lowest and highest bit-width; the others are checked against onnxruntime above);
    the int8 mode within 3% (measured +0.6..1.6% on 4 windows, README)."""
    bits = [3, 8]
    torch_rows = api.eval_torch(real_parent, bits, windows=2, seqlen=128, baselines=False)
    ids = data.token_windows(session.tokenizer, data.EVAL_TEXT, 2, 128)
    int8 = Session(real_artifact_int8)
    for row in torch_rows:
        if row["bits"] == 32:
            continue
        ppl = session.perplexity(ids, row["bits"])
        assert abs(ppl / row["ppl"] - 1) < 0.01, f"{row['bits']}-bit: tvm {ppl:.3f} vs torch {row['ppl']:.3f}"
        ppl8 = int8.perplexity(ids, row["bits"])
        assert abs(ppl8 / row["ppl"] - 1) < 0.03, f"{row['bits']}-bit int8: {ppl8:.3f} vs torch {row['ppl']:.3f}"


def test_switching_bits_in_one_process(session, real_artifact):
    """One load: bits switched between calls give the same tokens as separate runs, and resident memory
    does not grow with the number of bit-widths used."""
    import psutil

    ids = session.tokenizer(PROMPT)["input_ids"]
    proc = psutil.Process()
    first = session.generate_ids(ids, 6, 8)
    rss0 = proc.memory_info().rss
    mixed = {b: session.generate_ids(ids, 6, b) for b in (3, 4, 5, 6, 7, 8)}
    growth = proc.memory_info().rss - rss0
    assert mixed[8] == first
    assert growth < 64 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB after using 6 bit-widths"
    fresh = Session(real_artifact)
    for b in (3, 8):
        assert fresh.generate_ids(ids, 6, b) == mixed[b]
    assert mixed[3] != mixed[8] or mixed[4] != mixed[8]   # the bit-width really changes the model


def test_cli_run_generates_text(real_artifact):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "tvm_anyprec.cli", "run", str(real_artifact), "--bits", "8",
                        "--prompt", PROMPT, "--max-new-tokens", "8"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(PROMPT) and len(r.stdout) > len(PROMPT) + 5


def test_empty_prompt_is_a_clear_error(session):
    with pytest.raises(ValueError, match="prompt is empty"):
        session.generate_ids([], 4, 8)


def test_long_prompt_greedy_equals_torch(session, real_model, real_parent):
    """The 8192-position cache on the real model: a 1000-token prompt (32 prefill chunks) and 200 new tokens
    at 8 bits equal torch's greedy decoding (transformers' own generate, its own KV cache) on the parent's
    dequantized 8-bit weights."""
    import torch

    from tvm_anyprec.quant.model import swapped_weights

    m, tok = real_model
    assert session.spec("decode")["max_len"] == 8192 and session.functions["decode"]["kv_cache"] == "in_place"
    ids = tok(data.corpus_text(data.EVAL_TEXT)[20000:40000])["input_ids"][:1000]
    assert len(ids) == 1000
    got = session.generate_ids(ids, 200, bits=8)
    with torch.no_grad(), swapped_weights(m, Parent.load(real_parent).dequantized(8)):
        from transformers import GenerationConfig
        cfg = GenerationConfig(max_new_tokens=200, do_sample=False, eos_token_id=None, pad_token_id=0)
        out = m.generate(torch.tensor([ids]), generation_config=cfg)
    ref = out[0, len(ids):].tolist()
    assert len(ref) == 200
    first = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), None)
    assert first is None and len(got) == 200, f"first difference at new token {first}"


def test_export_graphs_share_one_weights_file(real_onnx):
    """The exported graphs hold no weights of their own: every large initializer of each refers to the one
    ``weights.data`` (same offsets in every graph); the other tests run these graphs in onnxruntime and TVM."""
    import onnx

    files = sorted(p.name for p in real_onnx.glob("*.onnx"))
    assert files == ["decode.onnx", "prefill.onnx", "verify.onnx", "verify_3.onnx"]
    size = (real_onnx / "weights.data").stat().st_size
    assert size > 500e6 and all((real_onnx / f).stat().st_size < size / 100 for f in files)
    refs = []
    for f in files:
        m = onnx.load(str(real_onnx / f), load_external_data=False)
        refs.append({t.name: {e.key: e.value for e in t.external_data} for t in m.graph.initializer
                     if t.data_location == onnx.TensorProto.EXTERNAL})
    assert len(refs[0]) >= 200 and all(r == refs[0] for r in refs[1:])
    assert {v["location"] for v in refs[0].values()} == {"weights.data"}
