"""Schedule rules, one per (kernel family, target class), and the one dispatch over them (dlight's style).

A rule says which kernel families and targets it serves (``families``, ``is_target_available``) and gives

* ``apply(func, ctx)``: the hand schedule, a scheduled PrimFunc marked ``tirx.is_scheduled``, and how it was
  chosen ("default", or "default:<variant>" / "tuned:<variant>" for the ARM integer GEMM);
* ``hand(func, target)``: the hand schedule as a ``Schedule`` whose trace MetaSchedule can store as a record
  (None where the rule has no design space);
* ``space(target)``: the MetaSchedule design space (a ScheduleFn), or None: such kernels are not tuned.

``rule_for(spec, target)`` picks the rule; ``schedule_kernels`` gives every kernel of a module its schedule,
a tuned one where ``tuned(func)`` finds a record, else the rule's. Nothing here picks a kernel by its name:
the family comes from the kernel's spec (``kernels.spec.spec_of``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import tvm

from ..kernels.registry import int_gemm_act_bits, spec_of
from ..targets import is_gpu, is_webgpu
from . import cpu, gpu, intgemm_cpu, intgemm_gpu


@dataclass
class Context:
    """What a rule may need beyond the kernel: the target, and for the ARM integer GEMM the preset's features,
    the activation bits of the layers each kernel serves, a forced variant and measured variant choices."""
    target: tvm.target.Target
    features: list | None = None
    act_bits: dict = field(default_factory=dict)
    variant: str | None = None
    choices: dict = field(default_factory=dict)
    rows: dict = field(default_factory=dict)   # {bitplane kernel: {bit-width: rows per task}} (tune.bitplane)
    kernel: str = ""          # the name of the kernel being scheduled (variant tables are keyed by it)


def _aarch64(target) -> bool:
    return "aarch64" in str(target.attrs.get("mtriple", ""))


class ScheduleRule:
    families: tuple = ()
    gpu: bool = False

    def is_target_available(self, target) -> bool:
        return is_gpu(target) == self.gpu

    def apply(self, func, ctx: Context):
        return self.hand(func, ctx.target).mod["main"].with_attr("tirx.is_scheduled", True), "default"

    def hand(self, func, target):
        return None

    def space(self, target):
        return None


def _schedule_fn(fn, target):
    from tvm.s_tir import meta_schedule as ms

    if is_webgpu(target):     # MetaSchedule has no webgpu defaults: the space is complete as it is
        return ms.space_generator.ScheduleFn(fn, sch_rules=[], postprocs=[], mutator_probs={})
    return ms.space_generator.ScheduleFn(fn)


class LinearCPU(ScheduleRule):
    """Bitplane and fp32 dense linear kernels on CPUs (x86 and aarch64): schedules.cpu."""
    families = ("anyprec_linear", "dense_nt")

    def hand(self, func, target):
        return cpu.hand_schedule(func)

    def space(self, target):
        return _schedule_fn(cpu.linear_space_cpu, target)


class LutCPU(ScheduleRule):
    """The CPU bitplane operator (kernels.lut_cpu): explicit loops, scheduled as built (its instruction set was
    chosen from the target when the kernel was made). Its one knob, rows per parallel task per bit-width, is a
    measured choice (``tune.bitplane``, ``ctx.rows``), not a MetaSchedule space: rebuilt with it when measured."""
    families = ("anyprec_cpu",)

    def apply(self, func, ctx):
        spec = spec_of(func)
        if spec is None:
            return func, "default"
        rows = ctx.rows.get(ctx.kernel)
        if not rows:
            return func, f"default:{spec.mode}/{spec.isa}"
        from ..kernels.lut_cpu import build_with_rows
        return build_with_rows(spec, rows), "tuned:rows=" + ",".join(f"{b}:{r}" for b, r in sorted(rows.items()))


class AttentionCPU(ScheduleRule):
    """The in-place cache write and attention (kernels.attention), the embedding lookup of a tied lm_head
    (kernels.embed) and the fp32 dense GEMM at M > 1 (kernels.dense): explicit loops, scheduled as built."""
    families = ("cache_attention", "anyprec_embed", "dense_nt_cpu")

    def apply(self, func, ctx):
        return func, "default"


class LinearGPU(ScheduleRule):
    """The same kernels on CUDA/WebGPU/Vulkan: schedules.gpu (the dense prefill kernel becomes two blocks)."""
    families = ("anyprec_linear", "dense_nt")
    gpu = True

    def hand(self, func, target):
        return gpu.hand_schedule(func, gpu.max_threads_of(target))

    def space(self, target):
        return _schedule_fn(partial(gpu.linear_space_gpu, max_threads=gpu.max_threads_of(target)), target)


class ActQuantCPU(ScheduleRule):
    families = ("act_quant",)

    def apply(self, func, ctx):
        return intgemm_cpu.schedule_act_quant_cpu(func), "default"


class ActQuantGPU(ScheduleRule):
    families = ("act_quant",)
    gpu = True

    def apply(self, func, ctx):
        return intgemm_gpu.schedule_act_quant_gpu(func, gpu.max_threads_of(ctx.target)), "default"


class IntGemmX86(ScheduleRule):
    families = ("int_gemm",)

    def is_target_available(self, target) -> bool:
        return not is_gpu(target) and not _aarch64(target)

    def apply(self, func, ctx):
        return intgemm_cpu.schedule_int_gemm_cpu(func), "default"


class IntGemmARM(ScheduleRule):
    """aarch64: the variant the preset's features allow (schedules.intgemm_arm), or the measured choice."""
    families = ("int_gemm",)

    def is_target_available(self, target) -> bool:
        return not is_gpu(target) and _aarch64(target)

    def apply(self, func, ctx):
        from .intgemm_arm import VARIANTS, pick_variant, schedule_int_gemm_arm, target_features

        feats = ctx.features if ctx.features is not None else target_features(ctx.target)
        name = ctx.kernel
        bits = ctx.act_bits.get(name, set())
        ab = 4 if bits == {4} else (max(b or 8 for b in bits) if bits else None)
        v = pick_variant(feats, func, ab, ctx.variant)
        kind = f"default:{v}"
        tuned = ctx.choices.get(name) if ctx.variant is None else None
        if tuned is not None and tuned != v and pick_variant(feats, func, ab, tuned) == tuned and \
                VARIANTS.get(tuned, ("?",))[0] in set(feats) | {"neon"}:
            v = tuned
        if tuned == v:
            kind = f"tuned:{v}"
        return schedule_int_gemm_arm(func, v, feats, ab), kind


