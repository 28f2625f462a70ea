"""aarch64 variants of the integer GEMM (neon / sdot / smmla / packed) cross-compiled and run under
qemu-aarch64 on a CPU model that has their feature: ACC bit-exact vs numpy int64, Y vs the numpy float
reference and the x86 build; the instructions in the assembly; SIGILL on a CPU model without the feature;
the variant choice of schedules.rules.schedule_kernels on a small graph, and a W4A4 graph with the packed
kernel run end to end (Relax VM over RPC)."""
from __future__ import annotations

import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm_anyprec.kernels.intgemm import make_int_gemm  # noqa: E402
from tvm_anyprec.kernels.intgemm_arm import make_int_gemm_arm, unsupported  # noqa: E402
from tvm_anyprec.schedules.intgemm_arm import (  # noqa: E402
    ArmVariantError, check_variant, schedule_int_gemm_arm, target_features, variant_for)
from tvm_anyprec.schedules.intgemm_cpu import schedule_int_gemm_cpu  # noqa: E402
from tvm_anyprec.targets import arm, preset  # noqa: E402

_WHY = arm.missing()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"no emulated aarch64 board: {_WHY}")

# variant -> (preset it is built for, shapes (M, N, K, group_size)); the qemu CPU is the preset's
CASES = {
    "neon": ("arm-neon", [(1, 48, 128, 64), (4, 32, 256, 64)]),
    "packed": ("arm-neon", [(1, 48, 128, 64), (3, 33, 256, 64)]),      # odd N: a row pair with one row
    "sdot": ("arm-dotprod", [(1, 48, 128, 64), (3, 40, 256, 64), (4, 64, 128, 32)]),
    "smmla": ("arm-i8mm", [(1, 40, 128, 64), (3, 36, 256, 64), (4, 64, 128, 32)]),   # odd M, N % 8 != 0
}
X86 = {"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2}
SIGILL_SHAPE = (2, 16, 64, 64)
# the smmla module for the SIGILL check: cortex-a76 + i8mm, so that smmla is the only instruction
# cortex-a76 lacks (the arm-i8mm preset is a Neoverse V1, whose code may use SVE as well)
A76_I8MM = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76",
            "mattr": ["+neon", "+dotprod", "+i8mm"], "num-cores": 4}


def _bits(variant):
    return 4 if variant == "packed" else 8


def _kernel(variant, M, N, K, gs, out):
    return schedule_int_gemm_arm(make_int_gemm(M, N, K, gs, out=out), variant, preset(CASES[variant][0]),
                                 act_bits=_bits(variant))


def _name(variant, shape, out):
    return f"{variant}_{out}_" + "_".join(map(str, shape))


def _compile(funcs: dict, target):
    mod = tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()})
    return tvm.compile(mod, target=tvm.target.Target(target))


def _inputs(M, N, K, gs, bits, seed):
    rng = np.random.default_rng(seed)
    qm, G = 2 ** (bits - 1) - 1, K // gs
    xq = rng.integers(-qm, qm + 1, (M, K)).astype(np.int8)
    xq[0, :4] = [qm, -qm, qm, -qm]
    codes = rng.integers(0, 16, (N, K)).astype(np.uint8)
    codes[:2, :4] = 15                                   # extremes, both rows of the first packed pair
    codes[0, 2] = 0
    wp = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    xsum = xq.astype(np.int32).reshape(M, G, gs).sum(-1).astype(np.int32)
    xs = rng.uniform(0.01, 0.1, M).astype(np.float32)
    ws = rng.uniform(0.001, 0.02, (N, G)).astype(np.float32)
    wz = rng.uniform(0, 15, (N, G)).astype(np.float32)
    acc = np.einsum("mgk,ngk->mng", xq.astype(np.int64).reshape(M, G, gs), codes.astype(np.int64).reshape(N, G, gs))
    y = (xs[:, None, None].astype(np.float64) * ws[None].astype(np.float64)
         * (acc - wz[None].astype(np.float64) * xsum[:, None, :])).sum(-1)
    return {"xq": xq, "wp": wp, "xs": xs, "xsum": xsum, "ws": ws, "wz": wz, "acc": acc, "y": y}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """preset -> (host module (assembly), exported .so path): every variant/shape/output of CASES in one
    library per preset; plus the two small modules of the SIGILL test."""
    d = tmp_path_factory.mktemp("arm_kernels")
    per = {}
    for variant, (pre, shapes) in CASES.items():
        for shape in shapes:
            for out in ("acc", "float"):
                per.setdefault(pre, {})[_name(variant, shape, out)] = _kernel(variant, *shape, out)
    M, N, K, gs = SIGILL_SHAPE
    per["sigill-sdot"] = {"k": _kernel("sdot", M, N, K, gs, "acc")}
    per["sigill-smmla"] = {"k": schedule_int_gemm_arm(make_int_gemm(M, N, K, gs, out="acc"), "smmla", A76_I8MM)}
    targets = {p: preset(p)["target"] for p in ("arm-neon", "arm-dotprod", "arm-i8mm")}
    targets.update({"sigill-sdot": preset("arm-dotprod")["target"], "sigill-smmla": A76_I8MM})
    out = {}
    for pre, funcs in per.items():
        lib = _compile(funcs, targets[pre])
        path = d / f"{pre}.so"
        lib.export_library(str(path), fcompile=arm.cross_compiler())
        out[pre] = (lib, path)
    return out


