"""compile on small ONNX graphs: every linear form is rewritten, outputs match onnxruntime running the
same graph with the dequantized weights at each bit-width, and bad input fails clearly."""
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tvm_anyprec.artifact import ArtifactError
from tvm_anyprec.compiler import CompileError, compile_model
from tvm_anyprec.frontend.onnx_import import ImportError_
from tvm_anyprec.frontend.reference import dequantized_onnx, ort_session
from tvm_anyprec.quant import quantize_nonuniform
from tvm_anyprec.runtime import Session
from tvm_anyprec.targets import TargetError

from tvm_anyprec.testing import MLP_DIMS, mlp_onnx as _mlp_onnx  # noqa: E402

K, H, H2, N = MLP_DIMS   # odd sizes on purpose: K and N are not multiples of 32


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlp")
    weights, xshape = _mlp_onnx(d / "mlp.onnx")
    manifest = compile_model(d / "mlp.onnx", d / "art", accuracy="exact")
    assert manifest["accuracy"] == "exact"
    return d, weights, xshape, manifest


def test_every_linear_form_rewritten_and_lm_head_excluded(mlp):
    _d, _w, _x, manifest = mlp
    assert set(manifest["layers"]) == {"W1", "W2t", "W3"}
    assert manifest["layers"]["W1"]["layout"] == "kn" and manifest["layers"]["W2t"]["layout"] == "nk"
    assert manifest["layers"]["W1"]["N"] == H and manifest["layers"]["W1"]["K"] == K
    assert "excluded" in manifest["kept_fp32"]["lm_head.weight"]
    # weights are function parameters, not constants baked into the library
    assert "W1.planes" in manifest["functions"]["mlp"]["params"]


def _quantized_layers(weights, manifest):
    """The compile step quantizes from the graph with plain k-means; redo it independently here."""
    out = {}
    for name, w in weights.items():
        wn = w if manifest["layers"][name]["layout"] == "nk" else w.T
        out[name] = quantize_nonuniform(wn, None, 3, 8, name=name)
    return out


def _against_onnxruntime(onnx_path, art, weights, manifest, xshape, bits, seed):
    """(bits, compiled output, ORT's fp32 output on the graph with the independently dequantized weights)."""
    layers = _quantized_layers(weights, manifest)
    layouts = {n: v["layout"] for n, v in manifest["layers"].items()}
    x = np.random.default_rng(seed).standard_normal(xshape).astype(np.float32)
    sess = Session(art)
    for b in bits:
        ref = ort_session(dequantized_onnx(onnx_path, layers, b, layouts)).run(None, {"x": x})[0]
        yield b, sess.call(onnx_path.stem, [x], b).numpy(), ref


def test_matches_onnxruntime_every_bit_width(mlp):
    d, weights, xshape, manifest = mlp
    for _b, out, ref in _against_onnxruntime(d / "mlp.onnx", d / "art", weights, manifest, xshape, range(3, 9), 5):
        # fp32 kernels vs ORT's fp32 (different summation order): relative to the output scale
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_int8_mode_close_to_onnxruntime(tmp_path):
    """The CPU kernel's int8 mode (int8 activations per block of 32, int16 centroid tables) against ORT's fp32 on
    the dequantized graph: the error is the two int8 roundings, a few percent of the output scale at most."""
    weights, xshape = _mlp_onnx(tmp_path / "mlp.onnx")
    manifest = compile_model(tmp_path / "mlp.onnx", tmp_path / "art")      # the default: int8 mode
    assert manifest["accuracy"] == "int8" and manifest["plane_layout"] == "byte_sliced64"
    for b, out, ref in _against_onnxruntime(tmp_path / "mlp.onnx", tmp_path / "art", weights, manifest, xshape,
                                            (3, 6, 8), 5):
        err = np.abs(out - ref).max() / np.abs(ref).max()
        assert err < 6e-2, (b, err)
        assert err > 1e-6, "int8 mode must not be the exact kernel"


def test_3d_input_and_transposed_matmul(tmp_path):
    weights, xshape = _mlp_onnx(tmp_path / "m3.onnx", seq=5)
    manifest = compile_model(tmp_path / "m3.onnx", tmp_path / "art", accuracy="exact")
    assert set(manifest["layers"]) == {"W1", "W2t", "W3"}
    assert manifest["layers"]["W1"]["rows"]["m3"] == 5
    for _b, out, ref in _against_onnxruntime(tmp_path / "m3.onnx", tmp_path / "art", weights, manifest, xshape,
                                             (3, 5, 8), 6):
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_switching_bits_equals_separate_sessions(mlp):
    d, _w, xshape, _m = mlp
    x = np.random.default_rng(9).standard_normal(xshape).astype(np.float32)
    s = Session(d / "art")
    mixed = {b: s.call("mlp", [x], b).numpy() for b in (8, 3, 6, 4, 8, 3)}
    for b in (3, 4, 6, 8):
        np.testing.assert_array_equal(mixed[b], Session(d / "art").call("mlp", [x], b).numpy())


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tvm_anyprec.cli", *map(str, args)], capture_output=True, text=True)


