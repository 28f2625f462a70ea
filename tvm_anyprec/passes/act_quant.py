"""Relax pass: rewrite linear layers into low-bit-activation integer operators (W4A8 / W4A4).

Every eligible ``matmul(x, W^T)`` / ``matmul(x, W)`` (the same matching, eligibility and fp32 fallback as
``AnyPrecRewrite``) becomes

    (xq, xs, xsum) = call_tir(act_quant_a{bits}, [x, <W>.act_inv])       fused per-token quantization
    y              = call_tir(int_gemm_w4, [xq, xs, xsum, <W>.w4, <W>.w4_scales, <W>.w4_zeros])

with four new function parameters per layer: ``<W>.w4`` uint8 [N, K/2] (two INT4 codes per byte),
``<W>.w4_scales`` / ``<W>.w4_zeros`` float32 [N, K/group] and ``<W>.act_inv`` float32 [K] (1/f of the outlier
smoothing; ones without it). The activation bit-width is per layer (``ActQuantConfig.bits_for``), fixed at
compile time. Softmax, norms, RoPE and attention stay in float (they are not linear layers with weights).

On GPU targets (``words=True``) the kernels are the word form of ``kernels.intgemm`` (WGSL has no 8-bit
types): ``<W>.w4`` is uint32 [N, K/8] (the same bytes) and the quantized activations travel as uint32 words.

The function keeps the ``nbits`` input of the any-precision operator so the runtime calls it the same way; it
is ignored here (the weights are INT4, the artifact's only bit-width is 4).
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..kernels.intgemm import (act_quant_name, check_shape, check_words, int_gemm_name, make_act_quant,
                               make_int_gemm)
from ..quant.activations import ActQuantConfig, prepare_layer
from .anyprec_rewrite import AnyPrecRewrite, LinearSite, _Rewriter

KERNEL_PREFIXES = ("act_quant_", "int_gemm_w4_")


@relax.expr_functor.mutator
class _ActRewriter(_Rewriter._cls):
    def _linear(self, call, x, xs, wvar, layout, M, N, K):
        name = wvar.name
        cfg: ActQuantConfig = self.owner.cfg
        bits = cfg.bits_for(name.removesuffix(".weight"))
        words = self.owner.words
        why = check_shape(K, cfg.group_size) or (check_words(K) if words else None)
        if name in self.eligible and (bits is None or why):
            self.owner.report.skipped.setdefault(name, why or "float activations requested (a16_layers)")
        if name not in self.eligible or bits is None or why:
            return self._fallback(call, x, xs, wvar, layout, M, N, K)
        self._site(name, N, K, layout, M)
        self.owner.act_bits[name] = bits
        gs = cfg.group_size
        G = K // gs
        aq = self._kernel(act_quant_name(M, K, bits, gs), lambda: make_act_quant(M, K, bits, gs, words=words))
        gm = self._kernel(int_gemm_name(M, N, K, gs), lambda: make_int_gemm(M, N, K, gs, words=words))
        inv = self._param(f"{name}.act_inv", [K], "float32")
        wp = self._param(f"{name}.w4", [N, K // 8] if words else [N, K // 2], "uint32" if words else "uint8")
        xq_type = relax.TensorType([M, K // 4], "uint32") if words else relax.TensorType([M, K], "int8")
        ws = self._param(f"{name}.w4_scales", [N, G], "float32")
        wz = self._param(f"{name}.w4_zeros", [N, G], "float32")
        x2 = x if len(xs) == 2 else self.builder_.emit(relax.op.reshape(x, [M, K]))
        q = self.builder_.emit(relax.call_tir(aq, [x2, inv], [xq_type,
                                                              relax.TensorType([M], "float32"),
                                                              relax.TensorType([M, G], "int32")]))
        y = relax.call_tir(gm, [relax.TupleGetItem(q, 0), relax.TupleGetItem(q, 1), relax.TupleGetItem(q, 2),
                                wp, ws, wz], relax.TensorType([M, N], "float32"))
        if len(xs) != 2:
            y = relax.op.reshape(self.builder_.emit(y), xs[:-1] + [N])
        return y


class ActQuantRewrite(AnyPrecRewrite):
    """Rewrite every eligible linear layer into act-quantize + INT4 GEMM (module-pass-like callable); after the
    call, ``report`` says what was rewritten and ``act_bits`` the activation bits of each rewritten weight.
    ``words``: the GPU (word) form of the kernels and of ``<W>.w4``."""

    rewriter = _ActRewriter

    def __init__(self, cfg: ActQuantConfig, exclude=("lm_head",), functions=None, words: bool = False):
        super().__init__(4, 4, exclude, functions)
        self.cfg = cfg
        self.words = words
        self.report.operator = "act-quantize + INT4 GEMM (low-bit activations)"
        if cfg.outlier == "keep":
            raise ValueError("outlier='keep' is not supported by the integer kernels: use 'smooth' or 'none'")
        self.act_bits: dict = {}


def layer_tensors(site: LinearSite, w: np.ndarray, cfg: ActQuantConfig, act_absmax=None,
                  words: bool = False) -> dict:
    """The parameters of one rewritten layer from its float weight W [N, K] (torch layout); ``words``: the GPU
    form (``<W>.w4`` as uint32 [N, K/8], the same bytes)."""
    if cfg.outlier == "keep":
        raise ValueError("outlier='keep' (float outlier channels) exists in the torch fake-quant path only; "
                         "the integer kernels take 'smooth' or 'none'")
    layer = prepare_layer(site.name, w, cfg, act_absmax)
    inv = layer.inv_factor if layer.inv_factor is not None else np.ones(site.K, np.float32)
    packed = np.ascontiguousarray(layer.w4.packed())
    return {f"{site.name}.w4": packed.view(np.uint32) if words else packed, f"{site.name}.w4_scales": layer.w4.scales,
            f"{site.name}.w4_zeros": layer.w4.zeros, f"{site.name}.act_inv": inv.astype(np.float32)}


def int_gemm_act_bits(mod) -> dict:
    """{int_gemm kernel name: set of activation bit-widths of the layers calling it} from the Relax call sites
    (a kernel is shared by every layer of its shape; the bits come from the act_quant kernel feeding it)."""
    import re

    call_tir = tvm.ir.Op.get("relax.call_tir")
    out: dict = {}
    for _gv, f in mod.functions_items():
        if not isinstance(f, relax.Function):
            continue
        bound = {}
        for block in f.body.blocks:
            for b in block.bindings:
                if isinstance(b, relax.VarBinding):
                    bound[b.var] = b.value
        for value in bound.values():
            if not (isinstance(value, relax.Call) and value.op.same_as(call_tir)):
                continue
            name = value.args[0].name_hint
            if not name.startswith("int_gemm_w4_"):
                continue
            src = value.args[1].fields[0]
            src = bound.get(src, src)
            if isinstance(src, relax.TupleGetItem):
                src = bound.get(src.tuple_value, src.tuple_value)
            m = None
            if isinstance(src, relax.Call) and src.op.same_as(call_tir):
                m = re.match(r"act_quant_m\d+_k\d+_a(\d+)_g\d+$", src.args[0].name_hint)
            out.setdefault(name, set()).add(int(m.group(1)) if m else None)
    return out


def schedule_kernels(mod, tp: dict | None = None, variant: str | None = None, choices: dict | None = None):
    """Hand-schedule the act_quant / int_gemm kernels; mark them opaque to FuseOps. -> (mod, {kernel: how}).

    ``tp``: the target preset (``targets.preset``). For an aarch64 preset the int_gemm kernels become the ARM
    variant its features allow (``schedules.intgemm_arm.variant_for``; how = "default:<variant>"); ``variant``
    forces one ("neon", "sdot", "smmla", "packed"; ArmVariantError when the preset lacks its feature).
    "packed" applies to the kernels that serve only 4-bit-activation layers; the others get the preset's
    best variant. ``choices``: {kernel: variant} measured by ``tuning.tune_int_gemm_variants`` (how =
    "tuned:<variant>"), used where the preset has the variant's feature and the kernel's shape allows it.
    A GPU preset (CUDA, WebGPU, Vulkan) gets ``schedules.intgemm_gpu`` (the kernels must be the word form)."""
    from ..schedules.intgemm_cpu import schedule_act_quant_cpu, schedule_int_gemm_cpu

    if tp is not None and tp.get("device"):
        return _schedule_gpu(mod, tp, variant)
    arm = tp is not None and tp.get("arch") == "aarch64"
    if variant is not None and not arm:
        raise ValueError(f"int_gemm variant {variant!r} is for aarch64 targets; target is "
                         f"{(tp or {}).get('name', 'the default CPU')}")
    if arm:
        from ..schedules.intgemm_arm import VARIANTS, pick_variant, schedule_int_gemm_arm, target_features
        feats = target_features(tp)
        act_bits = int_gemm_act_bits(mod)
    how = {}
    for gv, f in list(mod.functions_items()):
        if not (isinstance(f, tvm.tirx.PrimFunc) and gv.name_hint.startswith(KERNEL_PREFIXES)):
            continue
        if gv.name_hint.startswith("act_quant_"):
            sched, kind = schedule_act_quant_cpu(f), "default"
        elif arm:
            bits = act_bits.get(gv.name_hint, set())
            ab = 4 if bits == {4} else (max(b or 8 for b in bits) if bits else None)
            v = pick_variant(feats, f, ab, variant)
            kind = f"default:{v}"
            tuned = (choices or {}).get(gv.name_hint) if variant is None else None
            if tuned is not None and tuned != v and pick_variant(feats, f, ab, tuned) == tuned and \
                    VARIANTS.get(tuned, ("?",))[0] in set(feats) | {"neon"}:
                v = tuned
            if tuned == v:
                kind = f"tuned:{v}"
            sched = schedule_int_gemm_arm(f, v, feats, ab)
        else:
            sched, kind = schedule_int_gemm_cpu(f), "default"
        mod[gv] = sched.with_attr("op_pattern", 8)
        how[gv.name_hint] = kind
    return mod, how


def _schedule_gpu(mod, tp: dict, variant: str | None):
    from ..schedules.gpu import max_threads_of
    from ..schedules.intgemm_gpu import schedule_act_quant_gpu, schedule_int_gemm_gpu

    if variant is not None:
        raise ValueError(f"int_gemm variant {variant!r} is for aarch64 targets; target is {tp.get('name')}")
    threads = max_threads_of(tvm.target.Target(tp["target"]))
    how = {}
    for gv, f in list(mod.functions_items()):
        if not (isinstance(f, tvm.tirx.PrimFunc) and gv.name_hint.startswith(KERNEL_PREFIXES)):
            continue
        hand = schedule_act_quant_gpu if gv.name_hint.startswith("act_quant_") else schedule_int_gemm_gpu
        mod[gv] = hand(f, threads).with_attr("op_pattern", 8)
        how[gv.name_hint] = "default"
    return mod, how
