"""Layer-name patterns shared by the quantizer and the Relax pass (no dependencies)."""
from __future__ import annotations

import fnmatch
import re

DEFAULT_EXCLUDE = ()          # the bitplane operator: every linear layer, the lm_head included (tied to the
                              # embedding, one layer serves both); --exclude lm_head keeps it in fp32
ACT_EXCLUDE = ("lm_head",)    # low-bit activations (the integer GEMM) keep the lm_head in fp32


def matches_any(name: str, patterns) -> bool:
    """True when ``name`` matches one of ``patterns``: a glob (whole name or substring) or a regex search."""
    for p in patterns or ():
        if fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f"*{p}*") or re.search(p, name):
            return True
    return False
