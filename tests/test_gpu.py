"""GPU targets without a GPU (issue 7): CUDA kernels build to real cubin/fatbin for sm_80 and sm_90 with nvcc
(a stub libcuda.so.1 stands in for the driver), the WGSL of the WebGPU build runs on Mesa's lavapipe (software
Vulkan) and matches numpy for every bit-width, and the targets that cannot work say what is missing.

Skips (with the reason) only when nvcc, the CUDA runtime library, wgpu-py or a WebGPU adapter is missing;
scripts/setup_gpu.sh installs what it can. On a machine with an NVIDIA GPU the compiled artifact also runs.
"""
import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm_anyprec.kernels.anyprec import make_anyprec_linear  # noqa: E402
from tvm_anyprec.kernels.dense import make_dense_nt  # noqa: E402
from tvm_anyprec.quant import quantize_nonuniform  # noqa: E402
from tvm_anyprec.testing import concat_luts  # noqa: E402
from tvm_anyprec.schedules.gpu import schedule_linear_gpu  # noqa: E402
from tvm_anyprec.targets import TargetError, preset  # noqa: E402
from tvm_anyprec.targets.cuda import FATBIN_MAGIC  # noqa: E402

RTOL = 1e-4


@pytest.fixture(scope="module")
def cuda_build():
    from tvm_anyprec.targets.cuda import ensure_cuda_build

    try:
        return ensure_cuda_build()
    except TargetError as e:
        pytest.skip(f"no CUDA build here: {e}")


@pytest.fixture(scope="module")
def wgpu_device():
    pytest.importorskip("wgpu", reason="wgpu-py not installed (pip install wgpu)")
    from tvm_anyprec.targets import webgpu

    try:
        webgpu.device()
    except webgpu.WebGPUUnavailable as e:
        pytest.skip(str(e))
    return webgpu


def _so_bytes(lib, path) -> bytes:
    lib.export_library(str(path))
    return path.read_bytes()


# ---------------------------------------------------------------- CUDA: the real model's kernels, sm_80 and sm_90

@pytest.fixture(scope="module")
def real_kernels(real_onnx):
    from tvm_anyprec.api import model_kernels

    return model_kernels(real_onnx, target="cuda-sm80")


def _act_kernels(real_kernels) -> dict:
    """The low-bit-activation kernels (word form, GPU schedules) of the real model's linear shapes: W4A8 and
    W4A4 act_quant, and the INT4 GEMM (what `compile --act-bits` emits for a GPU target)."""
    import re

    from tvm_anyprec.kernels.intgemm import act_quant_name, int_gemm_name, make_act_quant, make_int_gemm
    from tvm_anyprec.quant.activations import ActQuantConfig
    from tvm_anyprec.schedules.intgemm_gpu import schedule_act_quant_gpu, schedule_int_gemm_gpu

    gs = ActQuantConfig(8).group_size
    out = {}
    for name in real_kernels:
        m = re.match(r"anyprec_linear_m(\d+)_n(\d+)_k(\d+)_", name)
        if m is None:
            continue
        M, N, K = map(int, m.groups())
        for bits in (8, 4):
            out[act_quant_name(M, K, bits, gs)] = schedule_act_quant_gpu(make_act_quant(M, K, bits, gs, words=True))
        out[int_gemm_name(M, N, K, gs)] = schedule_int_gemm_gpu(make_int_gemm(M, N, K, gs, words=True))
    return out


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_real_model_kernels_build_to_cubin(arch, real_kernels, cuda_build, tmp_path):
    """Every distinct kernel of the real model, bitplane and fp32 dense as compiled, plus the integer kernels
    of the same shapes (low-bit activations), in one CUDA library with a fatbin for ``arch``."""
    kernels = {name: schedule_linear_gpu(f).with_attr("global_symbol", name) for name, f in real_kernels.items()}
    assert any(n.startswith("anyprec_linear_m1_") for n in kernels), "no decode-step (GEMV) kernel"
    assert any(not n.startswith("anyprec_linear_m1_") and n.startswith("anyprec") for n in kernels)
    act = _act_kernels(real_kernels)
    assert any(n.startswith("int_gemm_w4_m1_") for n in act) and any("_a4_" in n for n in act)
    kernels.update({name: f.with_attr("global_symbol", name) for name, f in act.items()})
    target = tvm.target.Target({**preset("cuda-" + arch.replace("_", ""))["target"]})
    assert target.attrs["arch"] == arch
    with target:
        lib = tvm.compile(tvm.IRModule(kernels), target=target)
    cu = lib.mod._collect_from_import_tree(lambda m: m.kind == "cuda")
    assert len(cu) == 1
    src = cu[0].inspect_source()
    for name in kernels:
        assert f"{name}_kernel" in src
    blob = _so_bytes(lib, tmp_path / "k.so")
    assert FATBIN_MAGIC in blob, "the library embeds CUDA source, not a fatbin (nvcc did not run)"
    assert arch.encode() in blob
    for name in kernels:                      # every kernel is in the device code's symbol table
        assert f"{name}_kernel".encode() in blob


