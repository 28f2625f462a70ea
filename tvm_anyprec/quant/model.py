"""Whole-model quantization with torch: find linear layers, sensitivity (Fisher) from calibration text,
quantize every layer into an any-precision parent, swap dequantized children back in, perplexity.
No TVM import here."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .patterns import DEFAULT_EXCLUDE, matches_any  # noqa: F401  (re-exported)
from .anyprec import (AnyPrecLayer, QuantizationError, UniformLayer, check_bits, layer_bytes, parent_bytes,
                      quantize_nonuniform, quantize_uniform, require_bits, rtn_quantize)




def _progress(iterable, desc, total=None, enable=True):
    if not enable:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, unit="layer" if "quant" in desc else "it", leave=False)


def find_linears(model: torch.nn.Module, exclude=DEFAULT_EXCLUDE) -> dict[str, torch.nn.Linear]:
    """Every nn.Linear whose name matches none of the ``exclude`` glob/regex patterns."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and not matches_any(name, exclude):
            out[name] = mod
    return out


def layer_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def fisher_information(model, windows: np.ndarray, linears: dict, progress: bool = True) -> dict[str, np.ndarray]:
    """Diagonal Fisher information of each linear weight: sum over calibration windows of the squared
    gradient of the language-model loss (one backward pass per window, as in SqueezeLLM)."""
    acc = {n: torch.zeros_like(m.weight, dtype=torch.float64) for n, m in linears.items()}
    params = [m.weight for m in linears.values()]
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        for w in _progress(windows, "sensitivity (Fisher)", enable=progress):
            ids = torch.from_numpy(np.asarray(w)[None])
            loss = model(input_ids=ids, labels=ids).loss
            grads = torch.autograd.grad(loss, params)
            for (n, _), g in zip(linears.items(), grads):
                acc[n] += g.double() ** 2
    finally:
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
    return {n: a.float().numpy() for n, a in acc.items()}


@dataclass
class Parent:
    """An any-precision parent of a whole model."""

    scheme: str
    seed_bits: int
    max_bits: int
    layers: dict = field(default_factory=dict)      # name -> AnyPrecLayer | UniformLayer
    fp_tensors: dict = field(default_factory=dict)  # state-dict name -> float32 array (not quantized)
    tied: dict = field(default_factory=dict)        # state-dict name -> the name whose tensor it shares
    info: dict = field(default_factory=dict)

    @property
    def bit_widths(self) -> list[int]:
        return list(range(self.seed_bits, self.max_bits + 1))

    def check_bits(self, bits: int) -> None:
        require_bits(bits, self.bit_widths)

    def dequantized(self, bits: int) -> dict[str, np.ndarray]:
        self.check_bits(bits)
        return {n: l.dequantize(bits) for n, l in self.layers.items()}

    # ---- persistence (tensor naming: "<layer>.planes", "<layer>.lut<b>", "<layer>.scales", "<layer>.zeros")
    def tensors(self) -> dict[str, np.ndarray]:
        t = {}
        for n, l in self.layers.items():
            t[f"{n}.planes"] = l.planes
            if isinstance(l, AnyPrecLayer):
                for b, lut in l.luts.items():
                    t[f"{n}.lut{b}"] = lut
            else:
                t[f"{n}.scales"], t[f"{n}.zeros"] = l.scales, l.zeros
        for n, a in self.fp_tensors.items():
            t[n] = a
        return t

    def manifest(self) -> dict:
        return {"kind": "parent", "scheme": self.scheme, "seed_bits": self.seed_bits, "max_bits": self.max_bits,
                "bit_widths": self.bit_widths, **self.info,
                "layers": {n: {"shape": list(l.shape), "type": layer_type(n),
                               **({"group_size": l.group_size} if isinstance(l, UniformLayer) else {})}
                           for n, l in self.layers.items()},
                "full_precision": sorted(self.fp_tensors), "tied": self.tied}

    def save(self, path) -> dict:
        from ..artifact import WEIGHTS, atomic_dir, save_tensors, write_manifest

        with atomic_dir(path) as tmp:
            save_tensors(tmp / WEIGHTS, self.tensors())
            return write_manifest(tmp, self.manifest())

    @classmethod
    def load(cls, path, verify: bool = True) -> "Parent":
        from ..artifact import WEIGHTS, ArtifactError, load_tensors, read_manifest

        m = read_manifest(path, kind="parent", verify=verify)
        missing = [k for k in ("scheme", "seed_bits", "max_bits", "bit_widths", "layers", "full_precision")
                   if k not in m]
        if missing or m["scheme"] not in ("nonuniform", "uniform"):
            raise ArtifactError(f"{path}: manifest is not a valid parent manifest "
                                f"({'missing ' + ', '.join(missing) if missing else 'scheme ' + repr(m['scheme'])})")
        t = load_tensors(Path(path) / WEIGHTS)
        layers = {}
        try:
            for n, info in m["layers"].items():
                shape = tuple(info["shape"])
                if m["scheme"] == "nonuniform":
                    luts = {b: t[f"{n}.lut{b}"] for b in m["bit_widths"]}
                    layers[n] = AnyPrecLayer(t[f"{n}.planes"], luts, shape, m["seed_bits"])
                else:
                    layers[n] = UniformLayer(t[f"{n}.planes"], t[f"{n}.scales"], t[f"{n}.zeros"], shape,
                                             info["group_size"], m["seed_bits"])
                _check_layer(path, n, layers[n], m["max_bits"])
            fp = {n: t[n] for n in m["full_precision"]}
        except KeyError as e:
            raise ArtifactError(f"{path}: weights file lacks tensor {e}") from e
        info = {k: m[k] for k in ("source", "group_size", "calibration") if k in m}
        return cls(m["scheme"], m["seed_bits"], m["max_bits"], layers, fp, m.get("tied", {}), info)


