"""TVM RPC server over two pipe file descriptors; runs on the device side (here: the aarch64 Python under
qemu-aarch64, which cannot start ``python -m tvm.exec.rpc_server`` because that re-executes the interpreter).
``tvm.rpc._ffi_api.CreatePipeClient`` starts this script and appends (read_fd, write_fd) to its argv.
It imports only the TVM runtime and numpy (the device-side site has no compiler library). Besides TVM's
own server functions it registers ``tvm_anyprec.load_safetensor(path, name)``."""
import json
import os
import struct
import sys

import numpy as np
import tvm
from tvm.rpc import _ffi_api, server

_DTYPES = {"F32": "float32", "F16": "float16", "U32": "uint32", "U8": "uint8", "I8": "int8", "I32": "int32",
           "I64": "int64"}
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
    return tvm.runtime.tensor(np.ascontiguousarray(arr), tvm.cpu())


def main() -> None:
    rfd, wfd = int(sys.argv[-2]), int(sys.argv[-1])
    server._server_env([])   # registers tvm.rpc.server.upload / load_module / workpath
    tvm.register_global_func("tvm_anyprec.load_safetensor", load_safetensor)

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
