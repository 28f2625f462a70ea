"""Kernel-level rows: GEMV (M=1) and GEMM (M=prefill chunk) latency at one shape, every implementation side
by side on the same inputs, each checked against numpy before it is timed.

Implementations (``family``):
  bitplane    tvm-anyprec's TIR kernel (hand schedule), one compiled function, the bit-width a run-time tensor
  tvm-dense   TVM fp32 dense with W [N, K] (the pipeline's dense_nt kernel, same hand schedule)
  numpy       numpy fp32 ``x @ W.T`` (OpenBLAS sgemv/sgemm)
  ort-fp32    onnxruntime, a one-node MatMul graph with the fp32 weight [K, N] as initializer
  ort-nbits   onnxruntime com.microsoft MatMulNBits made by onnxruntime's own MatMulNBitsQuantizer
              (asymmetric, bits 4/8, block 32/128, accuracy_level 0 = fp32 compute, 4 = int8 activations)
  integer     tvm-anyprec W4A8 / W4A4 kernels: NOT IMPLEMENTED YET (see ``integer_cases``; no rows)

Bytes each kernel must read (the physical floor for a memory-bound GEMV) are the ``*_bytes`` functions; they
count the weights in the kernel's own format plus the activations read and the outputs written.
The weights are random (bitplanes: random words and fp16 LUTs; fp32: N(0, 0.02)): latency does not depend on
the values, and every row's output is compared with numpy on a sample of output columns.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from tvm_anyprec.quant.bitplanes import num_words, unpack_bitplanes

MIN_BITS, MAX_BITS = 3, 8
NBITS_CONFIGS = [(b, blk, acc) for b in (4, 8) for blk in (32, 128) for acc in (0, 4)]
CHECK_COLUMNS = 64   # output columns (rows of W) compared with numpy per case


# ----------------------------------------------------------------------------- bytes each kernel must read
def io_bytes(M: int, N: int, K: int) -> int:
    """fp32 activations read + fp32 outputs written."""
    return 4 * M * K + 4 * M * N


def bitplane_bytes(M: int, N: int, K: int, bits: int, lut_bytes: int = 2) -> int:
    """A b-bit call: the top b planes (b x N x ceil(K/32) uint32 words) + that bit-width's LUT (N x 2^b fp16)."""
    return bits * N * num_words(K) * 4 + N * (1 << bits) * lut_bytes + io_bytes(M, N, K)


def lut_cpu_bytes(M: int, N: int, K: int, bits: int, mode: str) -> int:
    """What a b-bit call of the CPU kernel reads: b byte-sliced plane rows (8 bytes per 64 weights), the b-bit
    table (fp16 exact / int16, plus the row's fp32 scale in int8 mode), the activations and the outputs."""
    from tvm_anyprec.quant.byteslice import row_bytes

    table = N * (1 << bits) * 2 + (0 if mode == "exact" else N * 4)   # fp16 LUT or int16 table (+ row scale)
    return bits * N * row_bytes(K) + table + io_bytes(M, N, K)


def dense_bytes(M: int, N: int, K: int) -> int:
    return 4 * N * K + io_bytes(M, N, K)