# ---------------------------------------------------------------- whole (small) graph through the CLI

def _small_onnx(path):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from tvm_anyprec.testing import mlp_onnx as _mlp_onnx

    return _mlp_onnx(path)


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu_small")
    _small_onnx(d / "mlp.onnx")
    return d / "mlp.onnx"


def test_cli_compile_cuda_sm80_embeds_fatbin(small_onnx, cuda_build, tmp_path):
    from tvm_anyprec import cli
    from tvm_anyprec.artifact import read_manifest
    from tvm_anyprec.runtime import Session
    from tvm_anyprec.targets.cuda import has_gpu

    out = tmp_path / "art"
    assert cli.main(["compile", str(small_onnx), "--out", str(out), "--target", "cuda-sm80"]) in (0, None)
    blob = (out / "lib.so").read_bytes()
    assert FATBIN_MAGIC in blob and b"sm_80" in blob
    m = read_manifest(out)
    assert m["target"]["device"] == "cuda" and m["target"]["target"]["arch"] == "sm_80"
    assert all(v == "default" for v in m["kernels"].values())
    if not has_gpu():
        with pytest.raises(TargetError, match="no usable CUDA GPU"):
            Session(out)
        return
    # a machine with an NVIDIA GPU: the artifact runs and matches the x86 build of the same graph
    x86 = tmp_path / "x86"
    cli.main(["compile", str(small_onnx), "--out", str(x86), "--target", "x86"])
    x = np.random.default_rng(0).standard_normal((3, 77)).astype(np.float32)
    fn = next(iter(m["functions"]))
    for b in m["bit_widths"]:
        y_gpu = Session(out).call(fn, [x], b)[0].numpy()
        y_cpu = Session(x86).call(fn, [x], b)[0].numpy()
        np.testing.assert_allclose(y_gpu, y_cpu, rtol=1e-3, atol=1e-3)


def test_webgpu_artifact_compiles_and_says_where_it_runs(small_onnx, tmp_path):
    from tvm_anyprec.compiler import compile_model
    from tvm_anyprec.runtime import Session

    m = compile_model(small_onnx, tmp_path / "wg", target="webgpu")
    assert m["target"]["device"] == "webgpu"
    with pytest.raises(TargetError, match="browser"):
        Session(tmp_path / "wg")


def test_vulkan_error_names_missing_spirv_codegen(small_onnx, tmp_path, capsys):
    from tvm_anyprec import cli

    if tvm.get_global_func("target.build.vulkan", allow_missing=True) is not None:
        assert preset("vulkan")["target"]["kind"] == "vulkan"   # a TVM with Vulkan: the preset works
        return
    with pytest.raises(TargetError) as e:
        preset("vulkan")
    msg = str(e.value)
    assert "SPIR-V" in msg and "target.build.vulkan" in msg and "USE_VULKAN" in msg
    assert cli.main(["compile", str(small_onnx), "--out", str(tmp_path / "vk"), "--target", "vulkan"]) != 0
    err = capsys.readouterr().err
    assert "SPIR-V" in err and "target.build.vulkan" in err
    assert not (tmp_path / "vk").exists()


def test_gpu_presets():
    for name, arch in (("cuda-sm80", "sm_80"), ("cuda-sm89", "sm_89"), ("cuda-sm90", "sm_90")):
        t = tvm.target.Target(preset(name)["target"])
        assert t.kind.name == "cuda" and t.attrs["arch"] == arch and t.host.kind.name == "llvm"
    assert tvm.target.Target(preset("webgpu")["target"]).kind.name == "webgpu"
    with pytest.raises(TargetError, match="cuda-sm80"):
        preset("no-such-target")


# ---------------------------------------------------------------- WGSL on lavapipe vs numpy, every bit-width

SHAPES = [(1, 64, 96, None), (1, 50, 77, None), (1, 40, 1100, True), (1, 24, 130, False), (5, 33, 130, None),
          (32, 64, 200, None)]


