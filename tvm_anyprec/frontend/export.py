"""transformers causal LM -> ONNX with a KV cache written in place (torch.onnx, static shapes).

The exported graph computes one chunk of S tokens (S fixed at export: S=1 for decode, S=P for prefill/
perplexity, 3 and 5 for the verify graphs) at position ``pos`` against caches of T positions (T = the model's
context, 8192 at most by default):

    inputs : input_ids int64 [1, S], pos int64 [1], then per layer i: key_i, value_i float32 [Hkv, T, D]
    outputs: logits float32 [1, S, V], then per layer: key_out_i, value_out_i (rows pos..pos+S-1 written)

The forward pass is transformers' own modeling code (``HFChunkLM``): any decoder-only family transformers
implements (Llama, Qwen2, Gemma 3, ...). Two hooks make it a chunk graph: the attention implementation
(registered with transformers as "tvm_anyprec") is one custom op per layer,
``tvm_anyprec.CacheAttention_<key>``: write the chunk's rows into the cache, attend to rows up to each
token's position (and within the sliding window of a sliding layer); and a placeholder mask makes
transformers skip building its own (the op masks). No transformers cache object is built.
For onnxruntime (and any ONNX tool) the graph carries the op's definition as an ONNX function (a dense
reference: one-hot write, masked softmax); TVM's import replaces it (``onnx_import``) by the CPU kernel
``kernels.attention`` (in place, reads only the rows up to the position) or, on GPU targets, by the inlined
reference. One tensor per layer and per K/V (not one stacked cache).

Token pruning (Agile-Quant; ``prune_ratio`` R > 0, prefill graphs of Llama-family models): a re-statement of
the Llama forward (``StaticCacheLM``, dense attention over the whole cache) takes one more input,
``n_valid`` int64 [1], the number of real tokens at the start of the chunk (the runtime pads the last chunk).
Layer ``prune_layer - 1``'s softmax gives each chunk token the attention it receives from the chunk's real
query rows (summed over heads); from layer ``prune_layer`` on only the ``S - round(R*S)`` most attended tokens
are processed (queries, attention output, MLP). The last real token is always kept (its logits predict the
next token) and padding is never preferred over a real token. A pruned token keeps its hidden state from
before ``prune_layer``: its keys/values in later layers come from that frozen state (the cache stays complete
for decoding, and kept tokens attend to it), and its logits are computed from it (final norm + lm_head).
Static counts: top-k selection, gathers for the kept rows, a one-hot product to scatter them back.

Weights keep their transformers names as initializers (e.g. ``model.layers.0.self_attn.q_proj.weight``) so
passes can report and exclude layers by name.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .cache_op import (ATTN_IMPL, OP_DOMAIN, PENDING_OPS, HFChunkLM, op_functions, register_attention,
                       set_attention, text_config)


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
    prune_ratio: float = 0.0   # token pruning in this graph (prefill): fraction of the chunk's tokens dropped
    prune_layer: int = 0       # ... from this layer on (1..n_layers-1); 0 with prune_ratio 0: no pruning
    family: str = "llama"      # transformers' model_type
    attention: str = "dense"   # "cache_op": the in-place CacheAttention op (HFChunkLM); "dense": one-hot
                               # cache update and attention over the whole cache (StaticCacheLM, older exports)

    @property
    def n_pruned(self) -> int:
        """Tokens of a chunk that skip the layers from prune_layer on (static)."""
        return int(round(self.prune_ratio * self.chunk))

    def cache_shape(self) -> tuple[int, int, int]:
        """Shape of one layer's key (or value) cache."""
        return (self.n_kv_heads, self.max_len, self.head_dim)

    def to_dict(self) -> dict:
        return asdict(self)


def check_pruning(prune_ratio: float, prune_layer: int | None, n_layers: int, chunk: int) -> int:
    """Validate token-pruning settings; returns the prune layer (None: the middle layer, n_layers // 2)."""
    if not 0.0 <= float(prune_ratio) < 1.0:
        raise ValueError(f"--prune-ratio must be in [0, 1), got {prune_ratio}")
    if not prune_ratio:
        if prune_layer not in (None, 0):
            raise ValueError("--prune-layer needs a --prune-ratio above 0")
        return 0
    layer = n_layers // 2 if prune_layer is None else int(prune_layer)
    if not 1 <= layer < n_layers:
        raise ValueError(f"--prune-layer must be in 1..{n_layers - 1} (the first layer that processes fewer "
                         f"tokens; the model has {n_layers} layers), got {prune_layer}")
    n = int(round(float(prune_ratio) * chunk))
    if not 0 < n < chunk:
        raise ValueError(f"--prune-ratio {prune_ratio} drops {n} of the {chunk} tokens of a chunk: it must drop "
                         f"at least one and keep at least one")
    return layer


