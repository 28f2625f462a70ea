"""compile: ONNX graph(s) -> Relax -> the scheme's rewrite -> scheduled TIR -> shared library + weights.

Artifact (directory, written atomically):
  lib.so               the Relax VM executable for the target (one function per ONNX graph)
  weights.safetensors  every function parameter by name: the scheme's tensors for rewritten layers
                       (<w>.planes / <w>.luts, or <w>.w4 ...) and the fp32 tensors that stay
  manifest.json        target, bit-widths, functions (inputs, outputs, parameter order), layer map, the
                       kernels with their specs and how each was scheduled, checksums

``compile_model`` is scheme-blind: a ``schemes`` object rewrites, packs and describes the weights.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import numpy as np

from .artifact import LIB, WEIGHTS, atomic_dir, refuse_overwrite, save_tensors, write_manifest
from .data import file_sha256
from .errors import CompileError
from .kernels.registry import kernel_specs
from .schedules.rules import schedule_kernels
from .targets import export_compiler, is_gpu, preset
from .tune.records import default_log_dir, load_database, load_rows_choices, load_variant_choices, query_database

logger = logging.getLogger(__name__)


def relax_pipeline(target):
    """cpu_generic's default pipeline plus, for the ops we do not schedule ourselves: float32 sigmoid / exp in
    vectorizable arithmetic (``passes.fast_math``), ops on small tensors on one thread
    (``schedules.cpu.schedule_small``), dlight's CPU rules, then a parallel-outer-loops fallback. GPU targets:
    TVM's GPU pipeline (dlight's GPU rules for the rest)."""
    import tvm

    if is_gpu(target):   # GPU branch: our kernels arrive scheduled (schedules/gpu.py, tirx.is_scheduled)
        from tvm.relax.backend import cuda, gpu_generic
        return (cuda if str(target.kind.name) == "cuda" else gpu_generic).get_default_pipeline(target)
    import tvm.s_tir.dlight as dl
    from tvm.relax.backend.cpu_generic import pipeline as P

    from .passes.fast_math import fast_math
    from .schedules.cpu import fallback_pass, small_ops_pass

    @tvm.transform.module_pass(opt_level=0, name="AnyPrecCPUPipeline")
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                [fast_math] + P.library_dispatch_passes(target) + P.legalize_passes(target)
                + [small_ops_pass(), dl.ApplyDefaultSchedule(dl.cpu.GEMV(), dl.cpu.Reduction()), fallback_pass()]
                + P.dataflow_lower_passes(target) + P.finalize_passes(target))
            return seq(mod)

    return _pipeline


@contextlib.contextmanager
def memoized_tir_build():
    """Within the block, the global ``tirx.build`` (what relax's ``FoldConstant`` calls to evaluate a call on
    constants) builds each structurally distinct PrimFunc once: the exported graphs repeat the same
    shape arithmetic in every layer (SmolLM2's decode graph: 452 builds of 8 distinct functions), and TVM's
    own cache lives per pass call. SmolLM2-135M's decode graph compiled in 23.9 -> 11.0 s (Zen 4, 1 thread)."""
    import tvm
    import tvm_ffi

    original = tvm.get_global_func("tirx.build")
    built: dict = {}

    def build(mod, target=None, pipeline="default"):
        if isinstance(mod, tvm.tirx.PrimFunc):
            mod = tvm.IRModule.from_expr(mod)
        key = (tvm_ffi.structural_hash(mod), str(target))
        for seen, lib in built.get(key, ()):
            if tvm_ffi.structural_equal(seen, mod):
                return lib
        lib = original(mod, target, pipeline)
        built.setdefault(key, []).append((mod, lib))
        return lib

    tvm.register_global_func("tirx.build", build, override=True)
    try:
        yield
    finally:
        tvm.register_global_func("tirx.build", original, override=True)


def make_scheme(parent=None, seed_bits: int = 3, max_bits: int = 8, act_quant=None, act_stats=None, accuracy=None,
                lm_head_bits=None):
    """The weight scheme of a compile: low-bit activations when ``act_quant`` (an ActQuantConfig) is given,
    else any-precision bitplanes (from the ``parent`` directory, or the graph's weights)."""
    if act_quant is not None:
        if parent is not None:
            raise CompileError("low-bit activations quantize the graph's own weights to INT4: a parent is not "
                               "used with them (drop --parent, or --act-bits)")
        if accuracy is not None or lm_head_bits is not None:
            raise CompileError("--accuracy and --lm-head-bits are the bitplane kernel's; --act-bits uses the "
                               "integer GEMM")
        from .schemes.lowbit_act import LowBitActivations
        return LowBitActivations(act_quant, act_stats)
    from .schemes.anyprec import AnyPrec
    if parent is None:
        return AnyPrec(seed_bits, max_bits, accuracy=accuracy, lm_head_bits=lm_head_bits)
    from .quant.model import Parent
    return AnyPrec(parent=Parent.load(parent), parent_path=parent, accuracy=accuracy, lm_head_bits=lm_head_bits)


def compile_model(source, out, target: str = "x86", parent=None, exclude=("lm_head",), seed_bits: int = 3,
                  max_bits: int = 8, force: bool = False, tuning_log=None, tokenizer=None,
                  require_rewrite: bool = True, act_quant=None, act_stats=None, accuracy=None,
                  attention: str | None = None, input_shapes: dict | None = None, lm_head_bits=None) -> dict:
    """The graph-level compile (``api.compile`` is the user's: it also exports and quantizes a model, and its
    ``exclude`` default quantizes the lm_head too). ``tuning_log``: a MetaSchedule JSON database directory (default: ``env.default_log_dir(target)``,
    used when present). ``require_rewrite=False`` allows an all-fp32 artifact (a baseline for benchmarks).
    ``act_quant`` (a quant.activations.ActQuantConfig): low-bit activations instead of the bitplane operator
    (INT4 weights from the graph's own weights; ``act_stats``: calibrated per-channel max |x| per layer for
    the outlier handling, see passes.act_quant). See ``make_scheme``. ``attention``: how the exporter's
    attention ops are compiled ("kernel": in place, CPU; "inline": dense; None: by the target)."""
    out = Path(out)
    refuse_overwrite(out, force)
    tp = preset(target)
    scheme = make_scheme(parent, seed_bits, max_bits, act_quant, act_stats, accuracy, lm_head_bits)
    return compile_with(scheme, source, out, tp, exclude, tuning_log, tokenizer, require_rewrite, attention,
                        input_shapes)


def _cache_twins(mod, imp, functions: dict) -> tuple:
    """``passes.cache_only`` for the exported prompt function (prefill; verify keeps every logit): the twin
    without logits that a long prompt's chunks but the last run. Returns (module, {twin name: its manifest
    entry})."""
    from .passes.cache_only import SUFFIX, cache_only

    out = {}
    for fname in list(functions):
        spec = imp.specs.get(fname)
        if fname != "prefill" or spec is None or spec.chunk <= 1 or len(imp.outputs[fname]) < 2:
            continue
        done = cache_only(mod, fname, int(mod[fname].attrs["num_input"]))
        if done is None:
            continue
        mod, params = done
        out[fname + SUFFIX] = {"inputs": imp.inputs[fname], "outputs": imp.outputs[fname][1:], "params": params,
                               "spec": spec.to_dict(), "logits": False, "twin_of": fname}
    return mod, out


def compile_with(scheme, source, out: Path, tp: dict, exclude=("lm_head",), tuning_log=None, tokenizer=None,
                 require_rewrite: bool = True, attention: str | None = None, input_shapes: dict | None = None) -> dict:
    import tvm
    from tqdm.auto import tqdm

    from .frontend.onnx_import import import_onnx

    t0 = time.time()
    # the exporter's attention ops: the in-place CPU kernel, or (GPU targets) their dense ONNX definition
    gpu = is_gpu(tvm.target.Target(tp["target"]))
    attention = attention or ("inline" if gpu else "kernel")
    if attention == "kernel" and gpu:
        raise CompileError("the in-place attention kernel is for CPU targets")
    imp = import_onnx(source, attention=attention, input_shapes=input_shapes)
    logger.info(f"imported {', '.join(f'{f} ({Path(s).name})' for f, s in imp.sources.items())} "
                f"in {time.time() - t0:.1f}s")
    rw = scheme.rewrite_pass(exclude, tp)
    mod = rw(imp.mod)
    if not rw.report.rewritten and require_rewrite:
        raise CompileError("no linear layer to rewrite: the graph has no MatMul/Gemm with a weight initializer"
                           + (f" (kept: {rw.report.skipped})" if rw.report.skipped else ""))
    logger.info(rw.report.summary())
    mod, twins = _cache_twins(mod, imp, rw.report.functions)

    tensors, layers = {}, {}
    for site in tqdm(list(rw.report.rewritten.values()), desc=scheme.describe, unit="layer", leave=False,
                     disable=not logger.isEnabledFor(logging.INFO)):
        w = imp.weights[site.name]
        tensors.update(scheme.pack(site, w if site.layout == "nk" else w.T))
        layers[site.name] = scheme.layer_entry(site, rw)
    for fname, names in list(rw.report.functions.items()) + [(f, t["params"]) for f, t in twins.items()]:
        for n in names:
            if n not in tensors:
                if n not in imp.weights:
                    raise CompileError(f"function {fname} needs parameter {n!r}, which no graph provides")
                tensors[n] = np.asarray(imp.weights[n], order="C")   # (ascontiguousarray makes 0-d 1-d)

    target = tvm.target.Target(tp["target"])
    log_dir = Path(tuning_log) if tuning_log is not None else default_log_dir(tp["name"])
    db = load_database(log_dir)
    specs = kernel_specs(mod)
    mod, how = schedule_kernels(mod, tp, choices=load_variant_choices(log_dir), rows=load_rows_choices(log_dir),
                                tuned=None if db is None else (lambda f: query_database(db, f, target)))
    n_tuned = sum(v.startswith("tuned") for v in how.values())
    logger.info(f"schedules: {n_tuned} kernels tuned (from {log_dir}), {len(how) - n_tuned} hand-scheduled")
    for kind in sorted(set(how.values()), key=lambda k: (k != "tuned", k)):   # "default:sdot" = ARM variant
        logger.info(f"  {kind}: {', '.join(sorted(k for k, v in how.items() if v == kind))}")
    t1 = time.time()
    if tp.get("device") == "cuda":   # nvcc (and, without a driver, a stub libcuda) so the .so embeds a fatbin
        from .targets.cuda import ensure_cuda_build
        logger.info(f"CUDA build: nvcc ({ensure_cuda_build()})")
    # the nvcc callback reads -arch from the current target (tvm.compile does not enter the target scope)
    with target if tp.get("device") else contextlib.nullcontext(), memoized_tir_build():
        ex = tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target))
    logger.info(f"compiled for {tp['name']} ({tp['target']}) in {time.time() - t1:.1f}s")

    functions = {}
    for fname in rw.report.functions:
        spec = imp.specs.get(fname)
        functions[fname] = {"inputs": imp.inputs[fname], "outputs": imp.outputs[fname],
                            "params": rw.report.functions[fname], "spec": spec.to_dict() if spec else None}
        if spec is not None:   # in place: the returned caches are the ones passed in, read up to the position
            functions[fname]["kv_cache"] = "in_place" if spec.attention == "cache_op" and attention == "kernel" \
                else "dense"
    for name, twin in twins.items():   # the twin keeps its function's cache kind
        functions[name] = {**twin, **({"kv_cache": functions[twin["twin_of"]]["kv_cache"]}
                                      if "kv_cache" in functions[twin["twin_of"]] else {})}
    manifest = {
        "kind": "compiled", "target": tp, "scheme": scheme.name,
        "bit_widths": list(range(scheme.seed_bits, scheme.max_bits + 1)),
        "seed_bits": scheme.seed_bits, "max_bits": scheme.max_bits, "functions": functions, "layers": layers,
        "kept_fp32": rw.report.skipped, "kernels": how,
        "kernel_specs": {name: spec.to_dict() for name, spec in sorted(specs.items())},
        "tuning_log": str(log_dir) if db is not None else None,
        "sources": {f: {"onnx": Path(s).name, "sha256": file_sha256(s)} for f, s in imp.sources.items()},
        **scheme.manifest(),
    }
    manifest["tokenizer"] = tokenizer or scheme.default_tokenizer()
    with atomic_dir(out) as tmp:
        ex.export_library(str(tmp / LIB), fcompile=export_compiler(tp))
        save_tensors(tmp / WEIGHTS, tensors)
        manifest = write_manifest(tmp, manifest)
    logger.info(f"wrote {out}: {LIB} + {WEIGHTS} ({sum(a.nbytes for a in tensors.values()) / 2**20:.1f} MiB) "
                f"in {time.time() - t0:.1f}s total")
    return manifest
