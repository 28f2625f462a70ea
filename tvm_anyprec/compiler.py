"""compile: ONNX graph(s) -> Relax -> any-precision rewrite -> scheduled TIR -> shared library + weights.

Artifact (directory, written atomically):
  lib.so               the Relax VM executable for the target (one function per ONNX graph)
  weights.safetensors  every function parameter by name: <w>.planes / <w>.luts for rewritten layers and the
                       fp32 tensors that stay (embeddings, norms, excluded layers)
  manifest.json        target, bit-widths, functions (inputs, outputs, parameter order), layer map, checksums
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .artifact import WEIGHTS, atomic_dir, log, refuse_overwrite, save_tensors, write_manifest
from .data import file_sha256

LIB = "lib.so"


class CompileError(RuntimeError):
    pass


def is_gpu(target) -> bool:
    return "gpu" in [str(k) for k in target.keys]


def relax_pipeline(target):
    """cpu_generic's default pipeline plus, for the ops we do not schedule ourselves, dlight's CPU rules and
    then a parallel-outer-loops fallback. GPU targets: TVM's GPU pipeline (dlight's GPU rules for the rest)."""
    import tvm

    if is_gpu(target):   # GPU branch: our kernels arrive scheduled (schedules/gpu.py, tirx.is_scheduled)
        from tvm.relax.backend import cuda, gpu_generic
        return (cuda if str(target.kind.name) == "cuda" else gpu_generic).get_default_pipeline(target)
    import tvm.s_tir.dlight as dl
    from tvm.relax.backend.cpu_generic import pipeline as P

    from .schedules.cpu import fallback_pass

    @tvm.transform.module_pass(opt_level=0, name="AnyPrecCPUPipeline")
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                P.library_dispatch_passes(target) + P.legalize_passes(target)
                + [dl.ApplyDefaultSchedule(dl.cpu.GEMV(), dl.cpu.Reduction()), fallback_pass()]
                + P.dataflow_lower_passes(target) + P.finalize_passes(target))
            return seq(mod)

    return _pipeline


def schedule_kernels(mod, target, database=None):
    """Give every bitplane kernel a schedule: a tuned one from ``database`` when it has a record, else the
    hand schedule. Returns (mod, {kernel: "tuned"|"default"})."""
    import tvm

    from .passes.anyprec_rewrite import KERNEL_PREFIXES
    from .schedules.cpu import schedule_linear_cpu

    hand = schedule_linear_cpu
    if is_gpu(target):   # GPU branch: the CUDA/WebGPU hand schedule
        from .schedules.gpu import max_threads_of, schedule_linear_gpu
        threads = max_threads_of(target)
        hand = lambda f: schedule_linear_gpu(f, threads)  # noqa: E731
    how = {}
    for gv, f in list(mod.functions_items()):
        if not (isinstance(f, tvm.tirx.PrimFunc) and gv.name_hint.startswith(KERNEL_PREFIXES)):
            continue
        sched = None
        if database is not None:
            from .tuning import query_database
            sched = query_database(database, f, target)
        if sched is not None:
            how[gv.name_hint] = "tuned"
        else:
            sched = hand(f)
            how[gv.name_hint] = "default"
        # opaque to FuseOps: fusing a hand-scheduled kernel with its neighbours would drop the schedule
        # (and FuseTIR cannot merge its buffers)
        mod[gv] = sched.with_attr("op_pattern", 8)
    return mod, how


def quantized_tensors(site, layer, min_bits: int, max_bits: int) -> dict:
    from .kernels.anyprec import lut_width

    if tuple(layer.shape) != (site.N, site.K):
        raise CompileError(f"{site.name}: parent layer shape {tuple(layer.shape)} != graph weight "
                           f"[{site.N}, {site.K}]")
    luts = np.concatenate([layer.luts[b] for b in range(min_bits, max_bits + 1)], axis=1).astype(np.float16)
    assert luts.shape[1] == lut_width(max_bits, min_bits)
    return {f"{site.name}.planes": layer.planes, f"{site.name}.luts": luts}


def compile_model(source, out, target: str = "x86", parent=None, exclude=("lm_head",), seed_bits: int = 3,
                  max_bits: int = 8, force: bool = False, tuning_log=None, tokenizer=None, quiet: bool = False,
                  require_rewrite: bool = True, act_quant=None, act_stats=None) -> dict:
    """``tuning_log``: a MetaSchedule JSON database directory (default: tuning_logs/<target>/ of this checkout,
    used when present). ``require_rewrite=False`` allows an all-fp32 artifact (a baseline for benchmarks).
    ``act_quant`` (a quant.activations.ActQuantConfig): low-bit activations instead of the bitplane operator
    (INT4 weights from the graph's own weights, ``parent`` unused; ``act_stats``: calibrated per-channel max |x|
    per layer for the outlier handling, see passes.act_quant)."""
    import tvm

    from .frontend.onnx_import import import_onnx
    from .passes.anyprec_rewrite import AnyPrecRewrite
    from .quant.anyprec import check_bits, quantize_nonuniform
    from .targets import export_compiler, preset

    out = Path(out)
    refuse_overwrite(out, force)
    tp = preset(target)
    par = None
    if act_quant is not None:
        seed_bits = max_bits = 4
        parent = None
    if parent is not None:
        from .quant.model import Parent
        par = Parent.load(parent)
        if par.scheme != "nonuniform":
            raise CompileError(f"{parent}: the bitplane operator needs a 'nonuniform' parent, got '{par.scheme}'")
        seed_bits, max_bits = par.seed_bits, par.max_bits
    if act_quant is None:
        check_bits(seed_bits, max_bits)
    t0 = time.time()
    imp = import_onnx(source)
    log(f"imported {', '.join(f'{f} ({Path(s).name})' for f, s in imp.sources.items())} in {time.time() - t0:.1f}s",
         quiet)
    if act_quant is not None:
        from .passes.act_quant import ActQuantRewrite
        rw = ActQuantRewrite(act_quant, exclude, words=bool(tp.get("device")))   # GPU: the word form
    else:
        rw = AnyPrecRewrite(seed_bits, max_bits, exclude)
    mod = rw(imp.mod)
    if not rw.report.rewritten and require_rewrite:
        raise CompileError("no linear layer to rewrite: the graph has no MatMul/Gemm with a weight initializer"
                           + (f" (kept: {rw.report.skipped})" if rw.report.skipped else ""))
    log(rw.report.summary(), quiet)

    tensors, layers = {}, {}
    sites = list(rw.report.rewritten.values())
    from tqdm.auto import tqdm
    for site in tqdm(sites, desc="quantizing weights" if par is None else "packing weights", disable=quiet,
                     unit="layer", leave=False):
        if act_quant is not None:
            from .passes.act_quant import layer_tensors
            w = imp.weights[site.name]
            stats = (act_stats or {}).get(site.name.removesuffix(".weight"))
            tensors.update(layer_tensors(site, w if site.layout == "nk" else w.T, act_quant, stats,
                                         words=rw.words))
            layers[site.name] = {"N": site.N, "K": site.K, "layout": site.layout, "rows": site.M,
                                 "act_bits": rw.act_bits[site.name]}
            continue
        if par is not None:
            layer = par.layers.get(site.name.removesuffix(".weight")) or par.layers.get(site.name)
            if layer is None:
                raise CompileError(f"parent {parent} has no layer for graph weight {site.name!r}")
        else:
            w = imp.weights[site.name]
            layer = quantize_nonuniform(w if site.layout == "nk" else w.T, None, seed_bits, max_bits, name=site.name)
        tensors.update(quantized_tensors(site, layer, seed_bits, max_bits))
        layers[site.name] = {"N": site.N, "K": site.K, "layout": site.layout, "rows": site.M}
    for fname, names in rw.report.functions.items():
        for n in names:
            if n not in tensors:
                if n not in imp.weights:
                    raise CompileError(f"function {fname} needs parameter {n!r}, which no graph provides")
                tensors[n] = np.ascontiguousarray(imp.weights[n])

    target_obj = tvm.target.Target(tp["target"])
    from .tuning import default_log_dir, load_database
    log_dir = Path(tuning_log) if tuning_log is not None else default_log_dir(target)
    db = load_database(log_dir, warn=lambda m: log(m, False))
    mod, how = schedule_kernels(mod, target_obj, db)
    if act_quant is not None:
        from .passes.act_quant import schedule_kernels as schedule_act_kernels
        from .tuning import load_variant_choices
        mod, how_act = schedule_act_kernels(mod, tp, choices=load_variant_choices(log_dir, lambda m: log(m, False)))
        how.update(how_act)
    n_tuned = sum(v.startswith("tuned") for v in how.values())
    log(f"schedules: {n_tuned} kernels tuned (from {log_dir}), {len(how) - n_tuned} hand-scheduled", quiet)
    for kind in sorted(set(how.values()), key=lambda k: (k != "tuned", k)):   # "default:sdot" = ARM variant
        names = sorted(k for k, v in how.items() if v == kind)
        log(f"  {kind}: {', '.join(names)}", quiet)
    t1 = time.time()
    if tp.get("device") == "cuda":   # nvcc (and, without a driver, a stub libcuda) so the .so embeds a fatbin
        from .targets.cuda import ensure_cuda_build
        log(f"CUDA build: nvcc ({ensure_cuda_build()})", quiet)
    import contextlib
    # the nvcc callback reads -arch from the current target (tvm.compile does not enter the target scope)
    with target_obj if tp.get("device") else contextlib.nullcontext():
        ex = tvm.compile(mod, target=target_obj, relax_pipeline=relax_pipeline(target_obj))
    log(f"compiled for {target} ({tp['target']}) in {time.time() - t1:.1f}s", quiet)

    functions = {}
    for fname in rw.report.functions:
        spec = imp.specs.get(fname)
        functions[fname] = {"inputs": imp.inputs[fname], "outputs": imp.outputs[fname],
                            "params": rw.report.functions[fname], "spec": spec.to_dict() if spec else None}
    manifest = {
        "kind": "compiled", "target": tp, "bit_widths": list(range(seed_bits, max_bits + 1)),
        "seed_bits": seed_bits, "max_bits": max_bits, "functions": functions, "layers": layers,
        "kept_fp32": rw.report.skipped, "kernels": how, "tuning_log": str(log_dir) if db is not None else None,
        "sources": {f: {"onnx": Path(s).name, "sha256": file_sha256(s)} for f, s in imp.sources.items()},
        "parent": None if par is None else {"path": str(parent), **par.info.get("source", {}),
                                            "calibration": par.info.get("calibration")},
        "tokenizer": tokenizer or (None if par is None else par.info.get("source", {}).get("model")),
    }
    if act_quant is not None:
        manifest["act_quant"] = {**act_quant.to_dict(), "calibrated": bool(act_stats),
                                 "weights": "uniform 4-bit child (per row-group scale and zero point)"}
    with atomic_dir(out) as tmp:
        ex.export_library(str(tmp / LIB), fcompile=export_compiler(tp))
        save_tensors(tmp / WEIGHTS, tensors)
        manifest = write_manifest(tmp, manifest)
    log(f"wrote {out}: {LIB} + {WEIGHTS} ({sum(a.nbytes for a in tensors.values()) / 2**20:.1f} MiB) "
         f"in {time.time() - t0:.1f}s total", quiet)
    return manifest
