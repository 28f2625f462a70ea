"""aarch64 variants of the integer GEMM (``int_gemm``, out="float" and out="acc"), chosen per target features.

* ``neon``: the generic CPU schedule (``schedule_int_gemm_cpu``); on aarch64 LLVM turns its int32 lanes of
  int8 x int4 products into smlal/smlal2 (16-bit multiply-accumulate long). Any aarch64 CPU.
* ``sdot`` (+dotprod), ``smmla`` (+i8mm), ``packed`` (W4A4 only): hand-written kernels with the same buffers,
  see ``kernels.intgemm_arm``.

``variant_for(features, M, act_bits)`` picks the best one a feature list allows ("packed" only on request);
``schedule_int_gemm_arm(func, variant, target)`` turns a ``make_int_gemm`` PrimFunc into that variant.
A kernel with sdot/smmla built for an LLVM target without the feature aborts the whole process inside LLVM
("Cannot select"), so those variants need the target (or its feature list) and are refused with
``ArmVariantError`` when it lacks the feature.
"""
from __future__ import annotations

from ..errors import ArmVariantError  # noqa: F401  (re-exported)

import tvm

from ..kernels.intgemm_arm import make_int_gemm_arm, unsupported
from .intgemm_cpu import schedule_int_gemm_cpu

# variant -> (the CPU feature it needs, what it does)
VARIANTS = {
    "neon": ("neon", "generic schedule, NEON smlal/smlal2 on 16-bit lanes"),
    "sdot": ("dotprod", "sdot: 4 x (4 int8 products) per instruction, one weight row x 16 columns"),
    "smmla": ("i8mm", "smmla: (2 tokens x 8) . (8 x 2 rows) -> 2x2 int32 per instruction"),
    "packed": ("neon", "W4A4 only: two rows' 4-bit products in one 16-bit multiply (Agile-Quant)"),
}


def variant_for(features, M: int, act_bits: int = 8) -> str:
    """The best variant for a preset's feature list: "smmla" with i8mm and M >= 2 (for M = 1 half of every
    smmla is padding), else "sdot" with dotprod, else "neon". "packed" is never chosen here (ask for it);
    ``act_bits`` does not change the choice (sdot/smmla/neon are exact for A8 and A4)."""
    feats = set(features or ())
    if "i8mm" in feats and M >= 2:
        return "smmla"
    if "dotprod" in feats:
        return "sdot"
    return "neon"


def target_features(target) -> list | None:
    """The aarch64 features among VARIANTS' needs that ``target`` has: a feature list, a preset dict
    (``targets.preset``), a target dict or a ``tvm.target.Target`` (mcpu implies features, asked from LLVM)."""
    if target is None:
        return None
    if isinstance(target, (list, tuple, set)):
        return sorted({str(f).lstrip("+") for f in target})
    if isinstance(target, dict) and "features" in target:
        return list(target["features"])
    if isinstance(target, dict) and "target" in target:
        target = target["target"]
    tgt = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    if "aarch64" not in str(tgt.attrs.get("mtriple", "")):
        return []
    from tvm.target import codegen
    return [f for f in ("neon", "dotprod", "i8mm") if codegen.target_has_features(f, tgt)]


def check_variant(variant: str, target) -> None:
    """Raise ArmVariantError when ``variant`` is unknown or ``target`` lacks its feature."""
    if variant not in VARIANTS:
        raise ArmVariantError(f"unknown int_gemm variant {variant!r}; ARM variants: {', '.join(VARIANTS)}")
    need = VARIANTS[variant][0]
    if need == "neon":
        return
    feats = target_features(target)
    if feats is None:
        raise ArmVariantError(f"the {variant} variant uses +{need} instructions: pass the target (or its feature "
                              f"list) so that it can be checked; LLVM aborts the process on a target without it")
    if need not in feats:
        raise ArmVariantError(f"the {variant} variant needs the aarch64 '+{need}' feature, which the target lacks "
                              f"(features: {', '.join(feats) or 'none'}): use a +{need} target (e.g. "
                              f"{'arm-dotprod' if need == 'dotprod' else 'arm-i8mm'}) or the "
                              f"'{variant_for(feats, 2)}' variant")


def gemm_shape(func: tvm.tirx.PrimFunc) -> dict:
    """(M, N, K, group_size, out) of a ``make_int_gemm`` PrimFunc, from its buffers."""
    bufs = list(func.params)   # TVM 0.27: the params are the buffers
    shapes = [[int(s) for s in b.shape] for b in bufs]
    if len(bufs) == 3:      # XQ, WP, ACC
        (M, K), (N, _), (_, _, G), out = shapes[0], shapes[1], shapes[2], "acc"
    elif len(bufs) == 7:    # XQ, XS, XSUM, WP, WS, WZ, Y
        (M, K), (N, _), (_, G), out = shapes[0], shapes[3], shapes[2], "float"
    else:
        raise ValueError(f"not an int_gemm kernel: {len(bufs)} buffers")
    return {"M": M, "N": N, "K": K, "group_size": K // G, "out": out}


def schedule_int_gemm_arm(func: tvm.tirx.PrimFunc, variant: str, target=None,
                          act_bits: int | None = None) -> tvm.tirx.PrimFunc:
    """``func`` (from ``make_int_gemm``, either output) as the ``variant`` kernel, marked scheduled.

    ``target``: a feature list, preset dict, target dict or Target; required by sdot/smmla (checked, see
    ``check_variant``). ``act_bits``: the activations' bit-width; "packed" needs 4. ValueError (ArmVariantError)
    when the variant cannot serve this kernel (feature, group size, activation bits)."""
    check_variant(variant, target)
    if variant == "neon":
        out = schedule_int_gemm_cpu(func)
    else:
        s = gemm_shape(func)
        why = unsupported(variant, s["K"], s["group_size"], act_bits if variant == "packed" else None)
        if why:
            raise ArmVariantError(why)
        out = make_int_gemm_arm(s["M"], s["N"], s["K"], s["group_size"], s["out"], variant, act_bits)
    return out.with_attr("tirx.is_scheduled", True).with_attr("tvm_anyprec.arm_variant", variant)


def pick_variant(features, func: tvm.tirx.PrimFunc, act_bits: int | None, variant: str | None = None) -> str:
    """The variant ``schedule_kernels`` uses for one kernel: ``variant`` when given (but "packed" only where
    the kernel serves 4-bit activations alone, the best feature variant otherwise), else ``variant_for``;
    a hand kernel the shape does not fit (group size) falls back to "neon"."""
    s = gemm_shape(func)
    v = variant or variant_for(features, s["M"], act_bits or 8)
    if v == "packed" and act_bits != 4:
        v = variant_for(features, s["M"], act_bits or 8)
    if v != "neon" and v in VARIANTS and unsupported(v, s["K"], s["group_size"], act_bits) and variant is None:
        v = "neon"
    return v
