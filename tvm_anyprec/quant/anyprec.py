"""Any-precision weight quantization (numpy/torch only; no TVM here).

Non-uniform scheme (Any-Precision LLM, Park et al. 2024):
  1. seed: a ``seed_bits`` model from sensitivity-weighted 1-D k-means per output row (SqueezeLLM style;
     the weights are the Fisher information, i.e. squared gradients; plain k-means without calibration);
  2. incremental upscaling: every cluster is split in two by a weighted 2-means, the new bit becoming the
     least significant one, until ``max_bits``.
  Every b-bit child is exactly the top b bits of the parent code, and ``luts[b][n, c]`` is the weighted
  centroid of child cluster c of row n.

1-D k-means clusters are contiguous runs of the sorted row, so everything below works on sorted rows
with prefix sums of f, f*w and f*w^2: a Lloyd step is a batched searchsorted, and the 2-means split of a
cluster is found exactly (the best of all contiguous splits), not by a local search.

Uniform scheme: an 8-bit asymmetric uniform parent per row-group; the b-bit child is the top b bits of
the 8-bit code, dequantized at the centre of its bucket (the +2^(7-b) offset) so it stays unbiased.
"""
from __future__ import annotations

from ..errors import QuantizationError  # noqa: F401  (re-exported)

from dataclasses import dataclass, field

import numpy as np
import torch

from .bitplanes import num_words, pack_bitplanes, unpack_bitplanes

MIN_SEED_BITS, MAX_SEED_BITS, MAX_PARENT_BITS = 2, 4, 8


def check_weight(w: np.ndarray, name: str = "weight") -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2:
        raise QuantizationError(f"{name}: expected a 2-D weight [out_features, in_features], got shape {w.shape}")
    if w.size == 0:
        raise QuantizationError(f"{name}: empty weight {w.shape}")
    if not np.issubdtype(w.dtype, np.floating):
        raise QuantizationError(f"{name}: expected a floating-point weight, got {w.dtype}")
    bad = ~np.isfinite(w)
    if bad.any():
        n, k = np.argwhere(bad)[0]
        raise QuantizationError(f"{name}: {int(bad.sum())} non-finite values (NaN/Inf), first at [{n}, {k}]")
    return w.astype(np.float32, copy=False)


def check_bits(seed_bits: int, max_bits: int) -> None:
    if not MIN_SEED_BITS <= seed_bits <= MAX_SEED_BITS:
        raise QuantizationError(f"seed bit-width {seed_bits} unsupported: use {MIN_SEED_BITS}..{MAX_SEED_BITS}")
    if not seed_bits <= max_bits <= MAX_PARENT_BITS:
        raise QuantizationError(f"parent bit-width {max_bits} unsupported: use {seed_bits}..{MAX_PARENT_BITS}")


def require_bits(bits: int, widths, holder: str = "this parent holds") -> None:
    if bits not in widths:
        raise QuantizationError(f"bit-width {bits} unsupported: {holder} {list(widths)}")


class _Bitplanes:
    """What the parents of both schemes share: ``planes`` [max_bits, N, ceil(K/32)], children
    ``lowest_bits..max_bits``, a child's codes = the top bits of the parent code."""

    @property
    def max_bits(self) -> int:
        return int(self.planes.shape[0])

    @property
    def bit_widths(self) -> list[int]:
        return list(range(self.lowest_bits, self.max_bits + 1))

    def check_bits(self, bits: int) -> None:
        require_bits(bits, self.bit_widths)

    def codes(self, bits: int) -> np.ndarray:
        self.check_bits(bits)
        return unpack_bitplanes(self.planes, self.shape[1], bits)


@dataclass
class AnyPrecLayer(_Bitplanes):
    """A quantized linear layer [N, K]: the parent bitplanes plus one LUT per child bit-width."""

    planes: np.ndarray                      # uint32 [max_bits, N, ceil(K/32)], plane 0 = MSB
    luts: dict[int, np.ndarray]             # b -> float16 [N, 2**b], b in seed_bits..max_bits
    shape: tuple[int, int]                  # (N, K)
    seed_bits: int
    scheme: str = "nonuniform"
    meta: dict = field(default_factory=dict)

    @property
    def lowest_bits(self) -> int:
        return self.seed_bits

    def dequantize(self, bits: int) -> np.ndarray:
        codes = self.codes(bits).astype(np.int64)
        return np.take_along_axis(self.luts[bits].astype(np.float32), codes, axis=1)

    def nbytes(self) -> int:
        return int(self.planes.nbytes + sum(l.nbytes for l in self.luts.values()))