DEFAULT_MAX_CONTEXT = 8192   # default cache length: the model's context, at most this (``--max-len`` for more)
LLAMA_FAMILY = ("llama", "mistral", "qwen2")   # the re-stated forward (token pruning) covers these


def default_max_len(model) -> int:
    """The cache length an export gets by default: the model's context length, at most DEFAULT_MAX_CONTEXT."""
    n = getattr(text_config(model), "max_position_embeddings", None) or DEFAULT_MAX_CONTEXT
    return int(min(n, DEFAULT_MAX_CONTEXT))


def spec_from_hf(model, max_len: int, chunk: int, prune_ratio: float = 0.0,
                 prune_layer: int | None = None) -> ExportSpec:
    c = text_config(model)
    family = str(getattr(c, "model_type", type(model).__name__))
    if prune_ratio and family not in LLAMA_FAMILY and "Llama" not in type(model).__name__:
        raise ValueError(f"token pruning (--prune-ratio) is implemented for Llama-family models "
                         f"({', '.join(LLAMA_FAMILY)}); {family!r} exports without it")
    for need in ("num_hidden_layers", "num_attention_heads", "hidden_size", "vocab_size"):
        if getattr(c, need, None) is None:
            raise ValueError(f"{family!r} is not a decoder-only language model the exporter knows: its config "
                             f"has no {need}")
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    rope = getattr(c, "rope_parameters", None) or {}
    if isinstance(rope, dict) and "full_attention" in rope:   # per layer type (Gemma 3): the global layers'
        rope = rope["full_attention"]
    theta = (rope or {}).get("rope_theta", getattr(c, "rope_theta", 10000.0))
    if prune_ratio and (rope or {}).get("rope_type", "default") != "default":
        raise ValueError(f"rope type {rope.get('rope_type')!r} is not supported with token pruning")
    layer = check_pruning(prune_ratio, prune_layer, c.num_hidden_layers, chunk)
    eps = getattr(c, "rms_norm_eps", None) or getattr(c, "layer_norm_eps", None) or 1e-6
    return ExportSpec(c.num_hidden_layers, heads, getattr(c, "num_key_value_heads", None) or heads, head_dim,
                      c.hidden_size, c.vocab_size, max_len, chunk, float(theta), float(eps), float(prune_ratio),
                      layer, family, "dense" if prune_ratio else "cache_op")


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

    def forward(self, input_ids, pos, *rest):
        sp = self.spec
        if sp.n_pruned:                      # the pruned prefill graph takes the chunk's real token count too
            n_valid, cache = rest[0], rest[1:]
        else:
            n_valid, cache = None, rest
        S, H, Hkv, D, G = sp.chunk, sp.n_heads, sp.n_kv_heads, sp.head_dim, sp.n_heads // sp.n_kv_heads
        positions = pos + self.chunk_offsets                                   # [S]
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]          # [S, D]
        onehot = (self.cache_positions[None, :] == positions[:, None]).float()  # [S, T]
        keep = 1.0 - onehot.sum(0)[None, :, None]                              # [1, T, 1]
        mask = torch.where(self.cache_positions[None, :] <= positions[:, None], 0.0, -1e9)  # [S, T]
        x = self.model.embed_tokens.weight[input_ids[0]]                     # [S, hidden]
        new_cache = []
        importance = None    # set at layer prune_layer - 1
        rows = None          # after pruning: indices (into the chunk) of the tokens that go on, [S - n_pruned]
        for i, layer in enumerate(self.model.layers):
            att = layer.self_attn
            if rows is None and sp.n_pruned and i == sp.prune_layer:
                rows = self._select(importance, n_valid)
                self.kept_rows = rows          # for diagnostics in torch (which positions went on)
                cos_r, sin_r, mask_r = cos[rows], sin[rows], mask[rows]
                scatter = (self.chunk_offsets[:, None] == rows[None, :]).float()  # [S, Sk] one-hot
                kept = scatter.sum(-1, keepdim=True) > 0.5                      # [S, 1]
                Sk = S - sp.n_pruned
            h = _RMSNorm(layer.input_layernorm.weight, sp.rms_eps)(x)
            # keys/values of every chunk token (pruned ones from their frozen state): the cache stays complete
            k = att.k_proj(h).reshape(S, Hkv, D).transpose(0, 1)             # [Hkv, S, D]
            v = att.v_proj(h).reshape(S, Hkv, D).transpose(0, 1)
            k = k * cos + self._rotate_half(k) * sin
            kc = cache[2 * i] * keep + torch.matmul(onehot.t(), k)            # [Hkv, T, D]
            vc = cache[2 * i + 1] * keep + torch.matmul(onehot.t(), v)
            new_cache += [kc, vc]
            if rows is None:
                hq, xq, cq, sq, mq, Sq = h, x, cos, sin, mask, S
            else:            # queries, attention output and MLP for the kept tokens only
                hq, xq, cq, sq, mq, Sq = h[rows], x[rows], cos_r, sin_r, mask_r, Sk
            q = att.q_proj(hq).reshape(Sq, H, D).transpose(0, 1)             # [H, Sq, D]
            q = q * cq + self._rotate_half(q) * sq
            qg = q.reshape(Hkv, G, Sq, D)
            scores = torch.matmul(qg, kc.unsqueeze(1).transpose(-1, -2)) * (1.0 / math.sqrt(D)) + mq
            p = torch.softmax(scores, -1)                                      # [Hkv, G, Sq, T]
            if rows is None and sp.n_pruned and i == sp.prune_layer - 1:
                # attention each chunk token receives from the chunk's real query rows, summed over heads
                recv = p.sum((0, 1)) * (self.chunk_offsets < n_valid).float()[:, None]   # [S, T]
                importance = torch.matmul(onehot, recv.sum(0))                 # [S]
            o = torch.matmul(p, vc.unsqueeze(1)).reshape(H, Sq, D).transpose(0, 1).reshape(Sq, H * D)
            xq = xq + att.o_proj(o)
            hm = _RMSNorm(layer.post_attention_layernorm.weight, sp.rms_eps)(xq)
            mlp = layer.mlp
            xq = xq + mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(hm)) * mlp.up_proj(hm))
            if rows is None:
                x = xq
            else:            # scatter the kept tokens back; pruned ones keep their state from prune_layer
                x = torch.where(kept, torch.matmul(scatter, xq), x)
        x = _RMSNorm(self.model.norm.weight, sp.rms_eps)(x)
        logits = self.lm_head(x)
        return (logits[None], *new_cache)

    def _select(self, importance, n_valid):
        """Indices of the S - n_pruned tokens that go on: the most attended real tokens; the last real token
        (whose logits predict the next token) always; padding (positions >= n_valid) only if nothing else is
        left (never, unless the chunk has fewer real tokens than are kept)."""
        off = self.chunk_offsets
        score = torch.where(off < n_valid, importance, -1.0 - off.float())     # padding: below any real token
        score = torch.where(off == n_valid - 1, torch.full_like(score, 1e9), score)
        return torch.topk(score, self.spec.chunk - self.spec.n_pruned).indices


