"""The scheme protocol and what schemes share."""
from __future__ import annotations

from typing import Protocol

import numpy as np


class Scheme(Protocol):
    name: str
    seed_bits: int
    max_bits: int
    describe: str                 # "packing weights" / "quantizing weights" (the progress bar)

    def rewrite_pass(self, exclude, tp: dict): ...
    def pack(self, site, weight: np.ndarray) -> dict: ...
    def layer_entry(self, site, rw) -> dict: ...
    def manifest(self) -> dict: ...
    def bytes_per_token(self, bits: int, params: dict) -> int: ...


def tensor_bytes(shape, dtype) -> int:
    return int(np.prod(shape)) * np.dtype(str(dtype)).itemsize
