"""The benchmark measures what it says: its bytes-to-read accounting equals the nbytes of the buffers the
kernels really get, every implementation it times computes the right product, the bandwidth probe really
reads its buffer, and the headline/goal logic reads the right rows. No timing assertions."""
import sys
from pathlib import Path

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
pytest.importorskip("onnxruntime")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the benchmarks/ package lives at the repo root

from benchmarks import kernels as K  # noqa: E402
from benchmarks.common import host_target  # noqa: E402

from tvm_anyprec.kernels.anyprec import lut_offset  # noqa: E402


@pytest.fixture(autouse=True)
def _private_kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TVM_ANYPREC_CACHE", str(tmp_path / "cache"))   # compile fresh, leave no files behind


def _codes_by_hand(planes, k, bits):
    """Codes of the top ``bits`` planes, bit by bit from the format's definition (plane 0 = MSB; column k is
    bit k % 32 of word k // 32), independent of quant.bitplanes."""
    cols = np.arange(k)
    words, shifts = cols // 32, (cols % 32).astype(np.uint32)
    code = np.zeros((planes.shape[1], k), np.int64)
    for p in range(bits):
        code = (code << 1) | ((planes[p][:, words] >> shifts) & 1).astype(np.int64)
    return code


@pytest.mark.parametrize("M,N,K_", [(1, 40, 70), (3, 33, 130)])
def test_bytes_accounting_matches_the_buffers(M, N, K_):
    wl = K.Workload(M, N, K_)
    io = wl.x.nbytes + np.empty((M, N), np.float32).nbytes
    assert K.io_bytes(M, N, K_) == io
    for b in range(K.MIN_BITS, K.MAX_BITS + 1):
        off = lut_offset(b, K.MIN_BITS)
        read = wl.planes[:b].nbytes + wl.luts[:, off:off + (1 << b)].nbytes   # what a b-bit call touches
        assert K.bitplane_bytes(M, N, K_, b) == read + io
    from tvm_anyprec.quant.byteslice import int_tables, to_byte_sliced

    bs = to_byte_sliced(wl.planes, K_)
    tabs, scales = int_tables(wl.luts, range(K.MIN_BITS, K.MAX_BITS + 1))
    for b in range(K.MIN_BITS, K.MAX_BITS + 1):
        off = lut_offset(b, K.MIN_BITS)
        assert K.lut_cpu_bytes(M, N, K_, b, "exact") == bs[:b].nbytes + wl.luts[:, off:off + (1 << b)].nbytes + io
        assert K.lut_cpu_bytes(M, N, K_, b, "int8") == \
            bs[:b].nbytes + tabs[:, off:off + (1 << b)].nbytes + scales[:, 0].nbytes + io
    assert K.dense_bytes(M, N, K_) == wl.w.nbytes + io
    for bits in (4, 8):
        for block in (32, 128):       # K = 70 / 130: a partial last block
            model = K.nbits_model(wl, bits, block, 0)
            assert K.nbits_bytes(M, N, K_, bits, block) == K.initializer_bytes(model) + io


def test_bench_rows_are_correct_kernels():
    """A tiny bench run: every implementation is checked against numpy before it is timed, and the bitplane
    kernel's full output matches a reference built by hand from the bit layout."""
    target = host_target(1)
    wl = K.Workload(2, 48, 100)
    rows = K.bench_workload(wl, target, 1, reps=2, flush=None, dram_GBps=10.0,
                            nbits_configs=[(4, 32, 0), (8, 128, 4)], log=lambda *_: None)
    fams = {r["family"] for r in rows}
    assert fams == {"bitplane", "tvm-dense", "numpy", "ort-fp32", "ort-nbits"}
    assert [(r["mode"], r["bits"]) for r in rows if r["family"] == "bitplane"] == \
        [(m, b) for m in ("int8", "exact") for b in range(3, 9)]
    assert all(r["check_ok"] for r in rows), [(r["label"], r["check_rel_err"]) for r in rows if not r["check_ok"]]
    for r in rows:
        assert r["median_s"] > 0 and r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["bytes_read"] > 0 and r["GBps"] == pytest.approx(r["bytes_read"] / r["median_s"] / 1e9)

    for case in K.bitplane_cases(wl, target, bits=[3, 8]):
        case.run()
        off = lut_offset(case.bits, K.MIN_BITS)
        lut = wl.luts[:, off:off + (1 << case.bits)].astype(np.float64)
        w = np.take_along_axis(lut, _codes_by_hand(wl.planes, wl.K, case.bits), 1)
        ref = wl.x.astype(np.float64) @ w.T
        tol = 1e-4 if case.info["mode"] == "exact" else 5e-2     # int8 mode: two int8 roundings
        np.testing.assert_allclose(case.output(), ref, rtol=tol, atol=tol * np.abs(ref).max())