def _check_layer(path, name: str, layer, max_bits: int) -> None:
    """The tensors of a loaded layer agree with its manifest entry (shape, bit-width, dtypes)."""
    from ..artifact import ArtifactError
    from .bitplanes import num_words

    n, k = layer.shape
    want = {"planes": ((max_bits, n, num_words(k)), np.uint32)}
    if isinstance(layer, AnyPrecLayer):
        want.update({f"lut{b}": ((n, 1 << b), np.float16) for b in layer.luts})
        got = {"planes": layer.planes, **{f"lut{b}": l for b, l in layer.luts.items()}}
    else:
        ng = (k + layer.group_size - 1) // layer.group_size
        want.update({"scales": ((n, ng), np.float16), "zeros": ((n, ng), np.float16)})
        got = {"planes": layer.planes, "scales": layer.scales, "zeros": layer.zeros}
    for key, (shape, dtype) in want.items():
        a = got[key]
        if a.shape != shape or a.dtype != dtype:
            raise ArtifactError(f"{path}: tensor {name}.{key} is {a.dtype} {list(a.shape)}, the manifest implies "
                                f"{np.dtype(dtype)} {list(shape)}")


def quantize_model(model, scheme: str = "nonuniform", seed_bits: int = 3, max_bits: int = 8,
                   group_size: int = 128, fisher: dict | None = None, exclude=DEFAULT_EXCLUDE,
                   progress: bool = True) -> Parent:
    if scheme not in ("nonuniform", "uniform"):
        raise QuantizationError(f"unknown scheme {scheme!r}: use 'nonuniform' or 'uniform'")
    if scheme == "nonuniform":
        check_bits(seed_bits, max_bits)
    linears = find_linears(model, exclude)
    if not linears:
        raise QuantizationError("the model has no linear layer to quantize (all excluded?)")
    layers = {}
    for n in _progress(list(linears), "quantizing layers", enable=progress):
        w = linears[n].weight.detach().float().numpy()
        if scheme == "nonuniform":
            layers[n] = quantize_nonuniform(w, None if fisher is None else fisher[n], seed_bits, max_bits, name=n)
        else:
            layers[n] = quantize_uniform(w, group_size, max_bits, seed_bits, name=n)
    quantized = {f"{n}.weight" for n in layers}
    fp, tied, seen = {}, {}, {}
    sd = model.state_dict(keep_vars=True)
    for name in quantized:   # a tensor sharing a quantized weight (an embedding tied to the lm_head) is tied to it
        seen[(sd[name].data_ptr(), tuple(sd[name].shape))] = name
    for name, p in sd.items():
        if name in quantized:
            continue
        key = (p.data_ptr(), tuple(p.shape))
        if key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        fp[name] = p.detach().float().numpy().copy()
    info = {"group_size": group_size} if scheme == "uniform" else {}
    return Parent(scheme, seed_bits, max_bits, layers, fp, tied, info)


