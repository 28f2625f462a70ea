"""The CacheAttention op: how a transformers model's own forward becomes a chunk graph (see ``frontend.export``).

``HFChunkLM`` runs the model on one chunk with the attention implementation "tvm_anyprec" (registered with
transformers): each layer's attention is one ``_CacheAttentionOp``, exported as the custom ONNX op
``tvm_anyprec.CacheAttention_<key>`` (``key``: its shapes and settings) with the layer's query, new keys and
values, both caches and the position. ``op_functions`` gives the ONNX functions that define those ops for
onnxruntime and other ONNX tools (``attention_reference``, exported); TVM's import replaces them
(``onnx_import``).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def text_config(model):
    c = model.config
    return c.get_text_config() if hasattr(c, "get_text_config") else c


OP_DOMAIN = "tvm_anyprec"
OP_PREFIX = "CacheAttention_"
ATTN_IMPL = "tvm_anyprec"
PENDING_OPS: dict = {}   # op type -> (shapes, scale, window, softcap): the ONNX functions an export must add


def attention_reference(q, k, v, kc, vc, pos, scale: float, window: int = 0, softcap: float = 0.0):
    """The op's meaning in torch (and, exported, its ONNX function): q [H, S, D], k / v [Hkv, S, D] (the chunk's
    keys after rotary, values), kc / vc [Hkv, T, D], pos int64 [1] -> (o [H, S, D], kc', vc') with rows
    pos..pos+S-1 written (rows past T dropped) and token s attending to rows t <= pos + s
    (and t > pos + s - window when window > 0)."""
    H, S, D = q.shape
    Hkv, Tn, _ = kc.shape
    positions = pos + torch.arange(S, dtype=torch.int64)
    cpos = torch.arange(Tn, dtype=torch.int64)
    onehot = (cpos[None, :] == positions[:, None]).to(q.dtype)                 # [S, T]
    keep = 1.0 - onehot.sum(0)[None, :, None]
    kc = kc * keep + torch.matmul(onehot.t(), k)
    vc = vc * keep + torch.matmul(onehot.t(), v)
    diff = positions[:, None] - cpos[None, :]
    ok = diff >= 0
    if window > 0:
        ok = ok & (diff < window)
    scores = torch.matmul(q.reshape(Hkv, H // Hkv, S, D), kc.unsqueeze(1).transpose(-1, -2)) * scale
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    p = torch.softmax(scores + torch.where(ok, 0.0, -1e9), -1)
    o = torch.matmul(p, vc.unsqueeze(1)).reshape(H, S, vc.shape[-1])
    return o, kc, vc


def op_type_of(shapes, scale: float, window: int, softcap: float) -> str:
    import hashlib
    key = repr((tuple(tuple(x) for x in shapes), float(scale), int(window), float(softcap)))
    return OP_PREFIX + hashlib.sha1(key.encode()).hexdigest()[:12]


class _CacheAttentionOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kc, vc, pos, scale, window, softcap, op):
        return attention_reference(q, k, v, kc, vc, pos, scale, window, softcap)

    @staticmethod
    def symbolic(g, q, k, v, kc, vc, pos, scale, window, softcap, op):
        return g.op(f"{OP_DOMAIN}::{op}", q, k, v, kc, vc, pos, scale_f=float(scale), window_i=int(window),
                    softcap_f=float(softcap), outputs=3)


class _Chunk:
    """The caches and position of the chunk being traced (read by the attention implementation)."""
    active: list = []

    def __init__(self, cache, pos):
        self.cache, self.pos, self.out = list(cache), pos, [None] * len(cache)


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None,
               sliding_window=None, **kwargs):
    """transformers attention implementation "tvm_anyprec": the CacheAttention op on the layer's caches."""
    ctx = _Chunk.active[-1]
    i = module.layer_idx
    scale = float(scaling) if scaling is not None else float(module.head_dim) ** -0.5
    window, cap = int(sliding_window or 0), float(softcap or 0.0)
    q, k, v, kc, vc = query[0], key[0], value[0], ctx.cache[2 * i], ctx.cache[2 * i + 1]
    shapes = [list(x.shape) for x in (q, k, v, kc)]
    op = op_type_of(shapes, scale, window, cap)
    PENDING_OPS[op] = (shapes, scale, window, cap)
    o, kc, vc = _CacheAttentionOp.apply(q, k, v, kc, vc, ctx.pos, scale, window, cap, op)
    ctx.out[2 * i], ctx.out[2 * i + 1] = kc, vc
    return o.unsqueeze(0).transpose(1, 2), None