def nbits_bytes(M: int, N: int, K: int, bits: int, block: int, symmetric: bool = False) -> int:
    """MatMulNBits: packed codes [N, ceil(K/block), block*bits/8] uint8 + fp32 scales [N, blocks]
    + packed zero points [N, ceil(blocks*bits/8)] uint8 (asymmetric only)."""
    blocks = -(-K // block)
    packed = N * blocks * -(-block * bits // 8)
    scales = N * blocks * 4
    zps = 0 if symmetric else N * -(-blocks * bits // 8)
    return packed + scales + zps + io_bytes(M, N, K)


# ----------------------------------------------------------------------------- workload and cases
@dataclass
class Workload:
    """Inputs shared by every implementation at one (M, N, K)."""
    M: int
    N: int
    K: int
    name: str = ""
    seed: int = 0
    x: np.ndarray = field(init=False, repr=False)
    w: np.ndarray = field(init=False, repr=False)         # fp32 [N, K]
    planes: np.ndarray = field(init=False, repr=False)    # uint32 [8, N, KW]
    luts: np.ndarray = field(init=False, repr=False)      # float16 [N, lut_width(8, 3)]
    check_rows: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        from tvm_anyprec.kernels.anyprec import lut_width

        rng = np.random.default_rng(self.seed + 7919 * self.N + 104729 * self.K + self.M)
        self.x = rng.standard_normal((self.M, self.K), dtype=np.float32)
        self.w = rng.standard_normal((self.N, self.K), dtype=np.float32) * np.float32(0.02)
        self.planes = rng.integers(0, 1 << 32, (MAX_BITS, self.N, num_words(self.K)), dtype=np.uint32)
        self.luts = (rng.standard_normal((self.N, lut_width(MAX_BITS, MIN_BITS))) * 0.02).astype(np.float16)
        n_check = min(CHECK_COLUMNS, self.N)
        self.check_rows = np.unique(np.concatenate([[0, self.N - 1], rng.choice(self.N, n_check, replace=False)]))
        if not self.name:
            self.name = f"{self.N}x{self.K}"

    def dequantized_rows(self, bits: int, rows: np.ndarray) -> np.ndarray:
        """The b-bit weights W[rows, :] as the kernel must see them (fp32), from planes + LUT in numpy."""
        from tvm_anyprec.kernels.anyprec import lut_offset

        codes = unpack_bitplanes(np.ascontiguousarray(self.planes[:, rows]), self.K, bits).astype(np.int64)
        off = lut_offset(bits, MIN_BITS)
        lut = self.luts[rows, off:off + (1 << bits)].astype(np.float32)
        return np.take_along_axis(lut, codes, axis=1)

    def reference(self, bits: int | None) -> np.ndarray:
        """float64 reference outputs [M, len(check_rows)] (bits=None: the fp32 weights)."""
        wr = self.w[self.check_rows] if bits is None else self.dequantized_rows(bits, self.check_rows)
        return self.x.astype(np.float64) @ wr.astype(np.float64).T


@dataclass
class Case:
    """One implementation at one workload: ``run()`` does one call into preallocated outputs."""
    family: str
    label: str
    bytes_read: int
    run: Callable[[], None]
    output: Callable[[], np.ndarray]      # [M, N] fp32 of the last run
    ref_bits: int | None                  # reference: the b-bit dequantized weights, or None = fp32 weights
    rtol: float                           # allowed max |out - ref| / max |ref| on the checked columns
    bits: int | None = None
    info: dict = field(default_factory=dict)
    close: Callable[[], None] = lambda: None

    def check(self, wl: Workload) -> float:
        """Run once and return the max error on the checked columns relative to max |ref|."""
        self.run()
        got = self.output()[:, wl.check_rows].astype(np.float64)
        ref = wl.reference(self.ref_bits)
        return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


def bitplane_cases(wl: Workload, target: dict, bits=range(MIN_BITS, MAX_BITS + 1),
                   modes=("int8", "exact")) -> list[Case]:
    """The CPU bitplane kernel (kernels/lut_cpu.py) per accuracy mode and bit-width, on the byte-sliced planes
    of the workload's parent (the instruction set is the target's: AVX2 bodies where it has them)."""
    import tvm

    from tvm_anyprec.kernels.lut_cpu import LUT_PAD, cpu_isa, kernel_name, make_anyprec_cpu
    from tvm_anyprec.quant.byteslice import int_tables, to_byte_sliced

    from .common import build_primfunc

    M, N, K = wl.M, wl.N, wl.K
    isa = cpu_isa(target)
    dev = tvm.cpu()
    x = tvm.runtime.tensor(wl.x, dev)
    planes = tvm.runtime.tensor(to_byte_sliced(wl.planes, K), dev)
    y = tvm.runtime.empty((M, N), "float32", dev)
    cases = []
    for mode in modes:
        fn = build_primfunc(make_anyprec_cpu(M, N, K, MAX_BITS, MIN_BITS, mode, isa), target,
                            kernel_name(M, N, K, MAX_BITS, MIN_BITS, mode, isa))
        pad = ((0, 0), (0, LUT_PAD))
        if mode == "exact":
            tables = [tvm.runtime.tensor(np.pad(wl.luts, pad), dev)]
        else:
            tabs, scales = int_tables(wl.luts, range(MIN_BITS, MAX_BITS + 1))
            tables = [tvm.runtime.tensor(np.pad(tabs, pad), dev), tvm.runtime.tensor(scales, dev)]
        for b in bits:
            nb = tvm.runtime.tensor(np.array([b], np.int32), dev)
            cases.append(Case("bitplane", f"bitplane {b}-bit {mode}", lut_cpu_bytes(M, N, K, b, mode),
                              run=lambda nb=nb, fn=fn, tables=tables: fn(x, planes, *tables, nb, y),
                              output=y.numpy, ref_bits=b, rtol=1e-4 if mode == "exact" else 5e-2, bits=b,
                              info={"kernel": "kernels/lut_cpu.py", "mode": mode, "isa": isa,
                                    "layout": "byte_sliced64"}))
    return cases


def tvm_dense_case(wl: Workload, target: dict) -> Case:
    import tvm

    from tvm_anyprec.kernels.dense import kernel_name, make_dense_nt
    from tvm_anyprec.schedules.cpu import schedule_linear_cpu

    from .common import build_primfunc

    M, N, K = wl.M, wl.N, wl.K
    fn = build_primfunc(schedule_linear_cpu(make_dense_nt(M, N, K)), target, kernel_name(M, N, K))
    dev = tvm.cpu()
    x, w = tvm.runtime.tensor(wl.x, dev), tvm.runtime.tensor(wl.w, dev)
    y = tvm.runtime.empty((M, N), "float32", dev)
    return Case("tvm-dense", "TVM fp32 dense", dense_bytes(M, N, K), run=lambda: fn(x, w, y), output=y.numpy,
                ref_bits=None, rtol=1e-4, info={"schedule": "hand (schedules/cpu.py)"})


def numpy_case(wl: Workload) -> Case:
    y = np.empty((wl.M, wl.N), np.float32)
    wt = wl.w.T
    return Case("numpy", "numpy fp32", dense_bytes(wl.M, wl.N, wl.K), run=lambda: np.matmul(wl.x, wt, out=y),
                output=lambda: y, ref_bits=None, rtol=1e-4, info={"call": "np.matmul(x, W.T, out=y)"})


def _ort_session(model, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def matmul_model(wl: Workload):
    """One-node ONNX graph Y[M, N] = X[M, K] @ W^T, the weight an initializer in MatMul's [K, N] layout."""
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"], name="linear")], "linear",
                          [helper.make_tensor_value_info("X", TensorProto.FLOAT, [wl.M, wl.K])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [wl.M, wl.N])],
                          [numpy_helper.from_array(np.ascontiguousarray(wl.w.T), "W")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def nbits_model(wl: Workload, bits: int, block: int, accuracy_level: int):
    """The one-node graph quantized by onnxruntime's MatMulNBitsQuantizer (asymmetric RTN per block)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    q = MatMulNBitsQuantizer(matmul_model(wl), bits=bits, block_size=block, is_symmetric=False,
                             accuracy_level=accuracy_level or None)
    q.process()
    model = q.model.model
    ops = [n.op_type for n in model.graph.node]
    if ops != ["MatMulNBits"]:
        raise RuntimeError(f"MatMulNBitsQuantizer({bits}-bit, block {block}) produced {ops}, not one MatMulNBits")
    return model


def initializer_bytes(model) -> int:
    from onnx import numpy_helper

    return sum(numpy_helper.to_array(i).nbytes for i in model.graph.initializer)


def _ort_case(wl, model, threads, family, label, bytes_read, rtol, info) -> Case:
    s = _ort_session(model, threads)
    feeds = {"X": wl.x}
    out = {}

    def run():
        out["y"] = s.run(None, feeds)[0]

    return Case(family, label, bytes_read, run=run, output=lambda: out["y"], ref_bits=None, rtol=rtol, info=info)


def ort_fp32_case(wl: Workload, threads: int) -> Case:
    return _ort_case(wl, matmul_model(wl), threads, "ort-fp32", "onnxruntime fp32 MatMul",
                     dense_bytes(wl.M, wl.N, wl.K), 1e-4, {"op": "MatMul"})


# quantization noise bound of an asymmetric RTN block (a check that ORT computed the product, not its accuracy)
NBITS_RTOL = {4: 0.25, 8: 0.03}


def ort_nbits_cases(wl: Workload, threads: int, configs=NBITS_CONFIGS) -> list[Case]:
    cases = []
    for bits, block, acc in configs:
        model = nbits_model(wl, bits, block, acc)
        nbytes = nbits_bytes(wl.M, wl.N, wl.K, bits, block)
        got = initializer_bytes(model) + io_bytes(wl.M, wl.N, wl.K)
        if got != nbytes:   # the accounting must describe the buffers ORT really holds
            raise RuntimeError(f"MatMulNBits bytes: formula {nbytes} != initializers+io {got}")
        cases.append(_ort_case(wl, model, threads, "ort-nbits", f"ORT MatMulNBits {bits}-bit b{block} acc{acc}",
                               nbytes, NBITS_RTOL[bits],
                               {"op": "com.microsoft.MatMulNBits", "block": block, "accuracy_level": acc,
                                "symmetric": False}))
        cases[-1].bits = bits
    return cases


def integer_cases(wl: Workload, target: dict) -> list[Case]:
    """HOOK for the integer-activation kernels (W4A8: int4 weights x int8 activations, W4A4). They do not
    exist in tvm_anyprec yet, so this returns no rows (and ``run.py`` records them as missing). When they
    land: build them like ``bitplane_cases`` (build_primfunc + a numpy reference of the quantized product),
    give each an exact ``*_bytes`` function (packed weights + scales + quantized activations + outputs) and a
    test in tests/test_bench.py, and return them here."""
    return []


INTEGER_KERNELS_STATUS = "not implemented in tvm_anyprec yet: no W4A8/W4A4 rows (hook: benchmarks.kernels.integer_cases)"


def build_cases(wl: Workload, target: dict, threads: int, families=None, bits=range(MIN_BITS, MAX_BITS + 1),
                nbits_configs=NBITS_CONFIGS):
    """Generator of the cases at ``wl``."""
    fam = set(families or ("bitplane", "tvm-dense", "numpy", "ort-fp32", "ort-nbits", "integer"))
    if "bitplane" in fam:
        yield from bitplane_cases(wl, target, bits)
    if "tvm-dense" in fam:
        yield tvm_dense_case(wl, target)
    if "numpy" in fam:
        yield numpy_case(wl)
    if "ort-fp32" in fam:
        yield ort_fp32_case(wl, threads)
    if "ort-nbits" in fam:
        for cfg in nbits_configs:
            yield from ort_nbits_cases(wl, threads, [cfg])
    if "integer" in fam:
        yield from integer_cases(wl, target)


SETTLE_S = 0.25   # pause before each case's block of calls: the previous runtime's spinning threads go idle
BLOCK = 3         # timed calls per case and round (after one untimed call: the case's thread pool wakes up)


def bench_workload(wl: Workload, target: dict, threads: int, reps: int, flush, dram_GBps: float | None = None,
                   families=None, bits=range(MIN_BITS, MAX_BITS + 1), nbits_configs=NBITS_CONFIGS,
                   log=print) -> list[dict]:
    """Check then time every case at ``wl``, rounds interleaved (each round times every case BLOCK times,
    caches flushed before each call; about ``reps`` calls per case in all), so a noisy neighbour or a frequency
    change hits every row alike. Calling each runtime in turn call by call would measure their thread pools
    spinning against each other (numpy, onnxruntime and TVM each keep one). -> JSON rows (``bw_fraction``
    against ``dram_GBps`` if given)."""
    import time

    from .common import stats

    cases = list(build_cases(wl, target, threads, families, bits, nbits_configs))   # all alive: interleaved
    errs = []
    for case in cases:
        err = case.check(wl)
        if err > case.rtol and case.family in ("bitplane", "tvm-dense"):
            raise RuntimeError(f"{case.label} at {wl.name} M={wl.M}: output differs from numpy (rel err {err:.2e})")
        errs.append(err)
        for _ in range(3):   # warm-up
            case.run()
    times = [[] for _ in cases]
    for _ in range(-(-reps // BLOCK)):
        for i, case in enumerate(cases):
            time.sleep(SETTLE_S)
            case.run()
            for _ in range(BLOCK):
                if flush is not None:
                    flush()
                t0 = time.perf_counter()
                case.run()
                times[i].append(time.perf_counter() - t0)
    rows = []
    for case, err, ts in zip(cases, errs, times):
        st, ok = stats(ts), err <= case.rtol
        gbps = case.bytes_read / st["median_s"] / 1e9
        rows.append({"shape": wl.name, "M": wl.M, "N": wl.N, "K": wl.K, "family": case.family, "label": case.label,
                     "bits": case.bits, **case.info, "bytes_read": case.bytes_read, **st,
                     "GBps": gbps, "bw_fraction": gbps / dram_GBps if dram_GBps else None,
                     "check_rel_err": err, "check_ok": ok})
        frac = f" ({gbps / dram_GBps:.0%})" if dram_GBps else ""
        log(f"  {wl.name:>11} M={wl.M:<3} {case.label:<36} {st['median_s'] * 1e3:9.3f} ms "
            f"[{st['min_s'] * 1e3:.3f}..{st['max_s'] * 1e3:.3f}]  {gbps:6.1f} GB/s{frac}"
            + ("" if ok else f"  CHECK FAILED (err {err:.2e})"))
    for case in cases:
        case.close()
    return rows


# ----------------------------------------------------------------------------- the real model's shapes
GGUF_TO_HF = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
              "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}


def model_layer_shapes(model=None) -> list[dict]:
    """Distinct (N, K) of the model's linear layers, read from the GGUF header (no weights loaded):
    [{"name": "576x576", "N", "K", "layers": ["o_proj", "q_proj"], "count": 60}, ...]."""
    import gguf

    from tvm_anyprec import data

    path = data.resolve_model(model)
    if path.suffix != ".gguf":
        raise ValueError(f"layer shapes are read from a GGUF file; got {path}")
    shapes: dict = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        parts = t.name.split(".")
        if parts[0] != "blk" or len(t.shape) != 2 or parts[2] not in GGUF_TO_HF:
            continue
        K, N = (int(d) for d in t.shape)    # GGUF lists dims fastest first: [in_features, out_features]
        s = shapes.setdefault((N, K), {"name": f"{N}x{K}", "N": N, "K": K, "layers": set(), "count": 0})
        s["layers"].add(GGUF_TO_HF[parts[2]])
        s["count"] += 1
    out = sorted(shapes.values(), key=lambda s: (s["N"] * s["K"], s["N"]))
    for s in out:
        s["layers"] = sorted(s["layers"])
    return out


def reference_shapes() -> list[dict]:
    """LLaMA-7B-sized shapes (N x K): attention projections, and down_proj (K = 11008)."""
    return [{"name": "4096x4096", "N": 4096, "K": 4096, "layers": ["llama-7b q/k/v/o_proj"], "count": None},
            {"name": "4096x11008", "N": 4096, "K": 11008, "layers": ["llama-7b down_proj"], "count": None}]


def nbits_available() -> dict:
    """Which MatMulNBits bit-widths the installed onnxruntime quantizer and CPU kernel accept (probed on a
    tiny graph): {4: True/"error", 8: ...}."""
    wl = Workload(1, 8, 64)
    out = {}
    for bits in (4, 8):
        try:
            c = ort_nbits_cases(wl, 1, [(bits, 32, 0)])[0]
            out[bits] = c.check(wl) <= c.rtol or "wrong result"
        except Exception as e:  # report what the installed version does, do not fake it
            out[bits] = f"{type(e).__name__}: {e}"
    return out
