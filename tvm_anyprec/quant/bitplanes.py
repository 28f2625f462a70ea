"""Bitplane packing: codes [N, K] (values < 2**nbits) <-> planes[nbits, N, ceil(K/32)] uint32.

Plane 0 holds the most significant bit of every code; bit ``k % 32`` of word ``k // 32`` holds column k.
K that is not a multiple of 32 is padded with zero bits (never read by the kernels).
"""
from __future__ import annotations

import numpy as np

WORD = 32


def num_words(k: int) -> int:
    return (k + WORD - 1) // WORD


def pack_bitplanes(codes: np.ndarray, nbits: int) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {codes.shape}")
    if not 1 <= nbits <= 8:
        raise ValueError(f"nbits must be in 1..8, got {nbits}")
    if codes.size and int(codes.max()) >= (1 << nbits):
        raise ValueError(f"a code does not fit in {nbits} bits (max code {int(codes.max())})")
    n, k = codes.shape
    kw = num_words(k)
    padded = np.zeros((n, kw * WORD), dtype=np.uint8)
    padded[:, :k] = codes
    weights = (np.uint64(1) << np.arange(WORD, dtype=np.uint64))
    planes = np.empty((nbits, n, kw), dtype=np.uint32)
    for b in range(nbits):
        bit = (padded >> (nbits - 1 - b)) & 1
        planes[b] = (bit.reshape(n, kw, WORD).astype(np.uint64) * weights).sum(-1).astype(np.uint32)
    return planes


def unpack_bitplanes(planes: np.ndarray, k: int, bits: int | None = None) -> np.ndarray:
    """Codes made of the top ``bits`` planes (all planes when None): uint8 [N, K]."""
    planes = np.asarray(planes)
    if planes.ndim != 3 or planes.dtype != np.uint32:
        raise ValueError(f"planes must be uint32 [nbits, N, K/32], got {planes.dtype} {planes.shape}")
    nb = planes.shape[0] if bits is None else bits
    if not 1 <= nb <= planes.shape[0]:
        raise ValueError(f"bits={bits} outside 1..{planes.shape[0]}")
    n, kw = planes.shape[1:]
    if not (kw - 1) * WORD < k <= kw * WORD:
        raise ValueError(f"K={k} does not match {kw} words per row")
    shifts = np.arange(WORD, dtype=np.uint32)
    codes = np.zeros((n, kw * WORD), dtype=np.uint8)
    for b in range(nb):
        bit = ((planes[b][:, :, None] >> shifts) & 1).reshape(n, kw * WORD).astype(np.uint8)
        codes = (codes << 1) | bit
    return codes[:, :k]