class IntGemmGPU(ScheduleRule):
    families = ("int_gemm",)
    gpu = True

    def hand(self, func, target):
        return intgemm_gpu.hand_schedule(func, gpu.max_threads_of(target))

    def space(self, target):
        return _schedule_fn(partial(intgemm_gpu.int_gemm_space_gpu, max_threads=gpu.max_threads_of(target)),
                            target)


RULES = (LinearCPU(), LutCPU(), AttentionCPU(), LinearGPU(), ActQuantCPU(), ActQuantGPU(), IntGemmX86(), IntGemmARM(), IntGemmGPU())


_FAMILY_BLOCKS = (("acc", "int_gemm"), ("absmax", "act_quant"), ("matmul", "anyprec_linear"))


def family_of(func) -> str:
    """The kernel family of a PrimFunc: its spec's, or (a kernel built without a spec, e.g. by a test or a
    benchmark from ``make_*``) the one its blocks say, as dlight's rules read a function's structure."""
    spec = spec_of(func)
    if spec is not None:
        return spec.family
    sch = tvm.s_tir.Schedule(func)
    for block, family in _FAMILY_BLOCKS:
        if cpu._has_block(sch, block):
            return family
    raise ValueError("not one of the project's kernels (no spec, and no matmul/acc/absmax block)")


def rule_for(spec_or_family, target) -> ScheduleRule:
    """The rule that schedules kernels of a family (a spec, or its family name) on ``target`` (a tvm Target)."""
    family = getattr(spec_or_family, "family", spec_or_family)
    for rule in RULES:
        if family in rule.families and rule.is_target_available(target):
            return rule
    raise ValueError(f"no schedule rule for {family} kernels on {target.kind.name}")


def schedule_kernels(mod, tp: dict | None = None, variant: str | None = None, choices: dict | None = None,
                     tuned=None, rows: dict | None = None):
    """Schedule every kernel of ``mod`` built from a spec; mark them opaque to FuseOps (fusing a scheduled
    kernel with its neighbours would drop the schedule). -> (mod, {kernel name: how}).

    ``tp``: the target preset (``targets.preset``; None: this machine's CPU). ``tuned(func)``: a tuned
    PrimFunc for a kernel, or None (how = "tuned"). For an aarch64 preset the int_gemm kernels become the
    ARM variant its features allow; ``variant`` forces one ("neon", "sdot", "smmla", "packed";
    ArmVariantError when the preset lacks its feature; "packed" only where a kernel serves 4-bit activations
    alone); ``choices``: {kernel: variant} measured by ``tune.variants`` (how = "tuned:<variant>"); ``rows``:
    {bitplane kernel: {bit-width: rows per task}} measured by ``tune.bitplane`` (how = "tuned:rows=...")."""
    target = tvm.target.Target(tp["target"]) if tp is not None else tvm.target.Target("llvm")
    arm = tp is not None and tp.get("arch") == "aarch64" and not tp.get("device")
    if variant is not None and not arm:
        raise ValueError(f"int_gemm variant {variant!r} is for aarch64 targets; target is "
                         f"{(tp or {}).get('name', 'the default CPU')}")
    ctx = Context(target, variant=variant, choices=dict(choices or {}), rows=dict(rows or {}))
    if arm:
        from .intgemm_arm import target_features
        ctx.features, ctx.act_bits = target_features(tp), int_gemm_act_bits(mod)
    how = {}
    for gv, f in list(mod.functions_items()):
        spec = spec_of(f) if isinstance(f, tvm.tirx.PrimFunc) else None
        if spec is None:
            continue
        sched = tuned(f) if tuned is not None else None
        if sched is not None:
            kind = "tuned"
        else:
            ctx.kernel = gv.name_hint
            sched, kind = rule_for(spec, target).apply(f, ctx)
        mod[gv] = sched.with_attr("op_pattern", 8)
        how[gv.name_hint] = kind
    return mod, how
