"""Independent references for the compiled model: the same ONNX graph with dequantized weights, for
onnxruntime. The weights are written back in the graph's own layout (a [N, K] torch weight stays [N, K];
a [K, N] MatMul initializer gets the transposed child)."""
from __future__ import annotations

import numpy as np


def dequantized_onnx(onnx_path, layers: dict, bits: int, layouts: dict | None = None, tied: dict | None = None):
    """-> onnx.ModelProto with every initializer named in ``layers`` (weight name -> AnyPrecLayer, the
    name being the graph's initializer name or it without '.weight') replaced by its b-bit child. ``tied``
    (a parent's: state name -> the name it shares) finds an embedding exported under its own name whose
    tensor is the quantized lm_head's."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    done = set()
    for init in model.graph.initializer:
        key = init.name if init.name in layers else init.name.removesuffix(".weight")
        if key not in layers and (tied or {}).get(init.name):
            key = tied[init.name].removesuffix(".weight")
        layer = layers.get(key)
        if layer is None:
            continue
        w = layer.dequantize(bits).astype(np.float32)
        orig = numpy_helper.to_array(init)
        if (layouts is not None and layouts.get(init.name) == "kn") or orig.shape != w.shape:
            w = w.T
        if orig.shape != w.shape:
            raise ValueError(f"{init.name}: graph weight {orig.shape} vs quantized {w.shape}")
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w), init.name))
        done.add(key)
    missing = set(layers) - done
    if missing:
        raise ValueError(f"{len(missing)} quantized layers not found in {onnx_path}: {sorted(missing)[:3]}")
    return model


def ort_session(model_proto, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(model_proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
