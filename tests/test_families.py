"""Decoder-only families through transformers' own modeling code: a tiny random-init model per family (Llama,
Qwen2, Gemma 3 with sliding-window layers), saved as a transformers directory with the SmolLM2 tokenizer, then
the user's path: ``quantize --model DIR`` -> ``compile DIR`` (export + compile) -> Session. Checked against torch
running the same model (fp32, and with the parent's dequantized 8-bit weights): logits, greedy output at a
prompt longer than one prefill chunk and past position 512, and a KV cache whose rows past the position are
poisoned with NaN (never read).
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.kernel

FAMILIES = ("llama", "qwen2", "gemma3")
MAX_LEN = 1024
PROMPT = 600          # > one prefill chunk (32), past position 512
NEW = 12


def _config(family: str, vocab: int, tok):
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=MAX_LEN,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, initializer_range=0.3)
    if family == "gemma3":
        from transformers import Gemma3TextConfig
        return Gemma3TextConfig(**common, sliding_window=64, layer_types=["sliding_attention", "full_attention"])
    if family == "qwen2":
        from transformers import Qwen2Config
        return Qwen2Config(**common)
    from transformers import LlamaConfig
    return LlamaConfig(**common, tie_word_embeddings=True)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(family, torch model, tokenizer, parent dir, Session of the compiled artifact)."""
    from transformers import AutoModelForCausalLM

    from tvm_anyprec import api, data
    from tvm_anyprec.runtime import Session

    fam = request.param
    tok = data.load_tokenizer("smollm2")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(fam, len(tok), tok)).eval()
    d = tmp_path_factory.mktemp(fam)
    src = d / "model"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    api.quantize(d / "parent", model=src, calib_windows=2, seqlen=32, progress=False)
    api.export(d / "art.onnx", src, verify_chunk=0)          # decode + prefill: the two graphs these tests run
    api.compile(d / "art.onnx", d / "art", parent=d / "parent", tokenizer=str(src), accuracy="exact")
    return fam, model, tok, d / "parent", Session(d / "art")


