"""Relax pass: rewrite linear layers into low-bit-activation integer operators (W4A8 / W4A4).

Every eligible ``matmul(x, W^T)`` / ``matmul(x, W)`` (the same matching, eligibility and fp32 fallback as
``AnyPrecRewrite``) becomes

    (xq, xs, xsum) = call_tir(act_quant_a{bits}, [x, <W>.act_inv])       fused per-token quantization
    y              = call_tir(int_gemm_w4, [xq, xs, xsum, <W>.w4, <W>.w4_scales, <W>.w4_zeros])

with four new function parameters per layer: ``<W>.w4`` uint8 [N, K/2] (two INT4 codes per byte),
``<W>.w4_scales`` / ``<W>.w4_zeros`` float32 [N, K/group] and ``<W>.act_inv`` float32 [K] (1/f of the outlier
smoothing; ones without it). The activation bit-width is per layer (``ActQuantConfig.bits_for``), fixed at
compile time. Softmax, norms, RoPE and attention stay in float (they are not linear layers with weights).

The function keeps the ``nbits`` input of the any-precision operator so the runtime calls it the same way; it
is ignored here (the weights are INT4, the artifact's only bit-width is 4).
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..kernels.intgemm import act_quant_name, check_shape, int_gemm_name, make_act_quant, make_int_gemm
from ..quant.activations import ActQuantConfig, prepare_layer
from .anyprec_rewrite import AnyPrecRewrite, LinearSite, _Rewriter

KERNEL_PREFIXES = ("act_quant_", "int_gemm_w4_")


@relax.expr_functor.mutator
class _ActRewriter(_Rewriter._cls):
    def _linear(self, call, x, xs, wvar, layout, M, N, K):
        name = wvar.name
        cfg: ActQuantConfig = self.owner.cfg
        bits = cfg.bits_for(name.removesuffix(".weight"))
        why = check_shape(K, cfg.group_size)
        if name in self.eligible and (bits is None or why):
            self.owner.report.skipped.setdefault(name, why or "float activations requested (a16_layers)")
        if name not in self.eligible or bits is None or why:
            return self._fallback(call, x, xs, wvar, layout, M, N, K)
        self._site(name, N, K, layout, M)
        self.owner.act_bits[name] = bits
        gs = cfg.group_size
        G = K // gs
        aq = self._kernel(act_quant_name(M, K, bits, gs), lambda: make_act_quant(M, K, bits, gs))
        gm = self._kernel(int_gemm_name(M, N, K, gs), lambda: make_int_gemm(M, N, K, gs))
        inv = self._param(f"{name}.act_inv", [K], "float32")
        wp = self._param(f"{name}.w4", [N, K // 2], "uint8")
        ws = self._param(f"{name}.w4_scales", [N, G], "float32")
        wz = self._param(f"{name}.w4_zeros", [N, G], "float32")
        x2 = x if len(xs) == 2 else self.builder_.emit(relax.op.reshape(x, [M, K]))
        q = self.builder_.emit(relax.call_tir(aq, [x2, inv], [relax.TensorType([M, K], "int8"),
                                                              relax.TensorType([M], "float32"),
                                                              relax.TensorType([M, G], "int32")]))
        y = relax.call_tir(gm, [relax.TupleGetItem(q, 0), relax.TupleGetItem(q, 1), relax.TupleGetItem(q, 2),
                                wp, ws, wz], relax.TensorType([M, N], "float32"))
        if len(xs) != 2:
            y = relax.op.reshape(self.builder_.emit(y), xs[:-1] + [N])
        return y


class ActQuantRewrite(AnyPrecRewrite):
    """Rewrite every eligible linear layer into act-quantize + INT4 GEMM (module-pass-like callable); after the
    call, ``report`` says what was rewritten and ``act_bits`` the activation bits of each rewritten weight."""

    rewriter = _ActRewriter

    def __init__(self, cfg: ActQuantConfig, exclude=("lm_head",), functions=None):
        super().__init__(4, 4, exclude, functions)
        self.cfg = cfg
        if cfg.outlier == "keep":
            raise ValueError("outlier='keep' is not supported by the integer kernels: use 'smooth' or 'none'")
        self.act_bits: dict = {}


def layer_tensors(site: LinearSite, w: np.ndarray, cfg: ActQuantConfig, act_absmax=None) -> dict:
    """The parameters of one rewritten layer from its float weight W [N, K] (torch layout)."""
    if cfg.outlier == "keep":
        raise ValueError("outlier='keep' (float outlier channels) exists in the torch fake-quant path only; "
                         "the integer kernels take 'smooth' or 'none'")
    layer = prepare_layer(site.name, w, cfg, act_absmax)
    inv = layer.inv_factor if layer.inv_factor is not None else np.ones(site.K, np.float32)
    return {f"{site.name}.w4": layer.w4.packed(), f"{site.name}.w4_scales": layer.w4.scales,
            f"{site.name}.w4_zeros": layer.w4.zeros, f"{site.name}.act_inv": inv.astype(np.float32)}


def schedule_kernels(mod):
    """Hand-schedule the act_quant / int_gemm kernels; mark them opaque to FuseOps. -> (mod, {kernel: how})."""
    from ..schedules.intgemm_cpu import schedule_act_quant_cpu, schedule_int_gemm_cpu

    how = {}
    for gv, f in list(mod.functions_items()):
        if not (isinstance(f, tvm.tirx.PrimFunc) and gv.name_hint.startswith(KERNEL_PREFIXES)):
            continue
        sched = schedule_act_quant_cpu(f) if gv.name_hint.startswith("act_quant_") else schedule_int_gemm_cpu(f)
        mod[gv] = sched.with_attr("op_pattern", 8)
        how[gv.name_hint] = "default"
    return mod, how
