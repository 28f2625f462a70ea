"""Any-precision weights: each rewritten layer is its parent's bitplanes plus the LUTs of every bit-width
(``passes.anyprec_rewrite``, ``kernels.anyprec``). The parent comes from ``quantize`` (Fisher-weighted);
without one, the graph's own weights are quantized here with plain k-means."""
from __future__ import annotations

import numpy as np

from ..errors import CompileError
from ..kernels.anyprec import lut_offset, lut_width
from ..quant.anyprec import check_bits, quantize_nonuniform
from .base import tensor_bytes

AUTO_LM_HEAD_BITS = 7   # compile's default where the AVX-512 bodies run: within 0.1% of the fp32 lm_head's
                        # perplexity at every bit-width on SmolLM2, 37 MB a token instead of 113 (README)
ACCURACY = ("exact", "int8")
DEFAULT_ACCURACY = "int8"   # faster, and within 0.5% of exact's perplexity at every bit-width on SmolLM2 (README)


def layer_tensors(site, layer, min_bits: int, max_bits: int, kernel: dict | None = None) -> dict:
    """One any-precision layer's tensors. ``kernel`` None (GPU kernel): ``<W>.planes`` (uint32 bitplanes) and
    ``<W>.luts`` (the per-bit LUTs concatenated, fp16). ``kernel`` {"mode", "isa"} (the CPU kernel,
    ``kernels.lut_cpu``): the planes byte-sliced (uint8), and ``<W>.luts`` fp16 (exact) or ``<W>.tabs`` int16 +
    ``<W>.scales`` fp32 (int8), each table padded by 16 entries."""
    if tuple(layer.shape) != (site.N, site.K):
        raise CompileError(f"{site.name}: parent layer shape {tuple(layer.shape)} != graph weight "
                           f"[{site.N}, {site.K}]")
    luts = np.concatenate([layer.luts[b] for b in range(min_bits, max_bits + 1)], axis=1).astype(np.float16)
    assert luts.shape[1] == lut_width(max_bits, min_bits)
    if kernel is None:
        return {f"{site.name}.planes": layer.planes, f"{site.name}.luts": luts}
    from ..kernels.lut_cpu import LUT_PAD
    from ..quant.byteslice import int_tables, to_byte_sliced

    if not np.isfinite(luts).all():   # the kernels multiply padding by 0: the tables must be finite
        raise CompileError(f"{site.name}: the LUTs hold non-finite values (fp16 overflow?)")
    out = {f"{site.name}.planes": to_byte_sliced(layer.planes, site.K)}
    pad = ((0, 0), (0, LUT_PAD))
    if kernel["mode"] == "exact":
        out[f"{site.name}.luts"] = np.pad(luts, pad)
    else:
        tabs, scales = int_tables(luts, range(min_bits, max_bits + 1))
        out[f"{site.name}.tabs"] = np.pad(tabs, pad)
        out[f"{site.name}.scales"] = scales
    return out


