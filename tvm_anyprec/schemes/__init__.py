"""Weight schemes. A scheme owns what differs between them, so that ``compiler.compile_model`` is
scheme-blind:

* ``rewrite_pass(exclude, tp)``: the Relax rewrite of linear layers into the scheme's operator;
* ``pack(site, weight)``: the function parameters of one rewritten layer (its weight in torch layout [N, K]);
* ``layer_entry(site, rw)``: the layer's manifest entry; ``manifest()``: the scheme's manifest fields;
* ``bytes_per_token(bits, params)``: weight bytes one decode step reads ({name: (shape, dtype)} of the decode
  function's parameters), for the precision policy and the memory report.

``AnyPrec`` (any-precision bitplanes) and ``LowBitActivations`` (INT4 weights with W4A8/W4A4 activations).
``from_manifest`` gives the scheme a compiled artifact was built with (for the runtime).
"""
from __future__ import annotations

from .base import Scheme, tensor_bytes  # noqa: F401  (re-exported)


def from_manifest(manifest: dict) -> Scheme:
    """The scheme of a compiled artifact (its packing is not needed: only what the runtime asks)."""
    if "act_quant" in manifest:
        from .lowbit_act import LowBitActivations
        return LowBitActivations.from_manifest(manifest)
    from .anyprec import AnyPrec
    pinned = {n: e["bits"] for n, e in manifest.get("layers", {}).items() if "bits" in e}
    return AnyPrec(manifest["seed_bits"], manifest["max_bits"], pinned=pinned)
