"""Layer-name patterns shared by the quantizer and the Relax pass (no dependencies)."""
from __future__ import annotations

import fnmatch
import re

# Layers kept in fp32 unless asked: the lm_head. Quantized (``--quantize-lm-head``: exclude nothing) it is one
# any-precision layer with the embedding tied to it, but on SmolLM2 its 3-bit child takes the perplexity from
# 79 to 263 and at K = 576 the bitplane kernel reads it no faster than fp32 at 5 bits and up (README).
DEFAULT_EXCLUDE = ("lm_head",)
ACT_EXCLUDE = ("lm_head",)    # low-bit activations (the integer GEMM) keep the lm_head in fp32 too


def matches_any(name: str, patterns) -> bool:
    """True when ``name`` matches one of ``patterns``: a glob (whole name or substring) or a regex search."""
    for p in patterns or ():
        if fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f"*{p}*") or re.search(p, name):
            return True
    return False