class AnyPrec:
    name = "anyprec"

    def __init__(self, seed_bits: int = 3, max_bits: int = 8, parent=None, parent_path=None, accuracy=None,
                 lm_head_bits=None, pinned=None):
        """``parent``: a loaded ``quant.model.Parent`` (its bit-widths win); None: quantize each layer here.
        ``accuracy`` (CPU targets): "int8" (the default: int8 activations per block of 32 x int16 centroid
        tables per row; faster) or "exact" (fp32 math on the fp16 LUTs). GPU targets run exact math only.
        ``lm_head_bits``: the tied lm_head/embedding (quantized in the parent) runs at this bit-width on every
        call. ``pinned``: {weight name: bits} of a compiled artifact (``from_manifest``)."""
        if accuracy is not None and accuracy not in ACCURACY:
            raise CompileError(f"accuracy must be one of {', '.join(ACCURACY)}, got {accuracy!r}")
        self.accuracy = accuracy
        self.kernel = None   # set by rewrite_pass: the CPU kernel's {"mode", "isa"}, None for the GPU kernel
        if parent is not None:
            if parent.scheme != "nonuniform":
                raise CompileError(f"{parent_path}: the bitplane operator needs a 'nonuniform' parent, got "
                                   f"'{parent.scheme}'")
            seed_bits, max_bits = parent.seed_bits, parent.max_bits
        check_bits(seed_bits, max_bits)
        self.seed_bits, self.max_bits = seed_bits, max_bits
        if lm_head_bits is not None and not seed_bits <= lm_head_bits <= max_bits:
            raise CompileError(f"--lm-head-bits {lm_head_bits}: the parent has bit-widths {seed_bits}..{max_bits}")
        self.lm_head_bits, self.pinned = lm_head_bits, dict(pinned or {})
        self.parent, self.parent_path = parent, parent_path
        self.describe = "packing weights" if parent is not None else "quantizing weights"

    def rewrite_pass(self, exclude, tp: dict):
        from ..kernels.lut_cpu import cpu_isa
        from ..passes.anyprec_rewrite import AnyPrecRewrite
        from ..targets import is_gpu

        import tvm

        if tp.get("device") or is_gpu(tvm.target.Target(tp["target"])):
            if self.accuracy == "int8":
                raise CompileError(f"--accuracy int8 is a CPU kernel mode; the {tp['name']} kernel computes "
                                   f"in fp32 on the fp16 LUTs (use --accuracy exact, or leave it out)")
            self.kernel = None
        else:
            self.kernel = {"mode": self.accuracy or DEFAULT_ACCURACY, "isa": cpu_isa(tp["target"])}
        return AnyPrecRewrite(self.seed_bits, self.max_bits, exclude, cpu=self.kernel, available=self._available,
                              tied_bits=self.lm_head_bits)

    def _parent_layer(self, name: str):
        """The parent's layer of a graph weight: by its name, or by the weight it is tied to (an embedding
        exported under its own name and tied to the quantized lm_head)."""
        layers = self.parent.layers
        for n in (name, self.parent.tied.get(name)):
            if n is not None and (n.removesuffix(".weight") in layers or n in layers):
                return layers.get(n.removesuffix(".weight")) or layers[n]
        return None

    def _available(self, name: str, tied: bool) -> str | None:
        """A tied embedding/lm_head the parent did not quantize (quantized with --exclude lm_head, or made
        before the lm_head was quantized) stays fp32; any other missing layer is an error at packing."""
        from ..passes.anyprec_rewrite import TIED_ALIAS

        if self.parent is None or not tied or self._parent_layer(name) is not None or \
                self._parent_layer(TIED_ALIAS) is not None:
            return None
        return "tied embedding/lm_head: not quantized in the parent (quantize without --exclude lm_head)"

    def pack(self, site, weight: np.ndarray) -> dict:
        if self.parent is not None:
            from ..passes.anyprec_rewrite import TIED_ALIAS

            layer = self._parent_layer(site.name)
            if layer is None and getattr(site, "tied", False):
                layer = self._parent_layer(TIED_ALIAS)
            if layer is None:
                raise CompileError(f"parent {self.parent_path} has no layer for graph weight {site.name!r}")
        else:
            layer = quantize_nonuniform(weight, None, self.seed_bits, self.max_bits, name=site.name)
        return layer_tensors(site, layer, self.seed_bits, self.max_bits, self.kernel)

    def layer_entry(self, site, rw) -> dict:
        if site.tied and self.lm_head_bits is not None:
            self.pinned[site.name] = self.lm_head_bits
        return {"N": site.N, "K": site.K, "layout": site.layout, "rows": site.M,
                **({"embedding": True} if site.tied else {}),
                **({"bits": self.lm_head_bits} if site.tied and self.lm_head_bits is not None else {})}

    def manifest(self) -> dict:
        if self.lm_head_bits is not None and not self.pinned:
            raise CompileError(f"--lm-head-bits {self.lm_head_bits}: no tied lm_head/embedding was quantized (it "
                               f"needs one, in the parent: quantize with --quantize-lm-head)")
        par = self.parent
        return {"parent": None if par is None else {"path": str(self.parent_path), **par.info.get("source", {}),
                                                    "calibration": par.info.get("calibration")},
                "accuracy": "exact" if self.kernel is None else self.kernel["mode"],
                "plane_layout": "bitplanes32" if self.kernel is None else "byte_sliced64"}

    def default_tokenizer(self):
        return None if self.parent is None else self.parent.info.get("source", {}).get("model")

    def bytes_per_token(self, call_bits: int, params: dict) -> int:
        """b of B planes and the b-bit table (fp16 LUT, or int16 table and its scale) of every rewritten layer,
        plus every other parameter whole (the tied embedding/lm_head is read whole; a pinned one at its bits)."""
        total = 0
        for name, (shape, dtype) in params.items():
            item = np.dtype(dtype).itemsize
            bits = self.pinned.get(name.rsplit(".", 1)[0], call_bits)
            if name.endswith(".planes"):
                total += bits * int(np.prod(shape[1:])) * item
            elif name.endswith((".luts", ".tabs")):
                total += shape[0] * (lut_offset(bits + 1, self.seed_bits) - lut_offset(bits, self.seed_bits)) * item
            elif name.endswith(".scales"):
                total += shape[0] * item
            else:
                total += tensor_bytes(shape, dtype)
        return total


