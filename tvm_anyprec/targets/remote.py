"""Remote measurement through TVM's own RPC tracker and servers (tvm.exec.rpc_tracker / rpc_server).

``local_rpc_cluster`` starts a tracker and N servers on loopback (each a separate process, registered under
one key), waits until the tracker sees them all, and stops them afterwards: the same topology as a farm of
boards behind a tracker, on one machine. ``server_cmd`` lets a caller start each server differently (e.g.
under an emulator).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tracker_servers(host: str, port: int, key: str) -> int:
    """How many free servers the tracker at host:port has under ``key`` (0 if it does not answer)."""
    from tvm import rpc

    try:
        summary = rpc.connect_tracker(host, port).summary()
    except Exception:  # tracker not up yet
        return 0
    return int(summary.get("queue_info", {}).get(key, {}).get("free", 0))


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@contextmanager
def local_rpc_cluster(n_servers: int = 2, key: str = "anyprec-local", log_dir=None, server_cmd=None,
                      timeout_s: float = 60.0):
    """Yield (host, port, key, [server log paths]) of a tracker with ``n_servers`` servers on loopback."""
    import tempfile

    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="anyprec-rpc-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    host, port = "127.0.0.1", free_port()
    procs, logs = [], []

    def spawn(cmd, log):
        f = open(log, "w")
        procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"}))
        f.close()

    try:
        spawn([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", host, "--port", str(port),
               "--port-end", str(port + 1)], log_dir / "tracker.log")
        deadline = time.time() + timeout_s
        while not _answers(host, port):         # servers started before the tracker retry only every 5 s
            if procs[0].poll() is not None or time.time() > deadline:
                raise RuntimeError(f"RPC tracker did not start: {(log_dir / 'tracker.log').read_text()[-800:]}")
            time.sleep(0.2)
        for i in range(n_servers):
            sp = free_port()
            cmd = (server_cmd(i, host, port, key, sp) if server_cmd else
                   [sys.executable, "-m", "tvm.exec.rpc_server", "--host", host, "--port", str(sp),
                    "--port-end", str(sp + 1), "--tracker", f"{host}:{port}", "--key", key])
            logs.append(log_dir / f"server{i}.log")
            spawn(cmd, logs[-1])
        while tracker_servers(host, port, key) < n_servers:
            dead = [p for p in procs if p.poll() is not None]
            if dead or time.time() > deadline:
                tail = "".join(Path(lg).read_text()[-400:] for lg in [log_dir / "tracker.log", *logs])
                raise RuntimeError(f"RPC cluster did not come up ({tracker_servers(host, port, key)}/{n_servers} "
                                   f"servers registered): {tail}")
            time.sleep(0.5)
        yield host, port, key, logs
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
