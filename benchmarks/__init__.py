"""Benchmarks of tvm-anyprec against its peers and against this machine's memory bandwidth.

Entry point: ``python -m benchmarks`` (``--quick`` for the < 60 s headline run); see ``benchmarks/run.py``.
Nothing here imports numpy/TVM at package import time: ``__main__`` pins the thread counts (environment
variables read by OpenBLAS, OpenMP and TVM's thread pool) before those libraries load.
"""
