"""ONNX graphs from elsewhere: the onnx package's own MatMul/Gemm node tests (onnx.backend.test.case.node) with
their weights made constant, and a BERT-style encoder exported by torch.onnx.export; compiled and run through
``Session.run`` and ``tvm-anyprec run --inputs``. Also: 0-d initializers keep their shape, dynamic input
dimensions get a clear error and can be fixed with --input-shape."""
from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

pytestmark = pytest.mark.kernel

NODE_TESTS = ("test_gemm_all_attributes", "test_gemm_alpha", "test_gemm_beta", "test_gemm_default_matrix_bias",
              "test_gemm_default_no_bias", "test_gemm_default_scalar_bias", "test_gemm_default_single_elem_vector_bias",
              "test_gemm_default_vector_bias", "test_gemm_default_zero_bias", "test_gemm_transposeA",
              "test_gemm_transposeB", "test_matmul_2d", "test_matmul_3d", "test_matmul_4d", "test_matmul_bcast")


def _node_cases():
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = {c.name: c for c in collect_testcases(None) if c.name in NODE_TESTS}
    assert sorted(cases) == sorted(NODE_TESTS)
    return cases


def _constant_weights(case):
    """The case's model with every input after the first (B, and C for Gemm) an initializer holding the test
    data, renamed per case (graphs of one artifact share weights by name); -> (model, x, expected)."""
    inputs, outputs = case.data_sets[0]
    g = case.model.graph
    tag = case.name.removeprefix("test_")
    rename = {i.name: f"{tag}.{i.name}" for i in g.input[1:]}
    nodes = [helper.make_node(n.op_type, [rename.get(x, x) for x in n.input], list(n.output), name=n.name,
                              **{a.name: helper.get_attribute_value(a) for a in n.attribute}) for n in g.node]
    inits = [numpy_helper.from_array(np.asarray(v), rename[i.name]) for i, v in zip(g.input[1:], inputs[1:])]
    graph = helper.make_graph(nodes, tag, [g.input[0]], list(g.output), inits)
    model = helper.make_model(graph, opset_imports=list(case.model.opset_import))
    onnx.checker.check_model(model)
    return model, inputs[0], outputs[0]


@pytest.fixture(scope="module")
def node_artifacts(tmp_path_factory):
    """One directory of the node-test graphs -> one artifact with one function per graph (bitplane, 8 bits at
    most) and one all-fp32 artifact."""
    from tvm_anyprec.compiler import compile_model

    d = tmp_path_factory.mktemp("node")
    (d / "graphs").mkdir()
    cases = {}
    for name, case in _node_cases().items():
        model, x, y = _constant_weights(case)
        fname = name.removeprefix("test_")
        onnx.save(model, str(d / "graphs" / f"{fname}.onnx"))
        cases[fname] = (x, y)
    compile_model(d / "graphs", d / "bitplane", require_rewrite=True)
    compile_model(d / "graphs", d / "fp32", exclude=(".*",), require_rewrite=False)
    return d, cases


def test_node_tests_match_expected_outputs(node_artifacts):
    from tvm_anyprec.runtime import Session

    d, cases = node_artifacts
    fp32, bp = Session(d / "fp32"), Session(d / "bitplane")
    rewritten = set()
    for fname, (x, y) in cases.items():
        got = fp32.run([x], function=fname)
        np.testing.assert_allclose(next(iter(got.values())), y, rtol=1e-5, atol=1e-5, err_msg=fname)
        out = next(iter(bp.run([x], 8, function=fname).values()))
        assert out.shape == y.shape
        np.testing.assert_allclose(out, y, rtol=2e-2, atol=2e-2 * np.abs(y).max(), err_msg=fname)
        rewritten |= {n for n in bp.manifest["functions"][fname]["params"] if n.endswith(".planes")}
    # the 2-D weights became bitplane layers (batched 3-D/4-D B operands stay fp32)
    assert any(n.startswith("gemm_default_scalar_bias.") for n in rewritten)
    assert any(n.startswith("matmul_2d.") for n in rewritten)


def test_scalar_initializer_keeps_its_shape(node_artifacts):
    from tvm_anyprec.artifact import load_tensors

    d, _ = node_artifacts
    w = load_tensors(d / "fp32" / "weights.safetensors")
    assert w["gemm_default_scalar_bias.c"].shape == ()


def _bert(tmp_path):
    import torch
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    bert = BertModel(cfg).eval()

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, ids, mask):
            return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state

    enc = Encoder().eval()
    ids = torch.randint(0, 1000, (1, 16))
    mask = torch.ones(1, 16, dtype=torch.int64)
    mask[0, 12:] = 0
    with torch.no_grad():
        ref = enc(ids, mask).numpy()
    path = tmp_path / "encoder.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(enc, (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], opset_version=17, dynamo=False)
    np.savez(tmp_path / "inputs.npz", input_ids=ids.numpy(), attention_mask=mask.numpy())
    return path, ref


def test_torch_exported_encoder_at_8_bits(tmp_path):
    """A BERT-style encoder from torch.onnx.export: compiles (ConstantOfShape/Expand chains folded first) and
    its 8-bit embeddings match torch's fp32 ones; the CLI runs it on .npz inputs and saves the outputs."""
    path, ref = _bert(tmp_path)
    r = subprocess.run([sys.executable, "-m", "tvm_anyprec.cli", "compile", str(path), "-o", str(tmp_path / "art")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "tvm_anyprec.cli", "run", str(tmp_path / "art"), "--bits", "8",
                        "--inputs", str(tmp_path / "inputs.npz"), "--outputs", str(tmp_path / "out.npz")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "last_hidden_state: float32 [1, 16, 64]" in r.stdout
    got = np.load(tmp_path / "out.npz")["last_hidden_state"]
    cos = (got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.min() >= 0.999, cos
    from tvm_anyprec.runtime import Session
    s = Session(tmp_path / "art")
    with np.load(tmp_path / "inputs.npz") as z:
        low = s.run({k: z[k] for k in z.files}, 3)["last_hidden_state"]
    assert not np.allclose(low, got)                     # the bit-width is chosen per call
    with pytest.raises(ValueError, match="missing"):
        s.run({"input_ids": np.zeros((1, 16), np.int64)})


def test_dynamic_dimensions_need_a_shape(tmp_path):
    from tvm_anyprec import api
    from tvm_anyprec.errors import ImportError_

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "W")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "dyn",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 8])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 16])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "dyn.onnx"))
    with pytest.raises(ImportError_, match=r"dynamic dimensions x\[0\] \(batch\).*--input-shape"):
        api.compile(tmp_path / "dyn.onnx", tmp_path / "a")
    assert not (tmp_path / "a").exists()
    r = subprocess.run([sys.executable, "-m", "tvm_anyprec.cli", "compile", str(tmp_path / "dyn.onnx"), "-o",
                        str(tmp_path / "b"), "--input-shape", "x=3,8"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from tvm_anyprec.runtime import Session
    x = rng.standard_normal((3, 8)).astype(np.float32)
    y = Session(tmp_path / "b").run({"x": x})["y"]
    np.testing.assert_allclose(y, x @ numpy_helper.to_array(w), rtol=2e-2, atol=2e-2)
