"""The byte-sliced plane layout the CPU kernels read (numpy only), its activation order, the int16 centroid
tables of int8 mode, and a numpy reference of both kernel modes.

Layout ("bs64", per plane p, row n): K is padded to whole blocks of 64 weights; block j of a row is 8 bytes,
and bit i of byte l holds plane p's bit of the code of weight k = 64*j + 8*i + l. Rows are ``8*ceil(K/64)``
bytes, planes stay separate ([B, N, row bytes], plane 0 = MSB), so a b-bit call still reads only the top b
planes and every child is still the top bits of the parent: the same bytes as ``bitplanes``, reordered.

The kernels load 32 bytes of a plane at once: group g = blocks 4g..4g+3 (256 weights). Bit i of those
32 bytes gives 32 codes at once, lane 8*j + l <-> weight 256*g + 64*j + 8*i + l. The activations are put into
that order once per call (``decode_order``): position 256*g + 32*i + 8*j + l of the permuted row holds
x[256*g + 64*j + 8*i + l] (zero past K), so the kernels run their dot products over contiguous vectors.
"""
from __future__ import annotations

import numpy as np

from .bitplanes import unpack_bitplanes

BLOCK = 64      # weights per 8-byte block of a plane row
GROUP = 256     # weights per 32-byte vector of a plane (4 blocks); the activation scale group of int8 mode
INT8_MAX = 127
TABLE_MAX = 32767   # int8 mode's centroid tables are int16: int8 tables cost +0.4..1.2% perplexity from 5 bits on
                    # (see int_tables, byte_table)
TABLE_DTYPE = "int16"
BYTE_TABLE_BITS = (3, 4)   # bit-widths whose int16 tables are 256 x an int8 value (zero low bytes, ``int_tables``): the
                           # AVX-512 body looks up and multiplies one byte per code instead of two there
FORM_GRID = 16   # above BYTE_TABLE_BITS the int16 tables are FORM_GRID x A[code >> (b - 4)] + r[code], A and r int8
                 # (``table_form``): the AVX2 body looks up one 16-entry table and one byte tree, not two trees