def auto_lm_head_bits(target: str) -> int | None:
    """``compile``'s default for a tied lm_head/embedding on the ``target`` preset: pinned at AUTO_LM_HEAD_BITS
    where the AVX-512 bodies run (decode 1.24x / 1.15x faster at 3 / 4 bits than with the fp32 lm_head on a Zen 4,
    1.28x / 1.36x on a Xeon: README), None (fp32) elsewhere (the AVX2 bodies' 7-bit blend trees are slower than
    fp32 reads; GPU targets keep a tied weight in fp32)."""
    from ..kernels.lut_cpu import cpu_isa
    from ..kernels.lut_layout import WIDE_ISAS
    from ..targets import preset

    tp = preset(target)
    if tp.get("device"):
        return None
    return AUTO_LM_HEAD_BITS if cpu_isa(tp["target"]) in WIDE_ISAS else None


def parent_has_lm_head(parent) -> bool:
    """Whether the parent directory quantized the lm_head (a pinned lm_head needs it)."""
    from ..quant.model import Parent

    p = Parent.load(parent)
    return p.scheme == "nonuniform" and any(n.removesuffix(".weight") in p.layers for n in ("lm_head",
                                                                                          *p.tied, *p.tied.values()))


def lm_head_plan(lm_head_bits, target: str, exclude, act_bits):
    """``api.compile``'s lm_head and exclude patterns before the parent is known: -> (lm_head_bits, exclude,
    auto). "auto" with no exclude patterns given (and no low-bit activations): ``auto_lm_head_bits``, and a
    parent made from a model then quantizes the lm_head (exclude ())."""
    from ..quant.patterns import ACT_EXCLUDE, DEFAULT_EXCLUDE

    if auto := lm_head_bits == "auto":
        lm_head_bits = auto_lm_head_bits(target) if exclude is None and act_bits is None else None
    if exclude is None:
        exclude = ACT_EXCLUDE if act_bits is not None else () if lm_head_bits else DEFAULT_EXCLUDE
    return lm_head_bits, exclude, auto


def lm_head_settle(lm_head_bits, exclude, auto: bool, parent):
    """-> (lm_head_bits, exclude) once the parent is known: "auto" keeps the lm_head fp32 (and says so) when the
    parent has no quantized lm_head to pin (an older parent, or an ONNX source compiled without one)."""
    import logging

    from ..quant.patterns import DEFAULT_EXCLUDE

    if not (auto and lm_head_bits) or (parent is not None and parent_has_lm_head(parent)):
        return lm_head_bits, exclude
    logging.getLogger(__name__).info(
        f"the lm_head stays fp32: {parent or 'no parent'} has no quantized lm_head to pin at {lm_head_bits} bits "
        "(quantize with --quantize-lm-head, or compile the model by name into a new directory)")
    return None, DEFAULT_EXCLUDE
