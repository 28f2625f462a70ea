"""STREAM-like read bandwidth of this machine, with the same thread count as the kernels.

The probe is a TVM-compiled parallel sum (``stream_read``): the buffer [P, J, LANES] float32 is split in P
chunks run in parallel by TVM's thread pool (TVM_NUM_THREADS threads, like the kernels), each chunk summed
into LANES independent vector accumulators (enough to hide the add latency), so the loop is limited by how
fast memory delivers bytes. Bandwidth = bytes read / minimum time over the repeats (STREAM's convention,
"best rate"; the median is kept too). A buffer 8x the last-level cache measures DRAM; a small one read
repeatedly measures the cache.

Between timed kernel calls the caches are flushed by ``Flusher``: ``threads`` Python threads each sum
their share of a buffer 4x the L3 with numpy (the GIL is released in the reduction). Plain threads block
when idle; a TVM or OpenBLAS pool would keep spinning after the flush and steal a core from the runtime
being timed next (measured here: it halves a 2-thread read). The flusher's own read rate is reported too.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .common import build_primfunc, l3_bytes, measure, stats

LANES = 64          # 8 AVX2 / 4 AVX-512 vector accumulators per chunk
CHUNKS = 256        # parallel work items (TVM splits them statically over its threads)


def make_stream_read(n_floats: int, chunks: int = CHUNKS, lanes: int = LANES):
    from tvm.script import tirx as T

    J = n_floats // (chunks * lanes)
    if J < 1:
        raise ValueError(f"buffer of {n_floats} floats is too small for {chunks} x {lanes}")

    @T.prim_func
    def stream_read(A: T.Buffer((chunks, J, lanes), "float32"), S: T.Buffer((chunks, lanes), "float32")):
        T.func_attr({"tirx.noalias": True})
        for p in T.parallel(chunks):
            acc = T.alloc_buffer((lanes,), "float32", scope="local")
            for l in T.vectorized(lanes):
                acc[l] = T.float32(0)
            for j in range(J):
                for l in T.vectorized(lanes):
                    acc[l] = acc[l] + A[p, j, l]
            for l in T.vectorized(lanes):
                S[p, l] = acc[l]

    return stream_read.without_attr("global_symbol"), (chunks, J, lanes)


class StreamRead:
    """A compiled parallel read over a float32 buffer of about ``nbytes`` bytes."""

    def __init__(self, nbytes: int, target: dict, seed: int = 0):
        import tvm

        func, shape = make_stream_read(nbytes // 4)
        self.fn = build_primfunc(func, target, f"stream_read_{shape[0]}x{shape[1]}x{shape[2]}")
        dev = tvm.cpu()
        host = np.random.default_rng(seed).random(shape, dtype=np.float32)
        self.host_sum = float(host.sum(dtype=np.float64))
        self.a = tvm.runtime.tensor(host, dev)
        self.s = tvm.runtime.empty((shape[0], shape[2]), "float32", dev)
        self.nbytes = int(np.prod(shape)) * 4
        del host

    def __call__(self):
        self.fn(self.a, self.s)

    def check(self) -> float:
        """Relative error of the kernel's sum vs numpy (the probe must really read every element)."""
        self()
        got = float(self.s.numpy().sum(dtype=np.float64))
        return abs(got - self.host_sum) / abs(self.host_sum)


class Flusher:
    """Evicts the caches: ``threads`` plain Python threads sum their share of a buffer 4x the L3 (numpy)."""

    def __init__(self, threads: int, nbytes: int | None = None):
        n = (nbytes or 4 * (l3_bytes() or (32 << 20))) // 4
        self.parts = np.array_split(np.random.default_rng(1).random(n, dtype=np.float32), threads)
        self.nbytes = n * 4
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="flush")

    def __call__(self):
        list(self.pool.map(np.sum, self.parts))

    def close(self):
        self.pool.shutdown()


def measure_bandwidth(target: dict, threads: int, reps: int = 10, dram_bytes: int | None = None) -> dict:
    """-> {"dram": {...}, "cache": {...}, "numpy_threads": {...}}; GB/s = 1e9 bytes/s (cache and numpy: from
    the median time).
    "dram" (the TVM probe over 8x the L3) is the machine's memory bandwidth used for the fractions."""
    l3 = l3_bytes() or (32 << 20)
    dram_bytes = dram_bytes or max(256 << 20, 8 * l3)
    out = {"method": (f"TVM-compiled parallel sum over float32 ({CHUNKS} chunks x {LANES} vector lanes, "
                      f"{threads} threads via TVM_NUM_THREADS), buffer {dram_bytes >> 20} MiB = "
                      f"{dram_bytes / l3:.0f}x L3; bandwidth = bytes / minimum time (STREAM's best rate), "
                      f"median alongside; 1 GB = 1e9 B"),
           "threads": threads}
    big = StreamRead(dram_bytes, target)
    err = big.check()
    if err > 1e-3:
        raise RuntimeError(f"stream_read sums wrong (relative error {err:.2e}): the probe is broken")
    st = measure(big, reps, warmup=2)
    out["dram"] = {"bytes": big.nbytes, **st, "GBps": big.nbytes / st["min_s"] / 1e9,
                   "GBps_median": big.nbytes / st["median_s"] / 1e9}
    del big
    fl = Flusher(threads, dram_bytes)
    st = measure(fl, reps, warmup=1)
    fl.close()
    out["numpy_threads"] = {"bytes": fl.nbytes, **st, "GBps": fl.nbytes / st["median_s"] / 1e9,
                            "note": f"numpy sum in {threads} Python threads (the cache flusher)"}
    del fl
    small = StreamRead(max(1 << 20, l3 // 4), target)   # fits the L3 (and partly L2): hot-cache read
    st = measure(small, reps * 10, warmup=5)
    out["cache"] = {"bytes": small.nbytes, **st, "GBps": small.nbytes / st["median_s"] / 1e9,
                    "note": "TVM probe over a buffer of L3/4, read repeatedly (hot caches)"}
    return out


def combine_dram(samples: list[dict]) -> dict:
    """Several DRAM probes of one run (e.g. before and after the kernels) -> one figure from all their
    repeats. Like STREAM, the bandwidth is the best rate (bytes / minimum time): the physical limit the
    kernels are compared with; the median and worst rates are kept alongside."""
    times = [t for s in samples for t in s["dram"]["times_s"]]
    nbytes = samples[0]["dram"]["bytes"]
    st = stats(times)
    st.pop("times_s")
    return {"bytes": nbytes, **st, "GBps": nbytes / st["min_s"] / 1e9, "GBps_median": nbytes / st["median_s"] / 1e9,
            "GBps_worst": nbytes / st["max_s"] / 1e9, "probes": len(samples),
            "convention": "GBps = bytes / minimum time over all probe repeats (STREAM's 'best rate'); the "
                          "machine is a shared VM whose read rate varies between repeats (see GBps_median)"}