@pytest.mark.parametrize("M,N,K,lut_shared", SHAPES)
def test_wgsl_bitplane_kernel_matches_numpy_every_bit_width(M, N, K, lut_shared, wgpu_device):
    rng = np.random.default_rng(M * 1000 + N + K)
    w = rng.standard_normal((N, K)).astype(np.float32)
    layer = quantize_nonuniform(w, None, 3, 8)
    luts = concat_luts(layer, dtype=np.float16)
    x = rng.standard_normal((M, K)).astype(np.float32)
    f = schedule_linear_gpu(make_anyprec_linear(M, N, K), lut_shared=lut_shared)
    if lut_shared:
        assert "shared" in f.script()
    outs = {}
    for b in range(3, 9):
        y = wgpu_device.run_prim_func(f, {"X": x, "PLANES": layer.planes, "LUTS": luts,
                                          "NBITS": np.array([b], np.int32), "Y": np.zeros((M, N), np.float32)},
                                      ["Y"])["Y"]
        ref = x.astype(np.float64) @ layer.dequantize(b).astype(np.float64).T
        np.testing.assert_allclose(y, ref, rtol=RTOL, atol=RTOL * np.abs(ref).max())
        outs[b] = y
    assert not np.allclose(outs[3], outs[8]), "bit-width had no effect"


@pytest.mark.parametrize("M,N,K", [(1, 64, 96), (1, 33, 77), (7, 48, 130)])
def test_wgsl_dense_kernel_matches_numpy(M, N, K, wgpu_device):
    rng = np.random.default_rng(N + K)
    w = rng.standard_normal((N, K)).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32)
    f = schedule_linear_gpu(make_dense_nt(M, N, K))
    y = wgpu_device.run_prim_func(f, {"X": x, "W": w, "Y": np.zeros((M, N), np.float32)}, ["Y"])["Y"]
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    np.testing.assert_allclose(y, ref, rtol=RTOL, atol=RTOL * np.abs(ref).max())


@pytest.mark.parametrize("M,N,K", [(1, 48, 200), (8, 32, 100)])
def test_wgsl_tuning_space_samples_match_numpy(M, N, K, wgpu_device):
    """Random points of the MetaSchedule space (linear_space_gpu) are correct schedules too."""
    from tvm_anyprec.schedules.gpu import linear_space_gpu

    rng = np.random.default_rng(7)
    layer = quantize_nonuniform(rng.standard_normal((N, K)).astype(np.float32), None, 3, 8)
    luts = concat_luts(layer, dtype=np.float16)
    x = rng.standard_normal((M, K)).astype(np.float32)
    for seed in (1, 2):
        sch = tvm.s_tir.Schedule(make_anyprec_linear(M, N, K), seed=seed)
        linear_space_gpu(sch)
        f = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        for b in (3, 8):
            y = wgpu_device.run_prim_func(f, {"X": x, "PLANES": layer.planes, "LUTS": luts,
                                              "NBITS": np.array([b], np.int32),
                                              "Y": np.zeros((M, N), np.float32)}, ["Y"])["Y"]
            ref = x.astype(np.float64) @ layer.dequantize(b).astype(np.float64).T
            np.testing.assert_allclose(y, ref, rtol=RTOL, atol=RTOL * np.abs(ref).max())


# ---------------------------------------------------------------- integer kernels (low-bit activations), word form

def _act_ref(x, inv, bits, gs):
    """numpy: per-token codes (int8), scales and group sums of kernels.intgemm's act_quant."""
    qm = 2 ** (bits - 1) - 1
    xf = x * inv
    amax = np.abs(xf).max(1)
    xs = np.where(amax > 0, amax / np.float32(qm), np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(xf / xs[:, None]), -qm, qm).astype(np.int8)
    return q, xs, q.astype(np.int32).reshape(len(x), -1, gs).sum(-1).astype(np.int32)


INT_SHAPES = [(1, 64, 576, 64, 8), (1, 40, 200, 40, 4), (1, 24, 1536, 64, 8), (5, 96, 256, 64, 4),
              (32, 48, 128, 32, 8)]


