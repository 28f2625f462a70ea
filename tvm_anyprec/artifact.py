"""On-disk formats: a directory holding ``manifest.json`` plus files listed (with sha256) in the manifest.

Two kinds share the machinery:
* ``parent``  (written by ``quantize``): weights.safetensors with every quantized layer's bitplanes and LUTs
  and the full-precision tensors, so the source checkpoint is only needed for its architecture/tokenizer.
* ``compiled`` (written by ``compile``): the shared library for one target, the weights in the order the
  compiled functions take them, and the layer map.

Directories are written atomically: everything goes into ``<dir>.tmp-<pid>`` and is renamed into place
only when complete, so a crash or a bad input never leaves a half-written artifact behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from .data import file_sha256
from .errors import ArtifactError  # noqa: F401  (re-exported)

FORMAT_VERSION = 1          # parents
COMPILED_FORMAT_VERSION = 2  # compiled artifacts: 2 = byte-sliced planes and int8 tables on CPUs (kernels.lut_cpu)
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
LIB = "lib.so"   # a compiled artifact's Relax VM executable
CACHE_ONLY = "_cache"   # suffix of a chunk function's twin without logits (prefill_cache: passes.cache_only)




def refuse_overwrite(out: Path, force: bool) -> None:
    """Never replace a user's non-empty directory (or a file) unless asked to."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ArtifactError(f"{out} already exists; pass force=True (--force) to replace it")


@contextlib.contextmanager
def atomic_dir(path: os.PathLike, overwrite: bool = True):
    """Yield a temporary directory that replaces ``path`` only if the block completes."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ArtifactError(f"{path} exists (pass overwrite=True / --force to replace it)")
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f"{path.name}.old-{os.getpid()}")
            path.replace(old)
        tmp.replace(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_tensors(path: os.PathLike, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.asarray(v, order="C") for k, v in tensors.items()}, str(path),  # 0-d stays 0-d
              metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_tensors(path: os.PathLike) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise ArtifactError(f"cannot read weights file {path}: {e}") from e


def write_manifest(d: Path, manifest: dict) -> dict:
    """Adds format version, creation time and the sha256 of every file in ``d``; writes manifest.json."""
    files = {p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size}
             for p in sorted(d.iterdir()) if p.is_file() and p.name != MANIFEST}
    version = COMPILED_FORMAT_VERSION if manifest.get("kind") == "compiled" else FORMAT_VERSION
    manifest = {"format_version": version, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **manifest, "files": files}
    (d / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=False))
    return manifest


def read_manifest(d: os.PathLike, kind: str | None = None, verify: bool = True) -> dict:
    d = Path(d)
    if not d.is_dir():
        raise ArtifactError(f"{d} is not an artifact directory (missing or not a directory)")
    mp = d / MANIFEST
    if not mp.exists():
        raise ArtifactError(f"{d} has no {MANIFEST}: not a tvm-anyprec artifact")
    try:
        manifest = json.loads(mp.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{mp} is corrupt: {e}") from e
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{mp} is corrupt: expected a JSON object, got {type(manifest).__name__}")
    if kind is not None and manifest.get("kind") != kind:
        raise ArtifactError(f"{d} is a '{manifest.get('kind')}' artifact, expected '{kind}'")
    want = COMPILED_FORMAT_VERSION if manifest.get("kind") == "compiled" else FORMAT_VERSION
    if manifest.get("format_version") != want:
        hint = " (compiled artifacts of format 1 hold the old plane layout: compile the model again)" \
            if manifest.get("kind") == "compiled" else ""
        raise ArtifactError(f"{d}: format version {manifest.get('format_version')} is not supported "
                            f"(this tvm-anyprec reads version {want} for '{manifest.get('kind')}' artifacts){hint}")
    files = manifest.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(i, dict) and isinstance(i.get("bytes"), int)
                                              and isinstance(i.get("sha256"), str) for i in files.values()):
        raise ArtifactError(f"{mp} is corrupt: 'files' must map each file name to its bytes and sha256")
    if verify:
        for name, info in files.items():
            p = d / name
            if not p.exists():
                raise ArtifactError(f"{d}: file {name} listed in the manifest is missing")
            if p.stat().st_size != info["bytes"]:
                raise ArtifactError(f"{d}: {name} has {p.stat().st_size} bytes, manifest says {info['bytes']} "
                                    "(truncated or replaced?)")
            if file_sha256(p) != info["sha256"]:
                raise ArtifactError(f"{d}: checksum mismatch for {name} (corrupt or modified)")
    return manifest


def kv_cache_bytes(spec: dict) -> int:
    """Bytes of one KV cache of an exported function's spec: fp32 keys and values of every layer, full length."""
    return 2 * spec["n_layers"] * spec["n_kv_heads"] * spec["max_len"] * spec["head_dim"] * 4


def memory_summary(manifest: dict) -> dict:
    """Weights and one KV cache of a compiled artifact, in bytes, with how the cache is used."""
    specs = {f: i["spec"] for f, i in manifest["functions"].items() if i.get("spec")}
    mem = {"weights_bytes": manifest["files"].get(WEIGHTS, {}).get("bytes")}
    if specs:
        f, sp = next(iter(sorted(specs.items())))
        mem["kv_cache_bytes"] = kv_cache_bytes(sp)
        mem["kv_cache"] = (f"{sp['max_len']} positions x {sp['n_layers']} layers x {sp['n_kv_heads']} kv heads x "
                           f"{sp['head_dim']} (fp32 keys and values); "
                           + ("written in place, a step reads the rows up to its position"
                              if manifest["functions"][f].get("kv_cache") == "in_place"
                              else "dense: a step reads every row"))
    return mem
