"""aarch64 presets, run for real on an emulated board: qemu-aarch64 (user mode) with an arm64 sysroot and the
aarch64 TVM runtime, reached through TVM's RPC (scripts/setup_arm.sh installs it all; .ci/run calls it).

The reference is the x86 build of the same graph and weights. Both do the same float arithmetic in the same
order up to LLVM's instruction selection (FMA contraction may differ), so the logits must agree to 1e-4 of
their scale, and greedy tokens must be equal."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tvm_anyprec.targets import ARM_FEATURES, QEMU_CPU, arm, preset
from tvm_anyprec.env import arm_root

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(arm.missing() is not None, reason=f"no emulated aarch64 board: {arm.missing()}")
PROMPT = "The king"


def _mlp(path):
    rng = np.random.default_rng(0)
    W1 = (rng.standard_normal((64, 96)) / 8).astype(np.float32)           # MatMul: [K, N]
    W2 = (rng.standard_normal((40, 96)) / 10).astype(np.float32)          # Gemm transB: [N, K]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["hr"]),
             helper.make_node("Gemm", ["hr", "W2"], ["y"], transB=1)]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 40])],
                          [numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(W2, "W2")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_presets():
    for name, feats in ARM_FEATURES.items():
        p = preset(name)
        assert p["arch"] == "aarch64" and p["target"]["mtriple"] == "aarch64-linux-gnu"
        assert p["features"] == list(feats) and p["qemu_cpu"] == QEMU_CPU[name]
    assert preset("rpi4")["name"] == "arm-neon" and preset("neoverse-v1")["name"] == "arm-i8mm"


@pytest.mark.parametrize("name", list(ARM_FEATURES))
def test_every_preset_runs_under_qemu_and_matches_x86(tmp_path, name):
    """compile --target <arm preset> -> an aarch64 lib.so; run on the preset's CPU model under qemu; equal to
    the x86 build at several bit-widths."""
    from tvm_anyprec.compiler import compile_model
    from tvm_anyprec.runtime import Session

    _mlp(tmp_path / "mlp.onnx")
    compile_model(tmp_path / "mlp.onnx", tmp_path / "x86", "x86")
    man = compile_model(tmp_path / "mlp.onnx", tmp_path / name, name)
    head = (tmp_path / name / "lib.so").read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183     # EM_AARCH64
    assert man["target"]["arch"] == "aarch64"
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    ref = Session(tmp_path / "x86")
    board = Session(tmp_path / name, remote=arm.qemu_session(QEMU_CPU[name]), remote_files=True)
    for bits in (3, 5, 8):
        want = ref.call("mlp", [x], bits).numpy()
        got = board.call("mlp", [x], bits).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.abs(want).max())
    assert not np.allclose(board.call("mlp", [x], 3).numpy(), board.call("mlp", [x], 8).numpy())


@pytest.fixture(scope="module")
def arm_artifact(real_onnx, real_parent, tmp_path_factory):
    """The real model's decode graph compiled for arm-dotprod from the shared parent."""
    from tvm_anyprec import api

    out = tmp_path_factory.mktemp("arm") / "smollm2-arm"
    api.compile(Path(real_onnx) / "decode.onnx", out, "arm-dotprod", parent=real_parent, accuracy="exact")
    return out


@pytest.fixture(scope="module")
def board(arm_artifact):
    from tvm_anyprec import api

    return api.load(arm_artifact)          # an aarch64 artifact on x86: the emulated board, -cpu cortex-a76


def test_real_model_under_qemu_matches_x86(board, session):
    """The whole real model on the emulated Cortex-A76: logits at 3 and 8 bits equal the x86 build's, and
    greedy decoding (at 4 bits) gives the same tokens."""
    tok = session.tokenizer
    ids = np.array(tok(PROMPT)["input_ids"], np.int64)
    assert board.remote is not None and board.manifest["target"]["name"] == "arm-dotprod"
    for bits in (3, 8):
        got, _ = board.forward_tokens(ids, bits, fn="decode")
        want, _ = session.forward_tokens(ids, bits, fn="decode")
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert board.generate_ids(ids, 3, bits=4) == session.generate_ids(ids, 3, bits=4)


