"""Load a compiled artifact once, pick the bit-width per call, generate text, evaluate perplexity."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from .artifact import WEIGHTS, ArtifactError, load_tensors, read_manifest


class Session:
    """One loaded artifact: the library and one set of weight buffers serve every bit-width."""

    def __init__(self, artifact, verify: bool = True):
        import tvm
        from tvm import relax

        from .compiler import LIB
        from .targets import check_runnable

        self.path = Path(artifact)
        self.manifest = read_manifest(self.path, kind="compiled", verify=verify)
        tp = self.manifest["target"]
        check_runnable(tp["arch"], tp["name"])
        self.dev = tvm.cpu()
        self.bit_widths = list(self.manifest["bit_widths"])
        try:
            lib = tvm.runtime.load_module(str(self.path / LIB))
        except Exception as e:
            raise ArtifactError(f"cannot load {self.path / LIB}: {e}") from e
        self.vm = relax.VirtualMachine(lib, self.dev)
        host = load_tensors(self.path / WEIGHTS)
        self.weights = {k: tvm.runtime.tensor(v, self.dev) for k, v in host.items()}
        del host
        self.functions = self.manifest["functions"]
        self._params = {f: [self.weights[n] for n in info["params"]] for f, info in self.functions.items()}
        self._nbits = {b: tvm.runtime.tensor(np.array([b], np.int32), self.dev) for b in self.bit_widths}
        self._tok = None

    # ---------------------------------------------------------------- low level
    def check_bits(self, bits: int) -> None:
        from .quant.anyprec import require_bits

        require_bits(bits, self.bit_widths, "this artifact serves")

    def call(self, fname: str, inputs: list, bits: int):
        """Run one compiled function; inputs are numpy arrays or tvm tensors (in manifest order)."""
        import tvm

        self.check_bits(bits)
        if fname not in self.functions:
            raise ValueError(f"artifact has no function {fname!r} (has {sorted(self.functions)})")
        args = [a if isinstance(a, tvm.runtime.Tensor) else tvm.runtime.tensor(np.ascontiguousarray(a), self.dev)
                for a in inputs]
        return self.vm[fname](*args, self._nbits[bits], *self._params[fname])

    def spec(self, fname: str) -> dict:
        spec = self.functions[fname].get("spec")
        if spec is None:
            raise ArtifactError(f"function {fname} was not exported by tvm-anyprec (no KV-cache spec)")
        return spec

    def empty_cache(self, fname: str = "decode") -> list:
        """Zeroed KV cache: one key and one value tensor per layer."""
        import tvm

        sp = self.spec(fname)
        z = np.zeros((sp["n_kv_heads"], sp["max_len"], sp["head_dim"]), np.float32)
        return [tvm.runtime.tensor(z, self.dev) for _ in range(2 * sp["n_layers"])]

    # ---------------------------------------------------------------- model level
    def _chunk_fn(self) -> str:
        return "prefill" if "prefill" in self.functions else "decode"

    def forward_tokens(self, ids: np.ndarray, bits: int, pos: int = 0, cache=None):
        """Run ``ids`` (1-D) through the model from position ``pos``; returns (logits [len, V], cache)."""
        fn = self._chunk_fn()
        S = self.spec(fn)["chunk"]
        cache = cache if cache is not None else self.empty_cache(fn)
        if pos + len(ids) > self.spec(fn)["max_len"]:
            raise ValueError(f"sequence of {pos + len(ids)} tokens exceeds the cache ({self.spec(fn)['max_len']})")
        outs = []
        for start in range(0, len(ids), S):
            chunk = ids[start:start + S]
            buf = np.zeros((1, S), np.int64)
            buf[0, :len(chunk)] = chunk
            lg, *cache = self.call(fn, [buf, np.array([pos + start], np.int64), *cache], bits)
            outs.append(lg.numpy()[0, :len(chunk)])
        return np.concatenate(outs, 0), cache

    def decode_step(self, token: int, pos: int, cache, bits: int):
        lg, *cache = self.call("decode", [np.array([[token]], np.int64), np.array([pos], np.int64), *cache], bits)
        return lg.numpy()[0, -1], cache

    def generate_ids(self, prompt_ids, max_new_tokens: int, bits: int, eos: int | None = None) -> list[int]:
        """Greedy decoding; returns the new token ids."""
        prompt_ids = np.asarray(prompt_ids, np.int64)
        if prompt_ids.size == 0:
            raise ValueError("the prompt is empty: give at least one token")
        logits, cache = self.forward_tokens(prompt_ids, bits)
        pos = len(prompt_ids)
        max_len = self.spec("decode")["max_len"]
        out = []
        nxt = int(np.argmax(logits[-1]))
        while len(out) < max_new_tokens:
            out.append(nxt)
            if nxt == eos or pos >= max_len:
                break
            lg, cache = self.decode_step(nxt, pos, cache, bits)
            pos += 1
            nxt = int(np.argmax(lg))
        return out

    @property
    def tokenizer(self):
        if self._tok is None:
            from . import data
            src = self.manifest.get("tokenizer")
            if src is None:
                raise ArtifactError("this artifact records no tokenizer (compile it with --parent or --tokenizer)")
            if not Path(str(src)).exists():
                # an artifact made on another machine records that machine's path: the packaged model is
                # found again by its file name; anything else must be present
                if Path(str(src)).name not in (data.SMOLLM2_GGUF, "smollm2"):
                    raise ArtifactError(f"tokenizer source {src} (recorded in the manifest) is not on this machine")
                src = "smollm2"
            self._tok = data.load_tokenizer(src)
        return self._tok

    def generate(self, prompt: str, max_new_tokens: int = 32, bits: int = 8) -> str:
        tok = self.tokenizer
        ids = tok(prompt)["input_ids"]
        new = self.generate_ids(ids, max_new_tokens, bits, eos=tok.eos_token_id)
        return tok.decode(new)

    def perplexity(self, windows: np.ndarray, bits: int) -> float:
        from .quant.model import nll_from_logits

        nll, count = 0.0, 0
        for w in windows:
            logits, _ = self.forward_tokens(np.asarray(w), bits)
            a, c = nll_from_logits(logits, w)
            nll, count = nll + a, count + c
        return float(np.exp(nll / count))


def eval_artifact(path, bits=None, windows: int = 16, seqlen: int = 128, quiet: bool = False) -> list[dict]:
    from . import data

    s = Session(path)
    bits = s.bit_widths if bits is None else list(bits)
    for b in bits:
        s.check_bits(b)
    ids = data.token_windows(s.tokenizer, data.EVAL_TEXT, windows, seqlen)
    rows = []
    if not quiet:
        print(f"perplexity on {data.EVAL_TEXT}: {windows} windows x {seqlen} tokens (compiled artifact "
              f"{s.manifest['target']['name']})", file=sys.stderr)
    for b in bits:
        t0 = time.time()
        ppl = s.perplexity(ids, b)
        rows.append({"config": f"tvm {b}-bit", "bits": b, "ppl": ppl, "seconds": time.time() - t0})
        if not quiet:
            print(f"  {b}-bit ppl {ppl:9.3f} ({time.time() - t0:.1f}s)", file=sys.stderr)
    return rows
