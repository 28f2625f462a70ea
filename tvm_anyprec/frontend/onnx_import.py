"""ONNX -> Relax: one Relax function per ONNX graph, weights kept as named function parameters."""
from __future__ import annotations

from ..errors import ImportError_  # noqa: F401  (re-exported)

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class ImportedModel:
    mod: object                                   # tvm.IRModule with one Relax function per graph
    weights: dict = field(default_factory=dict)   # weight name -> numpy array (shared across functions)
    specs: dict = field(default_factory=dict)     # function -> ExportSpec or None
    inputs: dict = field(default_factory=dict)    # function -> [(name, shape, dtype)]
    outputs: dict = field(default_factory=dict)   # function -> [name]
    sources: dict = field(default_factory=dict)   # function -> onnx path


def function_name(path: Path, spec) -> str:
    if spec is not None:   # an export of ours: the file says its role (decode, prefill, verify)
        if path.stem in ("decode", "prefill", "verify"):
            return path.stem
        return "decode" if spec.chunk == 1 else "prefill"
    return path.stem.replace("-", "_").replace(".", "_") or "main"


def onnx_files(source) -> list[Path]:
    p = Path(source)
    if p.is_dir():
        files = sorted(p.glob("*.onnx"))
        if not files:
            raise ImportError_(f"{p} contains no .onnx file")
        return files
    if not p.exists():
        raise ImportError_(f"ONNX model not found: {p}")
    return [p]


def load_onnx(path: Path):
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf DecodeError and friends
        raise ImportError_(f"{path} is not a valid ONNX file: {type(e).__name__}: {e}") from e
    try:
        onnx.checker.check_model(model, full_check=False)
    except Exception as e:
        raise ImportError_(f"{path} failed the ONNX checker: {e}") from e
    return model


def import_onnx(source) -> ImportedModel:
    """Import every graph of ``source`` (an .onnx file or a directory of them) into one IRModule."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from .export import read_spec

    out = ImportedModel(mod=tvm.IRModule())
    for path in onnx_files(source):
        model = load_onnx(path)
        spec = read_spec(model)
        fname = function_name(path, spec)
        if fname in out.specs:
            raise ImportError_(f"two graphs map to the same function name {fname!r} ({path})")
        try:
            mod = from_onnx(model, keep_params_in_input=True)
        except Exception as e:
            msg = str(e).strip().splitlines()
            raise ImportError_(f"TVM's ONNX importer rejected {path.name}: {msg[-1] if msg else type(e).__name__}") \
                from e
        mod, params = relax.frontend.detach_params(mod)
        func = mod["main"]
        n_in = int(func.attrs["num_input"])
        for var, arr in zip(func.params[n_in:], params.get("main", [])):
            a = arr.numpy()
            prev = out.weights.get(var.name)
            if prev is not None and (prev.shape != a.shape or not np.array_equal(prev, a)):
                raise ImportError_(f"weight {var.name!r} differs between graphs; they must share weights")
            out.weights[var.name] = a
        out.mod[fname] = func.with_attr("global_symbol", fname)
        init = {i.name for i in model.graph.initializer}
        out.inputs[fname] = [(i.name, [d.dim_value for d in i.type.tensor_type.shape.dim],
                              _onnx_dtype(i.type.tensor_type.elem_type))
                             for i in model.graph.input if i.name not in init]
        out.outputs[fname] = [o.name for o in model.graph.output]
        out.specs[fname] = spec
        out.sources[fname] = str(path)
    return out


def _onnx_dtype(elem_type: int) -> str:
    import onnx

    return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