def test_cli_run_uses_the_emulated_board(arm_artifact, session):
    r = subprocess.run([sys.executable, "-m", "tvm_anyprec.cli", "run", str(arm_artifact), "--prompt", PROMPT,
                        "--bits", "6", "--max-new-tokens", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "qemu-aarch64 -cpu cortex-a76" in r.stderr
    assert r.stdout.strip() == PROMPT + session.generate(PROMPT, 2, 6)


def test_cpp_example_for_aarch64(arm_artifact, session, tmp_path):
    """examples/cpp cross-compiled for aarch64 against the aarch64 TVM runtime, run under qemu: the tokens equal
    the Python runtime's (x86). One bit-width here (emulated steps are slow); switching bit-widths within one
    load is checked on x86 (test_runtime_features) and, for the ARM build, by test_real_model_under_qemu."""
    exe = tmp_path / "anyprec_generate"
    b = subprocess.run(["bash", str(ROOT / "examples/cpp/build.sh"), str(exe)], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "ARCH": "aarch64",
                            "TVM_ANYPREC_ARM_ROOT": str(arm_root())})   # the board wherever env.py finds it
    assert b.returncode == 0, b.stderr[-3000:]
    ids = session.tokenizer(PROMPT)["input_ids"]
    r = subprocess.run(["bash", str(ROOT / "examples/cpp/run_aarch64.sh"), str(exe), str(arm_artifact),
                        "--prompt-ids", ",".join(map(str, ids)), "--bits", "3", "--max-new-tokens", "2",
                        "--prompt-fn", "decode"], capture_output=True, text=True,
                       env={"QEMU_CPU": "cortex-a76", "PATH": "/usr/bin:/bin", "TVM_ANYPREC_ARM_ROOT": str(arm_root())})
    assert r.returncode == 0, r.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in r.stdout.strip().splitlines())
    got = [int(t) for t in lines["bits=3"].removeprefix("ids=").split()]
    assert got == session.generate_ids(ids, 2, 3)


def test_integer_gemm_variants_tuned_on_the_board_and_applied(tmp_path):
    """`tune` on a W4A4 artifact for arm-dotprod measures the integer GEMM variants the preset allows (neon,
    sdot, packed) on the emulated Cortex-A76 and records the fastest per kernel; compile applies the choice
    ("tuned:<variant>"), and the result on the board equals the x86 build."""
    import json

    from tvm_anyprec.testing import two_layer_onnx as _two_layer_onnx

    from tvm_anyprec.compiler import compile_model
    from tvm_anyprec.quant import activations as A
    from tvm_anyprec.runtime import Session
    from tvm_anyprec.api import tune_variants
    from tvm_anyprec.tune import VARIANTS_FILE

    _two_layer_onnx(tmp_path / "mlp.onnx")
    cfg = A.ActQuantConfig(4, outlier="none", group_size=64)
    compile_model(tmp_path / "mlp.onnx", tmp_path / "art0", "arm-dotprod", act_quant=cfg,
                  tuning_log=tmp_path / "none")
    rows = tune_variants(tmp_path / "art0", "arm-dotprod", tmp_path / "log", progress=False)
    assert len(rows) == 2 and all(set(r["ms"]) == {"neon", "sdot", "packed"} for r in rows), rows
    table = json.loads((tmp_path / "log" / VARIANTS_FILE).read_text())
    man = compile_model(tmp_path / "mlp.onnx", tmp_path / "art", "arm-dotprod", act_quant=cfg,
                        tuning_log=tmp_path / "log")
    gemms = {k: v for k, v in man["kernels"].items() if k.startswith("int_gemm")}
    assert gemms == {k: f"tuned:{table[k]['variant']}" for k in gemms}, (gemms, table)
    x = np.random.default_rng(3).standard_normal((6, 128)).astype(np.float32)
    compile_model(tmp_path / "mlp.onnx", tmp_path / "x86", "x86", act_quant=cfg)
    want = Session(tmp_path / "x86").call("mlp", [x], 4).numpy()
    board = Session(tmp_path / "art", remote=arm.qemu_session("cortex-a76"), remote_files=True)
    np.testing.assert_allclose(board.call("mlp", [x], 4).numpy(), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
