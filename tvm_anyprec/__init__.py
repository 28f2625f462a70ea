"""tvm-anyprec: any-precision (3..8-bit bitplane) weights and low-bit activations for LLMs, compiled with
Apache TVM. The verbs are in ``tvm_anyprec.api`` (the command line is ``tvm_anyprec.cli``).

Progress goes through ``logging`` (logger "tvm_anyprec", INFO, to stderr, message only). Silence it with
``logging.getLogger("tvm_anyprec").setLevel(logging.WARNING)``, or give that logger handlers of your own.
"""
from __future__ import annotations

import logging as _logging
import sys as _sys

__version__ = "0.1.0"


class _StderrHandler(_logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (a test's capture, a redirected stream)."""

    def __init__(self):
        super().__init__(_sys.stderr)

    @property
    def stream(self):
        return _sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


_logger = _logging.getLogger(__name__)
if not _logger.handlers:
    _handler = _StderrHandler()
    _handler.setFormatter(_logging.Formatter("%(message)s"))
    _logger.addHandler(_handler)
    _logger.setLevel(_logging.INFO)
    _logger.propagate = False
