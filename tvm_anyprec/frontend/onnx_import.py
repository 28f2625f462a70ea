"""ONNX -> Relax: one Relax function per ONNX graph, weights kept as named function parameters."""
from __future__ import annotations

from ..errors import ImportError_  # noqa: F401  (re-exported)

import re
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


VERIFY_CHUNKS = (3, 5)   # tokens per call of the verify graphs: self-speculative decoding checks up to 4 drafts


def graph_names(chunk: int, verify_chunks=VERIFY_CHUNKS) -> list[tuple[str, int]]:
    """[(graph name, tokens per call)] of an export: decode, prefill and the verify graphs, the largest named
    ``verify`` and the others ``verify_<n>`` (``speculative.verify_graphs``: a round runs the smallest that holds
    its drafts). ``verify_chunks``: an int or a sequence (0 or empty: no verify graph)."""
    vc = sorted({int(c) for c in ([verify_chunks] if isinstance(verify_chunks, int) else verify_chunks) if c})
    return [("decode", 1), ("prefill", chunk)] + [("verify" if c == vc[-1] else f"verify_{c}", c) for c in vc]


def is_verify_name(name: str) -> bool:
    """A verify graph's name: ``verify`` (the largest) or ``verify_<n>``."""
    return re.fullmatch(r"verify(_\d+)?", name) is not None


def exported(d, chunk: int) -> bool:
    """``d`` holds every graph a default export (prefill chunk ``chunk``) writes."""
    return all((Path(d) / f"{g}.onnx").exists() for g, _ in graph_names(chunk))


def function_name(path: Path, spec) -> str:
    if spec is not None:   # an export of ours: the file says its role (decode, prefill, verify)
        if path.stem in ("decode", "prefill") or is_verify_name(path.stem):
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
    try:   # by path: the checker reads the file itself (a loaded model is serialized again: 1.8 s against 0.6 s
        onnx.checker.check_model(str(path), full_check=False)   # for SmolLM2's 539 MB decode graph)
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


def _dynamic_dims(model) -> list[str]:
    init = {i.name for i in model.graph.initializer}
    out = []
    for i in model.graph.input:
        if i.name in init:
            continue
        for k, d in enumerate(i.type.tensor_type.shape.dim):
            if not d.HasField("dim_value") or d.dim_value <= 0:
                out.append(f"{i.name}[{k}] ({d.dim_param or '?'})")
    return out


def set_input_shapes(model, shapes: dict, where: str):
    """Fix graph input dimensions: ``shapes`` {input name: [dims]}."""
    inputs = {i.name: i for i in model.graph.input}
    for name, dims in shapes.items():
        if name not in inputs:
            raise ImportError_(f"{where}: --input-shape names {name!r}, which is not an input "
                               f"(inputs: {', '.join(inputs)})")
        have = inputs[name].type.tensor_type.shape.dim
        if len(have) != len(dims):
            raise ImportError_(f"{where}: input {name!r} has {len(have)} dimensions, --input-shape gives {len(dims)}")
        for d, v in zip(have, dims):
            d.ClearField("dim_param")
            d.dim_value = int(v)
    return model


def prepare_foreign(model, where: str, shapes: dict | None = None):
    """A graph from elsewhere (not exported by tvm-anyprec), made ready for TVM's importer: input shapes fixed
    (``shapes``; dynamic ones are an error), then onnxruntime's offline basic optimization (constant folding,
    redundant nodes; ONNX operators only: what torch.onnx.export leaves as ConstantOfShape/Expand chains becomes
    constants) and onnx's shape inference."""
    import tempfile

    import onnx
    import onnxruntime as ort

    if shapes:
        model = set_input_shapes(model, shapes, where)
    dyn = _dynamic_dims(model)
    if dyn:
        raise ImportError_(f"{where}: inputs with dynamic dimensions {', '.join(dyn)}; TVM compiles static shapes: "
                           "give them with --input-shape NAME=D0,D1,... (api: input_shapes={name: dims})")
    # the weights (float initializers of 2+ dimensions) are held out as graph inputs while onnxruntime folds:
    # a Transpose of a weight stays in the graph and the weight keeps its name (the passes report, exclude and
    # rewrite layers by it); shapes, scalars and index tensors fold
    model = onnx.ModelProto.FromString(model.SerializeToString())
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    held = [t for t in model.graph.initializer if t.data_type in floats and len(t.dims) >= 2]
    names = {t.name for t in held}
    keep = [t for t in model.graph.initializer if t.name not in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    listed = {i.name for i in model.graph.input}
    model.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in held if t.name not in listed)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "folded.onnx"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(out)
        so.log_severity_level = 3
        try:
            ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ImportError_(f"{where}: onnxruntime cannot load the graph to fold its constants: "
                               f"{str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}") from e
        folded = onnx.load(str(out))
    inputs = [i for i in folded.graph.input if i.name not in names]
    del folded.graph.input[:]
    folded.graph.input.extend(inputs)
    folded.graph.initializer.extend(held)
    return onnx.shape_inference.infer_shapes(folded)


def import_onnx(source, attention: str = "kernel", input_shapes: dict | None = None) -> ImportedModel:
    """Import every graph of ``source`` (an .onnx file or a directory of them) into one IRModule.
    ``attention``: how the exporter's CacheAttention ops become Relax: "kernel", the in-place CPU kernel
    (CPU targets); "inline", their ONNX definition (a dense reference) inlined (other targets).
    Graphs not exported by tvm-anyprec go through ``prepare_foreign`` first (``input_shapes``: {input: dims}
    for inputs with dynamic dimensions)."""
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
        if spec is None:
            model = prepare_foreign(model, path.name, input_shapes)
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