@pytest.fixture(scope="module")
def x86_float():
    """The x86 build of every float kernel shape (generic CPU schedule), run on this machine."""
    shapes = sorted({s for _, ss in CASES.values() for s in ss})
    lib = _compile({"x86_" + "_".join(map(str, s)): schedule_int_gemm_cpu(make_int_gemm(*s, out="float"))
                    for s in shapes}, X86)
    return lambda s: lib["x86_" + "_".join(map(str, s))]


@pytest.fixture(scope="module")
def remote(builds):
    """preset -> (qemu RPC session on the preset's CPU model, the loaded library): one session per CPU."""
    cache, sessions = {}, []

    def get(pre):
        if pre not in cache:
            r = arm.qemu_session(preset(pre)["qemu_cpu"])
            sessions.append(r)
            path = builds[pre][1]
            r.upload(str(path))
            cache[pre] = (r, r.load_module(path.name))
        return cache[pre]

    yield get
    cache.clear()
    sessions.clear()


@pytest.mark.parametrize("variant", list(CASES))
def test_variant_matches_numpy_and_x86(variant, remote, x86_float):
    pre, shapes = CASES[variant]
    r, lib = remote(pre)
    dev = r.cpu()
    for i, shape in enumerate(shapes):
        M, N, K, gs = shape
        d = _inputs(*shape, _bits(variant), seed=i + 17 * len(variant))
        t = {k: tvm.runtime.tensor(np.ascontiguousarray(v), dev) for k, v in d.items() if k not in ("acc", "y")}
        acc = tvm.runtime.tensor(np.full((M, N, K // gs), -1, np.int32), dev)
        lib[_name(variant, shape, "acc")](t["xq"], t["wp"], acc)
        np.testing.assert_array_equal(acc.numpy().astype(np.int64), d["acc"], err_msg=f"{variant} {shape} ACC")
        y = tvm.runtime.tensor(np.full((M, N), np.nan, np.float32), dev)
        lib[_name(variant, shape, "float")](t["xq"], t["xs"], t["xsum"], t["wp"], t["ws"], t["wz"], y)
        y = y.numpy()
        tol = 1e-5 * np.abs(d["y"]).max()
        np.testing.assert_allclose(y, d["y"], rtol=1e-5, atol=tol, err_msg=f"{variant} {shape} Y vs numpy")
        yx = tvm.runtime.empty((M, N), "float32", tvm.cpu())
        loc = {k: tvm.runtime.tensor(np.ascontiguousarray(d[k]), tvm.cpu())
               for k in ("xq", "xs", "xsum", "wp", "ws", "wz")}
        x86_float(shape)(loc["xq"], loc["xs"], loc["xsum"], loc["wp"], loc["ws"], loc["wz"], yx)
        np.testing.assert_allclose(y, yx.numpy(), rtol=1e-5, atol=tol, err_msg=f"{variant} {shape} Y vs x86")


def _mnemonics(asm: str) -> set:
    return {ln.split()[0] for ln in asm.splitlines() if ln.startswith("\t") and not ln.strip().startswith(".")}


def test_assembly_has_the_instructions(builds):
    ops = {pre: _mnemonics(builds[pre][0].mod.inspect_source("s")) for pre in ("arm-neon", "arm-dotprod", "arm-i8mm")}
    assert "sdot" in ops["arm-dotprod"] and "smmla" not in ops["arm-dotprod"]
    assert "smmla" in ops["arm-i8mm"]
    assert not {"sdot", "smmla"} & ops["arm-neon"]                       # neon + packed
    assert {"smlal", "smlal2"} <= ops["arm-neon"]                        # the generic schedule on NEON
    assert "sadalp" in ops["arm-neon"] or "saddlp" in ops["arm-neon"]    # packed: p widened pairwise
    neon_only = _mnemonics(_compile({"p": _kernel("packed", 2, 16, 64, 64, "acc")}, preset("arm-neon")["target"])
                           .mod.inspect_source("s"))
    assert "mul" in neon_only and "smlal" not in neon_only               # one 16-bit mul per two rows


_SCRIPT = """
import sys
import numpy as np
import tvm
M, N, K, G = {M}, {N}, {K}, {G}
f = tvm.runtime.load_module(sys.argv[1])["k"]
xq = ((np.arange(M * K) * 37) % 255 - 127).astype(np.int8).reshape(M, K)
wp = ((np.arange(N * K // 2) * 73) % 256).astype(np.uint8).reshape(N, K // 2)
acc = tvm.runtime.tensor(np.zeros((M, N, G), np.int32))
f(tvm.runtime.tensor(xq), tvm.runtime.tensor(wp), acc)
print("checksum", int((acc.numpy().astype(np.int64) * np.arange(M * N * G).reshape(M, N, G)).sum()))
"""


def _checksum():
    M, N, K, gs = SIGILL_SHAPE
    xq = ((np.arange(M * K) * 37) % 255 - 127).astype(np.int8).reshape(M, K)
    wp = ((np.arange(N * K // 2) * 73) % 256).astype(np.uint8).reshape(N, K // 2)
    codes = np.stack([wp & 15, wp >> 4], -1).reshape(N, K).astype(np.int64)
    acc = np.einsum("mgk,ngk->mng", xq.astype(np.int64).reshape(M, -1, gs), codes.reshape(N, -1, gs))
    return int((acc * np.arange(acc.size).reshape(acc.shape)).sum())


def test_illegal_instruction_without_the_feature(builds, tmp_path):
    """The aarch64 runtime (python under qemu) loads the module and calls the kernel: sdot dies with SIGILL on
    cortex-a72 (no dotprod) and runs on cortex-a76; smmla dies on cortex-a76 (no i8mm) and runs on max."""
    M, N, K, gs = SIGILL_SHAPE
    script = _SCRIPT.format(M=M, N=N, K=K, G=K // gs)
    py = str(arm.arm_root() / "sysroot" / "usr" / "bin" / arm.PY)
    runs = [("sigill-sdot", "cortex-a72", False), ("sigill-sdot", "cortex-a76", True),
            ("sigill-smmla", "cortex-a76", False), ("sigill-smmla", "max", True)]

    def run(case):
        pre, cpu, _ok = case
        cmd = arm.qemu_command([py, "-c", script, str(builds[pre][1])], cpu)
        # no core file from the killed emulator (qemu-user dumps one into the cwd when the limit allows)
        return subprocess.run(["sh", "-c", 'ulimit -c 0; exec "$@"', "sh", *cmd], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)

    with ThreadPoolExecutor(2) as ex:
        results = list(ex.map(run, runs))
    want = f"checksum {_checksum()}"
    for (pre, cpu, ok), p in zip(runs, results):
        what = f"{pre} on {cpu}: rc={p.returncode} stdout={p.stdout[-300:]!r} stderr={p.stderr[-500:]!r}"
        if ok:
            assert p.returncode == 0 and want in p.stdout, what
        else:
            assert p.returncode == -signal.SIGILL or "Illegal instruction" in p.stderr, what
            assert want not in p.stdout, what


def test_variant_choice_and_guards():
    feats = {p: preset(p)["features"] for p in ("arm-neon", "arm-dotprod", "arm-i8mm")}
    assert [variant_for(feats[p], 1, 8) for p in feats] == ["neon", "sdot", "sdot"]
    assert [variant_for(feats[p], 4, 4) for p in feats] == ["neon", "sdot", "smmla"]
    assert target_features(preset("arm-i8mm")["target"]) == ["neon", "dotprod", "i8mm"]   # from mcpu via LLVM
    assert target_features({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}) == ["neon"]
    f = make_int_gemm(2, 16, 64, 64, out="acc")
    # refused before LLVM sees it (building sdot/smmla for a CPU without the feature aborts the process)
    with pytest.raises(ArmVariantError, match=r"\+dotprod"):
        schedule_int_gemm_arm(f, "sdot", preset("arm-neon"))
    with pytest.raises(ArmVariantError, match=r"\+i8mm"):
        schedule_int_gemm_arm(f, "smmla", preset("arm-dotprod")["target"])
    with pytest.raises(ArmVariantError, match="pass the target"):
        schedule_int_gemm_arm(f, "sdot")
    with pytest.raises(ArmVariantError, match="unknown"):
        check_variant("sve", preset("arm-i8mm"))
    # packed: 4-bit activations only
    with pytest.raises(ValueError, match="4-bit activations"):
        make_int_gemm_arm(2, 16, 64, 64, "acc", "packed", act_bits=8)
    with pytest.raises(ArmVariantError, match="4-bit activations"):
        schedule_int_gemm_arm(f, "packed", preset("arm-neon"), act_bits=8)
    assert unsupported("sdot", 96, 48) and unsupported("smmla", 64, 32) is None


def test_schedule_kernels_picks_the_variant(tmp_path):
    from tvm_anyprec.passes.act_quant import int_gemm_act_bits
    from tvm_anyprec.schedules.rules import schedule_kernels

    mods = {bits: _graph(tmp_path, bits)[0] for bits in (8, 4)}

    def how(bits, tp, variant=None):
        _, h = schedule_kernels(_copy(mods[bits]), tp and preset(tp), variant)
        return sorted({v for k, v in h.items() if k.startswith("int_gemm_w4")})

    assert int_gemm_act_bits(mods[4]) and all(v == {4} for v in int_gemm_act_bits(mods[4]).values())
    assert how(8, None) == ["default"] and how(8, "x86") == ["default"]
    assert how(8, "arm-neon") == ["default:neon"]
    assert how(8, "arm-dotprod") == ["default:sdot"]
    assert how(8, "arm-i8mm") == ["default:smmla"]                       # M = 6
    assert how(4, "arm-dotprod", "packed") == ["default:packed"]
    assert how(8, "arm-dotprod", "packed") == ["default:sdot"]           # A8 layers: not packed
    assert how(8, "arm-i8mm", "sdot") == ["default:sdot"]
    with pytest.raises(ArmVariantError, match=r"\+dotprod"):
        how(8, "arm-neon", "sdot")
    with pytest.raises(ValueError, match="aarch64"):
        how(8, "x86", "neon")


def test_w4a4_graph_with_packed_kernel_runs(tmp_path, remote):
    """The compile path for W4A4 layers on arm-neon with the packed kernel: rewrite, schedule_kernels(...,
    variant="packed"), the CPU Relax pipeline, cross-compiled, run by the Relax VM in the cortex-a72 session."""
    from tvm import relax

    from tvm_anyprec.compiler import relax_pipeline
    from tvm_anyprec.schedules.rules import schedule_kernels
    from tvm_anyprec.schemes.lowbit_act import layer_tensors
    from tvm_anyprec.quant import activations as A

    mod, rw, cfg, (W1, W2t), x = _graph(tmp_path, 4)
    tp = preset("arm-neon")
    mod, how = schedule_kernels(mod, tp, "packed")
    assert sorted(v for k, v in how.items() if k.startswith("int_gemm")) == ["default:packed"] * 2
    target = tvm.target.Target(tp["target"])
    ex = tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target))
    ex.export_library(str(tmp_path / "mlp.so"), fcompile=arm.cross_compiler())
    r, _ = remote("arm-neon")
    r.upload(str(tmp_path / "mlp.so"))
    dev = r.cpu()
    vm = relax.VirtualMachine(r.load_module("mlp.so"), dev)
    tensors = {}
    for site in rw.report.rewritten.values():
        w = {"W1": W1, "W2t": W2t}[site.name]
        tensors.update(layer_tensors(site, w if site.layout == "nk" else w.T, cfg))
    (fname, names), = rw.report.functions.items()
    args = [tvm.runtime.tensor(x, dev), tvm.runtime.tensor(np.array([4], np.int32), dev)] + \
        [tvm.runtime.tensor(tensors[n], dev) for n in names]
    vm.set_input(fname, *args)
    vm.invoke_stateful(fname)
    y = vm.get_outputs(fname).numpy()
    l1 = A.prepare_layer("W1", W1.T, cfg, None)
    l2 = A.prepare_layer("W2t", W2t, cfg, None)
    ref = A.reference_linear(np.maximum(A.reference_linear(x, l1), 0).astype(np.float32), l2)
    np.testing.assert_allclose(y, ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())


def _copy(mod):
    return tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)


def _graph(tmp_path, bits):
    """The two-layer ONNX graph of test_act_compile (M=6, K=128, H=192, N=64) rewritten with `bits`-bit
    activations (no outlier handling) -> (mod, rewriter, cfg, weights, x)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tvm_anyprec.testing import TWO_LAYER_DIMS, two_layer_onnx as _two_layer_onnx

    M, K = TWO_LAYER_DIMS[:2]

    from tvm_anyprec.frontend.onnx_import import import_onnx
    from tvm_anyprec.passes.act_quant import ActQuantRewrite
    from tvm_anyprec.quant import activations as A

    path = tmp_path / f"mlp{bits}.onnx"
    weights = _two_layer_onnx(path)
    cfg = A.ActQuantConfig(bits, outlier="none", group_size=64)
    rw = ActQuantRewrite(cfg)
    mod = rw(import_onnx(path).mod)
    x = np.random.default_rng(1).standard_normal((M, K)).astype(np.float32)
    return mod, rw, cfg, weights, x
