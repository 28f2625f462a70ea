"""The emulated aarch64 board as a tuning device: a loopback RPC tracker with aarch64 servers under
qemu-aarch64 (the preset's CPU model). Measurements there rank schedules under emulation, not on real
hardware."""
from __future__ import annotations

import logging
from contextlib import contextmanager

from ..errors import TuningError
from .measure import RPC

logger = logging.getLogger(__name__)


@contextmanager
def emulated_board(tp: dict, n_servers: int = 1):
    """Context -> RPC of ``n_servers`` emulated boards of preset ``tp`` (TuningError when not set up)."""
    from ..targets import arm
    from ..targets.remote import local_rpc_cluster

    why = arm.missing()
    if why:
        raise TuningError(f"{tp['name']} is an aarch64 target: give --rpc-tracker/--rpc-key of real boards, or "
                          f"set up the emulated board ({why})")

    def server(_i, host, port, key, sport):
        return arm.device_server_command(tp["qemu_cpu"], "--tracker", f"{host}:{port}", "--key", key,
                                         "--port", str(sport))

    logger.info(f"tvm-anyprec tune: measuring on the emulated aarch64 board (qemu-aarch64 -cpu {tp['qemu_cpu']}): "
                "schedules are ranked by emulated time, not real-hardware time; re-tune on a board "
                "(--rpc-tracker) for performance")
    with local_rpc_cluster(n_servers, key=f"anyprec-{tp['name']}", server_cmd=server, timeout_s=180) as c:
        yield RPC(c[0], c[1], c[2], n_servers, timeout_s=300)
