"""Structural before/after tests of the two Relax rewrites (TVM's test_transform_* style): a small module in,
the expected module built by hand, compared with ``tvm.ir.assert_structural_equal``. No compile, no run."""
from __future__ import annotations

import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from tvm_anyprec.kernels.anyprec import AnyPrecLinear, lut_width  # noqa: E402
from tvm_anyprec.kernels.dense import DenseNT  # noqa: E402
from tvm_anyprec.kernels.intgemm import ActQuant, IntGemm  # noqa: E402
from tvm_anyprec.kernels.spec import spec_of  # noqa: E402
from tvm_anyprec.passes.act_quant import ActQuantRewrite  # noqa: E402
from tvm_anyprec.passes.anyprec_rewrite import AnyPrecRewrite  # noqa: E402
from tvm_anyprec.quant import activations as A  # noqa: E402

pytestmark = pytest.mark.unit

M, K, N = 4, 64, 32


def T(shape, dtype="float32"):
    return relax.TensorType(shape, dtype)


def _linear_module(layout: str = "nk", name: str = "W"):
    """main(x [M, K]; W) = matmul(x, permute_dims(W)) with W [N, K] ("nk"), or matmul(x, W) with W [K, N]."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", T([M, K]))
    w = relax.Var(name, T([N, K] if layout == "nk" else [K, N]))
    with bb.function("main", [x, w], attrs={"num_input": 1}):
        with bb.dataflow():
            rhs = bb.emit(relax.op.permute_dims(w)) if layout == "nk" else w
            out = bb.emit_output(bb.emit(relax.op.matmul(x, rhs)))
        bb.emit_func_output(out)
    return bb.get()


def _expected(kernel, extra_params, args):
    """main(x, nbits, *extra_params) = call_tir(kernel, args(x, nbits, params)) with num_input = 2."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", T([M, K]))
    nbits = relax.Var("nbits", T([1], "int32"))
    params = [relax.Var(n, T(s, d)) for n, s, d in extra_params]
    gv = bb.add_func(kernel.build(), kernel.name())
    with bb.function("main", [x, nbits, *params], attrs={"num_input": 2}):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.call_tir(gv, args(x, nbits, params), T([M, N]))))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("layout", ["nk", "kn"])
def test_anyprec_rewrite_to_the_bitplane_operator(layout):
    rw = AnyPrecRewrite(3, 8, exclude=())
    after = rw(_linear_module(layout))
    want = _expected(AnyPrecLinear(M, N, K, 8, 3),
                     [("W.planes", [8, N, K // 32], "uint32"), ("W.luts", [N, lut_width(8, 3)], "float16")],
                     lambda x, nbits, p: [x, p[0], p[1], nbits])
    tvm.ir.assert_structural_equal(after, want)
    assert list(rw.report.rewritten) == ["W"] and rw.report.rewritten["W"].layout == layout
    assert rw.report.functions == {"main": ["W.planes", "W.luts"]}


def test_excluded_layer_reads_the_weight_in_place():
    rw = AnyPrecRewrite(3, 8, exclude=("lm_head",))
    after = rw(_linear_module("nk", name="lm_head.weight"))
    want = _expected(DenseNT(M, N, K), [("lm_head.weight", [N, K], "float32")], lambda x, nbits, p: [x, p[0]])
    tvm.ir.assert_structural_equal(after, want)
    assert rw.report.rewritten == {} and rw.report.skipped == {"lm_head.weight": "excluded by pattern"}


def test_act_quant_rewrite_to_quantize_then_int_gemm():
    cfg = A.ActQuantConfig(8, outlier="none", group_size=32)
    rw = ActQuantRewrite(cfg, exclude=())
    after = rw(_linear_module("nk"))
    G = K // 32
    bb = relax.BlockBuilder()
    x = relax.Var("x", T([M, K]))
    nbits = relax.Var("nbits", T([1], "int32"))
    inv, wp, ws, wz = (relax.Var("W.act_inv", T([K])), relax.Var("W.w4", T([N, K // 2], "uint8")),
                       relax.Var("W.w4_scales", T([N, G])), relax.Var("W.w4_zeros", T([N, G])))
    aq = bb.add_func(ActQuant(M, K, 8, 32).build(), ActQuant(M, K, 8, 32).name())
    gm = bb.add_func(IntGemm(M, N, K, 32).build(), IntGemm(M, N, K, 32).name())
    with bb.function("main", [x, nbits, inv, wp, ws, wz], attrs={"num_input": 2}):
        with bb.dataflow():
            q = bb.emit(relax.call_tir(aq, [x, inv], [T([M, K], "int8"), T([M]), T([M, G], "int32")]))
            y = bb.emit(relax.call_tir(gm, [relax.TupleGetItem(q, 0), relax.TupleGetItem(q, 1),
                                            relax.TupleGetItem(q, 2), wp, ws, wz], T([M, N])))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(after, bb.get())
    assert rw.act_bits == {"W": 8}


def test_kernels_carry_their_spec():
    mod = AnyPrecRewrite(3, 8, exclude=())(_linear_module())
    (name,) = [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert spec_of(mod[name]) == AnyPrecLinear(M, N, K, 8, 3) and name == AnyPrecLinear(M, N, K, 8, 3).name()
