"""A chunk function's twin without logits: ``<fn>_cache`` (e.g. ``prefill_cache``) fills the KV cache and returns
only the caches, so its lm_head (49152 x 576 for SmolLM2: 1.8 GFLOP per 32-token chunk) and final norm are gone.

A prompt longer than one chunk needs logits for its last token only (the first generated token), so every
chunk but the last runs the twin (``runtime.Session.forward_tokens(..., logits="last")``), as llama.cpp computes
the output rows of the batch's last token only. Perplexity (every position's logits) keeps the full function.
"""
from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.utils import copy_with_new_vars

from ..artifact import CACHE_ONLY as SUFFIX


def cache_only(mod: tvm.IRModule, fname: str, n_in: int) -> tuple[tvm.IRModule, list[str]] | None:
    """Add ``fname + SUFFIX``: ``fname`` (its first ``n_in`` params the inputs, then the weights) returning its
    outputs but the first (the logits). Returns (module, the twin's weight names), or None when ``fname`` does
    not end in a tuple binding whose first field is followed by others (nothing to drop)."""
    func = mod[fname]
    body = func.body
    if not (isinstance(body, relax.SeqExpr) and body.blocks and isinstance(body.body, relax.Var)):
        return None
    block = body.blocks[-1]
    last = block.bindings[-1] if len(block.bindings) else None
    if last is None or not last.var.same_as(body.body) or not isinstance(last.value, relax.Tuple) or \
            len(last.value.fields) < 2:
        return None
    fields = list(last.value.fields[1:])
    out = relax.Var(last.var.name, relax.TupleType([f.ty for f in fields]))
    bindings = list(block.bindings[:-1]) + [relax.VarBinding(out, relax.Tuple(fields))]
    blk = (relax.DataflowBlock if isinstance(block, relax.DataflowBlock) else relax.BindingBlock)(bindings)
    name = fname + SUFFIX
    twin = relax.Function(func.params, relax.SeqExpr(list(body.blocks[:-1]) + [blk], out), out.ty, func.is_pure,
                          func.attrs).with_attr("global_symbol", name)
    mod[name] = copy_with_new_vars(twin)   # a Relax variable is defined in one function only
    entries = [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, relax.Function)]
    mod = relax.transform.DeadCodeElimination(entries)(mod)
    twin = mod[name]
    used = {v.name for v in relax.analysis.free_vars(twin.body)}
    params = list(twin.params[:n_in]) + [p for p in twin.params[n_in:] if p.name in used]
    mod[name] = relax.Function(params, twin.body, twin.ret_ty, twin.is_pure, twin.attrs)
    return mod, [p.name for p in params[n_in:]]