def register_attention() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(ATTN_IMPL, _attention)


class HFChunkLM(nn.Module):
    """A transformers causal LM run on one chunk against the static caches, through its own forward: the
    attention of every layer is the CacheAttention op (``_attention``); no cache object is built (each layer
    hands its new keys and values to the op). Holds the model's own children (``model``, ``lm_head``, or
    whatever the family calls them) so the parameter (ONNX initializer) names are the transformers ones."""

    def __init__(self, hf, spec):
        super().__init__()
        self.spec = spec
        for name, child in hf.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_hf", hf)     # not a submodule: its parameters are its children's
        self.register_buffer("chunk_offsets", torch.arange(spec.chunk, dtype=torch.int64), persistent=False)
        types = getattr(text_config(hf), "layer_types", None)
        self._mask_keys = sorted(set(types)) if types else None

    def forward(self, input_ids, pos, *cache):
        positions = (pos + self.chunk_offsets)[None]
        dummy = torch.zeros((1, 1, self.spec.chunk, self.spec.chunk))    # the op masks; this skips HF's masks
        mask = {k: dummy for k in self._mask_keys} if self._mask_keys else dummy
        ctx = _Chunk(cache, pos)
        _Chunk.active.append(ctx)
        try:
            out = self._hf(input_ids=input_ids, position_ids=positions, attention_mask=mask, use_cache=False)
        finally:
            _Chunk.active.pop()
        if any(c is None for c in ctx.out):
            raise ValueError(f"{self.spec.family}: some layers did not run attention through the exporter's "
                             "implementation (transformers attn_implementation); the model cannot be exported")
        return (out.logits, *ctx.out)


def set_attention(hf, impl: str) -> str:
    """Set the attention implementation of ``hf`` (and its sub-configs); returns the previous one."""
    prev = getattr(hf.config, "_attn_implementation", None)
    for c in {id(x): x for x in (hf.config, text_config(hf))}.values():
        c._attn_implementation = impl
    return prev


def op_functions(opset: int) -> list:
    """ONNX functions (domain OP_DOMAIN) defining the CacheAttention ops of the last export: each the exported
    ``attention_reference`` at its shapes and settings."""
    import tempfile

    import onnx
    from onnx import helper, numpy_helper

    class Ref(nn.Module):
        def __init__(self, scale, window, softcap):
            super().__init__()
            self.a = (scale, window, softcap)

        def forward(self, q, k, v, kc, vc, pos):
            return attention_reference(q, k, v, kc, vc, pos, *self.a)

    names_in, names_out = ["q", "k", "v", "kc", "vc", "pos"], ["o", "kc_out", "vc_out"]
    out = []
    for op, (shapes, scale, window, softcap) in sorted(PENDING_OPS.items()):
        qs, ks, vs, cs = shapes
        ex = (torch.zeros(qs), torch.zeros(ks), torch.zeros(vs), torch.zeros(cs),
              torch.zeros(cs[:-1] + [vs[-1]]), torch.zeros(1, dtype=torch.int64))
        with tempfile.TemporaryDirectory() as d:
            f = Path(d) / "ref.onnx"
            torch.onnx.export(Ref(scale, window, softcap), ex, str(f), input_names=names_in, output_names=names_out,
                              opset_version=opset, dynamo=False, do_constant_folding=True)
            g = onnx.load(str(f)).graph
        consts = [helper.make_node("Constant", [], [t.name], value=numpy_helper.from_array(numpy_helper.to_array(t),
                                                                                          t.name))
                  for t in g.initializer]
        out.append(helper.make_function(OP_DOMAIN, op, names_in, names_out, consts + list(g.node),
                                        [helper.make_opsetid("", opset)], ["scale", "window", "softcap"]))
    return out
