"""MetaSchedule (XGBoost cost model) on the bitplane kernel: records land in a JSON database, compile
applies them, a corrupt log is ignored with a warning."""
import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm_anyprec.compiler import compile_model  # noqa: E402
from tvm_anyprec.kernels.anyprec import make_anyprec_linear  # noqa: E402
from tvm_anyprec.quant import quantize_nonuniform  # noqa: E402
from tvm_anyprec.runtime import Session  # noqa: E402
from tvm_anyprec.targets import preset  # noqa: E402
from tvm_anyprec.tuning import DB_FILES, open_database, query_database, tune_kernel  # noqa: E402

from test_compile import H, K, _mlp_onnx  # noqa: E402  (same small graph: W1 is a [K=77, H=96] MatMul)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """4 trials on the kernel of the graph's first layer (M=3, N=96, K=77): enough for a valid record."""
    d = tmp_path_factory.mktemp("tune")
    target = tvm.target.Target(preset("x86")["target"])
    f = make_anyprec_linear(3, H, K)
    tune_kernel(f, target, d / "log", trials=4)
    return d, f, target


def test_records_written_and_found(tuned):
    d, f, target = tuned
    assert all((d / "log" / name).stat().st_size > 0 for name in DB_FILES)
    sched = query_database(open_database(d / "log"), f, target)
    assert sched is not None
    rng = np.random.default_rng(0)
    layer = quantize_nonuniform(rng.standard_normal((H, K)).astype(np.float32), None, 3, 8)
    luts = np.concatenate([layer.luts[b] for b in range(3, 9)], 1)
    x = rng.standard_normal((3, K)).astype(np.float32)
    fn = tvm.compile(tvm.IRModule({"main": sched.with_attr("global_symbol", "main")}), target=target).jit()["main"]
    dev = tvm.cpu()
    y = tvm.runtime.empty((3, H), "float32", dev)
    for b in (3, 8):
        fn(*[tvm.runtime.tensor(a, dev) for a in (x, layer.planes, luts, np.array([b], np.int32))], y)
        ref = x @ layer.dequantize(b).T
        np.testing.assert_allclose(y.numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_compile_applies_log_and_says_which(tuned, tmp_path):
    d, _f, _t = tuned
    _mlp_onnx(tmp_path / "mlp.onnx")
    m = compile_model(tmp_path / "mlp.onnx", tmp_path / "art", tuning_log=d / "log", quiet=True)
    assert m["kernels"] == {"anyprec_linear_m3_n96_k77_b3to8": "tuned",
                            "anyprec_linear_m3_n50_k96_b3to8": "default",
                            "anyprec_linear_m3_n33_k50_b3to8": "default",
                            "dense_nt_m3_n33_k33": "default"}
    plain = compile_model(tmp_path / "mlp.onnx", tmp_path / "art0", tuning_log=tmp_path / "none", quiet=True)
    assert set(plain["kernels"].values()) == {"default"}
    x = np.random.default_rng(1).standard_normal((3, K)).astype(np.float32)
    a, b = Session(tmp_path / "art"), Session(tmp_path / "art0")
    for bits in (3, 6, 8):
        np.testing.assert_allclose(a.call("mlp", [x], bits).numpy(), b.call("mlp", [x], bits).numpy(),
                                   rtol=1e-4, atol=1e-5)


def test_corrupt_log_is_ignored_with_warning(tmp_path, capsys):
    _mlp_onnx(tmp_path / "mlp.onnx")
    log = tmp_path / "bad"
    log.mkdir()
    for name in DB_FILES:
        (log / name).write_text("{this is not json\n")
    m = compile_model(tmp_path / "mlp.onnx", tmp_path / "art", tuning_log=log, quiet=True)
    assert set(m["kernels"].values()) == {"default"} and m["tuning_log"] is None
    assert "warning: ignoring tuning log" in capsys.readouterr().err
