"""aarch64: cross-compilation and an emulated board (qemu-aarch64 + an arm64 sysroot + the aarch64 TVM runtime).

``scripts/setup_arm.sh`` installs qemu-user and the cross compilers and builds ``.arm/`` (or $TVM_ANYPREC_ARM_ROOT):
``sysroot/`` (arm64 Debian userland with python3.11) and ``site/`` (aarch64 apache-tvm runtime, numpy).
``qemu_session(cpu)`` starts the RPC server (device_server.py) under ``qemu-aarch64 -cpu <cpu>`` and returns a
``tvm.rpc.RPCSession``: upload a library, load it, run it on ``session.cpu()``. The emulated CPU model decides
which instructions exist: a kernel using sdot on ``-cpu cortex-a72`` dies with SIGILL, as on real hardware.
Timings under emulation are not performance.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from ..env import arm_root
from ..errors import ArmUnavailable, TargetError  # noqa: F401  (re-exported)

CROSS_CXX = "aarch64-linux-gnu-g++"
PY = "python3.11"


def missing() -> str | None:
    """Why the emulated aarch64 board cannot run here (None when it can)."""
    root = arm_root()
    if shutil.which("qemu-aarch64") is None:
        return "qemu-aarch64 is not installed (Debian: qemu-user; or run scripts/setup_arm.sh)"
    if shutil.which(CROSS_CXX) is None:
        return f"{CROSS_CXX} is not installed (Debian: g++-aarch64-linux-gnu; or run scripts/setup_arm.sh)"
    if not (root / "sysroot" / "usr" / "bin" / PY).exists():
        return f"no arm64 sysroot at {root / 'sysroot'} (run scripts/setup_arm.sh)"
    if not (root / "site" / ".complete").exists():
        return f"no aarch64 TVM runtime at {root / 'site'} (run scripts/setup_arm.sh)"
    return None


def cross_compiler():
    """fcompile for ``export_library``: links an aarch64 shared library with the cross g++."""
    from tvm.support import cc

    if shutil.which(CROSS_CXX) is None:
        raise ArmUnavailable(f"{CROSS_CXX} not found: install g++-aarch64-linux-gnu (scripts/setup_arm.sh)")
    return cc.cross_compiler(CROSS_CXX)


def qemu_command(argv: list, cpu: str = "max") -> list:
    """The command line running an aarch64 program (or ``python3.11`` with ``argv``) of the sysroot under qemu."""
    why = missing()
    if why:
        raise ArmUnavailable(why)
    root = arm_root()
    return ["qemu-aarch64", "-cpu", cpu, "-L", str(root / "sysroot"),
            "-E", f"PYTHONPATH={root / 'site'}", "-E", "TVM_USE_RUNTIME_LIB=1", "-E", "PYTHONDONTWRITEBYTECODE=1",
            *argv]


def qemu_session(cpu: str = "max"):
    """An RPC session whose server is the aarch64 TVM runtime under ``qemu-aarch64 -cpu <cpu>``."""
    from tvm import rpc
    from tvm.rpc import _ffi_api

    return rpc.RPCSession(_ffi_api.CreatePipeClient(*device_server_command(cpu)))


def device_server_command(cpu: str = "max", *args) -> list:
    """qemu-aarch64 running device_server.py (pipe mode; with ``--tracker ... --key ... --port ...``: a
    tracker-registered server, e.g. for ``targets.remote.local_rpc_cluster(server_cmd=...)``)."""
    root = arm_root()
    return qemu_command([str(root / "sysroot" / "usr" / "bin" / PY), str(Path(__file__).with_name("device_server.py")),
                         *args], cpu)
