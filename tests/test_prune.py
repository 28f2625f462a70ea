"""Token pruning (Agile-Quant, issue 6) on a tiny random Llama: the exported module vs an independent torch
reference of the same rule, the ONNX graph (onnxruntime) vs the compiled TVM artifact, greedy generation
through the runtime vs torch, and the error messages for bad settings."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tvm_anyprec.frontend.export import StaticCacheLM, export_onnx, io_names, spec_from_hf

S, T, RATIO, LAYER = 8, 48, 0.25, 1      # chunk, cache, pruning: drop 2 of 8 tokens from layer 1 on (3 layers)


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T,
                      tie_word_embeddings=True, attn_implementation="eager")
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():                # sharper attention than the 0.02 init: clear importance ranking
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.mul_(6)
            layer.self_attn.k_proj.weight.mul_(6)
    return m


def _reference(m, ids, ratio, layer):
    """Plain re-statement of the rule, chunk by chunk (no static cache, no padding, no one-hot tricks):
    returns (logits [n, V], per layer (keys, values) [n, Hkv, D] after RoPE)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    c = m.config
    H, Hkv = c.num_attention_heads, c.num_key_value_heads
    D, G = c.hidden_size // H, H // Hkv
    K = [[] for _ in m.model.layers]
    V = [[] for _ in m.model.layers]
    out = []
    for start in range(0, len(ids), S):
        chunk = torch.as_tensor(ids[start:start + S])
        n = len(chunk)
        pos = torch.arange(start, start + n)
        x = m.model.embed_tokens(chunk)
        cos, sin = m.model.rotary_emb(x[None], pos[None])
        active, imp = torch.arange(n), None
        keep = min(S - int(round(ratio * S)), n)
        for i, lyr in enumerate(m.model.layers):
            att = lyr.self_attn
            if ratio and i == layer:
                score = imp.clone()
                score[n - 1] = float("inf")
                active = torch.topk(score, keep).indices
            h = lyr.input_layernorm(x)
            q = att.q_proj(h).view(n, H, D).transpose(0, 1)[None]
            k = att.k_proj(h).view(n, Hkv, D).transpose(0, 1)[None]
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            K[i].append(k[0].transpose(0, 1))
            V[i].append(att.v_proj(h).view(n, Hkv, D))
            keys, vals = torch.cat(K[i]), torch.cat(V[i])                  # [start + n, Hkv, D]
            probs = torch.zeros(n, H, start + n)
            o = torch.zeros(n, H * D)
            for r in active.tolist():
                for hh in range(H):
                    s = keys[:start + r + 1, hh // G] @ q[0, hh, r] / D ** 0.5
                    p = torch.softmax(s, 0)
                    probs[r, hh, :start + r + 1] = p
                    o[r, hh * D:(hh + 1) * D] = p @ vals[:start + r + 1, hh // G]
            if i == layer - 1:
                imp = probs[:, :, start:].sum((0, 1))                        # attention received, [n]
            xa = x[active] + att.o_proj(o[active])
            xa = xa + lyr.mlp(lyr.post_attention_layernorm(xa))
            x = x.clone()
            x[active] = xa
        out.append(m.lm_head(m.model.norm(x)))
    return torch.cat(out), [(torch.cat(k), torch.cat(v)) for k, v in zip(K, V)]


def _module(m, ids, ratio, layer, chunk=S):
    """StaticCacheLM chunk by chunk, the last chunk zero-padded (as Session.forward_tokens does)."""
    sp = spec_from_hf(m, T, chunk, ratio, layer if ratio else None)
    lm = StaticCacheLM(m, sp).eval()
    cache = [torch.zeros(sp.cache_shape()) for _ in range(2 * sp.n_layers)]
    out = []
    for start in range(0, len(ids), chunk):
        c = ids[start:start + chunk]
        buf = torch.zeros((1, chunk), dtype=torch.int64)
        buf[0, :len(c)] = torch.as_tensor(c)
        valid = [torch.tensor([len(c)])] if sp.n_pruned else []
        lg, *cache = lm(buf, torch.tensor([start]), *valid, *cache)
        out.append(lg[0, :len(c)])
    return torch.cat(out), cache


@torch.no_grad()
@pytest.mark.parametrize("n_tokens", [16, 15, 11])   # full chunks; 7 real + 1 pad; 3 real + 5 pad (< kept)
def test_module_matches_reference(tiny, n_tokens):
    ids = np.random.default_rng(n_tokens).integers(0, 96, n_tokens)
    lg0, _ = _module(tiny, ids, 0.0, None)
    ref0, _ = _reference(tiny, ids, 0.0, LAYER)
    hf = tiny(input_ids=torch.as_tensor(ids)[None]).logits[0]
    torch.testing.assert_close(lg0, ref0, rtol=1e-4, atol=1e-4)     # R = 0: the unpruned graph
    torch.testing.assert_close(lg0, hf, rtol=1e-4, atol=1e-4)
    lg, cache = _module(tiny, ids, RATIO, LAYER)
    ref, kv = _reference(tiny, ids, RATIO, LAYER)
    torch.testing.assert_close(lg, ref, rtol=1e-4, atol=1e-4)       # kept and pruned tokens' logits
    for i, (k, v) in enumerate(kv):                                  # cache rows, pruned tokens included
        torch.testing.assert_close(cache[2 * i][:, :n_tokens], k.transpose(0, 1), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cache[2 * i + 1][:, :n_tokens], v.transpose(0, 1), rtol=1e-4, atol=1e-4)
    if n_tokens >= 15:                                              # real tokens were pruned: it shows
        assert (lg - lg0).abs().max() > 1e-2
    # the last real token of every chunk is never pruned: its logits row is the unpruned one up to the
    # (different) context it saw in later layers; for one chunk that context is its own kept set, so at least
    # its prediction stays a valid distribution
    assert torch.isfinite(lg).all()


@pytest.fixture(scope="module")
def tiny_compiled(tiny, tmp_path_factory):
    """Pruned prefill + plain decode exported and compiled twice: fp32 (every layer excluded, to compare with
    onnxruntime) and W4A8 (the issue's `--act-bits 8 --prune-ratio R`)."""
    from tvm_anyprec.compiler import compile_model
    from tvm_anyprec.quant import activations as A

    d = tmp_path_factory.mktemp("prune")
    export_onnx(tiny, d / "onnx" / "prefill.onnx", S, T, RATIO, LAYER)
    export_onnx(tiny, d / "onnx" / "decode.onnx", 1, T)
    compile_model(d / "onnx", d / "fp32", exclude=(".*",), require_rewrite=False)
    compile_model(d / "onnx", d / "w4a8", act_quant=A.preset(8, "none"))
    return d


def test_onnx_vs_tvm_and_greedy(tiny, tiny_compiled):
    import onnxruntime as ort

    from tvm_anyprec.runtime import Session

    d = tiny_compiled
    sess = Session(d / "fp32")
    spec = sess.spec("prefill")
    assert (spec["prune_ratio"], spec["prune_layer"]) == (RATIO, LAYER)
    assert [i[0] for i in sess.functions["prefill"]["inputs"]][:3] == ["input_ids", "pos", "n_valid"]
    bits = sess.bit_widths[-1]
    ids = np.random.default_rng(3).integers(0, 96, 15)
    lg_tvm, _ = sess.forward_tokens(ids, bits)
    ort_s = ort.InferenceSession(str(d / "onnx" / "prefill.onnx"))
    names = io_names(spec_from_hf(tiny, T, S, RATIO, LAYER))[0]
    cache = [np.zeros((2, T, 16), np.float32) for _ in range(6)]
    lg_ort = []
    for start in (0, 8):
        c = ids[start:start + S]
        buf = np.zeros((1, S), np.int64)
        buf[0, :len(c)] = c
        lg, *cache = ort_s.run(None, dict(zip(names, [buf, np.array([start]), np.array([len(c)]), *cache])))
        lg_ort.append(lg[0, :len(c)])
    np.testing.assert_allclose(lg_tvm, np.concatenate(lg_ort), rtol=1e-3, atol=1e-3)
    with torch.no_grad():
        lg_torch, _ = _module(tiny, ids, RATIO, LAYER)
    np.testing.assert_allclose(lg_tvm, lg_torch.numpy(), rtol=1e-3, atol=1e-3)

    # greedy: pruned prefill, then plain decode steps (torch) vs Session.generate_ids (TVM)
    new = sess.generate_ids(ids, 6, bits)
    with torch.no_grad():
        lg, cache = _module(tiny, ids, RATIO, LAYER)
        dec = StaticCacheLM(tiny, spec_from_hf(tiny, T, 1)).eval()
        want, tok = [], int(lg[-1].argmax())
        for p in range(len(ids), len(ids) + 6):
            want.append(tok)
            out, *cache = dec(torch.tensor([[tok]]), torch.tensor([p]), *cache)
            tok = int(out[0, -1].argmax())
    assert new == want

    # W4A8 + pruning: compiles, matches the torch fake-quant of the same pruned graph, generates
    from tvm_anyprec.quant import activations as A

    q = Session(d / "w4a8")
    lg_q, _ = q.forward_tokens(ids, 4)
    with A.fake_quantized(tiny, A.prepare_model(tiny, A.preset(8, "none"), None)), torch.no_grad():
        ref_q, _ = _module(tiny, ids, RATIO, LAYER)
    assert np.linalg.norm(lg_q - ref_q.numpy()) < 0.02 * np.linalg.norm(ref_q.numpy())
    new_q = q.generate_ids(ids, 4, 4)
    assert len(new_q) == 4 and all(0 <= t < 96 for t in new_q)


def test_bad_settings(tiny, tiny_compiled, capsys):
    from tvm_anyprec import api, cli

    for ratio, layer, msg in ((1.0, 1, r"\[0, 1\)"), (-0.1, 1, r"\[0, 1\)"), (0.25, 0, "1..2"),
                              (0.25, 3, "1..2"), (0.01, 1, "drops 0"), (0.0, 2, "needs a --prune-ratio")):
        with pytest.raises(ValueError, match=msg):
            spec_from_hf(tiny, T, S, ratio, layer)
    onnx_dir = tiny_compiled / "onnx"
    with pytest.raises(ValueError, match="built into the graph at export"):
        api.compile(onnx_dir, tiny_compiled / "x", prune_ratio=0.5)
    with pytest.raises(ValueError, match="built into the graph at export"):
        api.compile(onnx_dir, tiny_compiled / "x", prune_ratio=RATIO, prune_layer=2)
    assert cli.main(["compile", str(onnx_dir), "-o", str(tiny_compiled / "x"), "--prune-ratio", "1.5"]) == 2
    assert "--prune-ratio must be in [0, 1)" in capsys.readouterr().err
    assert not (tiny_compiled / "x").exists()
