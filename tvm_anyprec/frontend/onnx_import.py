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


ATTENTION_MODES = ("kernel", "inline")


def cache_attention_ops(model) -> set[str]:
    """Op types of the exporter's CacheAttention ops in an ONNX model (``frontend.export``)."""
    from .cache_op import OP_DOMAIN, OP_PREFIX

    return {n.op_type for n in model.graph.node if n.domain == OP_DOMAIN and n.op_type.startswith(OP_PREFIX)}


class _CacheAttentionConverter:
    """TVM ONNX converter of a CacheAttention op: the CPU kernel (``kernels.attention``), called in place on the
    two caches (``relax.call_tir_inplace``: the returned caches are the buffers passed in)."""

    @classmethod
    def get_converter(cls, opset):
        return cls._impl

    @staticmethod
    def _impl(bb, inputs, attr, params):
        from tvm import relax

        from ..kernels.attention import CacheAttention

        q, k, v, kc, vc, pos = inputs
        H, S, D = (int(d) for d in q.ty.shape)
        Hkv, Tn, Dk = (int(d) for d in kc.ty.shape)
        if Dk != D or tuple(int(d) for d in vc.ty.shape) != (Hkv, Tn, D):
            raise ImportError_(f"CacheAttention with key/value head sizes {Dk}/{vc.ty.shape} "
                               f"(queries {D}) is not supported")
        spec = CacheAttention(H, Hkv, S, Tn, D, float(attr.get("scale", D ** -0.5)), int(attr.get("window", 0)),
                              float(attr.get("softcap", 0.0)))
        gv = bb.add_func(spec.build(), spec.name())
        return bb.emit(relax.call_tir_inplace(gv, [q, k, v, kc, vc, pos], [-1, 3, 4],
                                              [q.ty, kc.ty, vc.ty]))


class _converters:
    """Within the block: TVM's ONNX importer also converts ``ops`` (CacheAttention op types)."""

    def __init__(self, ops):
        self.ops = ops

    def __enter__(self):
        from tvm.relax.frontend.onnx import onnx_frontend as F

        self.F, self.orig = F, F._get_convert_map
        extra = {op: _CacheAttentionConverter for op in self.ops}
        F._get_convert_map = lambda: {**self.orig(), **extra}

    def __exit__(self, *exc):
        self.F._get_convert_map = self.orig


def import_onnx(source, attention: str = "kernel") -> ImportedModel:
    """Import every graph of ``source`` (an .onnx file or a directory of them) into one IRModule.
    ``attention``: how the exporter's CacheAttention ops become Relax: "kernel", the in-place CPU kernel
    (CPU targets); "inline", their ONNX definition (a dense reference) inlined (other targets)."""
    import contextlib

    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from .export import read_spec

    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    out = ImportedModel(mod=tvm.IRModule())
    for path in onnx_files(source):
        model = load_onnx(path)
        spec = read_spec(model)
        fname = function_name(path, spec)
        if fname in out.specs:
            raise ImportError_(f"two graphs map to the same function name {fname!r} ({path})")
        ops = cache_attention_ops(model)
        if ops and attention == "inline":
            import onnx.inliner
            model, ops = onnx.inliner.inline_local_functions(model), set()
        try:
            with _converters(ops) if ops else contextlib.nullcontext():
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
        for gv, f in mod.functions_items():   # the kernels the converters added (CacheAttention)
            if gv.name_hint == "main":
                continue
            if any(g.name_hint == gv.name_hint for g in out.mod.get_global_vars()):
                raise ImportError_(f"{path.name}: kernel {gv.name_hint} is also used by another graph (two graphs "
                                   "with the same chunk length?)")
            out.mod[gv] = f
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
