"""transformers Llama-family model -> ONNX with a static KV cache (torch.onnx).

The exported graph computes one chunk of S tokens (S fixed at export: S=1 for decode, S=P for prefill/
perplexity) at position ``pos`` against fixed-size caches of T positions:

    inputs : input_ids int64 [1, S], pos int64 [1], then per layer i: key_i, value_i float32 [Hkv, T, D]
    outputs: logits float32 [1, S, V], then per layer: key_out_i, value_out_i (rows pos..pos+S-1 written)

One tensor per layer and per K/V (not one stacked cache): stacking would copy the whole cache once more.

Static shapes throughout (TVM 0.27's VM shape lowering fails on the symbolic-shape KV-cache graph). The
cache update is a one-hot product, so any pos works without ScatterND, and keys past the current position
are masked, so padding a short chunk is harmless. Weights keep their transformers names as initializers
(e.g. ``model.layers.0.self_attn.q_proj.weight``) so passes can report and exclude layers by name.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass
class ExportSpec:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    max_len: int
    chunk: int
    rope_theta: float
    rms_eps: float

    def cache_shape(self) -> tuple[int, int, int]:
        """Shape of one layer's key (or value) cache."""
        return (self.n_kv_heads, self.max_len, self.head_dim)

    def to_dict(self) -> dict:
        return asdict(self)


def spec_from_hf(model, max_len: int, chunk: int) -> ExportSpec:
    c = model.config
    if c.model_type not in ("llama", "mistral", "qwen2") and "Llama" not in type(model).__name__:
        raise ValueError(f"unsupported architecture {c.model_type!r}: the exporter handles Llama-family models")
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    rope = getattr(c, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope type {rope.get('rope_type')!r} is not supported by the exporter")
    return ExportSpec(c.num_hidden_layers, heads, c.num_key_value_heads, head_dim, c.hidden_size, c.vocab_size,
                      max_len, chunk, float(theta), float(c.rms_norm_eps))


class _RMSNorm(nn.Module):
    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class StaticCacheLM(nn.Module):
    """A re-statement of the HF Llama forward with an explicit static cache; shares the HF modules, so the
    parameter names (and so the ONNX initializer names) are the transformers ones."""

    def __init__(self, hf, spec: ExportSpec):
        super().__init__()
        self.spec = spec
        self.model = hf.model          # keeps "model.*" names
        self.lm_head = hf.lm_head      # tied to model.embed_tokens.weight for SmolLM2
        inv = 1.0 / (spec.rope_theta ** (torch.arange(0, spec.head_dim, 2, dtype=torch.float64) / spec.head_dim))
        ang = torch.arange(spec.max_len, dtype=torch.float64)[:, None] * inv[None]
        emb = torch.cat([ang, ang], -1)
        self.register_buffer("rope_cos", emb.cos().float(), persistent=False)
        self.register_buffer("rope_sin", emb.sin().float(), persistent=False)
        self.register_buffer("chunk_offsets", torch.arange(spec.chunk, dtype=torch.int64), persistent=False)
        self.register_buffer("cache_positions", torch.arange(spec.max_len, dtype=torch.int64), persistent=False)

    @staticmethod
    def _rotate_half(x):
        h = x.shape[-1] // 2
        return torch.cat([-x[..., h:], x[..., :h]], -1)

    def forward(self, input_ids, pos, *cache):
        sp = self.spec
        S, H, Hkv, D, G = sp.chunk, sp.n_heads, sp.n_kv_heads, sp.head_dim, sp.n_heads // sp.n_kv_heads
        positions = pos + self.chunk_offsets                                   # [S]
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]          # [S, D]
        onehot = (self.cache_positions[None, :] == positions[:, None]).float()  # [S, T]
        keep = 1.0 - onehot.sum(0)[None, :, None]                              # [1, T, 1]
        mask = torch.where(self.cache_positions[None, :] <= positions[:, None], 0.0, -1e9)  # [S, T]
        x = self.model.embed_tokens.weight[input_ids[0]]                     # [S, hidden]
        new_cache = []
        for i, layer in enumerate(self.model.layers):
            att = layer.self_attn
            h = _RMSNorm(layer.input_layernorm.weight, sp.rms_eps)(x)
            q = att.q_proj(h).reshape(S, H, D).transpose(0, 1)               # [H, S, D]
            k = att.k_proj(h).reshape(S, Hkv, D).transpose(0, 1)             # [Hkv, S, D]
            v = att.v_proj(h).reshape(S, Hkv, D).transpose(0, 1)
            q = q * cos + self._rotate_half(q) * sin
            k = k * cos + self._rotate_half(k) * sin
            kc = cache[2 * i] * keep + torch.matmul(onehot.t(), k)            # [Hkv, T, D]
            vc = cache[2 * i + 1] * keep + torch.matmul(onehot.t(), v)
            new_cache += [kc, vc]
            qg = q.reshape(Hkv, G, S, D)
            scores = torch.matmul(qg, kc.unsqueeze(1).transpose(-1, -2)) * (1.0 / math.sqrt(D)) + mask
            p = torch.softmax(scores, -1)                                      # [Hkv, G, S, T]
            o = torch.matmul(p, vc.unsqueeze(1)).reshape(H, S, D).transpose(0, 1).reshape(S, H * D)
            x = x + att.o_proj(o)
            h = _RMSNorm(layer.post_attention_layernorm.weight, sp.rms_eps)(x)
            mlp = layer.mlp
            x = x + mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        x = _RMSNorm(self.model.norm.weight, sp.rms_eps)(x)
        logits = self.lm_head(x)
        return (logits[None], *new_cache)


def example_inputs(spec: ExportSpec, pos: int = 0):
    return (torch.zeros((1, spec.chunk), dtype=torch.int64), torch.tensor([pos], dtype=torch.int64),
            *[torch.zeros(spec.cache_shape()) for _ in range(2 * spec.n_layers)])


def io_names(spec: ExportSpec) -> tuple[list[str], list[str]]:
    cache = [f"{kv}_{i}" for i in range(spec.n_layers) for kv in ("key", "value")]
    return ["input_ids", "pos"] + cache, ["logits"] + [f"{c}_out" for c in cache]


def export_onnx(hf, path, chunk: int, max_len: int = 512) -> ExportSpec:
    """Export one static-shape graph (chunk tokens per call) to ``path``; returns its spec.
    The spec is also stored in the ONNX metadata (key 'tvm_anyprec.spec')."""
    import json

    import onnx

    spec = spec_from_hf(hf, max_len, chunk)
    lm = StaticCacheLM(hf, spec).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with torch.no_grad():
        inputs, outputs = io_names(spec)
        torch.onnx.export(lm, example_inputs(spec), str(tmp), input_names=inputs, output_names=outputs,
                          opset_version=17, dynamo=False, do_constant_folding=False)
    m = onnx.load(str(tmp))
    entry = m.metadata_props.add()
    entry.key, entry.value = "tvm_anyprec.spec", json.dumps(spec.to_dict())
    onnx.save(m, str(tmp))
    tmp.replace(path)
    return spec


def read_spec(onnx_model) -> ExportSpec | None:
    import json
    for p in onnx_model.metadata_props:
        if p.key == "tvm_anyprec.spec":
            return ExportSpec(**json.loads(p.value))
    return None