def blocks(k: int) -> int:
    return -(-k // BLOCK)


def groups(k: int) -> int:
    return -(-k // GROUP)


def row_bytes(k: int) -> int:
    return 8 * blocks(k)


def to_byte_sliced(planes: np.ndarray, k: int) -> np.ndarray:
    """uint32 planes [B, N, ceil(K/32)] (``bitplanes``) -> uint8 [B, N, 8*ceil(K/64)]."""
    planes = np.asarray(planes)
    B, N, _ = planes.shape
    kb = blocks(k)
    out = np.empty((B, N, 8 * kb), np.uint8)
    for p in range(B):
        bits = np.zeros((N, kb * BLOCK), np.uint8)
        bits[:, :k] = unpack_bitplanes(planes[p:p + 1], k)          # this plane's bit of every weight
        bits = bits.reshape(N, kb, 8, 8)                            # [n, block, i, l]
        out[p] = np.packbits(bits.transpose(0, 1, 3, 2), axis=-1, bitorder="little").reshape(N, 8 * kb)
    return out


def codes_from_byte_sliced(bs: np.ndarray, k: int, bits: int) -> np.ndarray:
    """The codes of the top ``bits`` planes, uint8 [N, K] (the inverse of ``to_byte_sliced``)."""
    B, N, rb = bs.shape
    kb = rb // 8
    codes = np.zeros((N, kb * BLOCK), np.uint8)
    for p in range(bits):
        bit = np.unpackbits(bs[p].reshape(N, kb, 8, 1), axis=-1, bitorder="little")  # [n, block, l, i]
        codes = (codes << 1) | bit.transpose(0, 1, 3, 2).reshape(N, kb * BLOCK)
    return codes[:, :k]


def decode_order(k: int) -> np.ndarray:
    """int64 [groups(k) * 256]: the source column of each position of a permuted activation row (-1: zero)."""
    q = np.arange(groups(k) * GROUP)
    g, r = q // GROUP, q % GROUP
    i, j, l = r // 32, (r // 8) % 4, r % 8
    src = GROUP * g + BLOCK * j + 8 * i + l
    return np.where(src < k, src, -1)


def permute_activations(x: np.ndarray, k: int) -> np.ndarray:
    """x [M, K] -> [M, groups(k) * 256] in decode order."""
    src = decode_order(k)
    out = np.zeros((x.shape[0], src.size), x.dtype)
    out[:, src >= 0] = x[:, src[src >= 0]]
    return out


def int_tables(luts: np.ndarray, widths) -> tuple[np.ndarray, np.ndarray]:
    """fp16 LUTs [N, L] (the per-bit LUTs of ``widths`` concatenated) -> (int16 tables [N, L], fp32 scales
    [N, len(widths)]): per row and bit-width, q = round(centroid / scale); at BYTE_TABLE_BITS q = 256 r, r the int8
    value of ``byte_table`` (its low byte is zero, so the AVX-512 body skips it); above, FORM_GRID A + r
    (``form_table``; the AVX2 body reads one 16-entry table and one byte tree). (int8 tables, scale max / 127, cost
    +0.9% perplexity at 3, 6 and 7 bits and +1.2% at 8 on SmolLM2-135M, 16 x 128 tokens of Hamlet, torch; int16 tables
    with scale max / 32767 were within 0.01%; the form: int8 mode against exact -0.34..+0.16% at 5..8 bits.)"""
    luts = np.asarray(luts, np.float32)
    tab = np.zeros(luts.shape, np.int16)
    scales = np.ones((luts.shape[0], len(widths)), np.float32)
    off = 0
    for t, b in enumerate(widths):
        part = luts[:, off:off + (1 << b)]
        if b in BYTE_TABLE_BITS:
            r, s = byte_table(part)
            tab[:, off:off + (1 << b)] = r.astype(np.int16) * 256
            scales[:, t] = s / 256
        elif b > 4:
            q, s = form_table(part, b)
            tab[:, off:off + (1 << b)] = q
            scales[:, t] = s
        else:   # b < 3 (a 2-bit seed): int16 with the max scale
            amax = np.abs(part).max(1)
            s = np.where(amax > 0, amax / TABLE_MAX, 1.0).astype(np.float32)
            tab[:, off:off + (1 << b)] = np.clip(np.rint(part / s[:, None]), -TABLE_MAX, TABLE_MAX).astype(np.int16)
            scales[:, t] = s
        off += 1 << b
    return tab, scales


def cluster_base(q: np.ndarray, b: int) -> np.ndarray:
    """A [N, 16] of b-bit int16 tables q [N, 2^b] (b > 4), as the AVX2 body derives it: floor((first + last) / 32)
    of each 4-bit cluster's entries (codes h 2^(b-4) .. (h + 1) 2^(b-4) - 1)."""
    c = np.asarray(q, np.int32).reshape(q.shape[0], 16, -1)
    return (c[:, :, 0] + c[:, :, -1]) >> 5


def in_form(q: np.ndarray, b: int) -> np.ndarray:
    """Rows [N] whose table is FORM_GRID x A + r with A = ``cluster_base``, |A| and |r| <= INT8_MAX."""
    a = cluster_base(q, b)
    r = np.asarray(q, np.int32).reshape(q.shape[0], 16, -1) - FORM_GRID * a[:, :, None]
    return (np.abs(r) <= INT8_MAX).all((1, 2)) & (np.abs(a) <= INT8_MAX).all(1)


def form_table(part: np.ndarray, b: int, tries: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """Centroids [N, 2^b] (b > 4) -> (int16 q [N, 2^b] in the form of ``in_form``, scales [N]): q = round(c /
    scale) with the smallest scale, from the widest 4-bit cluster's span / 222 (sorted clusters then fit: the
    base sits within 16 of the middle) up by 1% at a time, at which the row is in the form. SmolLM2-135M's parent:
    RMS error 0.12-0.18 of an int8 table's (max / 127) at 5..8 bits (``benchmarks.table_forms``)."""
    part = np.asarray(part, np.float32)
    n = part.shape[0]
    cl = part.reshape(n, 16, -1)
    amax = np.abs(part).max(1)
    span = (cl.max(2) - cl.min(2)).max(1)
    base = np.maximum(np.maximum(span / (2 * INT8_MAX - 32), amax / (FORM_GRID * INT8_MAX)), 1e-30)
    q = np.zeros(part.shape, np.int16)
    scales = np.ones(n, np.float32)
    todo = np.arange(n)
    for k in range(tries):
        sc = (base[todo] * (1 + k / 100)).astype(np.float32)
        qq = np.rint(part[todo] / sc[:, None])
        ok = in_form(qq, b)
        q[todo[ok]], scales[todo[ok]] = qq[ok].astype(np.int16), sc[ok]
        todo = todo[~ok]
        if not todo.size:
            return q, scales
    raise ValueError(f"{todo.size} rows of the {b}-bit tables found no scale for the table form")


def byte_table(part: np.ndarray, steps: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Centroids [N, 2^b] -> (int8 values r [N, 2^b], scales [N]): r = round(centroid / scale), |r| <= 127, the scale
    per row the one of ``steps`` candidates max|c| / d (d from 127 down to 64) with the least squared error over the
    row's centroids (d = 127, the max scale, is a candidate: never worse than it). With 8 or 16 centroids the
    max scale leaves errors a shorter step removes: SmolLM2-135M, Hamlet 16 x 128 tokens, torch, the bench parent
    (lm_head fp32): 3 bits 117.27 (fp16 centroids) -> 118.29 with the max scale (+0.87%), 117.36 with the chosen
    one (+0.08%); 4 bits 73.34 -> 73.45 / 73.48 (+0.16 / +0.19%). Not used above 4 bits: 5 bits 63.19 -> 63.47 /
    63.77 (+0.43 / +0.91%), 6 bits 62.37 -> 62.94 / 63.04 (+0.91 / +1.06%)."""
    part = np.asarray(part, np.float32)
    amax = np.abs(part).max(1, keepdims=True)
    amax = np.where(amax > 0, amax, 1.0).astype(np.float32)
    best_err, best_s = None, None
    for d in np.linspace(INT8_MAX, 64, steps, dtype=np.float32):
        sc = amax / d
        err = ((part - sc * np.clip(np.rint(part / sc), -INT8_MAX, INT8_MAX)) ** 2).sum(1, keepdims=True)
        if best_err is None:
            best_err, best_s = err, sc
        else:
            better = err < best_err
            best_err, best_s = np.where(better, err, best_err), np.where(better, sc, best_s)
    r = np.clip(np.rint(part / best_s), -INT8_MAX, INT8_MAX).astype(np.int8)
    return r, best_s[:, 0].astype(np.float32)


def quantize_activations(xp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permuted activations [M, G*256] fp32 -> (int8 [M, G*256], scales fp32 [M, G, 2, 4]): per block of 32
    columns (block (h, j) of group g: positions 256g + 32i + 8j + l with i = 4h..4h+3), scale = max |x| / 127,
    q = floor(x / scale + 1/2) (the kernels' rounding; float ties may differ by one)."""
    M, P = xp.shape
    G = P // GROUP
    b = np.asarray(xp, np.float32).reshape(M, G, 2, 4, 4, 8)         # [m, g, h, i', j, l]
    amax = np.abs(b).max(axis=(3, 5))                                 # [m, g, h, j]
    inv = np.where(amax > 0, np.float32(INT8_MAX) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.clip(np.floor(b * inv[:, :, :, None, :, None] + np.float32(0.5)), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q.reshape(M, P), (amax / np.float32(INT8_MAX)).astype(np.float32)


def reference_exact(x: np.ndarray, bs: np.ndarray, luts: np.ndarray, k: int, bits: int, lut_off: int) -> np.ndarray:
    """Y = X @ W_b^T with W_b[n, k] = LUT_b[n, code_b(n, k)], in float64 (fp16 LUT values, fp32 inputs)."""
    codes = codes_from_byte_sliced(bs, k, bits).astype(np.int64)
    w = np.take_along_axis(np.asarray(luts, np.float64), lut_off + codes, axis=1)
    return np.asarray(x, np.float64) @ w.T


def reference_int8_acc(xq: np.ndarray, bs: np.ndarray, tab: np.ndarray, k: int, bits: int, lut_off: int) -> np.ndarray:
    """int8 mode's integer accumulators [M, N, G, 2, 4]: per block of 32, sum of table value x quantized activation."""
    codes = codes_from_byte_sliced(bs, k, bits).astype(np.int64)
    w = np.take_along_axis(tab.astype(np.int64), lut_off + codes, axis=1)              # [N, K]
    wp = permute_activations(w, k)                                                    # same order as xq
    M, P = xq.shape
    G = P // GROUP
    return np.einsum("mghijl,nghijl->mnghj", xq.astype(np.int64).reshape(M, G, 2, 4, 4, 8),
                     wp.reshape(-1, G, 2, 4, 4, 8))


def reference_int8(x: np.ndarray, bs: np.ndarray, tab: np.ndarray, scales: np.ndarray, k: int, bits: int,
                   lut_off: int, width_index: int) -> np.ndarray:
    xq, sx = quantize_activations(permute_activations(np.asarray(x, np.float32), k))
    acc = reference_int8_acc(xq, bs, tab, k, bits, lut_off)
    return (acc * sx[:, None].astype(np.float64)).sum((-1, -2, -3)) * \
        scales[:, width_index].astype(np.float64)[None, :]
