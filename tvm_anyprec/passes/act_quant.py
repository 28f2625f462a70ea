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

from tvm import relax

from ..kernels.intgemm import ActQuant, IntGemm, check_shape, check_words
from ..kernels.registry import int_gemm_act_bits  # noqa: F401  (re-exported)
from ..quant.activations import ActQuantConfig
from .anyprec_rewrite import AnyPrecRewrite, _Rewriter


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
        aq = self._kernel(ActQuant(M, K, bits, gs, words=words))
        gm = self._kernel(IntGemm(M, N, K, gs, words=words))
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

    def tied_unsupported(self) -> str | None:
        return "the integer GEMM path has no embedding lookup"

    def __init__(self, cfg: ActQuantConfig, exclude=("lm_head",), functions=None, words: bool = False):
        super().__init__(4, 4, exclude, functions)
        self.cfg = cfg
        self.words = words
        self.report.operator = "act-quantize + INT4 GEMM (low-bit activations)"
        if cfg.outlier == "keep":
            raise ValueError("outlier='keep' is not supported by the integer kernels: use 'smooth' or 'none'")
        self.act_bits: dict = {}
