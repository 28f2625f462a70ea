"""Low-bit activations (Agile-Quant style W4A8 / W4A4): per-token dynamic INT8/INT4 activation quantization,
INT4 weights, outlier handling calibrated on real text, and a torch fake-quant path for perplexity.
numpy/torch only (no TVM import).

Activations: symmetric per token (one scale per row of X, from that token's range, computed at run time):
``s = max|x| / qmax``, ``q = clip(round(x / s), -qmax, qmax)`` with qmax = 127 (INT8) or 7 (INT4).

Weights (W4): the 4-bit child of the *uniform* any-precision parent (``quantize_uniform``, 8-bit codes per
row-group, the child = the top 4 bits, dequantized at its bucket centre). Rewritten as
``w = s4 * (q4 - z4)`` with q4 in 0..15, ``s4 = 16 * s8``, ``z4 = (z8 - 7.5) / 16`` so an integer kernel can
compute ``sum_k xq * q4`` in int32 and apply the per-group zero point with the per-group sum of ``xq``.

Outlier handling (what we chose, and why): *per-channel smoothing folded into the weights*
(SmoothQuant-style migration; it is Agile-Quant's TRIP idea of giving outlier channels their own scale,
with the factor moved out of the activation's integer grid). From calibration text (Richard III) we record
every linear input's per-channel max |x|; channel j gets ``f_j = max|x_j|^alpha / max|W[:, j]|^(1-alpha)``
(``power_of_two=True`` rounds f_j to a power of two: TRIP/PTF's shift-friendly factor). At run time the
activation-quantize kernel multiplies X by 1/f (a per-channel vector, fused with the per-token
quantization), and W * f (columns) is what gets quantized to 4 bits, offline. The integer GEMM is unchanged.
We measured the alternative "keep the top outlier channels in float" as well (``outlier="keep"``); see the
README section "Low-bit activations" for the numbers that decided it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch

from .anyprec import QuantizationError, check_weight, quantize_uniform
from .patterns import matches_any

ACT_BITS = (4, 8)
OUTLIER_METHODS = ("none", "smooth", "keep")


def qmax(bits: int) -> int:
    if bits not in ACT_BITS:
        raise QuantizationError(f"activation bit-width {bits} unsupported: use {list(ACT_BITS)}")
    return (1 << (bits - 1)) - 1


# ----------------------------------------------------------------------------- activations (numpy reference)
def quantize_tokens(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-token symmetric quantization of x [M, K] -> (int8 codes [M, K], float32 scales [M])."""
    x = np.asarray(x, np.float32)
    qm = qmax(bits)
    amax = np.abs(x).max(-1)
    scale = np.where(amax > 0, amax / np.float32(qm), np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint(x / scale[:, None]), -qm, qm).astype(np.int8)
    return q, scale


def fake_quant_tokens(x: torch.Tensor, bits: int) -> torch.Tensor:
    """torch: quantize-dequantize along the last axis (one scale per token), same rule as quantize_tokens."""
    qm = qmax(bits)
    amax = x.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / qm, torch.ones_like(amax))
    return torch.clamp(torch.round(x / scale), -qm, qm) * scale


