"""Helpers that tests and benchmarks share: small ONNX graphs with known weights, and LUT handling.

Nothing here is used by the compiler itself; it needs onnx (a dependency) and numpy only.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MLP_DIMS = (77, 96, 50, 33)          # K, H, H2, N of ``mlp_onnx``: K and N not multiples of 32
TWO_LAYER_DIMS = (6, 128, 192, 64)   # M, K, H, N of ``two_layer_onnx``: group sizes 32/64 divide K and H
_K, _H, _H2, _N = MLP_DIMS
_M2, _K2, _H2L, _N2 = TWO_LAYER_DIMS


def concat_luts(layer, min_bits: int = 3, max_bits: int = 8, dtype=None) -> np.ndarray:
    """The LUTS operand of the bitplane kernel: the layer's per-bit LUTs ``min_bits..max_bits`` side by side."""
    luts = np.concatenate([layer.luts[b] for b in range(min_bits, max_bits + 1)], 1)
    return luts if dtype is None else luts.astype(dtype)


def mlp_onnx(path, batch=3, seq=None):
    """x -> MatMul(W1 [K,H]) + B1 -> Relu -> Gemm(W2t [H2,H], B2, transB=1) -> Relu -> MatMul(W3 [H2,N])
    -> MatMul(lm_head [N, N]^T via Transpose) ; optional 3-D input [1, seq, K]."""
    rng = np.random.default_rng(0)
    W1 = (rng.standard_normal((_K, _H)) / np.sqrt(_K)).astype(np.float32)
    B1 = rng.standard_normal(_H).astype(np.float32)
    W2t = (rng.standard_normal((_H2, _H)) / np.sqrt(_H)).astype(np.float32)
    B2 = rng.standard_normal(_H2).astype(np.float32)
    W3 = (rng.standard_normal((_H2, _N)) / np.sqrt(_H2)).astype(np.float32)
    LM = (rng.standard_normal((_N, _N)) / np.sqrt(_N)).astype(np.float32)
    xshape = [batch, _K] if seq is None else [1, seq, _K]
    yshape = [batch, _N] if seq is None else [1, seq, _N]
    x_in = "x"
    nodes = []
    if seq is not None:
        nodes.append(helper.make_node("Identity", ["x"], ["x2"]))
        x_in = "x2"
    nodes += [
        helper.make_node("MatMul", [x_in, "W1"], ["h1"]),
        helper.make_node("Add", ["h1", "B1"], ["h1b"]),
        helper.make_node("Relu", ["h1b"], ["h1r"]),
    ]
    if seq is None:
        nodes.append(helper.make_node("Gemm", ["h1r", "W2t", "B2"], ["h2"], transB=1))
    else:
        nodes += [helper.make_node("Transpose", ["W2t"], ["W2"], perm=[1, 0]),
                  helper.make_node("MatMul", ["h1r", "W2"], ["h2m"]),
                  helper.make_node("Add", ["h2m", "B2"], ["h2"])]
    nodes += [
        helper.make_node("Relu", ["h2"], ["h2r"]),
        helper.make_node("MatMul", ["h2r", "W3"], ["h3"]),
        helper.make_node("Transpose", ["lm_head.weight"], ["lmT"], perm=[1, 0]),
        helper.make_node("MatMul", ["h3", "lmT"], ["y"]),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((W1, "W1"), (B1, "B1"), (W2t, "W2t"), (B2, "B2"), (W3, "W3"), (LM, "lm_head.weight"))]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, xshape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, yshape)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, str(path))
    return {"W1": W1, "W2t": W2t, "W3": W3}, xshape


def two_layer_onnx(path):
    """x [M, K] -> MatMul(W1 [K, H]) -> Relu -> Gemm(W2t [N, H], transB=1) -> y [M, N] (TWO_LAYER_DIMS)."""
    rng = np.random.default_rng(0)
    W1 = (rng.standard_normal((_K2, _H2L)) / np.sqrt(_K2)).astype(np.float32)
    W2t = (rng.standard_normal((_N2, _H2L)) / np.sqrt(_H2L)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["hr"]),
             helper.make_node("Gemm", ["hr", "W2t"], ["y"], transB=1)]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [_M2, _K2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [_M2, _N2])],
                          [numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(W2t, "W2t")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return W1, W2t
