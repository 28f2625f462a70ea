"""Layer-name patterns shared by the quantizer and the Relax pass (no dependencies)."""
from __future__ import annotations

import fnmatch
import re


def matches_any(name: str, patterns) -> bool:
    """True when ``name`` matches one of ``patterns``: a glob (whole name or substring) or a regex search."""
    for p in patterns or ():
        if fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f"*{p}*") or re.search(p, name):
            return True
    return False