def _ids(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(100, 20000, n)


def _torch_logits(model, ids, weights=None):
    from tvm_anyprec.quant.model import swapped_weights

    with torch.no_grad(), (swapped_weights(model, weights) if weights is not None else contextlib.nullcontext()):
        return model(torch.from_numpy(ids[None])).logits[0].numpy()


def test_manifest_and_cache(family):
    fam, model, _tok, _parent, sess = family
    spec = sess.spec("decode")
    assert spec["family"] == model.config.model_type and spec["max_len"] == MAX_LEN
    assert spec["attention"] == "cache_op" and sess.functions["decode"]["kv_cache"] == "in_place"
    assert sess.cache_bytes() == 2 * 2 * 2 * MAX_LEN * 16 * 4


def test_logits_match_torch_at_8_bits(family):
    """Compiled at 8 bits vs torch on the parent's dequantized 8-bit weights (tight) and vs fp32 (loose)."""
    from tvm_anyprec.quant.model import Parent

    fam, model, _tok, parent, sess = family
    ids = _ids(PROMPT)
    got, _ = sess.forward_tokens(ids, 8)
    deq = _torch_logits(model, ids, Parent.load(parent).dequantized(8))
    fp32 = _torch_logits(model, ids)
    scale = np.abs(deq).max()
    assert np.abs(got - deq).max() < 2e-3 * scale, fam
    assert np.linalg.norm(got - fp32) < 1e-2 * np.linalg.norm(fp32), fam


def test_greedy_equals_torch_past_512(family):
    """Greedy decoding after a 600-token prompt equals torch's (dequantized 8-bit weights, no cache: every
    step recomputes the whole sequence)."""
    from tvm_anyprec.quant.model import Parent

    fam, model, _tok, parent, sess = family
    ids = _ids(PROMPT, 1)
    got = sess.generate_ids(ids, NEW, bits=8)
    seq = list(ids)
    w = Parent.load(parent).dequantized(8)
    for _ in range(NEW):
        seq.append(int(_torch_logits(model, np.array(seq), w)[-1].argmax()))
    assert got == seq[len(ids):], fam


def test_cache_past_the_position_is_never_read(family):
    """A cache poisoned with NaN gives the same logits as a fresh one: prefill, then decode steps, read only
    the rows they wrote."""
    import tvm

    fam, _model, _tok, _parent, sess = family
    ids = _ids(70, 2)
    clean, _ = sess.forward_tokens(ids, 5)
    sp = sess.spec("prefill")
    nan = np.full((sp["n_kv_heads"], sp["max_len"], sp["head_dim"]), np.nan, np.float32)
    poisoned = [tvm.runtime.tensor(nan, sess.dev) for _ in range(2 * sp["n_layers"])]
    got, cache = sess.forward_tokens(ids[:40], 5, cache=poisoned)
    got2, cache = sess.forward_tokens(ids[40:], 5, pos=40, cache=cache)
    assert np.isfinite(got).all() and np.isfinite(got2).all()
    np.testing.assert_allclose(np.concatenate([got, got2]), clean, rtol=1e-4, atol=1e-4 * np.abs(clean).max())
    k = cache[0].numpy()
    assert np.isfinite(k[:, :70]).all() and np.isnan(k[:, 96:]).all()   # rows past the last chunk untouched


def test_speculative_near_the_end_of_the_cache(family):
    """Too little room for a verify chunk: the last tokens come from plain steps, output still greedy (and it
    stops at the cache length, like plain decoding)."""
    fam, _model, _tok, _parent, sess = family
    if fam != "llama":
        pytest.skip("one family is enough")
    ids = _ids(MAX_LEN - 4, 3).tolist()
    st = {}
    out = sess.generate_speculative(ids, 8, 8, 3, stats=st)
    assert out == sess.generate_ids(ids, 8, 8)
    assert st["plain_steps"] >= 1 and len(out) == 5


def test_profile_counts_every_operator(family):
    """``run --profile``'s report: one bitplane call per linear layer, the fp32 lm_head, one attention call per
    layer, times that add up to about the step."""
    from tvm_anyprec.profile import profile_model

    fam, model, _tok, _parent, sess = family
    dec, pre = profile_model(sess, 4, _ids(40, 4), repeat=2)
    kinds = dec.by_kind()
    assert kinds["bitplane linear"][0] == len(sess.manifest["layers"]) == 2 * 7, fam
    assert kinds["fp32 linear"][0] == 1 and "embedding (bitplane rows)" not in kinds, fam
    assert kinds["attention + cache write"][0] == model.config.num_hidden_layers, fam
    parts = sum(dec.ms.values())
    assert 0 < parts < 3 * dec.hooked_ms and pre.function == "prefill"


@pytest.fixture(scope="module")
def tied_lm_head(tmp_path_factory):
    """The tiny Llama (embedding tied to the lm_head) quantized and compiled with ``--quantize-lm-head``."""
    from transformers import AutoModelForCausalLM

    from tvm_anyprec import api, data
    from tvm_anyprec.runtime import Session

    tok = data.load_tokenizer("smollm2")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config("llama", len(tok), tok)).eval()
    d = tmp_path_factory.mktemp("tied")
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    api.quantize(d / "parent", model=d / "model", calib_windows=2, seqlen=32, progress=False, exclude=())
    api.export(d / "art.onnx", d / "model", verify_chunk=0)
    api.compile(d / "art.onnx", d / "art", parent=d / "parent", tokenizer=str(d / "model"), exclude=(),
                accuracy="exact")
    api.compile(d / "art.onnx", d / "art8", parent=d / "parent", tokenizer=str(d / "model"), exclude=(),
                accuracy="exact", lm_head_bits=8)
    return model, d / "parent", Session(d / "art"), Session(d / "art8")


def test_lm_head_pinned_at_8_bits(tied_lm_head):
    """``lm_head_bits=8``: a 3-bit call runs every layer at 3 bits but the tied lm_head/embedding at 8 (the
    logits equal torch's with those weights), and the bytes per token count it at 8 bits."""
    from tvm_anyprec.quant.model import Parent

    model, parent_dir, sess, pinned = tied_lm_head
    parent = Parent.load(parent_dir)
    ids = _ids(20, 6)
    got, _ = pinned.forward_tokens(ids, 3)
    want = _torch_logits(model, ids, {**parent.dequantized(3), "lm_head": parent.dequantized(8)["lm_head"]})
    assert np.abs(got - want).max() < 2e-3 * np.abs(want).max()
    assert pinned.manifest["layers"]["model.embed_tokens.weight"]["bits"] == 8
    assert pinned.weight_bytes_per_token(8) == sess.weight_bytes_per_token(8)
    assert pinned.weight_bytes_per_token(3) > sess.weight_bytes_per_token(3)


