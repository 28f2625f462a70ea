"""Ops on small tensors (schedules/cpu.schedule_small): an RMSNorm of one token and of a prefill chunk through
the project's CPU pipeline, against numpy; the reduction computed once (one root loop nest per reduction, the
intermediates inlined); large tensors left to dlight."""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from tvm_anyprec.compiler import relax_pipeline
from tvm_anyprec.schedules.cpu import SMALL_OP_ELEMS, schedule_small
from tvm_anyprec.targets import preset

pytestmark = pytest.mark.kernel


def _rmsnorm_module(rows: int, hidden: int):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, rows, hidden], "float32"))
    w = relax.Var("w", relax.TensorType([hidden], "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            ms = bb.emit(relax.op.mean(relax.op.multiply(x, x), axis=[-1], keepdims=True))
            inv = bb.emit(relax.op.divide(relax.const(1.0, "float32"),
                                          relax.op.sqrt(relax.op.add(ms, relax.const(1e-5, "float32")))))
            out = bb.emit_output(bb.emit(relax.op.multiply(relax.op.multiply(x, inv), w)))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("rows, hidden", [(1, 576), (32, 576), (64, 4096)])
def test_rmsnorm_against_numpy(rows, hidden):
    target = tvm.target.Target(preset("x86")["target"])
    mod = _rmsnorm_module(rows, hidden)
    ex = tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((1, rows, hidden)).astype(np.float32)
    w = rng.standard_normal(hidden).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w)).numpy()
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_small_schedule_computes_each_reduction_once():
    with tvm.target.Target(preset("x86")["target"]):
        mod = relax.transform.FuseTIR()(relax.transform.FuseOps()(relax.transform.AnnotateTIROpPattern()(
            relax.transform.LegalizeOps()(_rmsnorm_module(1, 576)))))
    funcs = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    norm = next(f for name, f in funcs.items() if "mean" in name)
    sch = tvm.s_tir.Schedule(schedule_small(norm))
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    reductions = [b for b in blocks if sch.get(b).init is not None]
    assert len(reductions) == 1 and len(blocks) == 2       # the sum of squares once, then the output
    assert "parallel" not in sch.mod["main"].script()
    assert 576 <= SMALL_OP_ELEMS < 64 * 4096               # the large case above takes dlight's path


def _unary_module(shape, build):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(list(shape), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(build(x)))
        bb.emit_func_output(out)
    return bb.get()


_UNARY = {   # op -> (the Relax graph, the float64 numpy reference)
    "sigmoid*x": (lambda x: relax.op.multiply(x, relax.op.sigmoid(x)), lambda v: v / (1 + np.exp(-v))),
    "silu": (relax.op.nn.silu, lambda v: v / (1 + np.exp(-v))),
    "exp": (relax.op.exp, np.exp),
}


@pytest.mark.unit
@pytest.mark.parametrize("op", sorted(_UNARY))
@pytest.mark.parametrize("shape", [(1, 1536), (32, 1536)])
def test_fast_math_against_numpy(op, shape):
    """passes.fast_math: float32 sigmoid / silu / exp compiled without libm's expf, against numpy's float64, over
    the range a model sees plus the clamped ends (e^x near 0 and near the float32 maximum)."""
    target = tvm.target.Target(preset("x86")["target"])
    build, ref = _UNARY[op]
    ex = tvm.compile(_unary_module(shape, build), target=target, relax_pipeline=relax_pipeline(target))
    ir = ex.mod.imports[0].inspect_source("ll")
    assert "llvm.exp" not in ir and "expf" not in ir          # (without the pass: a call of llvm.exp.f32)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    rng = np.random.default_rng(shape[0])
    x = (rng.standard_normal(shape) * (4 if op == "exp" else 12)).astype(np.float32)
    x.flat[:4] = [-200.0, -86.0, 87.5, 200.0] if op != "exp" else [-86.0, -20.0, 20.0, 87.5]
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    want = ref(x.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-30)