def test_bad_onnx_file(tmp_path):
    p = tmp_path / "junk.onnx"
    p.write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(ImportError_, match="not a valid ONNX file"):
        compile_model(p, tmp_path / "out")
    r = _cli("compile", p, "-o", tmp_path / "out")
    assert r.returncode != 0 and "not a valid ONNX file" in r.stderr
    assert not (tmp_path / "out").exists()
    g = helper.make_graph([helper.make_node("Relu", ["nope"], ["y"])], "g",     # parses, fails the checker
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(g), tmp_path / "bad.onnx")
    with pytest.raises(ImportError_, match="failed the ONNX checker"):
        compile_model(tmp_path / "bad.onnx", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_graph_without_linear_layer(tmp_path):
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "relu.onnx"))
    with pytest.raises(CompileError, match="no linear layer"):
        compile_model(tmp_path / "relu.onnx", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_op_the_importer_rejects(tmp_path):
    g = helper.make_graph([helper.make_node("Det", ["x"], ["d"]), helper.make_node("Mul", ["x", "d"], ["s"]),
                           helper.make_node("MatMul", ["s", "W"], ["y"])],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])],
                          [numpy_helper.from_array(np.ones((4, 3), np.float32), "W")])
    # Det: a valid ONNX op that TVM 0.27's importer does not convert
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    r = _cli("compile", tmp_path / "m.onnx", "-o", tmp_path / "out")
    assert r.returncode != 0, r.stdout
    assert "error:" in r.stderr and "Det" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_artifact_for_another_target(mlp, tmp_path):
    import shutil
    d = tmp_path / "art"
    shutil.copytree(mlp[0] / "art", d)
    m = json.loads((d / "manifest.json").read_text())
    m["target"]["arch"], m["target"]["name"] = "aarch64", "arm-neon"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TargetError, match="compiled for arm-neon"):
        Session(d)


def test_weights_checksum_mismatch(mlp, tmp_path):
    import shutil
    d = tmp_path / "art"
    shutil.copytree(mlp[0] / "art", d)
    p = d / "weights.safetensors"
    raw = bytearray(p.read_bytes())
    raw[-10] ^= 0xFF
    p.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        Session(d)
    r = _cli("run", d, "--prompt", "hi", "--bits", "4")
    assert r.returncode != 0 and "checksum mismatch" in r.stderr


def test_unsupported_bits(mlp):
    d = mlp[0] / "art"
    with pytest.raises(ValueError, match="unsupported"):
        Session(d).call("mlp", [np.zeros(mlp[2], np.float32)], 9)
    r = _cli("eval", d, "--bits", "9")
    assert r.returncode != 0 and "9" in r.stderr


def test_vulkan_target_says_what_is_missing(mlp, tmp_path):
    with pytest.raises(TargetError, match="SPIR-V"):
        compile_model(mlp[0] / "mlp.onnx", tmp_path / "v", target="vulkan")


def test_generate_without_tokenizer_says_so(mlp):
    with pytest.raises(ArtifactError, match="records no tokenizer"):
        Session(mlp[0] / "art").generate("hello", 4, 8)



def test_memoized_tir_build_folds_repeated_constants_the_same():
    """FoldConstant under ``memoized_tir_build``: the same folded module as with TVM's own build, each distinct
    PrimFunc built once, the global ``tirx.build`` restored afterwards, and the folded module runs right."""
    import tvm
    import tvm_ffi
    from tvm import relax

    from tvm_anyprec.compiler import memoized_tir_build

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([4], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            acc = x
            for _ in range(6):    # the same constant computation six times (as in every layer of a graph)
                c = relax.const(np.arange(4, dtype=np.float32) + 1)
                acc = bb.emit(relax.op.add(acc, relax.op.multiply(c, c)))
            out = bb.emit_output(acc)
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps()(bb.get())
    plain = relax.transform.FoldConstant()(mod)
    original, seen = tvm.get_global_func("tirx.build"), []

    def counting(m, target=None, pipeline="default"):
        seen.append(m)
        return original(m, target, pipeline)

    tvm.register_global_func("tirx.build", counting, override=True)
    try:
        with memoized_tir_build():
            folded = relax.transform.FoldConstant()(mod)
        n_memo = len(seen)
        relax.transform.FoldConstant()(mod)     # restored: every fold builds again
        n_plain = len(seen) - n_memo
    finally:
        tvm.register_global_func("tirx.build", original, override=True)
    assert n_memo == 1 and n_plain == 6, (n_memo, n_plain)
    assert tvm_ffi.structural_equal(plain, folded)
    vm = relax.VirtualMachine(tvm.compile(folded, target="llvm"), tvm.cpu())
    xs = np.ones(4, np.float32)
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(xs)).numpy(), xs + 6 * (np.arange(4) + 1.0) ** 2)
