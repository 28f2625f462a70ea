"""Small local buffers of the project's explicit-loop kernels stay on the stack (registers, after LLVM).

TVM 0.27 lowers every ``T.alloc_local`` through ``TVMBackendAllocWorkspace`` unless the allocation carries the
``disable_lower_builtin`` annotation, and its ``StorageRewrite`` pass drops that annotation. In a kernel whose
accumulators live in local buffers inside a parallel loop that is one workspace call per task and no register
promotion: the 3-bit GEMV ran 2x slower than the same loop with stack buffers.

Kernels marked with ``STACK_LOCALS`` (``kernels.lut_cpu``) annotate their local buffers, and the TIR pipeline
("s_tir", the default for CPU targets) is wrapped so marked functions are lowered with ``StorageRewrite``
disabled; every other function goes through the unchanged pipeline. Installed on import of ``kernels``.
"""
from __future__ import annotations

import tvm

STACK_LOCALS = "tvm_anyprec.stack_locals"
KEEP = {"disable_lower_builtin": True}


def _marked(func) -> bool:
    return isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None and STACK_LOCALS in func.attrs


def install() -> None:
    from tvm.tirx import compilation_pipeline as cp

    factory = cp.PIPELINE_MAP.get("s_tir")
    if factory is None or getattr(factory, "_anyprec", False):
        return

    def wrapped_factory(**kwargs):
        pipeline, finalize_host, finalize_device = factory(**kwargs)

        @tvm.transform.module_pass(opt_level=0, name="AnyPrecTIRPipeline")
        def _run(mod, ctx):
            marked = [gv for gv, f in mod.functions_items() if _marked(f)]
            if not marked:
                return pipeline(mod)
            ours = tvm.IRModule({gv: mod[gv] for gv in marked}, attrs=mod.attrs)
            rest = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv not in marked}, attrs=mod.attrs)
            config = dict(ctx.config)
            config["tirx.disable_storage_rewrite"] = True
            config["tirx.disable_cse_tir"] = True   # CSE on the unrolled bodies took most of the build time
            with tvm.transform.PassContext(opt_level=ctx.opt_level, config=config,
                                           required_pass=list(ctx.required_pass),
                                           disabled_pass=list(ctx.disabled_pass),
                                           instruments=list(ctx.instruments)):
                ours = pipeline(ours)
            out = pipeline(rest) if len(rest.functions) else rest
            out.update(ours)
            return out

        return _run, finalize_host, finalize_device

    wrapped_factory._anyprec = True
    cp.PIPELINE_MAP["s_tir"] = wrapped_factory
