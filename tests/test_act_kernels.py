"""Integer kernels (W4A8 / W4A4): the fused activation quantizer and the INT4 x INT8 GEMM match a numpy
integer reference exactly (codes, scales, int32 accumulators), the dequantized output to float tolerance."""
import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm_anyprec.kernels.intgemm import check_shape, make_act_quant, make_int_gemm  # noqa: E402
from tvm_anyprec.quant import activations as A  # noqa: E402
from tvm_anyprec.schedules.intgemm_cpu import schedule_act_quant_cpu, schedule_int_gemm_cpu  # noqa: E402

TARGET = {"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2}


def _build(func):
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    return tvm.compile(mod, target=tvm.target.Target(TARGET)).jit()["main"]


def _t(a):
    return tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cpu())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("M,K,gs", [(1, 128, 64), (5, 96, 32)])
@pytest.mark.parametrize("scheduled", [True, False])
def test_act_quant_matches_numpy_exactly(bits, M, K, gs, scheduled):
    rng = np.random.default_rng(M + K + bits)
    x = rng.standard_normal((M, K)).astype(np.float32)
    x[:, 7] *= 40
    if M > 1:
        x[1] = 0  # an all-zero token
    inv = (2.0 ** rng.integers(-3, 3, K)).astype(np.float32)
    f = make_act_quant(M, K, bits, gs)
    fn = _build(schedule_act_quant_cpu(f) if scheduled else f)
    xq, xs, xsum = (tvm.runtime.empty(s, d, tvm.cpu()) for s, d in
                    (((M, K), "int8"), ((M,), "float32"), ((M, K // gs), "int32")))
    fn(_t(x), _t(inv), xq, xs, xsum)
    q, s = A.quantize_tokens(x * inv, bits)
    np.testing.assert_array_equal(xq.numpy(), q)
    np.testing.assert_array_equal(xs.numpy(), s)
    np.testing.assert_array_equal(xsum.numpy(), q.astype(np.int64).reshape(M, -1, gs).sum(-1))


@pytest.mark.parametrize("M,N,K,gs", [(1, 48, 128, 64), (7, 40, 192, 32), (3, 64, 64, 64)])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("scheduled", [True, False])
def test_int_gemm_accumulators_exact(M, N, K, gs, bits, scheduled):
    rng = np.random.default_rng(N * K + M)
    qm = 2 ** (bits - 1) - 1
    xq = rng.integers(-qm, qm + 1, (M, K)).astype(np.int8)
    xq[0, :4] = [qm, -qm, qm, -qm]                     # extremes
    codes = rng.integers(0, 16, (N, K)).astype(np.uint8)
    codes[0, :4] = [15, 15, 0, 15]
    w4 = A.W4Layer(codes, np.ones((N, K // gs), np.float32), np.zeros((N, K // gs), np.float32), gs)
    f = make_int_gemm(M, N, K, gs, out="acc")
    fn = _build(schedule_int_gemm_cpu(f) if scheduled else f)
    acc = tvm.runtime.empty((M, N, K // gs), "int32", tvm.cpu())
    fn(_t(xq), _t(w4.packed()), acc)
    ref = np.einsum("mgk,ngk->mng", xq.astype(np.int64).reshape(M, -1, gs), codes.astype(np.int64).reshape(N, -1, gs))
    np.testing.assert_array_equal(acc.numpy(), ref)


@pytest.mark.parametrize("M,N,K,gs", [(4, 48, 128, 64), (2, 33, 96, 32)])
def test_int_gemm_dequantized_output(M, N, K, gs):
    """Full path: act_quant -> int_gemm == numpy reference_linear (per-token INT8 x W4) to float tolerance."""
    rng = np.random.default_rng(K)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    layer = A.prepare_layer("l", w, A.ActQuantConfig(8, group_size=gs), np.abs(x).max(0) * 2)
    aq = _build(schedule_act_quant_cpu(make_act_quant(M, K, 8, gs)))
    gm = _build(schedule_int_gemm_cpu(make_int_gemm(M, N, K, gs)))
    dev = tvm.cpu()
    xq, xs, xsum = (tvm.runtime.empty(s, d, dev) for s, d in
                    (((M, K), "int8"), ((M,), "float32"), ((M, K // gs), "int32")))
    aq(_t(x), _t(layer.inv_factor), xq, xs, xsum)
    y = tvm.runtime.empty((M, N), "float32", dev)
    gm(xq, xs, xsum, _t(layer.w4.packed()), _t(layer.w4.scales), _t(layer.w4.zeros), y)
    ref = A.reference_linear(x, layer)
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # and close to the float product (it is a quantized layer, so only loosely)
    exact = x.astype(np.float64) @ w.T.astype(np.float64)
    assert np.linalg.norm(y.numpy() - exact) < 0.2 * np.linalg.norm(exact)


def test_bad_shapes_are_refused():
    assert check_shape(576, 64) is None and check_shape(1536, 64) is None
    assert "multiple" in check_shape(100, 64)
    with pytest.raises(ValueError, match="multiple"):
        make_int_gemm(1, 8, 100, 64)
    with pytest.raises(ValueError, match="bit-width"):
        make_act_quant(1, 64, 6, 64)