@pytest.mark.parametrize("M,N,K,gs,bits", INT_SHAPES)
def test_wgsl_int_kernels_match_numpy(M, N, K, gs, bits, wgpu_device):
    """act_quant and int_gemm (word form, GPU hand schedules) on lavapipe: the packed codes, scales and group
    sums equal numpy exactly, and the output equals numpy's dequantized exact int32 accumulation."""
    from tvm_anyprec.kernels.intgemm import make_act_quant, make_int_gemm
    from tvm_anyprec.schedules.intgemm_gpu import schedule_act_quant_gpu, schedule_int_gemm_gpu

    rng = np.random.default_rng(M + N + K + bits)
    G = K // gs
    x = rng.standard_normal((M, K)).astype(np.float32)
    x[:, 3] *= 20                                            # an outlier channel, smoothed by INV
    inv = np.ones(K, np.float32)
    inv[3] = 1 / 8
    if M > 1:
        x[-1] = 0                                            # an all-zero token: its scale is 1
    f = schedule_act_quant_gpu(make_act_quant(M, K, bits, gs, words=True))
    o = wgpu_device.run_prim_func(f, {"X": x, "INV": inv, "XQ": np.zeros((M, K // 4), np.uint32),
                                      "XS": np.zeros(M, np.float32), "XSUM": np.zeros((M, G), np.int32)},
                                  ["XQ", "XS", "XSUM"])
    q, xs, xsum = _act_ref(x, inv, bits, gs)
    np.testing.assert_array_equal(o["XQ"].view(np.int8).reshape(M, K), q)
    np.testing.assert_allclose(o["XS"], xs, rtol=1e-6)
    np.testing.assert_array_equal(o["XSUM"], xsum)

    codes = rng.integers(0, 16, (N, K)).astype(np.uint8)
    wp = np.ascontiguousarray(codes[:, 0::2] | (codes[:, 1::2] << 4)).view(np.uint32)    # [N, K/8]
    ws = (rng.random((N, G)) * 0.1).astype(np.float32)
    wz = (rng.random((N, G)) * 15).astype(np.float32)
    g = schedule_int_gemm_gpu(make_int_gemm(M, N, K, gs, words=True))
    y = wgpu_device.run_prim_func(g, {"XQ": q.view(np.uint32).reshape(M, K // 4), "XS": xs, "XSUM": xsum,
                                      "WP": wp, "WS": ws, "WZ": wz, "Y": np.zeros((M, N), np.float32)}, ["Y"])["Y"]
    acc = np.einsum("mgk,ngk->mng", q.astype(np.int64).reshape(M, G, gs), codes.astype(np.int64).reshape(N, G, gs))
    ref = (xs[:, None, None].astype(np.float64) * ws[None] * (acc - wz[None] * xsum[:, None, :])).sum(-1)
    np.testing.assert_allclose(y, ref, rtol=RTOL, atol=RTOL * np.abs(ref).max())
    assert np.abs(y[0]).max() > 0 and (M == 1 or np.all(y[-1] == 0))


@pytest.mark.parametrize("M,N,K,gs", [(1, 48, 256, 64), (8, 32, 128, 32)])
def test_wgsl_int_gemm_tuning_space_samples_match_numpy(M, N, K, gs, wgpu_device):
    """Random points of int_gemm_space_gpu (the MetaSchedule space) are correct schedules too."""
    from tvm_anyprec.kernels.intgemm import make_int_gemm
    from tvm_anyprec.schedules.intgemm_gpu import int_gemm_space_gpu

    rng = np.random.default_rng(11)
    G = K // gs
    q = rng.integers(-127, 128, (M, K)).astype(np.int8)
    xs = (rng.random(M) * 0.05).astype(np.float32)
    xsum = q.astype(np.int32).reshape(M, G, gs).sum(-1).astype(np.int32)
    codes = rng.integers(0, 16, (N, K)).astype(np.uint8)
    wp = np.ascontiguousarray(codes[:, 0::2] | (codes[:, 1::2] << 4)).view(np.uint32)
    ws = (rng.random((N, G)) * 0.1).astype(np.float32)
    wz = (rng.random((N, G)) * 15).astype(np.float32)
    acc = np.einsum("mgk,ngk->mng", q.astype(np.int64).reshape(M, G, gs), codes.astype(np.int64).reshape(N, G, gs))
    ref = (xs[:, None, None].astype(np.float64) * ws[None] * (acc - wz[None] * xsum[:, None, :])).sum(-1)
    for seed in (1, 2, 3):
        sch = tvm.s_tir.Schedule(make_int_gemm(M, N, K, gs, words=True), seed=seed)
        int_gemm_space_gpu(sch)
        f = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        y = wgpu_device.run_prim_func(f, {"XQ": q.view(np.uint32).reshape(M, K // 4), "XS": xs, "XSUM": xsum,
                                          "WP": wp, "WS": ws, "WZ": wz, "Y": np.zeros((M, N), np.float32)},
                                      ["Y"])["Y"]
        np.testing.assert_allclose(y, ref, rtol=RTOL, atol=RTOL * np.abs(ref).max())


def test_cli_compile_act_bits_for_gpu_targets(cuda_build, tmp_path):
    """--act-bits with a GPU target: the word-form kernels with the GPU schedules; the CUDA library embeds a
    fatbin, the weights hold the INT4 codes as uint32 words (the same bytes as the CPU artifact's uint8)."""
    import sys
    from pathlib import Path

    from tvm_anyprec import cli
    from tvm_anyprec.artifact import load_tensors

    sys.path.insert(0, str(Path(__file__).parent))
    from tvm_anyprec.testing import two_layer_onnx as _two_layer_onnx

    _two_layer_onnx(tmp_path / "mlp.onnx")
    arts = {}
    for target in ("cuda-sm80", "webgpu", "x86"):
        out = tmp_path / target
        assert cli.main(["compile", str(tmp_path / "mlp.onnx"), "--out", str(out), "--target", target,
                         "--act-bits", "8", "--act-outlier", "none"]) in (0, None)
        arts[target] = load_tensors(out / "weights.safetensors")
    blob = (tmp_path / "cuda-sm80" / "lib.so").read_bytes()
    assert FATBIN_MAGIC in blob and b"int_gemm_w4_m6_n192_k128_g64_kernel" in blob
    for name, w in arts["x86"].items():
        if name.endswith(".w4"):
            assert w.dtype == np.uint8 and arts["cuda-sm80"][name].dtype == np.uint32
            assert arts["cuda-sm80"][name].tobytes() == w.tobytes() == arts["webgpu"][name].tobytes()


# ---------------------------------------------------------------- GPU tuning (MetaSchedule) on the WebGPU adapter

def test_webgpu_tuning_records_are_applied_and_correct(small_onnx, wgpu_device, tmp_path):
    """`tune --target webgpu` measures the GPU design space through wgpu (here lavapipe: a ranking on the
    CPU's software Vulkan, not a GPU's) with the hand schedule as record 1; compile applies the records, and
    the best record's kernel still matches numpy."""
    from tvm_anyprec import cli
    from tvm_anyprec.compiler import compile_model
    from tvm_anyprec.tune import count_records, open_database, query_database

    log = tmp_path / "log"
    assert cli.main(["tune", str(small_onnx), "--target", "webgpu", "--trials", "4", "--only", "m3_n96",
                     "--log-dir", str(log)]) in (0, None)
    target = tvm.target.Target(preset("webgpu")["target"])
    f = make_anyprec_linear(3, 96, 77)
    assert count_records(open_database(log), f, target) == 4
    m = compile_model(small_onnx, tmp_path / "art", target="webgpu", tuning_log=log)
    assert m["kernels"]["anyprec_linear_m3_n96_k77_b3to8"] == "tuned"
    assert {v for k, v in m["kernels"].items() if "m3_n96" not in k} == {"default"}
    best = query_database(open_database(log), f, target)
    rng = np.random.default_rng(5)
    layer = quantize_nonuniform(rng.standard_normal((96, 77)).astype(np.float32), None, 3, 8)
    luts = concat_luts(layer, dtype=np.float16)
    x = rng.standard_normal((3, 77)).astype(np.float32)
    for b in (3, 8):
        y = wgpu_device.run_prim_func(best, {"X": x, "PLANES": layer.planes, "LUTS": luts,
                                             "NBITS": np.array([b], np.int32), "Y": np.zeros((3, 96), np.float32)},
                                      ["Y"])["Y"]
        ref = x.astype(np.float64) @ layer.dequantize(b).astype(np.float64).T
        np.testing.assert_allclose(y, ref, rtol=RTOL, atol=RTOL * np.abs(ref).max())


def test_cuda_tuning_without_a_gpu_says_what_is_missing(small_onnx, tmp_path, capsys):
    from tvm_anyprec import cli
    from tvm_anyprec.targets.cuda import has_gpu

    if has_gpu():
        pytest.skip("this machine has an NVIDIA GPU: CUDA tuning runs here")
    assert cli.main(["tune", str(small_onnx), "--target", "cuda-sm80", "--trials", "2",
                     "--log-dir", str(tmp_path / "log")]) == 2
    assert "needs an NVIDIA GPU" in capsys.readouterr().err
    assert not (tmp_path / "log" / "database_tuning_record.json").exists()
