"""Any-precision quantizer: bitplanes, the top-b-bits property, error vs bit-width, independent k-means,
the uniform scheme, memory accounting and bad input. Synthetic data only; every expected value is
computed here in plain numpy, independently of the package's own helpers where that is possible."""
from __future__ import annotations

import numpy as np
import pytest

from tvm_anyprec.quant import (AnyPrecLayer, QuantizationError, kmeans_reference, memory_ratios, pack_bitplanes,
                               quantize_nonuniform, quantize_uniform, rtn_quantize, unpack_bitplanes,
                               weighted_error)


# ----------------------------------------------------------------------------- independent numpy reference
def ref_unpack(planes: np.ndarray, k: int) -> np.ndarray:
    """planes uint32 [B, N, W] -> bits uint8 [B, N, K]: bit k%32 of word k//32 is column k (little-endian)."""
    b, n, w = planes.shape
    by = np.ascontiguousarray(planes.astype("<u4")).view(np.uint8).reshape(b, n, w * 4)
    return np.unpackbits(by, axis=2, bitorder="little")[:, :, :k]


def ref_codes(planes: np.ndarray, k: int, bits: int) -> np.ndarray:
    """Top ``bits`` planes (plane 0 = MSB) combined into integer codes."""
    bitv = ref_unpack(planes, k)[:bits].astype(np.int64)
    return sum(bitv[i] << (bits - 1 - i) for i in range(bits))


def gaussian(n, k, seed=0):
    return np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)


def fisher_like(n, k, seed=1):
    """A positive, skewed sensitivity (squared gradients look like this: chi-square, heavy right tail)."""
    return (np.random.default_rng(seed).standard_normal((n, k)) ** 2).astype(np.float32)