# ----------------------------------------------------------------------------- sorted-row machinery
class _SortedRows:
    """Rows of w sorted ascending, with float64 prefix sums of f, f*w, f*w^2 (shape [N, K+1])."""

    def __init__(self, w: np.ndarray, f: np.ndarray | None):
        wt = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float64))
        self.ws, self.order = torch.sort(wt, dim=1, stable=True)
        if f is None:
            fs = torch.ones_like(self.ws)
        else:
            ft = torch.from_numpy(np.ascontiguousarray(f, dtype=np.float64)).clamp_min(0)
            # a row whose sensitivities are all ~0 would make every centroid undefined: keep a floor
            ft = ft + 1e-8 * ft.mean(dim=1, keepdim=True) + 1e-30
            fs = torch.gather(ft, 1, self.order)
        zero = torch.zeros((self.ws.shape[0], 1), dtype=torch.float64)
        self.P0 = torch.cat([zero, fs.cumsum(1)], 1)
        self.P1 = torch.cat([zero, (fs * self.ws).cumsum(1)], 1)
        self.P2 = torch.cat([zero, (fs * self.ws * self.ws).cumsum(1)], 1)
        self.N, self.K = self.ws.shape

    def seg(self, P: torch.Tensor, bnd: torch.Tensor) -> torch.Tensor:
        return torch.gather(P, 1, bnd[:, 1:]) - torch.gather(P, 1, bnd[:, :-1])

    def centroids(self, bnd: torch.Tensor, fallback: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted mean per cluster; an empty cluster takes ``fallback`` (or the value at its boundary)."""
        s0, s1 = self.seg(self.P0, bnd), self.seg(self.P1, bnd)
        c = s1 / torch.where(s0 > 0, s0, torch.ones_like(s0))
        if fallback is None:
            fallback = torch.gather(self.ws, 1, bnd[:, :-1].clamp_max(self.K - 1))
        return torch.where(s0 > 0, c, fallback)

    def sse(self, bnd: torch.Tensor) -> torch.Tensor:
        """Weighted squared error of the partition, per row."""
        s0, s1, s2 = self.seg(self.P0, bnd), self.seg(self.P1, bnd), self.seg(self.P2, bnd)
        e = s2 - s1 * s1 / torch.where(s0 > 0, s0, torch.ones_like(s0))
        return torch.where(s0 > 0, e, torch.zeros_like(e)).sum(1)

    def cluster_of_positions(self, bnd: torch.Tensor) -> torch.Tensor:
        """[N, K] index j with bnd[j] <= t < bnd[j+1] for each sorted position t."""
        t = torch.arange(self.K, dtype=bnd.dtype).expand(self.N, self.K).contiguous()
        return torch.searchsorted(bnd[:, 1:].contiguous(), t, right=True)

    # -- seed: weighted Lloyd iterations on the sorted rows
    def kmeans(self, nclusters: int, max_iter: int = 200, init: str = "quantile", seed: int = 0) -> torch.Tensor:
        if init == "quantile":  # cuts at equal cumulative sensitivity
            total = self.P0[:, -1:]
            q = torch.arange(1, nclusters, dtype=torch.float64) / nclusters
            bnd = self._bounds(torch.searchsorted(self.P0.contiguous(), (total * q).contiguous()))
        elif init == "kmeans++":
            bnd = self._bounds_from_centres(self._kmeanspp(nclusters, seed))
        else:
            raise ValueError(f"unknown k-means init {init!r}")
        return self.lloyd(bnd, max_iter)

    def best_kmeans(self, nclusters: int, restarts: int = 2) -> torch.Tensor:
        """Lloyd from a quantile init and from ``restarts`` k-means++ inits; the best result per row.
        (With skewed sensitivities the quantile init alone gets stuck in poor local optima.)"""
        cands = [self.kmeans(nclusters, init="quantile")] + \
            [self.kmeans(nclusters, init="kmeans++", seed=s) for s in range(restarts)]
        best = torch.stack([self.sse(b) for b in cands]).argmin(0)
        return torch.stack(cands)[best, torch.arange(self.N)]

    def _kmeanspp(self, nclusters: int, seed: int) -> torch.Tensor:
        """k-means++ seeding (D^2 sampling, sensitivity-weighted), batched over rows."""
        gen = torch.Generator().manual_seed(seed)
        f = self.P0[:, 1:] - self.P0[:, :-1]
        centres = torch.empty((self.N, nclusters), dtype=torch.float64)
        d2 = torch.full_like(self.ws, float("inf"))
        p = f
        for j in range(nclusters):   # D^2 draw by inverse CDF (torch.multinomial: 16x slower, 40% of quantize)
            cdf = torch.cumsum(p, 1)
            u = torch.rand((self.N, 1), generator=gen, dtype=torch.float64) * cdf[:, -1:]
            idx = torch.searchsorted(cdf, u, right=True).clamp_(max=self.K - 1)
            centres[:, j:j + 1] = torch.gather(self.ws, 1, idx)
            d2 = torch.minimum(d2, (self.ws - centres[:, j:j + 1]) ** 2)
            p = f * d2 + 1e-300
        return torch.sort(centres, dim=1).values

    def _bounds_from_centres(self, c: torch.Tensor) -> torch.Tensor:
        mid = 0.5 * (c[:, :-1] + c[:, 1:])
        return self._bounds(torch.searchsorted(self.ws.contiguous(), mid.contiguous()))

    def lloyd(self, bnd: torch.Tensor, max_iter: int = 200) -> torch.Tensor:
        for _ in range(max_iter):
            new = self._bounds_from_centres(self.centroids(bnd))
            if torch.equal(new, bnd):
                break
            bnd = new
        return bnd

    def _bounds(self, inner: torch.Tensor) -> torch.Tensor:
        n = inner.shape[0]
        lo = torch.zeros((n, 1), dtype=torch.int64)
        hi = torch.full((n, 1), self.K, dtype=torch.int64)
        bnd = torch.cat([lo, inner.to(torch.int64).clamp(0, self.K), hi], 1)
        return torch.cummax(bnd, dim=1).values

    # -- upscaling: split every cluster at its best contiguous point (exact weighted 2-means)
    def split(self, bnd: torch.Tensor) -> torch.Tensor:
        n, c = self.N, bnd.shape[1] - 1
        jt = self.cluster_of_positions(bnd)
        lo, hi = torch.gather(bnd, 1, jt), torch.gather(bnd, 1, jt + 1)
        P0t, P1t = self.P0[:, :-1], self.P1[:, :-1]

        def between_score(a0, a1, b0, b1):  # (sum f*w)^2 / sum f over [a, b); 0 when empty
            s0, s1 = b0 - a0, b1 - a1
            return torch.where(s0 > 0, s1 * s1 / torch.where(s0 > 0, s0, torch.ones_like(s0)), torch.zeros_like(s0))

        P0lo, P1lo = torch.gather(self.P0, 1, lo), torch.gather(self.P1, 1, lo)
        P0hi, P1hi = torch.gather(self.P0, 1, hi), torch.gather(self.P1, 1, hi)
        gain = between_score(P0lo, P1lo, P0t, P1t) + between_score(P0t, P1t, P0hi, P1hi)
        segmax = torch.full((n, c), -float("inf"), dtype=torch.float64).scatter_reduce(1, jt, gain, "amax")
        t = torch.arange(self.K, dtype=torch.int64).expand(n, self.K)
        cand = torch.where(gain >= torch.gather(segmax, 1, jt), t, torch.full_like(t, self.K))
        cut = torch.full((n, c), self.K, dtype=torch.int64).scatter_reduce(1, jt, cand, "amin")
        cut = torch.minimum(torch.maximum(cut, bnd[:, :-1]), bnd[:, 1:])  # empty clusters: cut = lo = hi
        out = torch.empty((n, 2 * c + 1), dtype=torch.int64)
        out[:, 0:-1:2], out[:, 1:-1:2], out[:, -1] = bnd[:, :-1], cut, self.K
        return out

    def codes(self, bnd: torch.Tensor) -> np.ndarray:
        jt = self.cluster_of_positions(bnd)
        codes = torch.empty_like(jt)
        codes.scatter_(1, self.order, jt)
        return codes.numpy().astype(np.uint8)


# ----------------------------------------------------------------------------- public API
def quantize_nonuniform(w: np.ndarray, fisher: np.ndarray | None = None, seed_bits: int = 3, max_bits: int = 8,
                        name: str = "weight", restarts: int = 2) -> AnyPrecLayer:
    """Seed (weighted k-means at ``seed_bits``, best of a quantile and ``restarts`` k-means++ inits per row)
    + incremental upscaling to ``max_bits``."""
    check_bits(seed_bits, max_bits)
    w = check_weight(w, name)
    if fisher is not None:
        fisher = np.asarray(fisher)
        if fisher.shape != w.shape:
            raise QuantizationError(f"{name}: sensitivity shape {fisher.shape} != weight shape {w.shape}")
        if not np.isfinite(fisher).all():
            raise QuantizationError(f"{name}: sensitivity (Fisher information) has non-finite values")
    rows = _SortedRows(w, fisher)
    bnd = rows.best_kmeans(1 << seed_bits, restarts)
    cent = rows.centroids(bnd)
    luts = {seed_bits: cent.numpy().astype(np.float16)}
    for b in range(seed_bits + 1, max_bits + 1):
        bnd = rows.split(bnd)
        cent = rows.centroids(bnd, fallback=torch.repeat_interleave(cent, 2, dim=1))
        luts[b] = cent.numpy().astype(np.float16)
    planes = pack_bitplanes(rows.codes(bnd), max_bits)
    return AnyPrecLayer(planes=planes, luts=luts, shape=tuple(w.shape), seed_bits=seed_bits, scheme="nonuniform")


def kmeans_reference(w: np.ndarray, fisher: np.ndarray | None, bits: int, restarts: int = 2) -> np.ndarray:
    """An independent weighted k-means at ``bits`` (no upscaling): the best per row of Lloyd runs from a
    quantile init and from ``restarts`` k-means++ inits. Returns the dequantized weight.
    Used to check the paper's claim that upscaled children match independently quantized models."""
    w = check_weight(w)
    rows = _SortedRows(w, fisher)
    bnd = rows.best_kmeans(1 << bits, restarts)
    cent = rows.centroids(bnd).numpy().astype(np.float16).astype(np.float32)
    return np.take_along_axis(cent, rows.codes(bnd).astype(np.int64), axis=1)


def weighted_error(w: np.ndarray, wq: np.ndarray, fisher: np.ndarray | None = None) -> float:
    d = (np.asarray(w, np.float64) - np.asarray(wq, np.float64)) ** 2
    return float((d if fisher is None else d * fisher).sum())


# ----------------------------------------------------------------------------- uniform scheme
@dataclass
class UniformLayer(_Bitplanes):
    """8-bit (``max_bits``) asymmetric uniform parent per row-group; children are truncations."""

    planes: np.ndarray        # uint32 [max_bits, N, ceil(K/32)]
    scales: np.ndarray        # float16 [N, ngroups]
    zeros: np.ndarray         # float16 [N, ngroups]: code of 0.0 (fractional allowed)
    shape: tuple[int, int]
    group_size: int
    min_bits: int = 3
    scheme: str = "uniform"

    @property
    def lowest_bits(self) -> int:
        return self.min_bits

    def dequantize(self, bits: int) -> np.ndarray:
        n, k = self.shape
        drop = self.max_bits - bits
        q = self.codes(bits).astype(np.float32) * (1 << drop) + (0.5 * ((1 << drop) - 1) if drop else 0.0)
        s = np.repeat(self.scales.astype(np.float32), self.group_size, axis=1)[:, :k]
        z = np.repeat(self.zeros.astype(np.float32), self.group_size, axis=1)[:, :k]
        return (q - z) * s

    def nbytes(self) -> int:
        return int(self.planes.nbytes + self.scales.nbytes + self.zeros.nbytes)


def _group_minmax(w: np.ndarray, group_size: int):
    n, k = w.shape
    if group_size <= 0:
        raise QuantizationError(f"group size must be positive, got {group_size}")
    ng = (k + group_size - 1) // group_size
    pad = ng * group_size - k
    wp = np.pad(w, ((0, 0), (0, pad)), mode="edge") if pad else w
    g = wp.reshape(n, ng, group_size)
    return g.min(-1), g.max(-1), ng


def quantize_uniform(w: np.ndarray, group_size: int = 128, max_bits: int = 8, min_bits: int = 3,
                     name: str = "weight") -> UniformLayer:
    if not 2 <= min_bits <= max_bits <= MAX_PARENT_BITS:
        raise QuantizationError(f"uniform bit-widths {min_bits}..{max_bits} unsupported: use 2..8")
    w = check_weight(w, name)
    n, k = w.shape
    lo, hi, ng = _group_minmax(w, group_size)
    # the range always includes 0, so the zero point lies in [0, levels] and its fp16 rounding is < 1/8 code;
    # (a group far from 0, e.g. constant 10.0, would otherwise get a zero point beyond fp16: inf, or one
    # off by several codes, with every code then clipped)
    lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
    levels = (1 << max_bits) - 1
    scale = np.maximum(hi - lo, 1e-8) / levels
    scale = scale.astype(np.float16).astype(np.float32)
    scale[scale == 0] = np.float32(np.finfo(np.float16).tiny)
    zero = (-lo / scale).astype(np.float16).astype(np.float32)
    s = np.repeat(scale, group_size, axis=1)[:, :k]
    z = np.repeat(zero, group_size, axis=1)[:, :k]
    codes = np.clip(np.rint(w / s + z), 0, levels).astype(np.uint8)
    return UniformLayer(planes=pack_bitplanes(codes, max_bits), scales=scale.astype(np.float16),
                        zeros=zero.astype(np.float16), shape=(n, k), group_size=group_size, min_bits=min_bits)


def rtn_quantize(w: np.ndarray, bits: int, group_size: int = 128) -> np.ndarray:
    """Round-to-nearest asymmetric min-max quantization per group (the usual baseline); returns w_hat."""
    if not 2 <= bits <= 8:
        raise QuantizationError(f"RTN bit-width {bits} unsupported: use 2..8")
    w = check_weight(w)
    n, k = w.shape
    lo, hi, _ = _group_minmax(w, group_size)
    levels = (1 << bits) - 1
    scale = np.maximum(hi - lo, 1e-8) / levels
    s = np.repeat(scale, group_size, axis=1)[:, :k]
    l = np.repeat(lo, group_size, axis=1)[:, :k]
    return (np.clip(np.rint((w - l) / s), 0, levels) * s + l).astype(np.float32)


# ----------------------------------------------------------------------------- memory accounting
def layer_bytes(n: int, k: int, bits: int, lut_bytes: int = 2) -> int:
    """A single b-bit non-uniform model of one layer: packed codes + its LUT."""
    return (bits * n * k + 7) // 8 + n * (1 << bits) * lut_bytes


def parent_bytes(n: int, k: int, seed_bits: int, max_bits: int, lut_bytes: int = 2) -> int:
    """The any-precision parent: max_bits planes of ceil(K/32) words + one LUT per bit-width."""
    words = num_words(k)
    return max_bits * n * words * 4 + n * sum(1 << b for b in range(seed_bits, max_bits + 1)) * lut_bytes


def memory_ratios(n: int, k: int, seed_bits: int = 3, max_bits: int = 8) -> dict:
    parent = parent_bytes(n, k, seed_bits, max_bits)
    single_max = layer_bytes(n, k, max_bits)
    separate = sum(layer_bytes(n, k, b) for b in range(seed_bits, max_bits + 1))
    return {"parent_bytes": parent, "single_max_bytes": single_max, "separate_bytes": separate,
            "fp16_bytes": 2 * n * k,
            "parent_over_single_max": parent / single_max, "separate_over_parent": separate / parent}
