"""The thread count a local Session gives TVM's pool: the physical cores (TVM alone would halve the logical CPUs
on x86, one thread on a 2-core VM without SMT), or what the user set."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tvm_anyprec.env import set_threads

POOL = ("from tvm_anyprec.env import set_threads; n = set_threads({arg}); import tvm; "
        "print(n, tvm.get_global_func('runtime.NumThreads')())")


def _pool(arg: str = "", **env) -> list[int]:
    base = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", POOL.format(arg=arg)], env={**base, **env}, capture_output=True,
                         text=True, check=True).stdout.split()
    return [int(v) for v in out]


def _lscpu_cores() -> int | None:
    """Physical cores among the CPUs this process may use, from lscpu (an independent reading of the topology)."""
    if shutil.which("lscpu") is None:
        return None
    allowed = os.sched_getaffinity(0)
    rows = [r.split(",") for r in subprocess.run(["lscpu", "-p=CPU,CORE,SOCKET"], capture_output=True, text=True,
                                                 check=True).stdout.splitlines() if r and not r.startswith("#")]
    return len({(sock, core) for cpu, core, sock in rows if int(cpu) in allowed})


def test_the_pool_gets_the_physical_cores_by_default():
    n, pool = _pool()
    assert n == pool >= 1
    expected = _lscpu_cores()
    if expected is not None:
        assert n == expected


def test_the_users_thread_count_wins():
    assert _pool(TVM_NUM_THREADS="1") == [1, 1]
    assert _pool("2") == [2, 2]
    with pytest.raises(ValueError, match="at least 1"):
        set_threads(0)
