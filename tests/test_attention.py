"""The in-place cache write and attention kernel (kernels/attention.py) against a float64 numpy reference:
grouped-query heads, sliding windows, softcapping, D not a multiple of 8, a chunk that runs past the end of the
cache; the cache past the chunk is poisoned with NaN and must never be read. Also the exporter's torch
definition of the op (the ONNX function onnxruntime runs) against the same reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm

import tvm_anyprec.kernels  # noqa: F401  (the stack-locals lowering)
from tvm_anyprec.frontend.cache_op import attention_reference
from tvm_anyprec.kernels.attention import make_cache_attention

pytestmark = pytest.mark.kernel
HOST = {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": 2}

CASES = [  # H, Hkv, S, T, D, window, softcap, pos
    (4, 2, 1, 64, 16, 0, 0.0, 5), (9, 3, 32, 256, 64, 0, 0.0, 70), (4, 1, 5, 100, 12, 8, 0.0, 40),
    (4, 2, 4, 40, 8, 0, 30.0, 38), (2, 2, 1, 2048, 64, 0, 0.0, 2000), (4, 4, 3, 16, 8, 0, 0.0, 0),
    # chunks of >= 8 tokens (attention_rows): lanes past S, windows, softcap, the cache's end, pos 0
    (4, 1, 13, 100, 12, 8, 0.0, 40), (4, 2, 9, 40, 8, 0, 30.0, 35), (9, 3, 32, 600, 64, 0, 0.0, 0),
    (8, 2, 11, 300, 16, 50, 0.0, 120)]


def reference(Q, KN, VN, KC, VC, pos, scale, window, softcap):
    H, S, D = Q.shape
    Hkv, Tn, _ = KC.shape
    KC, VC = KC.astype(np.float64), VC.astype(np.float64)
    for s in range(S):
        if pos + s < Tn:
            KC[:, pos + s], VC[:, pos + s] = KN[:, s], VN[:, s]
    O = np.zeros(Q.shape)
    for q in range(H):
        h = q // (H // Hkv)
        for s in range(S):
            hi = min(pos + s, Tn - 1) + 1
            lo = max(pos + s - window + 1, 0) if window else 0
            sc = (KC[h, lo:hi] @ Q[q, s]) * scale
            if softcap:
                sc = softcap * np.tanh(sc / softcap)
            p = np.exp(sc - sc.max())
            O[q, s] = (p / p.sum()) @ VC[h, lo:hi]
    return O, KC, VC


def _inputs(rng, H, Hkv, S, Tn, D, pos):
    Q = rng.standard_normal((H, S, D)).astype(np.float32)
    KN, VN = (rng.standard_normal((Hkv, S, D)).astype(np.float32) for _ in range(2))
    KC, VC = (rng.standard_normal((Hkv, Tn, D)).astype(np.float32) for _ in range(2))
    KC[:, pos + S:], VC[:, pos + S:] = np.nan, np.nan
    return Q, KN, VN, KC, VC


@pytest.mark.parametrize("case", CASES, ids=lambda c: "h{}_kv{}_s{}_t{}_d{}_w{}_c{:g}_p{}".format(*c))
def test_kernel_matches_numpy_and_never_reads_past_the_chunk(case):
    H, Hkv, S, Tn, D, window, softcap, pos = case
    f = make_cache_attention(H, Hkv, S, Tn, D, D ** -0.5, window, softcap)
    fn = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=tvm.target.Target(HOST))
    Q, KN, VN, KC, VC = _inputs(np.random.default_rng(pos), H, Hkv, S, Tn, D, pos)
    O, KCr, VCr = reference(Q, KN, VN, KC, VC, pos, D ** -0.5, window, softcap)
    dev = tvm.cpu()
    a = [tvm.runtime.tensor(x, dev) for x in (Q, KN, VN, KC, VC, np.array([pos], np.int64), np.zeros_like(Q))]
    fn["main"](*a)
    rows = min(S, Tn - pos)                         # tokens past the cache are dropped
    np.testing.assert_allclose(a[-1].numpy()[:, :rows], O[:, :rows], rtol=1e-5, atol=1e-5)
    for got, ref in ((a[3].numpy(), KCr), (a[4].numpy(), VCr)):  # written in place, the rest untouched
        assert np.array_equal(np.isnan(got), np.isnan(ref)) and np.allclose(got[~np.isnan(got)],
                                                                            ref[~np.isnan(ref)])


@pytest.mark.unit
@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: "h{}_kv{}_s{}_w{}_c{:g}".format(*c[:3], c[5], c[6]))
def test_exported_definition_matches_numpy(case):
    """The torch definition (exported as the op's ONNX function) on a clean cache: the same numbers."""
    H, Hkv, S, Tn, D, window, softcap, pos = case
    Q, KN, VN, KC, VC = _inputs(np.random.default_rng(pos), H, Hkv, S, Tn, D, pos)
    KC, VC = np.nan_to_num(KC), np.nan_to_num(VC)   # the dense definition reads every row (masked)
    O, KCr, VCr = reference(Q, KN, VN, KC, VC, pos, D ** -0.5, window, softcap)
    o, kc, vc = attention_reference(*(torch.from_numpy(x) for x in (Q, KN, VN, KC, VC)), torch.tensor([pos]),
                                    D ** -0.5, window, softcap)
    rows = min(S, Tn - pos)
    np.testing.assert_allclose(o.numpy()[:, :rows], O[:, :rows], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kc.numpy(), KCr, rtol=1e-6, atol=1e-6)