def example_inputs(spec: ExportSpec, pos: int = 0):
    valid = (torch.tensor([spec.chunk], dtype=torch.int64),) if spec.n_pruned else ()
    return (torch.zeros((1, spec.chunk), dtype=torch.int64), torch.tensor([pos], dtype=torch.int64), *valid,
            *[torch.zeros(spec.cache_shape()) for _ in range(2 * spec.n_layers)])


def io_names(spec: ExportSpec) -> tuple[list[str], list[str]]:
    """Graph inputs and outputs; a pruned prefill graph takes ``n_valid`` (int64 [1], the number of real tokens
    at the start of the chunk: the rest is padding) after ``pos``."""
    cache = [f"{kv}_{i}" for i in range(spec.n_layers) for kv in ("key", "value")]
    valid = ["n_valid"] if spec.n_pruned else []
    return ["input_ids", "pos"] + valid + cache, ["logits"] + [f"{c}_out" for c in cache]


EXPORT_OPSET = 17


def export_onnx(hf, path, chunk: int, max_len: int | None = None, prune_ratio: float = 0.0,
                prune_layer: int | None = None) -> ExportSpec:
    """Export one static-shape graph (chunk tokens per call) to ``path``; returns its spec.
    The spec is also stored in the ONNX metadata (key 'tvm_anyprec.spec'). ``max_len`` None: the model's
    context (``default_max_len``). ``prune_ratio`` > 0: token pruning (see the module docstring) from
    ``prune_layer`` on (default: the middle layer), through ``StaticCacheLM``; otherwise the model's own
    forward (``HFChunkLM``)."""
    import json

    import onnx

    spec = spec_from_hf(hf, max_len or default_max_len(hf), chunk, prune_ratio, prune_layer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    PENDING_OPS.clear()
    if spec.attention == "cache_op":
        register_attention()
        prev = set_attention(hf, ATTN_IMPL)
        lm = HFChunkLM(hf, spec).eval()
    else:
        prev, lm = None, StaticCacheLM(hf, spec).eval()
    try:
        with torch.no_grad():
            inputs, outputs = io_names(spec)
            torch.onnx.export(lm, example_inputs(spec), str(tmp), input_names=inputs, output_names=outputs,
                              opset_version=EXPORT_OPSET, dynamo=False, do_constant_folding=False)
    finally:
        if spec.attention == "cache_op":
            set_attention(hf, prev)
    m = onnx.load(str(tmp))
    m.functions.extend(op_functions(EXPORT_OPSET))
    if PENDING_OPS and not any(o.domain == OP_DOMAIN for o in m.opset_import):
        m.opset_import.append(onnx.helper.make_opsetid(OP_DOMAIN, 1))
    entry = m.metadata_props.add()
    entry.key, entry.value = "tvm_anyprec.spec", json.dumps(spec.to_dict())
    onnx.save(m, str(tmp))
    tmp.replace(path)
    return spec


WEIGHTS_DATA = "weights.data"   # the external-data file the graphs of one export share (``share_weights``)


def share_weights(paths, data_name: str = WEIGHTS_DATA) -> int:
    """Move the weights of the exported graphs at ``paths`` into one external-data file next to them that every
    graph reads: the first graph's initializers of 1 KiB or more are written once, and each graph refers to the
    ones it holds with the same name and bytes (SmolLM2's four graphs: 518 MB in all instead of 4 x 539 MB; one
    graph in memory at a time besides the first's weights). Anything else stays inline. -> bytes written. ONNX
    tools read the graphs as before (``onnx.load``, onnxruntime: external data relative to the graph; onnx's
    checker refuses a data file that is a symbolic or hard link)."""
    import onnx
    from onnx import TensorProto

    paths = [Path(p) for p in paths]
    data, where, offset = paths[0].parent / data_name, {}, 0
    first = onnx.load(str(paths[0]))
    raw = {t.name: t.raw_data for t in first.graph.initializer if len(t.raw_data) >= 1024}
    del first
    tmp = data.with_name(data.name + ".tmp")
    with open(tmp, "wb") as f:
        for n, blob in raw.items():
            pad = -offset % 4096                       # aligned, as onnx's own writer does
            f.write(b"\0" * pad)
            where[n] = (offset + pad, len(blob))
            f.write(blob)
            offset += pad + len(blob)
    tmp.replace(data)
    for p in paths:
        m = onnx.load(str(p))
        for t in m.graph.initializer:
            if t.name in where and t.raw_data == raw[t.name]:
                t.ClearField("raw_data")
                del t.external_data[:]
                for k, v in (("location", data_name), ("offset", where[t.name][0]), ("length", where[t.name][1])):
                    e = t.external_data.add()
                    e.key, e.value = k, str(v)
                t.data_location = TensorProto.EXTERNAL
        part = p.with_name(p.name + ".tmp")
        onnx.save(m, str(part))
        part.replace(p)
    return offset


def read_spec(onnx_model) -> ExportSpec | None:
    import json
    for p in onnx_model.metadata_props:
        if p.key == "tvm_anyprec.spec":
            return ExportSpec(**json.loads(p.value))   # older exports: attention "dense" (the default)
    return None
