"""Bitplane and dense kernels against numpy on the dequantized weights, every bit-width, odd shapes."""
import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm_anyprec.kernels.anyprec import lut_width, make_anyprec_linear  # noqa: E402
from tvm_anyprec.kernels.dense import make_dense_nt, make_dense_nt_cpu  # noqa: E402
from tvm_anyprec.quant import quantize_nonuniform  # noqa: E402
from tvm_anyprec.testing import concat_luts  # noqa: E402
from tvm_anyprec.schedules.cpu import schedule_linear_cpu  # noqa: E402

TARGET = {"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2}
# float32 accumulation over K terms vs numpy's float64-accumulated reference
RTOL, ATOL = 1e-4, 1e-4


def _build(func):
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    return tvm.compile(mod, target=tvm.target.Target(TARGET)).jit()["main"]


@pytest.mark.parametrize("M,N,K", [(1, 64, 96), (1, 50, 77), (4, 33, 130), (7, 48, 64)])
@pytest.mark.parametrize("scheduled", [True, False])
def test_anyprec_kernel_matches_numpy_all_bits(M, N, K, scheduled):
    rng = np.random.default_rng(M * 1000 + N + K)
    w = rng.standard_normal((N, K)).astype(np.float32)
    layer = quantize_nonuniform(w, None, 3, 8)
    luts = concat_luts(layer)
    assert luts.shape == (N, lut_width(8, 3))
    x = rng.standard_normal((M, K)).astype(np.float32)
    f = make_anyprec_linear(M, N, K)
    fn = _build(schedule_linear_cpu(f) if scheduled else f)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in (x, layer.planes, luts)]
    y = tvm.runtime.empty((M, N), "float32", dev)
    outs = {}
    for b in range(3, 9):  # one compiled function, the bit-width chosen per call
        fn(*args, tvm.runtime.tensor(np.array([b], np.int32), dev), y)
        ref = x.astype(np.float64) @ layer.dequantize(b).astype(np.float64).T
        np.testing.assert_allclose(y.numpy(), ref, rtol=RTOL, atol=ATOL * np.abs(ref).max())
        outs[b] = y.numpy().copy()
    assert not np.allclose(outs[3], outs[8]), "bit-width had no effect"


def test_anyprec_kernel_clamps_out_of_range_bits():
    rng = np.random.default_rng(1)
    N, K = 32, 64
    layer = quantize_nonuniform(rng.standard_normal((N, K)).astype(np.float32), None, 3, 8)
    luts = concat_luts(layer)
    x = rng.standard_normal((1, K)).astype(np.float32)
    fn = _build(schedule_linear_cpu(make_anyprec_linear(1, N, K)))
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in (x, layer.planes, luts)]
    y = tvm.runtime.empty((1, N), "float32", dev)
    fn(*args, tvm.runtime.tensor(np.array([12], np.int32), dev), y)  # clamped to 8, never out of bounds
    np.testing.assert_allclose(y.numpy(), x @ layer.dequantize(8).T, rtol=RTOL, atol=1e-3)


@pytest.mark.parametrize("M,N,K,tiled", [(1, 40, 70, False), (5, 64, 128, False), (5, 37, 100, True),
                                         (32, 19, 576, True), (2, 4, 16, True)])
def test_dense_nt_matches_numpy(M, N, K, tiled):
    """The scheduled form and the CPU's register-tiled form (M > 1; partial tiles of rows, K % 16 != 0)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    fn = _build(make_dense_nt_cpu(M, N, K) if tiled else schedule_linear_cpu(make_dense_nt(M, N, K)))
    dev = tvm.cpu()
    y = tvm.runtime.empty((M, N), "float32", dev)
    fn(tvm.runtime.tensor(x, dev), tvm.runtime.tensor(w, dev), y)
    np.testing.assert_allclose(y.numpy(), x @ w.T, rtol=RTOL, atol=1e-4)


@pytest.mark.parametrize("b_shape", [(3, 1, 64, 24), (3, 3, 64, 16)])
def test_fallback_schedule_keeps_results(b_shape):
    """The fallback rule for unscheduled ops (batched matmul -> parallel + vectorized) computes the same."""
    from tvm import relax

    from tvm_anyprec.schedules.cpu import parallelize_outer

    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType([3, 3, 8, 64], "float32"))
    b = relax.Var("b", relax.TensorType(list(b_shape), "float32"))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.relu(relax.op.matmul(a, b)))
        bb.emit_func_output(y)
    mod = relax.transform.LegalizeOps()(bb.get())
    rng = np.random.default_rng(3)
    av = rng.standard_normal((3, 3, 8, 64)).astype(np.float32)
    bv = rng.standard_normal(b_shape).astype(np.float32)
    dev = tvm.cpu()
    for gv, f in mod.functions_items():
        if not isinstance(f, tvm.tirx.PrimFunc):
            continue
        g = parallelize_outer(f)
        assert g is not None, gv.name_hint
        script = g.script()
        assert "T.parallel" in script
        fn = _build(g)
        if "matmul" in gv.name_hint:
            assert "T.vectorized" in script
            out = tvm.runtime.empty((3, 3, 8, b_shape[-1]), "float32", dev)
            fn(tvm.runtime.tensor(av, dev), tvm.runtime.tensor(bv, dev), out)
            np.testing.assert_allclose(out.numpy(), av @ bv, rtol=1e-4, atol=1e-4)


def test_fast_tvmscript_stack_keeps_the_parser_behaviour():
    """kernels/__init__.py gives TVMScript's prim_func a stack without source lookups past the third frame:
    prim_funcs inside an @I.ir_module class (detected from frame 2's source line), closures over local
    variables, and prim_funcs in a plain class still parse as before."""
    import tvm.tirx.script.parser.entry as entry
    from tvm.script import ir as I
    from tvm.script import tirx as T

    import tvm_anyprec.kernels  # noqa: F401

    assert getattr(entry.inspect, "_anyprec_fast", False)

    @I.ir_module
    class Mod:
        @T.prim_func
        def main(A: T.Buffer((4,), "float32"), B: T.Buffer((4,), "float32")):
            for i in range(4):
                B[i] = A[i] * T.float32(2)

    n = 8

    @T.prim_func
    def closure(A: T.Buffer((n,), "float32")):
        for i in range(n):
            A[i] = T.float32(1)

    class Plain:
        @T.prim_func
        def g(A: T.Buffer((2,), "float32")):
            A[0] = T.float32(0)

    assert isinstance(Mod, tvm.IRModule) and [gv.name_hint for gv in Mod.functions] == ["main"]
    assert int(closure.params[0].shape[0]) == 8          # (0.27: buffer params are buffer-typed Vars)
    assert isinstance(Plain.g, tvm.tirx.PrimFunc)
    a = np.arange(4, dtype=np.float32)
    b = np.zeros(4, np.float32)
    f = tvm.compile(Mod, target="llvm")
    dev = tvm.cpu()
    ta, tb = tvm.runtime.tensor(a, dev), tvm.runtime.tensor(b, dev)
    f["main"](ta, tb)
    np.testing.assert_array_equal(tb.numpy(), 2 * a)
