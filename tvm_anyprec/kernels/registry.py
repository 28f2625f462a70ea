"""The one table of kernel families: compile, tune and the manifest read specs through it."""
from __future__ import annotations

import tvm
from tvm import relax

from . import anyprec, attention, dense, embed, intgemm, lut_cpu  # noqa: F401  (each registers its families)
from .intgemm import ActQuant, IntGemm
from .spec import FAMILIES, SPEC_ATTR, KernelSpec, spec_from_dict, spec_of  # noqa: F401  (re-exported)


def kernel_specs(mod) -> dict[str, KernelSpec]:
    """{kernel name in ``mod``: spec} of every PrimFunc built from a spec."""
    out = {}
    for gv, f in mod.functions_items():
        spec = spec_of(f)
        if spec is not None:
            out[gv.name_hint] = spec
    return out


def int_gemm_act_bits(mod) -> dict:
    """{int_gemm kernel name: set of activation bit-widths of the layers calling it} from the Relax call sites
    (a kernel is shared by every layer of its shape; the bits are those of the act_quant kernel feeding it,
    read from its spec; None where no act_quant kernel feeds it)."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    out: dict = {}

    def spec(gv):
        return spec_of(mod[gv]) if gv in mod.get_global_vars() else None

    for _gv, f in mod.functions_items():
        if not isinstance(f, relax.Function):
            continue
        bound = {}
        for block in f.body.blocks:
            for b in block.bindings:
                if isinstance(b, relax.VarBinding):
                    bound[b.var] = b.value
        for value in bound.values():
            if not (isinstance(value, relax.Call) and value.op.same_as(call_tir)):
                continue
            gemm = spec(value.args[0])
            if not isinstance(gemm, IntGemm):
                continue
            src = value.args[1].fields[0]
            src = bound.get(src, src)
            if isinstance(src, relax.TupleGetItem):
                src = bound.get(src.tuple_value, src.tuple_value)
            quant = spec(src.args[0]) if isinstance(src, relax.Call) and src.op.same_as(call_tir) else None
            out.setdefault(value.args[0].name_hint, set()).add(quant.bits if isinstance(quant, ActQuant) else None)
    return out