def test_lm_head_bits_auto_follows_the_cpu(tied_lm_head, tmp_path):
    """compile's default (lm_head_bits "auto"): with a parent that quantized the lm_head, the tied lm_head is
    pinned at 7 bits where the AVX-512 bodies run and stays fp32 elsewhere (auto_lm_head_bits of the host);
    with a parent without it (the other families' fixtures, the real model's) it stays fp32."""
    from tvm_anyprec import api
    from tvm_anyprec.schemes.anyprec import AUTO_LM_HEAD_BITS, auto_lm_head_bits, parent_has_lm_head

    _model, parent_dir, _sess, _pinned = tied_lm_head
    assert parent_has_lm_head(parent_dir)
    man = api.compile(parent_dir.parent / "art.onnx", tmp_path / "auto", parent=parent_dir, accuracy="exact")
    want = auto_lm_head_bits("x86")
    assert want in (None, AUTO_LM_HEAD_BITS)
    if want is None:
        assert "model.embed_tokens.weight" in man["kept_fp32"]
    else:
        assert man["layers"]["model.embed_tokens.weight"]["bits"] == AUTO_LM_HEAD_BITS


def test_quantized_lm_head_is_the_embedding_too(tied_lm_head):
    """One any-precision layer serves the lm_head product and the token lookup (rows decoded from the same
    planes at the call's bit-width): the logits equal torch's with the parent's dequantized weights swapped in
    (in place, so the tied embedding changes with the lm_head) at 3 and 8 bits; no fp32 copy is kept."""
    from tvm_anyprec.profile import profile_model
    from tvm_anyprec.quant.model import Parent

    model, parent_dir, sess, _ = tied_lm_head
    parent = Parent.load(parent_dir)
    assert "lm_head" in parent.layers and parent.tied == {"model.embed_tokens.weight": "lm_head.weight"}
    layers = sess.manifest["layers"]
    assert len(layers) == 2 * 7 + 1 and layers["model.embed_tokens.weight"]["embedding"]
    assert not sess.manifest["kept_fp32"] and "model.embed_tokens.weight" not in sess.weights
    ids = _ids(40, 5)
    for b in (3, 8):
        got, _ = sess.forward_tokens(ids, b)
        want = _torch_logits(model, ids, parent.dequantized(b))
        assert np.abs(got - want).max() < 2e-3 * np.abs(want).max(), b
    kinds = profile_model(sess, 4, ids, repeat=1)[0].by_kind()
    assert kinds["embedding (bitplane rows)"][0] == 1 and "fp32 linear" not in kinds


def test_sampling_through_the_python_api(family):
    """``Session.generate(..., temperature=, top_p=, seed=)``: a seed reproduces the text, temperature 0 is the
    greedy text, top_k=1 at any temperature is greedy too."""
    fam, _model, _tok, _parent, sess = family
    if fam != "llama":
        pytest.skip("one family is enough")
    greedy = sess.generate("Once upon a time", 10, bits=4)
    a = sess.generate("Once upon a time", 10, bits=4, temperature=1.2, top_p=0.95, seed=11)
    assert a == sess.generate("Once upon a time", 10, bits=4, temperature=1.2, top_p=0.95, seed=11)
    assert sess.generate("Once upon a time", 10, bits=4, temperature=0.0, seed=1) == greedy
    assert sess.generate("Once upon a time", 10, bits=4, temperature=1.5, top_k=1, seed=2) == greedy
    assert a != greedy or sess.generate("Once upon a time", 10, bits=4, temperature=1.2, seed=12) != greedy


def test_streamed_generation_stops_at_the_context(family):
    """``generate.Generation`` (what run, chat and serve use) near the end of the cache: the same tokens as
    ``generate_ids``, and it stops at the context with finish reason "length"."""
    from tvm_anyprec.generate import Generation
    from tvm_anyprec.sampling import SamplingParams

    fam, _model, _tok, _parent, sess = family
    if fam != "llama":
        pytest.skip("one family is enough")
    ids = _ids(MAX_LEN - 4, 6).tolist()
    gen = Generation(sess, ids, SamplingParams(max_new_tokens=10), bits=8)
    gen.run()
    want = sess.generate_ids(ids, 10, 8)
    assert len(want) == 5          # positions MAX_LEN - 4 .. MAX_LEN - 1 fed, then one more token chosen
    assert gen.new == want and gen.finish_reason == "length"
