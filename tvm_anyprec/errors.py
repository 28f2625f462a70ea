"""Every error tvm-anyprec raises on purpose derives from ``AnyPrecError``; the command line catches that one
type and exits 2 with its message. Each module's own errors (``ArtifactError``, ``TargetError``, ...) are
defined here so that leaf modules need no import from above. They keep the built-in base they had
(RuntimeError or ValueError), so callers that catch those still do. Imports nothing."""
from __future__ import annotations


class AnyPrecError(Exception):
    """Base of every error tvm-anyprec reports to a user (bad input, missing tool, corrupt file)."""


class ArtifactError(AnyPrecError, RuntimeError):
    """A missing, corrupt, foreign or incompatible artifact."""


class DataError(AnyPrecError, RuntimeError):
    """A model or text that cannot be found or read."""


class QuantizationError(AnyPrecError, ValueError):
    """Bit-widths or quantization settings that cannot work."""


class ImportError_(AnyPrecError, RuntimeError):
    """An ONNX graph the importer cannot take (named with a trailing underscore: not Python's ImportError)."""


class CompileError(AnyPrecError, RuntimeError):
    """A graph, parent or setting the compiler cannot turn into an artifact."""


class TargetError(AnyPrecError, ValueError):
    """An unknown, unavailable or mismatched target or device."""


class TuningError(AnyPrecError, ValueError):
    """Tuning settings or sources that cannot be tuned."""


class KernelError(AnyPrecError, ValueError):
    """A kernel spec with impossible fields, or a manifest entry that is not a kernel spec."""


class ArmVariantError(AnyPrecError, ValueError):
    """An ARM integer-GEMM variant the target or the kernel's shape cannot have."""


class ArmUnavailable(TargetError):
    """The emulated aarch64 board (or a part of it) is not installed."""


class WebGPUUnavailable(AnyPrecError, RuntimeError):
    """No WebGPU adapter or wgpu package to run WGSL kernels on."""


class BudgetError(AnyPrecError, ValueError):
    """A precision-policy budget that cannot be read."""
