"""Low-bit activations: INT4 weights (the graph's own weights, per row-group scale and zero point) with
per-token INT8 or INT4 activations and outlier smoothing (``passes.act_quant``, ``kernels.intgemm``). The
artifact serves one bit-width, 4."""
from __future__ import annotations

import numpy as np

from ..quant.activations import ActQuantConfig, prepare_layer
from .base import tensor_bytes


def layer_tensors(site, w: np.ndarray, cfg: ActQuantConfig, act_absmax=None, words: bool = False) -> dict:
    """The parameters of one rewritten layer from its float weight W [N, K] (torch layout); ``words``: the GPU
    form (``<W>.w4`` as uint32 [N, K/8], the same bytes)."""
    if cfg.outlier == "keep":
        raise ValueError("outlier='keep' (float outlier channels) exists in the torch fake-quant path only; "
                         "the integer kernels take 'smooth' or 'none'")
    layer = prepare_layer(site.name, w, cfg, act_absmax)
    inv = layer.inv_factor if layer.inv_factor is not None else np.ones(site.K, np.float32)
    packed = np.ascontiguousarray(layer.w4.packed())
    return {f"{site.name}.w4": packed.view(np.uint32) if words else packed, f"{site.name}.w4_scales": layer.w4.scales,
            f"{site.name}.w4_zeros": layer.w4.zeros, f"{site.name}.act_inv": inv.astype(np.float32)}


class LowBitActivations:
    name = "lowbit_act"
    seed_bits = max_bits = 4
    describe = "quantizing weights"

    def __init__(self, cfg: ActQuantConfig, act_stats: dict | None = None):
        """``act_stats``: calibrated per-channel max |x| per layer for the outlier handling."""
        self.cfg, self.act_stats = cfg, act_stats
        self.words = False

    @classmethod
    def from_manifest(cls, manifest: dict) -> "LowBitActivations":
        return cls(None)

    def rewrite_pass(self, exclude, tp: dict):
        from ..passes.act_quant import ActQuantRewrite
        self.words = bool(tp.get("device"))           # GPU: the word form (WGSL has no 8-bit types)
        return ActQuantRewrite(self.cfg, exclude, words=self.words)

    def pack(self, site, weight: np.ndarray) -> dict:
        stats = (self.act_stats or {}).get(site.name.removesuffix(".weight"))
        return layer_tensors(site, weight, self.cfg, stats, words=self.words)

    def layer_entry(self, site, rw) -> dict:
        return {"N": site.N, "K": site.K, "layout": site.layout, "rows": site.M, "act_bits": rw.act_bits[site.name]}

    def manifest(self) -> dict:
        return {"parent": None,
                "act_quant": {**self.cfg.to_dict(), "calibrated": bool(self.act_stats),
                              "weights": "uniform 4-bit child (per row-group scale and zero point)"}}

    def default_tokenizer(self):
        return None

    def bytes_per_token(self, bits: int, params: dict) -> int:
        return sum(tensor_bytes(shape, dtype) for shape, dtype in params.values())
