"""Kernel specs: a frozen dataclass per kernel family is the kernel's identity.

A spec builds its PrimFunc (``build()``), gives its name (``name()``, the name the rewrite passes give the
kernel in the IRModule and the one manifests and variant tables are keyed by) and serialises to a plain dict
(``to_dict()``, recorded in an artifact's manifest under "kernel_specs"). Nothing parses a kernel name back:
compile and the schedule dispatch read the spec attached to the PrimFunc (``spec_of``), tune reads it from
the manifest (``spec_from_dict``).

The built PrimFunc carries its spec as the function attribute ``SPEC_ATTR`` (a JSON string). Tuning
workloads drop the attribute (``tune.records.workload``), so records keep matching kernels by structure.
"""
from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

from ..errors import KernelError

SPEC_ATTR = "tvm_anyprec.kernel"
FAMILIES: dict[str, type] = {}   # family name -> spec class (filled by register)


def register(cls):
    """Class decorator: make ``cls`` (a frozen dataclass with a ``family``) known to ``spec_from_dict``."""
    FAMILIES[cls.family] = cls
    return cls


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    family: ClassVar[str] = ""

    def name(self) -> str:
        raise NotImplementedError

    def make(self):
        """The PrimFunc without the spec attribute (the kernel module's builder)."""
        raise NotImplementedError

    def build(self):
        """The PrimFunc, carrying this spec as its ``SPEC_ATTR`` attribute."""
        return self.attach(self.make())

    def attach(self, func):
        """``func`` (this spec's kernel, however made) carrying this spec as its ``SPEC_ATTR`` attribute."""
        return func.with_attr(SPEC_ATTR, json.dumps(self.to_dict(), sort_keys=True))

    def to_dict(self) -> dict:
        return {"family": self.family, **dataclasses.asdict(self)}


def spec_from_dict(d: dict) -> KernelSpec:
    """The spec a manifest recorded (``to_dict``); KernelError for anything else."""
    if not isinstance(d, dict) or d.get("family") not in FAMILIES:
        raise KernelError(f"not a kernel spec: {d!r} (families: {', '.join(sorted(FAMILIES))})")
    cls = FAMILIES[d["family"]]
    fields = {f.name for f in dataclasses.fields(cls)}
    extra = set(d) - fields - {"family"}
    if extra:
        raise KernelError(f"kernel spec {d!r} has fields {sorted(extra)} that {cls.__name__} does not know")
    try:
        return cls(**{k: v for k, v in d.items() if k != "family"})
    except TypeError as e:
        raise KernelError(f"kernel spec {d!r}: {e}") from e


def spec_of(func) -> KernelSpec | None:
    """The spec a PrimFunc was built from (None: not one of the project's kernels, or already replaced)."""
    attrs = getattr(func, "attrs", None)
    if attrs is None or SPEC_ATTR not in attrs:
        return None
    return spec_from_dict(json.loads(str(attrs[SPEC_ATTR])))