# ----------------------------------------------------------------------------- INT4 weights
@dataclass
class W4Layer:
    """w[n, k] ~= scales[n, g] * (codes[n, k] - zeros[n, g]) with g = k // group_size, codes in 0..15."""

    codes: np.ndarray       # uint8 [N, K]
    scales: np.ndarray      # float32 [N, G]
    zeros: np.ndarray       # float32 [N, G]
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> np.ndarray:
        k = self.codes.shape[1]
        s = np.repeat(self.scales, self.group_size, axis=1)[:, :k]
        z = np.repeat(self.zeros, self.group_size, axis=1)[:, :k]
        return ((self.codes.astype(np.float32) - z) * s).astype(np.float32)

    def packed(self) -> np.ndarray:
        """Two codes per byte: uint8 [N, ceil(K/2)], column 2i in the low nibble, 2i+1 in the high nibble."""
        n, k = self.codes.shape
        c = np.zeros((n, k + (k & 1)), np.uint8)
        c[:, :k] = self.codes
        return (c[:, 0::2] | (c[:, 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, k: int) -> np.ndarray:
    p = np.asarray(packed, np.uint8)
    out = np.empty((p.shape[0], p.shape[1] * 2), np.uint8)
    out[:, 0::2], out[:, 1::2] = p & 15, p >> 4
    return out[:, :k]


def quantize_w4(w: np.ndarray, group_size: int = 64, name: str = "weight") -> W4Layer:
    """The 4-bit child of the uniform 8-bit parent (per row-group), as integer codes + scale + zero point."""
    w = check_weight(w, name)
    u = quantize_uniform(w, group_size, 8, 4, name=name)
    codes = u.codes(4)
    s8, z8 = u.scales.astype(np.float32), u.zeros.astype(np.float32)
    return W4Layer(codes=codes, scales=(16.0 * s8).astype(np.float32), zeros=((z8 - 7.5) / 16.0).astype(np.float32),
                   group_size=group_size)


# ----------------------------------------------------------------------------- configuration
@dataclass
class ActQuantConfig:
    """Which bits each linear layer's input gets and how outliers are handled.

    ``bits``: default activation bit-width (8, or 4); ``int4_layers``: layer-name patterns (glob/regex) whose
    input is quantized to INT4 regardless (the paper: only the layer after self-attention, ``o_proj``);
    ``a16_layers``: patterns kept with float activations (W4A16). ``outlier``: "smooth" (per-channel factors
    folded into the weights), "keep" (the ``keep`` largest channels stay float), or "none"."""

    bits: int = 8
    int4_layers: tuple = ()
    a16_layers: tuple = ()
    outlier: str = "smooth"
    alpha: float = 0.5
    power_of_two: bool = True
    keep: int = 8
    group_size: int = 64

    def __post_init__(self):
        qmax(self.bits)
        if self.outlier not in OUTLIER_METHODS:
            raise QuantizationError(f"unknown outlier method {self.outlier!r}: use {list(OUTLIER_METHODS)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise QuantizationError(f"smoothing alpha must be in [0, 1], got {self.alpha}")

    def bits_for(self, name: str) -> int | None:
        """Activation bits of layer ``name``; None = float activations."""
        if matches_any(name, self.a16_layers):
            return None
        return 4 if matches_any(name, self.int4_layers) else self.bits

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def preset(act_bits: int, outlier: str = "smooth", int4_only_after_attention: bool = True, **kw) -> ActQuantConfig:
    """``act_bits`` 8: INT8 everywhere. ``act_bits`` 4: INT4 where the paper puts it (``o_proj``, the layer after
    self-attention) and INT8 elsewhere, or INT4 everywhere with ``int4_only_after_attention=False``."""
    if act_bits == 8:
        return ActQuantConfig(8, (), outlier=outlier, **kw)
    if act_bits == 4:
        return ActQuantConfig(8, ("o_proj",), outlier=outlier, **kw) if int4_only_after_attention else \
            ActQuantConfig(4, (), outlier=outlier, **kw)
    qmax(act_bits)
    raise AssertionError


# ----------------------------------------------------------------------------- calibration
@torch.no_grad()
def calibrate_absmax(model, windows: np.ndarray, linears: dict) -> dict[str, np.ndarray]:
    """Per-channel max |x| of every linear layer's input over the calibration windows -> {name: float32 [K]}."""
    stats: dict = {}
    hooks = []

    def make(name):
        def hook(_mod, args):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            stats[name] = x if name not in stats else torch.maximum(stats[name], x)
        return hook

    for n, m in linears.items():
        hooks.append(m.register_forward_pre_hook(make(n)))
    try:
        for w in windows:
            model(input_ids=torch.from_numpy(np.asarray(w)[None]))
    finally:
        for h in hooks:
            h.remove()
    return {n: s.numpy() for n, s in stats.items()}


def smoothing_factors(act_absmax: np.ndarray, w: np.ndarray, alpha: float = 0.5,
                      power_of_two: bool = False) -> np.ndarray:
    """Per input channel f_j = max|x_j|^alpha / max|W[:, j]|^(1 - alpha), normalised to geometric mean 1.
    X / f and W * f give the same product; f flattens the activation outlier channels."""
    a = np.maximum(np.asarray(act_absmax, np.float64), 1e-5)
    wm = np.maximum(np.abs(np.asarray(w, np.float64)).max(0), 1e-5)
    f = a ** alpha / wm ** (1.0 - alpha)
    f = f / np.exp(np.log(f).mean())
    if power_of_two:
        f = 2.0 ** np.round(np.log2(f))
    return f.astype(np.float32)


def outlier_channels(act_absmax: np.ndarray, keep: int) -> np.ndarray:
    """The ``keep`` channels with the largest calibrated max |x| (sorted indices)."""
    a = np.asarray(act_absmax)
    return np.sort(np.argsort(-a, kind="stable")[:min(keep, a.size)]).astype(np.int64)


# ----------------------------------------------------------------------------- a layer, ready to run
@dataclass
class ActQuantLayer:
    """What one rewritten linear layer needs: W4 weights (of W * f when smoothing), the activation bits, and
    the per-channel activation multiplier 1/f (ones when not smoothing) or the float outlier channels."""

    name: str
    bits: int | None                       # None: float activations (W4A16)
    w4: W4Layer
    inv_factor: np.ndarray | None = None   # float32 [K]: X * inv_factor before quantizing (smoothing)
    keep_idx: np.ndarray | None = None     # int64 [k]: channels kept in float ("keep")
    meta: dict = field(default_factory=dict)


def prepare_layer(name: str, w: np.ndarray, cfg: ActQuantConfig, act_absmax: np.ndarray | None) -> ActQuantLayer:
    w = check_weight(w, name)
    bits = cfg.bits_for(name)
    if cfg.outlier == "none" or (bits is None and cfg.outlier == "keep"):
        return ActQuantLayer(name, bits, quantize_w4(w, cfg.group_size, name))
    if act_absmax is None:
        raise QuantizationError(f"{name}: outlier handling {cfg.outlier!r} needs calibration statistics")
    if cfg.outlier == "smooth":
        f = smoothing_factors(act_absmax, w, cfg.alpha, cfg.power_of_two)
        return ActQuantLayer(name, bits, quantize_w4(w * f[None, :], cfg.group_size, name),
                             inv_factor=(1.0 / f).astype(np.float32))
    return ActQuantLayer(name, bits, quantize_w4(w, cfg.group_size, name),
                         keep_idx=outlier_channels(act_absmax, cfg.keep))


def reference_linear(x: np.ndarray, layer: ActQuantLayer) -> np.ndarray:
    """numpy float64 reference of what the compiled layer computes: y = Q(x * 1/f) @ W4(W * f)^T."""
    x = np.asarray(x, np.float32)
    if layer.inv_factor is not None:
        x = x * layer.inv_factor[None, :]
    wd = layer.w4.dequantize().astype(np.float64)
    if layer.bits is None:
        return x.astype(np.float64) @ wd.T
    xm = x.copy()
    if layer.keep_idx is not None:
        xm[:, layer.keep_idx] = 0
    q, s = quantize_tokens(xm, layer.bits)
    xd = q.astype(np.float64) * s[:, None].astype(np.float64)
    if layer.keep_idx is not None:
        xd[:, layer.keep_idx] = x[:, layer.keep_idx]
    return xd @ wd.T


# ----------------------------------------------------------------------------- torch fake-quant model
def prepare_model(model, cfg: ActQuantConfig, act_absmax: dict | None, exclude=("lm_head",),
                  progress: bool = False) -> dict[str, ActQuantLayer]:
    from .model import _progress, find_linears

    lin = find_linears(model, exclude)
    return {n: prepare_layer(n, m.weight.detach().float().numpy(), cfg, None if act_absmax is None else
                             act_absmax.get(n)) for n, m in _progress(list(lin.items()), "quantizing layers (W4)",
                                                                      enable=progress)}


@contextlib.contextmanager
def fake_quantized(model, layers: dict[str, ActQuantLayer]):
    """Temporarily run the given linear layers as W4 x per-token A8/A4 (fake quantization, float math)."""
    mods = dict(model.named_modules())
    saved = {}

    def make_forward(layer: ActQuantLayer, mod):
        wq = torch.from_numpy(layer.w4.dequantize())
        inv = None if layer.inv_factor is None else torch.from_numpy(layer.inv_factor)
        idx = None if layer.keep_idx is None else torch.from_numpy(layer.keep_idx)
        bias = mod.bias

        def forward(x):
            if inv is not None:
                x = x * inv
            if layer.bits is not None:
                if idx is not None:
                    xm = x.clone()
                    xm[..., idx] = 0
                    xq = fake_quant_tokens(xm, layer.bits)
                    xq[..., idx] = x[..., idx]
                    x = xq
                else:
                    x = fake_quant_tokens(x, layer.bits)
            return torch.nn.functional.linear(x, wq, bias)
        return forward

    try:
        for n, layer in layers.items():
            mod = mods[n]
            saved[n] = mod.forward
            mod.forward = make_forward(layer, mod)
        yield model
    finally:
        for n, f in saved.items():
            mods[n].forward = f