@contextlib.contextmanager
def swapped_weights(model, new: dict[str, np.ndarray]):
    """Temporarily replace ``<linear name>.weight`` tensors (keys are module names)."""
    mods = dict(model.named_modules())
    saved = {}
    try:
        with torch.no_grad():
            for n, w in new.items():
                lin = mods[n]
                saved[n] = lin.weight.detach().clone()
                lin.weight.copy_(torch.from_numpy(np.asarray(w, dtype=np.float32)))
        yield model
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                mods[n].weight.copy_(w)


@torch.no_grad()
def perplexity(model, windows: np.ndarray) -> float:
    """exp(mean NLL) over every predicted token of every window (windows are independent)."""
    nll, count = 0.0, 0
    for w in windows:
        ids = torch.from_numpy(np.asarray(w)[None])
        logits = model(input_ids=ids).logits[0, :-1].double()
        nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def nll_from_logits(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Sum of NLL of ids[1:] given logits[:-1] (numpy, float64), and the token count."""
    lg = np.asarray(logits, np.float64)[:-1]
    lg = lg - lg.max(-1, keepdims=True)
    lse = np.log(np.exp(lg).sum(-1))
    tgt = np.asarray(ids)[1:]
    return float((lse - lg[np.arange(len(tgt)), tgt]).sum()), len(tgt)


def rtn_weights(model, bits: int, group_size: int = 128, exclude=DEFAULT_EXCLUDE) -> dict[str, np.ndarray]:
    return {n: rtn_quantize(m.weight.detach().float().numpy(), bits, group_size)
            for n, m in find_linears(model, exclude).items()}


def memory_table(parent: Parent) -> list[dict]:
    """Per layer type and whole model: parent bytes vs one max-bit model and vs separate models."""
    rows, tot = {}, {"parent": 0, "single": 0, "separate": 0, "fp16": 0}
    for n, l in parent.layers.items():
        N, K = l.shape
        t = rows.setdefault(layer_type(n), {"type": layer_type(n), "count": 0, "shape": f"{N}x{K}",
                                            "parent": 0, "single": 0, "separate": 0, "fp16": 0})
        if isinstance(l, AnyPrecLayer):
            p = parent_bytes(N, K, parent.seed_bits, parent.max_bits)
            s = layer_bytes(N, K, parent.max_bits)
            sep = sum(layer_bytes(N, K, b) for b in parent.bit_widths)
        else:  # uniform: codes + per-group fp16 scale/zero, children need no extra table
            g = l.scales.nbytes + l.zeros.nbytes
            p = l.planes.nbytes + g
            s = (parent.max_bits * N * K + 7) // 8 + g
            sep = sum((b * N * K + 7) // 8 + g for b in parent.bit_widths)
        for key, v in (("parent", p), ("single", s), ("separate", sep), ("fp16", 2 * N * K)):
            t[key] += v
            tot[key] += v
        t["count"] += 1
    out = list(rows.values()) + [{"type": "all quantized", "count": len(parent.layers), "shape": "", **tot}]
    for r in out:
        r["parent/single"] = r["parent"] / r["single"]
        r["separate/parent"] = r["separate"] / r["parent"]
    return out
