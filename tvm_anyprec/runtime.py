"""Load a compiled artifact once, pick the bit-width per call, generate text, evaluate perplexity."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from .artifact import CACHE_ONLY, LIB, WEIGHTS, ArtifactError, kv_cache_bytes, load_tensors, read_manifest
from .env import set_threads

logger = logging.getLogger(__name__)


def _prompt(prompt_ids) -> np.ndarray:
    if (ids := np.asarray(prompt_ids, np.int64)).size == 0:
        raise ValueError("the prompt is empty: give at least one token")
    return ids


class Session:
    """One loaded artifact: the library and one set of weight buffers serve every bit-width."""

    def __init__(self, artifact, verify: bool = True, remote=None, remote_files: bool = False,
                 prompt_fn: str | None = None):
        """``remote``: a ``tvm.rpc.RPCSession`` to run on (an aarch64 board, or qemu: targets.arm.qemu_session);
        the library is uploaded and loaded there, the weights live in its memory. ``remote_files``: the
        device reads this artifact's files at the same path (qemu-user does), so the weights are loaded
        there instead of being sent through RPC. ``prompt_fn``: the function that feeds a prompt (None:
        prefill in chunks; "decode": token by token, what an emulated board wants; the results are the same)."""
        import tvm
        from tvm import relax

        from .targets import local_device

        if remote is None:   # before the first kernel starts TVM's pool
            set_threads()
        self.path = Path(artifact)
        self.manifest = read_manifest(self.path, kind="compiled", verify=verify)
        tp = self.manifest["target"]
        self.remote = remote
        # device selection: this CPU, or the GPU of a cuda-*/vulkan artifact (TargetError when there is none)
        self.dev = local_device(tp) if remote is None else remote.cpu()
        self.bit_widths = list(self.manifest["bit_widths"])
        try:
            if remote is None:
                lib = tvm.runtime.load_module(str(self.path / LIB))
            else:
                remote.upload(str(self.path / LIB), "anyprec_" + LIB)
                lib = remote.load_module("anyprec_" + LIB)
        except Exception as e:
            raise ArtifactError(f"cannot load {self.path / LIB}" + (" on the remote device" if remote else "")
                                + f": {e}") from e
        self.vm = relax.VirtualMachine(lib, self.dev)
        self.weights = self._load_weights(remote_files)
        self.prompt_fn, self.functions = prompt_fn, self.manifest["functions"]
        self._params = {f: [self.weights[n] for n in info["params"]] for f, info in self.functions.items()}
        self._nbits = {b: tvm.runtime.tensor(np.array([b], np.int32), self.dev) for b in self.bit_widths}
        self._tok = None
        self._latency: dict[int, float] = {}
        self._local_cpu = remote is None and self.dev.dlpack_device_type() == 1   # kDLCPU: outputs read in place
        self._kept: dict = {}   # function -> its (ids, pos) input tensors and their numpy views

    def _load_weights(self, remote_files: bool) -> dict:
        import tvm

        if self.remote is not None and remote_files:
            path = str((self.path / WEIGHTS).resolve())
            load = self.remote.get_function("tvm_anyprec.load_safetensor")
            names = sorted({n for f in self.manifest["functions"].values() for n in f["params"]})
            return {n: load(path, n) for n in names}
        host = load_tensors(self.path / WEIGHTS)
        return {k: tvm.runtime.tensor(v, self.dev) for k, v in host.items()}

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
        args = [a if isinstance(a, tvm.runtime.Tensor) else tvm.runtime.tensor(np.asarray(a, order="C"), self.dev)
                for a in inputs]
        if self.remote is None:
            return self.vm[fname](*args, self._nbits[bits], *self._params[fname])
        # over RPC a returned tuple is an opaque remote object: run statefully and fetch the outputs
        self.vm.set_input(fname, *args, self._nbits[bits], *self._params[fname])
        self.vm.invoke_stateful(fname)
        return self.vm.get_outputs(fname)

    def run(self, inputs, bits: int | None = None, function: str | None = None) -> dict:
        """Run a graph of any kind (an encoder, a graph from elsewhere): ``inputs`` {name: array} (or a list in
        the graph's input order) -> {output name: numpy array}. ``function``: the graph (default: the only one);
        ``bits``: default the highest the artifact serves."""
        fname = function or (next(iter(self.functions)) if len(self.functions) == 1 else None)
        if fname is None:
            raise ValueError(f"this artifact has several graphs ({', '.join(sorted(self.functions))}): choose one")
        info = self.functions.get(fname)
        if info is None:
            raise ValueError(f"artifact has no function {fname!r} (has {sorted(self.functions)})")
        names = [i[0] for i in info["inputs"]]
        if isinstance(inputs, dict):
            missing, extra = [n for n in names if n not in inputs], sorted(set(inputs) - set(names))
            if missing or extra:
                raise ValueError(f"{fname} takes inputs {names}" + (f"; missing {missing}" if missing else "")
                                 + (f"; unknown {extra}" if extra else ""))
            inputs = [inputs[n] for n in names]
        if len(inputs) != len(names):
            raise ValueError(f"{fname} takes {len(names)} inputs {names}, got {len(inputs)}")
        args = []
        for (name, shape, dtype), a in zip(info["inputs"], inputs):
            a = np.asarray(a)
            if list(a.shape) != list(shape):
                raise ValueError(f"input {name!r}: shape {list(a.shape)}, the graph takes {list(shape)}")
            args.append(a.astype(dtype, copy=False))
        out = self.call(fname, args, self.bit_widths[-1] if bits is None else bits)
        outs = list(out) if not hasattr(out, "numpy") else [out]
        return {n: o.numpy() for n, o in zip(info["outputs"], outs)}

    def spec(self, fname: str) -> dict:
        spec = self.functions[fname].get("spec")
        if spec is None:
            raise ArtifactError(f"function {fname} was not exported by tvm-anyprec (no KV-cache spec)")
        return spec

    def cache_bytes(self, fname: str = "decode") -> int:
        """Bytes of one KV cache (every layer's keys and values, at the full length)."""
        return kv_cache_bytes(self.spec(fname))

    def empty_cache(self, fname: str = "decode") -> list:
        """A KV cache for a new sequence: one key and one value tensor per layer. An in-place cache (the CPU
        attention kernel reads rows up to the position only) is left uninitialised; a dense one (attention over
        every row, masked: GPU targets, older artifacts) is zeroed."""
        import tvm

        sp = self.spec(fname)
        shape = (sp["n_kv_heads"], sp["max_len"], sp["head_dim"])
        if self.functions[fname].get("kv_cache") == "in_place":   # (on a remote device: nothing sent over RPC)
            return [tvm.runtime.empty(shape, "float32", self.dev) for _ in range(2 * sp["n_layers"])]
        z = np.zeros(shape, np.float32)
        return [tvm.runtime.tensor(z, self.dev) for _ in range(2 * sp["n_layers"])]

    # ---------------------------------------------------------------- model level
    def _chunk_fn(self) -> str:
        return "prefill" if "prefill" in self.functions else "decode"

    def forward_tokens(self, ids: np.ndarray, bits: int, pos: int = 0, cache=None, fn: str | None = None,
                       logits: str = "all"):
        """Run ``ids`` (1-D) through the model from position ``pos``, in calls of the chunked function ``fn``
        (default: prefill), the last one padded; returns (logits [len, V], cache). ``logits="last"`` (a prompt):
        the chunks before the last run ``fn``'s twin without logits (``<fn>_cache``, ``passes.cache_only``) if
        the artifact has one, and only the last chunk's rows are returned (the last token's is the last row)."""
        fn = fn or self._chunk_fn()
        if logits not in ("all", "last"):
            raise ValueError(f"logits must be 'all' or 'last', got {logits!r}")
        twin = fn + CACHE_ONLY if logits == "last" and fn + CACHE_ONLY in self.functions else None
        S, cache = self.spec(fn)["chunk"], cache if cache is not None else self.empty_cache(fn)
        if pos + len(ids) > self.spec(fn)["max_len"]:
            raise ValueError(f"sequence of {pos + len(ids)} tokens exceeds the cache ({self.spec(fn)['max_len']})")
        # a token-pruned prefill graph also takes the number of real tokens in the chunk (the rest is padding)
        pruned = any(i[0] == "n_valid" for i in self.functions[fn]["inputs"])
        outs = []
        for start in range(0, len(ids), S):
            chunk = ids[start:start + S]
            valid = [np.array([len(chunk)], np.int64)] if pruned else []
            args = [*self._ids_pos(fn, S, chunk, pos + start), *valid, *cache]
            if twin is not None and start + S < len(ids):
                cache = list(self.call(twin, args, bits))
                continue
            lg, cache = self._split(fn, self.call(fn, args, bits), cache)
            outs.append(lg[0, :len(chunk)])
        return np.concatenate(outs, 0), cache

    def _split(self, fn: str, out, cache):
        """A KV-cache function's outputs -> (logits as numpy, the cache). On this machine's CPU the logits are
        read in place (no copy) and an in-place cache is the one passed in (its 2 x layers tensors not unpacked
        again): per decode step that is ~0.5 ms of Python after a 6 ms call (SmolLM2, 4 bits, Zen 4)."""
        import tvm

        if self._local_cpu and self.functions[fn].get("kv_cache") == "in_place" and \
                all(isinstance(c, tvm.runtime.Tensor) for c in cache):
            return np.from_dlpack(out[0]), list(cache)
        lg, *cache = out
        return (np.from_dlpack(lg) if self._local_cpu else lg.numpy()), cache

    def _ids_pos(self, fn: str, S: int, ids, pos: int) -> list:
        """The token ids [1, S] (``ids`` padded with 0) and position [1] inputs of a call of ``fn``: on this
        machine's CPU two tensors kept per function, written through numpy views (no tensor made per call)."""
        if not self._local_cpu:
            buf = np.zeros((1, S), np.int64)
            buf[0, :len(ids)] = ids
            return [buf, np.array([pos], np.int64)]
        if fn not in self._kept:
            import tvm
            ts = [tvm.runtime.empty(shape, "int64", self.dev) for shape in ((1, S), (1,))]
            self._kept[fn] = ts, [np.from_dlpack(t) for t in ts]
        ts, (iv, pv) = self._kept[fn]
        iv[0, :len(ids)], iv[0, len(ids):], pv[0] = ids, 0, pos
        return ts

    def decode_step(self, token: int, pos: int, cache, bits: int):
        """One token at ``pos`` -> (its logits [V], the cache)."""
        lg, cache = self._split("decode", self.call("decode", [*self._ids_pos("decode", 1, [token], pos), *cache],
                                                    bits), cache)
        return lg[0, -1], cache

    def generate_ids(self, prompt_ids, max_new_tokens: int, bits: int = 8, eos: int | None = None,
                     max_ms_per_token: float | None = None, max_bytes_per_token: float | None = None,
                     per_step: bool = True, trace: list | None = None, stats: dict | None = None) -> list[int]:
        """Greedy decoding; returns the new token ids. With a budget (``max_ms_per_token`` and/or
        ``max_bytes_per_token``) the bit-width comes from the precision policy instead of ``bits``: chosen
        for the request, then again before every step if ``per_step`` (see tvm_anyprec.policy). ``trace``
        (a list) receives (bits, ms) per decode step; ``stats`` (a dict) the prompt's time (prompt_s)."""
        prompt_ids = _prompt(prompt_ids)
        policy = None
        if max_ms_per_token is not None or max_bytes_per_token is not None:
            policy = self.policy(measure=max_ms_per_token is not None)
            choice = policy.choose(max_ms_per_token, max_bytes_per_token)
            if not choice.met:
                logger.warning(f"tvm-anyprec: no bit-width meets the budget (max_ms_per_token={max_ms_per_token}, "
                      f"max_bytes_per_token={max_bytes_per_token}); using {choice.bits} bits")
            bits = choice.bits
        self.check_bits(bits)
        t0 = time.perf_counter()
        logits, cache = self.forward_tokens(prompt_ids, bits, fn=self.prompt_fn, logits="last")
        if stats is not None:
            stats["prompt_s"] = time.perf_counter() - t0
        st = {"pos": len(prompt_ids), "cache": cache, "nxt": int(np.argmax(logits[-1]))}
        max_len = self.spec("decode")["max_len"]
        out: list[int] = []

        def step(b: int) -> bool:
            out.append(st["nxt"])
            if st["nxt"] == eos or st["pos"] >= max_len or len(out) >= max_new_tokens:
                return False
            lg, st["cache"] = self.decode_step(st["nxt"], st["pos"], st["cache"], b)
            st["pos"] += 1
            st["nxt"] = int(np.argmax(lg))
            return True

        if max_new_tokens <= 0:
            return out
        if policy is None:
            while step(bits):
                pass
            return out
        from .policy import run_with_policy
        steps = run_with_policy(step, max_new_tokens, policy, max_ms_per_token, max_bytes_per_token, per_step)
        if trace is not None:
            trace.extend(steps)
        return out

    # ---------------------------------------------------------------- precision policy
    def weight_bytes_per_token(self, bits: int) -> int:
        """Weight bytes one decode step reads at ``bits``: b bitplanes + the b-bit LUT of every rewritten layer,
        plus every fp32 tensor the decode function takes (the tied embedding/lm_head is read whole)."""
        from .schemes import from_manifest

        self.check_bits(bits)
        params = {n: ([int(d) for d in self.weights[n].shape], str(self.weights[n].dtype))
                  for n in self.functions["decode"]["params"]}
        return from_manifest(self.manifest).bytes_per_token(bits, params)

    def measure_latencies(self, bits=None, steps: int = 4) -> dict[int, float]:
        """Median ms of one decode step per bit-width (cached on the session)."""
        from .policy import measure

        bits = list(bits or self.bit_widths)
        todo = [b for b in bits if b not in self._latency]
        if todo:
            cache = self.empty_cache("decode")
            self._latency.update(measure(lambda b: self.decode_step(1, 8, cache, b), todo, steps=steps))
        return {b: self._latency[b] for b in bits}

    def policy(self, measure: bool = True):
        """A PrecisionPolicy over this artifact's bit-widths: byte counts always, latencies when ``measure``."""
        from .policy import PrecisionPolicy

        return PrecisionPolicy(self.bit_widths, self.measure_latencies() if measure else {},
                               {b: self.weight_bytes_per_token(b) for b in self.bit_widths})

    # ---------------------------------------------------------------- self-speculative decoding
    def generate_speculative(self, prompt_ids, max_new_tokens: int, bits: int, draft_bits: int, draft_len: int = 4,
                             eos: int | None = None, stats: dict | None = None) -> list[int]:
        """Greedy decoding at ``bits`` that drafts ``draft_len`` tokens with the ``draft_bits`` child (the same
        weight buffers: a draft reads the top planes only) and checks them in one pass at ``bits``: the output
        is plain greedy decoding at ``bits``. See ``speculative.generate_speculative``."""
        from .speculative import generate_speculative

        return generate_speculative(self, _prompt(prompt_ids), max_new_tokens, bits, draft_bits, draft_len, eos,
                                    stats)

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
                name = data.packaged_name(src)
                if name is None:
                    raise ArtifactError(f"tokenizer source {src} (recorded in the manifest) is not on this machine")
                src = name
            self._tok = data.load_tokenizer(src)
        return self._tok

    def generate(self, prompt: str, max_new_tokens: int = 32, bits: int = 8, draft_bits: int | None = None,
                 draft_len: int = 4, max_ms_per_token: float | None = None,
                 max_bytes_per_token: float | None = None, stats: dict | None = None, **sampling) -> str:
        """Greedy text generation at ``bits``; with ``draft_bits``, self-speculative (same output, drafts from
        the lower child); with a budget, the precision policy picks the bit-width (see generate_ids).
        ``sampling``: ``sampling.SamplingParams`` fields (temperature, top_k, top_p, min_p, repeat_penalty,
        seed, stop): the text comes from ``generate.Generation`` (EOS and stop strings cut it)."""
        tok = self.tokenizer
        ids = tok(prompt)["input_ids"]
        if sampling:
            from .generate import Generation
            from .sampling import SamplingParams
            return Generation(self, ids, SamplingParams(max_new_tokens=max_new_tokens, **sampling), bits,
                              draft_bits, draft_len).run()
        if draft_bits is not None:
            if max_ms_per_token is not None or max_bytes_per_token is not None:
                raise ValueError("choose either speculative decoding (draft_bits) or a budget, not both")
            new = self.generate_speculative(ids, max_new_tokens, bits, draft_bits, draft_len, tok.eos_token_id,
                                            stats)
        else:
            trace = [] if stats is not None else None
            new = self.generate_ids(ids, max_new_tokens, bits, tok.eos_token_id, max_ms_per_token,
                                    max_bytes_per_token, trace=trace)
            if stats is not None:
                stats["steps"] = trace
        return tok.decode(new)

    def perplexity(self, windows: np.ndarray, bits: int) -> float:
        from .quant.model import nll_from_logits

        nll, count = 0.0, 0
        for w in windows:
            logits, _ = self.forward_tokens(np.asarray(w), bits)
            a, c = nll_from_logits(logits, w)
            nll, count = nll + a, count + c
        return float(np.exp(nll / count))


def eval_artifact(path, bits=None, windows: int = 16, seqlen: int = 128) -> list[dict]:
    from . import data

    s = Session(path)
    bits = s.bit_widths if bits is None else list(bits)
    for b in bits:
        s.check_bits(b)
    ids = data.token_windows(s.tokenizer, data.EVAL_TEXT, windows, seqlen)
    rows = []
    logger.info(f"perplexity on {data.EVAL_TEXT}: {windows} windows x {seqlen} tokens (compiled artifact "
                f"{s.manifest['target']['name']})")
    for b in bits:
        t0 = time.time()
        ppl = s.perplexity(ids, b)
        rows.append({"config": f"tvm {b}-bit", "bits": b, "ppl": ppl, "seconds": time.time() - t0})
        logger.info(f"  {b}-bit ppl {ppl:9.3f} ({time.time() - t0:.1f}s)")
    return rows