# ----------------------------------------------------------------------------- bitplanes
@pytest.mark.parametrize("k", [1, 31, 32, 33, 50, 64, 577])
@pytest.mark.parametrize("nbits", [1, 3, 8])
def test_bitplane_round_trip(k, nbits):
    rng = np.random.default_rng(k * 10 + nbits)
    codes = rng.integers(0, 1 << nbits, size=(5, k), dtype=np.uint8)
    planes = pack_bitplanes(codes, nbits)
    assert planes.dtype == np.uint32 and planes.shape == (nbits, 5, (k + 31) // 32)
    np.testing.assert_array_equal(unpack_bitplanes(planes, k), codes)
    # the layout, checked independently: plane 0 is the MSB, column k sits at bit k%32 of word k//32
    np.testing.assert_array_equal(ref_codes(planes, k, nbits), codes)
    # padding bits past K are zero
    bits = np.unpackbits(planes.astype("<u4").view(np.uint8).reshape(nbits, 5, -1), axis=2, bitorder="little")
    assert not bits[:, :, k:].any()
    # top-b planes are the codes shifted right
    for b in range(1, nbits + 1):
        np.testing.assert_array_equal(unpack_bitplanes(planes, k, b), codes >> (nbits - b))


def test_bitplane_layout_single_bit():
    codes = np.zeros((1, 40), np.uint8)
    codes[0, 33] = 0b101  # 3-bit code at column 33 -> word 1, bit 1 of planes 0 and 2
    p = pack_bitplanes(codes, 3)
    assert p[:, 0, 0].tolist() == [0, 0, 0]
    assert p[:, 0, 1].tolist() == [2, 0, 2]


def test_bitplane_errors():
    with pytest.raises(ValueError, match="2-D"):
        pack_bitplanes(np.zeros(8, np.uint8), 3)
    with pytest.raises(ValueError, match="2-D"):
        pack_bitplanes(np.zeros((2, 2, 2), np.uint8), 3)
    with pytest.raises(ValueError, match="does not fit in 3 bits"):
        pack_bitplanes(np.full((2, 5), 8, np.uint8), 3)
    with pytest.raises(ValueError, match="nbits"):
        pack_bitplanes(np.zeros((2, 5), np.uint8), 9)
    with pytest.raises(ValueError, match="nbits"):
        pack_bitplanes(np.zeros((2, 5), np.uint8), 0)
    planes = pack_bitplanes(np.zeros((2, 50), np.uint8), 4)
    with pytest.raises(ValueError, match="K=65"):
        unpack_bitplanes(planes, 65)       # 2 words hold 33..64 columns
    with pytest.raises(ValueError, match="K=32"):
        unpack_bitplanes(planes, 32)
    with pytest.raises(ValueError, match="bits=5"):
        unpack_bitplanes(planes, 50, 5)
    with pytest.raises(ValueError, match="uint32"):
        unpack_bitplanes(planes.astype(np.int64), 50)


# ----------------------------------------------------------------------------- top-b-bits identity
@pytest.mark.parametrize("seed_bits,max_bits", [(2, 8), (3, 8), (4, 8), (3, 6), (2, 4), (4, 4)])
@pytest.mark.parametrize("k,weighted", [(50, False), (577, True), (256, False)])
def test_children_are_top_bits_of_parent(seed_bits, max_bits, k, weighted):
    n = 6
    w = gaussian(n, k, seed=k)
    f = fisher_like(n, k) if weighted else None
    layer = quantize_nonuniform(w, f, seed_bits, max_bits)
    assert layer.bit_widths == list(range(seed_bits, max_bits + 1))
    assert layer.planes.shape == (max_bits, n, (k + 31) // 32)
    assert sorted(layer.luts) == layer.bit_widths
    full = layer.codes(max_bits)
    np.testing.assert_array_equal(full, ref_codes(layer.planes, k, max_bits))
    rows = np.arange(n)[:, None]
    for b in layer.bit_widths:
        assert layer.luts[b].shape == (n, 1 << b) and layer.luts[b].dtype == np.float16
        cb = layer.codes(b)
        np.testing.assert_array_equal(cb, full >> (max_bits - b))
        np.testing.assert_array_equal(cb, ref_codes(layer.planes, k, b))
        expect = layer.luts[b][rows, ref_codes(layer.planes, k, b)].astype(np.float32)
        np.testing.assert_array_equal(layer.dequantize(b), expect)


def test_lut_is_weighted_centroid_of_child_cluster():
    """luts[b][n, c] is the (sensitivity-weighted) mean of the weights whose top b bits are c (fp16)."""
    w, f = gaussian(4, 300, 5), fisher_like(4, 300, 6)
    layer = quantize_nonuniform(w, f, 3, 6)
    for b in layer.bit_widths:
        c = layer.codes(b)
        for r in range(4):
            for code in np.unique(c[r]):
                m = c[r] == code
                mean = (f[r, m].astype(np.float64) * w[r, m]).sum() / f[r, m].astype(np.float64).sum()
                assert abs(float(layer.luts[b][r, code]) - mean) <= 2e-3 * max(1.0, abs(mean))


def test_constant_and_tiny_rows():
    w = np.full((3, 40), 0.5, np.float32)
    layer = quantize_nonuniform(w, None, 3, 8)
    for b in layer.bit_widths:
        np.testing.assert_array_equal(layer.dequantize(b), w)
    # fewer weights than clusters (K=5 < 2**8): empty clusters, still exact and top-bits consistent
    w = gaussian(2, 5, 3)
    layer = quantize_nonuniform(w, None, 2, 8)
    for b in layer.bit_widths:
        np.testing.assert_array_equal(layer.codes(b), layer.codes(8) >> (8 - b))
    np.testing.assert_allclose(layer.dequantize(3), w, atol=2e-3)
    # all-zero sensitivity on a row must not break the centroids
    f = fisher_like(2, 5)
    f[0] = 0
    layer = quantize_nonuniform(w, f, 2, 4)
    assert np.isfinite(layer.dequantize(2)).all()


# ----------------------------------------------------------------------------- error vs bit-width
@pytest.mark.parametrize("weighted", [False, True])
def test_error_falls_strictly_with_bits(weighted):
    w = gaussian(32, 512, 11)
    f = fisher_like(32, 512, 12) if weighted else None
    layer = quantize_nonuniform(w, f, 2, 8)
    errs = [weighted_error(w, layer.dequantize(b), f) for b in layer.bit_widths]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    # each extra bit removes most of the error (ideal ~4x); a sanity bound
    assert all(b < 0.5 * a for a, b in zip(errs, errs[1:])), errs


# ----------------------------------------------------------------------------- upscaled child vs independent k-means
# Measured ratio = weighted error of the upscaled b-bit child / error of an independent b-bit weighted k-means
# (kmeans_reference), Gaussian rows 64 x K, three random seeds (max over them), parent 3..8 bits:
#
#   K     sensitivity   4-bit  5-bit  6-bit  7-bit  8-bit
#   1024  none          1.019  1.028  1.043  1.102  1.295
#   1024  Fisher-like   1.039  1.072  1.112  1.310  1.856
#   4096  none          1.014  1.017  1.016  1.025  1.027
#   4096  Fisher-like   1.013  1.024  1.019  1.052  1.084
#
# The 2-means splits themselves are exact (the best contiguous cut of each cluster), so the gap is the cost
# of the tree structure: once a cluster holds only a few weights (K / 2^b = 8 at 7 bits and 4 at 8 bits for
# K=1024), a child inherits its parent's cut points and cannot move them, while an independent k-means can.
# The "within 10% of an independently quantized model" claim therefore holds for 4..8 bits at K=4096
# (>= 16 weights per cluster) but NOT for 7-8 bits (unweighted) or 6-8 bits (Fisher-weighted) at K=1024.
# Those cases are not asserted; test_upscaling_gap_small_clusters records them. (The real model's layers
# have K = 576 and 1536.)
WITHIN_10PCT = [
    (1024, False, [4, 5, 6]),
    (1024, True, [4, 5]),
    (4096, False, [4, 5, 6, 7, 8]),
    (4096, True, [4, 5, 6, 7, 8]),
]


@pytest.mark.parametrize("k,weighted,bits", WITHIN_10PCT)
def test_upscaled_child_within_10pct_of_independent_kmeans(k, weighted, bits):
    n = 64 if k == 1024 else 32
    w = gaussian(n, k, 21)
    f = fisher_like(n, k, 22) if weighted else None
    layer = quantize_nonuniform(w, f, 3, 8)
    ratios = {}
    for b in bits:
        ratios[b] = weighted_error(w, layer.dequantize(b), f) / weighted_error(w, kmeans_reference(w, f, b), f)
    print(f"K={k} weighted={weighted} child/independent:", {b: round(r, 4) for b, r in ratios.items()})
    assert all(r <= 1.10 for r in ratios.values()), ratios


def _ratio_table(w, f):
    layer = quantize_nonuniform(w, f, 3, 8)
    child = {b: weighted_error(w, layer.dequantize(b), f) for b in layer.bit_widths}
    ref = {b: weighted_error(w, kmeans_reference(w, f, b), f) for b in layer.bit_widths}
    return child, ref


@pytest.mark.parametrize("dist", ["gaussian", "student-t3"])
@pytest.mark.parametrize("weighted", [False, True])
def test_upscaling_gap_small_clusters(dist, weighted, capsys):
    """Records the configurations where the 10% claim does not hold (64x1024 rows, 7-8 bits; heavy tails).

    Measured (seed 7): child(b) / independent(b) for b = 3..8
      gaussian   none    1.000 1.021 1.022 1.012 1.076 1.267
      gaussian   Fisher  1.000 1.037 1.048 1.105 1.286 1.847
      student-t3 none    1.000 1.082 1.236 1.449 1.850 2.795
      student-t3 Fisher  1.000 1.160 1.361 1.653 2.186 3.808
    (Student-t rows at K=4096 are also off: up to 1.30 at 6 bits and 1.95 at 8 bits.)
    What does hold everywhere: the upscaled b-bit child is better than half the error of an independent
    (b-1)-bit model (measured 0.21..0.39), i.e. every upscaling step is worth its bit.
    """
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((64, 1024)) if dist == "gaussian" else rng.standard_t(3, (64, 1024))).astype(np.float32)
    f = (rng.standard_normal((64, 1024)) ** 2).astype(np.float32) if weighted else None
    child, ref = _ratio_table(w, f)
    same = [child[b] / ref[b] for b in range(3, 9)]
    prev = [child[b] / ref[b - 1] for b in range(4, 9)]
    with capsys.disabled():
        print(f"\n  {dist:<10} {'Fisher' if weighted else 'none':<6} child(b)/independent(b), b=3..8: "
              + " ".join(f"{r:.3f}" for r in same)
              + " | child(b)/independent(b-1), b=4..8: " + " ".join(f"{r:.3f}" for r in prev))
    assert abs(same[0] - 1) < 1e-9          # the seed is the same k-means
    assert all(r >= 0.97 for r in same)      # an upscaled child is not better than a fresh k-means (sanity)
    assert all(r < 0.5 for r in prev)
    assert same[1] < 1.3                     # 4 bits: still close even with heavy tails


# ----------------------------------------------------------------------------- uniform scheme
def test_uniform_children_are_truncations_with_centre_offset():
    n, k, g = 8, 300, 128
    w = gaussian(n, k, 31)
    layer = quantize_uniform(w, g)
    assert layer.bit_widths == [3, 4, 5, 6, 7, 8]
    s = np.repeat(layer.scales.astype(np.float32), g, axis=1)[:, :k]
    z = np.repeat(layer.zeros.astype(np.float32), g, axis=1)[:, :k]
    code8 = ref_codes(layer.planes, k, 8)
    np.testing.assert_array_equal(code8, np.clip(np.rint(w / s + z), 0, 255))
    for b in layer.bit_widths:
        d = 8 - b
        q = (code8 >> d) * 2.0 ** d + (2.0 ** d - 1) / 2
        np.testing.assert_allclose(layer.dequantize(b), (q - z) * s, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(layer.codes(b), code8 >> d)


def test_uniform_error_falls_and_matches_rtn():
    w = gaussian(64, 1000, 32)
    layer = quantize_uniform(w, 128)
    errs = [weighted_error(w, layer.dequantize(b)) for b in layer.bit_widths]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    rtn8 = weighted_error(w, rtn_quantize(w, 8, 128))
    # same grid as RTN 8-bit up to the fp16 scale/zero (measured ratio 1.0017)
    assert errs[-1] <= 1.02 * rtn8, (errs[-1], rtn8)


def test_uniform_children_unbiased():
    w = gaussian(256, 1024, 33)
    layer = quantize_uniform(w, 128)
    step8 = float(layer.scales.astype(np.float32).mean())
    for b in layer.bit_widths:
        step = step8 * 2 ** (8 - b)
        bias = float((w.astype(np.float64) - layer.dequantize(b)).mean())
        assert abs(bias) < 0.01 * step, (b, bias, step)
        # and the plain truncation (no centre offset) would be biased by about half a step
        code8 = layer.codes(8).astype(np.float32)
        s = np.repeat(layer.scales.astype(np.float32), 128, axis=1)
        z = np.repeat(layer.zeros.astype(np.float32), 128, axis=1)
        if b < 8:
            trunc = (np.floor(code8 / 2 ** (8 - b)) * 2 ** (8 - b) - z) * s
            expect = (2 ** (8 - b) - 1) / 2 * step8       # the mean offset inside a bucket
            assert abs(float((w - trunc).mean()) - expect) < 0.1 * expect


def test_uniform_groups_not_containing_zero():
    """A constant group, or one far from 0, once produced an inf zero point (fp16 overflow) or one off by
    several codes; the range now always includes 0."""
    w = np.concatenate([np.full((2, 128), 10.0), 5 + 0.1 * np.random.default_rng(0).random((2, 128))], 1)
    layer = quantize_uniform(w.astype(np.float32), 128)
    assert np.isfinite(layer.zeros.astype(np.float32)).all()
    for b in layer.bit_widths:
        wq = layer.dequantize(b)
        assert np.isfinite(wq).all()
        step = layer.scales.astype(np.float32).max() * 2 ** (8 - b)
        assert np.abs(wq - w).max() <= 0.5 * step + 1e-3


def test_rtn_reference():
    w = gaussian(4, 256, 34)
    wq = rtn_quantize(w, 4, 128)
    for g in range(2):
        blk, q = w[:, g * 128:(g + 1) * 128], wq[:, g * 128:(g + 1) * 128]
        lo, hi = blk.min(1, keepdims=True), blk.max(1, keepdims=True)
        s = (hi - lo) / 15
        np.testing.assert_allclose(q, np.clip(np.rint((blk - lo) / s), 0, 15) * s + lo, rtol=1e-5, atol=1e-6)
        assert all(len(np.unique(r)) <= 16 for r in q)


# ----------------------------------------------------------------------------- memory
def test_memory_ratios_4096():
    n = k = 4096
    r = memory_ratios(n, k)
    # format: planes uint32 [8, N, K/32] + an fp16 LUT of 2^b entries per row for each b in 3..8
    parent = 8 * n * (k // 32) * 4 + sum(n * 2 ** b * 2 for b in range(3, 9))
    single8 = n * k * 8 // 8 + n * 256 * 2
    separate = sum(n * k * b // 8 + n * 2 ** b * 2 for b in range(3, 9))
    assert r["parent_bytes"] == parent
    assert r["single_max_bytes"] == single8
    assert r["separate_bytes"] == separate
    assert r["fp16_bytes"] == 2 * n * k
    assert r["parent_over_single_max"] == pytest.approx(parent / single8)
    assert parent <= 1.15 * single8                 # 1.1077: the five smaller LUTs cost ~11%
    assert separate >= 3.5 * parent                 # 3.508
    print(f"parent/8-bit {parent / single8:.4f}, separate/parent {separate / parent:.3f}")


def test_memory_ratios_odd_k():
    r = memory_ratios(10, 50, 3, 4)
    assert r["parent_bytes"] == 4 * 10 * 2 * 4 + 10 * (8 + 16) * 2


# ----------------------------------------------------------------------------- bad input
def test_bad_weights():
    with pytest.raises(QuantizationError, match="2-D"):
        quantize_nonuniform(np.zeros(16, np.float32))
    with pytest.raises(QuantizationError, match="2-D"):
        quantize_nonuniform(np.zeros((2, 3, 4), np.float32))
    w = gaussian(4, 64)
    w[2, 5] = np.nan
    with pytest.raises(QuantizationError, match=r"non-finite.*\[2, 5\]"):
        quantize_nonuniform(w, name="layers.0.q_proj")
    w[2, 5] = np.inf
    with pytest.raises(QuantizationError, match="layers.0.q_proj.*non-finite"):
        quantize_nonuniform(w, name="layers.0.q_proj")
    w = gaussian(4, 64)
    w[0, 0] = -np.inf
    with pytest.raises(QuantizationError, match="non-finite"):
        quantize_uniform(w)
    with pytest.raises(QuantizationError, match="non-finite"):
        rtn_quantize(w, 4)
    with pytest.raises(QuantizationError, match="empty"):
        quantize_nonuniform(np.zeros((0, 4), np.float32))
    with pytest.raises(QuantizationError, match="floating"):
        quantize_nonuniform(np.zeros((2, 4), np.int32))
    with pytest.raises(QuantizationError, match="sensitivity shape"):
        quantize_nonuniform(gaussian(4, 64), np.ones((4, 63), np.float32))
    f = np.ones((4, 64), np.float32)
    f[1, 1] = np.nan
    with pytest.raises(QuantizationError, match="sensitivity.*non-finite"):
        quantize_nonuniform(gaussian(4, 64), f)


@pytest.mark.parametrize("seed_bits,max_bits,msg", [
    (1, 8, "seed bit-width 1"), (5, 8, "seed bit-width 5"), (3, 9, "parent bit-width 9"),
    (4, 3, "parent bit-width 3"), (0, 8, "seed bit-width 0")])
def test_bad_bit_widths(seed_bits, max_bits, msg):
    with pytest.raises(QuantizationError, match=msg):
        quantize_nonuniform(gaussian(2, 64), None, seed_bits, max_bits)


def test_bad_child_bit_width():
    layer = quantize_nonuniform(gaussian(2, 64), None, 3, 8)
    assert isinstance(layer, AnyPrecLayer)
    for b in (9, 2, 0):
        with pytest.raises(QuantizationError, match=f"bit-width {b} unsupported.*3, 4, 5, 6, 7, 8"):
            layer.dequantize(b)
    u = quantize_uniform(gaussian(2, 64), 32)
    with pytest.raises(QuantizationError, match="bit-width 9 unsupported"):
        u.dequantize(9)
    with pytest.raises(QuantizationError, match="uniform bit-widths"):
        quantize_uniform(gaussian(2, 64), 32, max_bits=9)
    with pytest.raises(QuantizationError, match="group size"):
        quantize_uniform(gaussian(2, 64), 0)
    with pytest.raises(QuantizationError, match="RTN bit-width 9"):
        rtn_quantize(gaussian(2, 64), 9)
