"""A TVM RPC server for the device side (here: the aarch64 Python under qemu-aarch64, which cannot start
``python -m tvm.exec.rpc_server`` because that re-executes the interpreter). Two modes:

  device_server.py READ_FD WRITE_FD          serve one session over two pipes (``tvm.rpc._ffi_api.CreatePipeClient``
                                             starts the script and appends the fds)
  device_server.py --tracker HOST:PORT --key KEY --port PORT
                                             listen on PORT and register at a TVM RPC tracker (what the
                                             MetaSchedule RPC runner uses), serving sessions one after another

It imports only the TVM runtime and numpy (the device-side site has no compiler library). Besides TVM's own
server functions it registers ``tvm_anyprec.load_safetensor(path, name)``."""
import json
import os
import struct
import sys

import numpy as np
import tvm
from tvm.rpc import _ffi_api, server

_DTYPES = {"F32": "float32", "F16": "float16", "U32": "uint32", "U8": "uint8", "I8": "int8", "I16": "int16",
           "I32": "int32", "I64": "int64"}
_files: dict = {}


def load_safetensor(path: str, name: str):
    """One tensor of a safetensors file that this device can read (qemu-user shares the host's files): the
    weights go from the file into device memory without crossing the RPC pipe."""
    if path not in _files:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        _files[path] = (np.memmap(path, np.uint8, mode="r"), 8 + n, header)
    raw, base, header = _files[path]
    meta = header[name]
    a, b = meta["data_offsets"]
    arr = raw[base + a:base + b].view(_DTYPES[meta["dtype"]]).reshape(meta["shape"])
    return tvm.runtime.tensor(np.asarray(arr, order="C"), tvm.cpu())


def serve_tracker(argv) -> None:
    import argparse
    import socket

    ap = argparse.ArgumentParser()
    ap.add_argument("--tracker", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    a = ap.parse_args(argv)
    thost, _, tport = a.tracker.rpartition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((a.host, a.port))
    sock.listen(1)
    print(f"device server on {a.host}:{a.port}, key {a.key}, tracker {a.tracker}", flush=True)
    server._listen_loop(sock, a.port, a.key, (thost, int(tport)), [], a.host)


def _load_runtime_extra() -> None:
    """libtvm_runtime_extra holds tvm.contrib.random.random_fill_for_measure (MetaSchedule's RPC runner fills
    the inputs with it); the runtime-only import does not load it."""
    import ctypes

    path = os.path.join(os.path.dirname(tvm.__file__), "lib", "libtvm_runtime_extra.so")
    if os.path.exists(path):
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


def main() -> None:
    _load_runtime_extra()
    tvm.register_global_func("tvm_anyprec.load_safetensor", load_safetensor)
    if "--tracker" in sys.argv:
        serve_tracker(sys.argv[1:])
        return
    rfd, wfd = int(sys.argv[-2]), int(sys.argv[-1])
    server._server_env([])   # registers tvm.rpc.server.upload / load_module / workpath

    def send(data):
        return os.write(wfd, bytes(data))

    def recv(size):
        return os.read(rfd, size)

    try:
        _ffi_api.ServerLoop(send, recv)
    except Exception:  # the client closed the pipe: the session is over
        pass


if __name__ == "__main__":
    main()