def test_stream_probe_reads_every_element():
    from benchmarks.bandwidth import Flusher, StreamRead

    probe = StreamRead(4 << 20, host_target(1))
    assert probe.nbytes <= 4 << 20 and probe.nbytes >= (4 << 20) * 0.9
    assert probe.check() < 1e-5
    fl = Flusher(2, 1 << 20)
    fl()
    assert fl.nbytes == 1 << 20
    fl.close()


def test_headline_reads_the_right_rows():
    from benchmarks.run import headline

    def row(shape, label, fam, t, bits=None, frac=None, M=1, mode=None):
        return {"shape": shape, "M": M, "label": label, "family": fam, "median_s": t, "bits": bits,
                "bw_fraction": frac, "mode": mode}

    rows = [row("4096x4096", f"bitplane {b}-bit int8", "bitplane", 1.0 + b, b, mode="int8") for b in range(3, 9)]
    rows += [row("4096x4096", f"bitplane {b}-bit exact", "bitplane", 9.0, b, mode="exact") for b in range(3, 9)]
    rows += [row("4096x4096", "numpy fp32", "numpy", 20.0),
             row("4096x4096", "ORT MatMulNBits 4-bit b32 acc0", "ort-nbits", 6.0, 4),
             row("4096x4096", "ORT MatMulNBits 4-bit b32 acc4", "ort-nbits", 4.0, 4)]
    rows += [row("4096x11008", f"bitplane {b}-bit int8", "bitplane", 1.0, b, 0.1 * b, mode="int8")
             for b in range(3, 9)]
    rows += [row("4096x4096", "numpy fp32", "numpy", 30.0, M=32)]
    rows += [row("4096x4096", f"bitplane {b}-bit int8", "bitplane", 10.0 * b, b, M=32, mode="int8")
             for b in range(3, 9)]
    h = headline({"kernels": {"rows": rows, "bandwidth": {"dram": {"GBps": 20.0}}}})
    assert h["gemv_4096x4096_numpy_over_bitplane3"] == 5.0
    assert h["gemv_4096x4096_bitplane8_over_bitplane3"] == 2.25
    assert h["gemv_4096x4096_numpy_over_slowest_bitplane"] == round(20 / 9, 3)
    assert h["gemv_4096x4096_numpy_over_bitplane_exact"]["3"] == round(20 / 9, 3)
    assert h["gemv_4096x4096_ort_q4_best_over_bitplane4"] == 0.8
    assert h["gemv_4096x4096_ort_q4_best_config"].endswith("acc4")
    assert h["gemv_4096x11008_bitplane_bw_fraction_3to4"] == 0.3
    assert h["gemm_32x4096x4096_numpy_over_slowest_bitplane"] == round(30 / 80, 3)
    assert h["goals_met"] == {"gemv_4096x4096_numpy_over_bitplane3": True,
                              "gemv_4096x4096_bitplane8_over_bitplane3": True,
                              "gemv_4096x4096_numpy_over_slowest_bitplane": True,
                              "gemv_4096x4096_ort_q4_best_over_bitplane4": False,
                              "gemv_4096x11008_bitplane_bw_fraction_3to4": False,
                              "gemm_32x4096x4096_numpy_over_slowest_bitplane": False}


def test_model_layer_shapes_come_from_the_model():
    pytest.importorskip("gguf")
    from tvm_anyprec import data

    try:
        data.smollm2_path()
    except data.DataError as e:
        pytest.skip(str(e))
    shapes = K.model_layer_shapes()
    got = {(s["N"], s["K"]): (s["layers"], s["count"]) for s in shapes}
    assert got == {(576, 576): (["o_proj", "q_proj"], 60), (192, 576): (["k_proj", "v_proj"], 60),
                   (1536, 576): (["gate_proj", "up_proj"], 60), (576, 1536): (["down_proj"], 30)}

