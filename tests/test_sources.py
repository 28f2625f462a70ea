"""Model sources as users hold them (data.resolve_model, the one resolver quantize/export/compile use): the
packaged names, a .gguf file, a transformers directory; clear errors for the rest, naming the path and why.
The whole path per kind runs elsewhere: a transformers directory in test_families.py, the packaged SmolLM2
and its .gguf file in the real-model tests, ONNX files and directories in test_compile.py and
test_onnx_foreign.py."""
from __future__ import annotations

import pytest

from tvm_anyprec import data
from tvm_anyprec.data import DataError

pytestmark = pytest.mark.unit


def test_packaged_names_and_gguf_files():
    p = data.resolve_model("smollm2")
    assert p.suffix == ".gguf" and p.exists()
    assert data.resolve_model(None) == p and data.resolve_model(str(p)) == p
    assert data.packaged_name(p) == "smollm2" and data.packaged_name("/elsewhere/" + data.GEMMA3_GGUF) == "gemma3-270m"
    assert data.packaged_name("/some/model.gguf") is None


def test_transformers_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert data.resolve_model(tmp_path) == tmp_path
    h = data.source_sha256(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"y")   # a directory's hash follows its files
    assert data.source_sha256(tmp_path) != h and len(h) == 64


def test_what_is_not_a_model_says_why(tmp_path):
    with pytest.raises(DataError, match="model not found.*'smollm2'"):
        data.resolve_model(tmp_path / "missing")
    with pytest.raises(DataError, match="not a transformers model directory \\(no config.json\\)"):
        data.resolve_model(tmp_path)
    (tmp_path / "g.onnx").write_bytes(b"")
    with pytest.raises(DataError, match="ONNX graphs: give them to `compile`"):
        data.resolve_model(tmp_path)
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(DataError, match="must be .gguf"):
        data.resolve_model(tmp_path / "w.bin")


def test_unloadable_directory_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(DataError, match="transformers cannot load"):
        data.load_model(tmp_path)
