"""The project's TIR kernels (TVMScript). Importing this package makes TVMScript parsing fast (below)."""
from __future__ import annotations


def _fast_tvmscript_stack() -> None:
    """TVM 0.27's ``T.prim_func`` calls ``inspect.stack()`` on every parse, which reads the source line of
    every frame on the stack and, for frames without a file on disk (``<frozen importlib>``, ``<ast>``),
    scans every loaded module (``inspect.getmodule``): 0.1 s per kernel with torch loaded, and 45 s for
    MetaSchedule's ``import tvm.s_tir.tensor_intrin`` (about 250 kernels, imported by every TuneContext).
    The parser uses only the frame objects and the source line of the first three frames (``@I.ir_module``
    class detection), so the stack given to it carries exactly that: same behaviour, 6 s for that import."""
    import inspect
    import sys
    import types

    from tvm.tirx.script.parser import entry

    if getattr(entry.inspect, "_anyprec_fast", False):
        return

    def stack(context: int = 1):
        out = []
        frame = sys._getframe(1)
        while frame:
            if len(out) < 3:
                info = inspect.getframeinfo(frame, context)
                out.append(inspect.FrameInfo(frame, *info, positions=info.positions))
            else:
                code = frame.f_code
                out.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name, None, None,
                                             positions=None))
            frame = frame.f_back
        return out

    shim = types.ModuleType("inspect")
    shim.__dict__.update(inspect.__dict__)
    shim.stack = stack
    shim._anyprec_fast = True
    entry.inspect = shim


_fast_tvmscript_stack()

from .lowering import install as _install_lowering  # noqa: E402

_install_lowering()
