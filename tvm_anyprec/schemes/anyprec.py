"""Any-precision weights: each rewritten layer is its parent's bitplanes plus the LUTs of every bit-width
(``passes.anyprec_rewrite``, ``kernels.anyprec``). The parent comes from ``quantize`` (Fisher-weighted);
without one, the graph's own weights are quantized here with plain k-means."""
from __future__ import annotations

import numpy as np

from ..errors import CompileError
from ..kernels.anyprec import lut_offset, lut_width
from ..quant.anyprec import check_bits, quantize_nonuniform
from .base import tensor_bytes


def layer_tensors(site, layer, min_bits: int, max_bits: int) -> dict:
    """``<W>.planes`` and ``<W>.luts`` (the per-bit LUTs concatenated, fp16) of one any-precision layer."""
    if tuple(layer.shape) != (site.N, site.K):
        raise CompileError(f"{site.name}: parent layer shape {tuple(layer.shape)} != graph weight "
                           f"[{site.N}, {site.K}]")
    luts = np.concatenate([layer.luts[b] for b in range(min_bits, max_bits + 1)], axis=1).astype(np.float16)
    assert luts.shape[1] == lut_width(max_bits, min_bits)
    return {f"{site.name}.planes": layer.planes, f"{site.name}.luts": luts}


class AnyPrec:
    name = "anyprec"

    def __init__(self, seed_bits: int = 3, max_bits: int = 8, parent=None, parent_path=None):
        """``parent``: a loaded ``quant.model.Parent`` (its bit-widths win); None: quantize each layer here."""
        if parent is not None:
            if parent.scheme != "nonuniform":
                raise CompileError(f"{parent_path}: the bitplane operator needs a 'nonuniform' parent, got "
                                   f"'{parent.scheme}'")
            seed_bits, max_bits = parent.seed_bits, parent.max_bits
        check_bits(seed_bits, max_bits)
        self.seed_bits, self.max_bits = seed_bits, max_bits
        self.parent, self.parent_path = parent, parent_path
        self.describe = "packing weights" if parent is not None else "quantizing weights"

    def rewrite_pass(self, exclude, tp: dict):
        from ..passes.anyprec_rewrite import AnyPrecRewrite
        return AnyPrecRewrite(self.seed_bits, self.max_bits, exclude)

    def pack(self, site, weight: np.ndarray) -> dict:
        if self.parent is not None:
            layer = self.parent.layers.get(site.name.removesuffix(".weight")) or self.parent.layers.get(site.name)
            if layer is None:
                raise CompileError(f"parent {self.parent_path} has no layer for graph weight {site.name!r}")
        else:
            layer = quantize_nonuniform(weight, None, self.seed_bits, self.max_bits, name=site.name)
        return layer_tensors(site, layer, self.seed_bits, self.max_bits)

    def layer_entry(self, site, rw) -> dict:
        return {"N": site.N, "K": site.K, "layout": site.layout, "rows": site.M}

    def manifest(self) -> dict:
        par = self.parent
        return {"parent": None if par is None else {"path": str(self.parent_path), **par.info.get("source", {}),
                                                    "calibration": par.info.get("calibration")}}

    def default_tokenizer(self):
        return None if self.parent is None else self.parent.info.get("source", {}).get("model")

    def bytes_per_token(self, bits: int, params: dict) -> int:
        """b of B bitplanes (uint32 words) and the b-bit LUT of every rewritten layer, plus every other
        parameter whole (the tied embedding/lm_head is read whole)."""
        total = 0
        for name, (shape, dtype) in params.items():
            if name.endswith(".planes"):
                total += bits * int(np.prod(shape[1:])) * 4
            elif name.endswith(".luts"):
                total += shape[0] * (lut_offset(bits + 1, self.seed_bits) - lut_offset(bits, self.seed_bits)) * 2
            else:
                total += tensor_bytes(shape, dtype)
        return total
