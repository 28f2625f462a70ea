"""Relax pass: rewrite linear layers into calls of the bitplane any-precision operator.

A linear layer is ``R.matmul(x, W^T)`` (torch Linear / ONNX Gemm(transB=1): ``permute_dims(W)`` with W
[N, K]) or ``R.matmul(x, W)`` (ONNX MatMul with a [K, N] initializer), W being a *weight parameter* of the
function (the ONNX initializers, imported with ``keep_params_in_input=True``) or a constant. A bias
``add`` that follows stays a Relax add (it fuses with the surrounding elementwise ops).

Each rewritten weight W becomes two new function parameters ``<name>.planes`` (uint32 [B, N, ceil(K/32)])
and ``<name>.luts`` (float16 [N, 2^(B+1) - 2^MINB]) and the call gets one more input, ``nbits`` (int32 [1]),
so the same buffers serve every bit-width and the bit-width is picked per call. Several functions (decode,
prefill) may share the weights: parameters are matched by name.

A weight both gathered (``take``: an embedding) and multiplied (a tied embedding/lm_head) is one layer on CPU
targets: the product runs the bitplane operator and the lookup decodes its rows from the same planes
(``kernels.embed``) at the same bit-width. Exclude patterns match it by its own name and as "lm_head".

Not rewritten (and reported): weights matching an exclude pattern, weights also used by another op, tied
weights on GPU targets (no embedding kernel there) or missing from the parent, non-static shapes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

from ..kernels.anyprec import AnyPrecLinear, lut_width
from ..kernels.dense import TILED_MIN_M, DenseNT, DenseNTCPU
from ..kernels.embed import AnyPrecEmbed
from ..kernels.lut_cpu import AnyPrecCPU, table_width
from ..quant.byteslice import TABLE_DTYPE, row_bytes
from ..quant.bitplanes import num_words
from ..quant.patterns import matches_any

NBITS_NAME = "nbits"
TIED_ALIAS = "lm_head.weight"   # the name exclude patterns and parents know a tied embedding/lm_head by


@dataclass
class LinearSite:
    name: str               # original weight name, e.g. model.layers.0.self_attn.q_proj.weight
    N: int
    K: int
    layout: str             # "nk": W is [N, K] used through permute_dims; "kn": W is [K, N]
    M: dict = field(default_factory=dict)  # function -> rows of X at that call
    tied: bool = False      # also the embedding (its lookup decodes rows from the same planes)


@dataclass
class RewriteReport:
    rewritten: dict = field(default_factory=dict)   # name -> LinearSite
    skipped: dict = field(default_factory=dict)     # name -> reason
    functions: dict = field(default_factory=dict)   # function -> ordered param names (after inputs)
    tied: set = field(default_factory=set)          # rewritten weights that are also an embedding
    operator: str = "the bitplane operator"

    def summary(self) -> str:
        lines = [f"rewrote {len(self.rewritten)} linear layers to {self.operator}"]
        shapes = {}
        for s in self.rewritten.values():
            shapes.setdefault((s.N, s.K), 0)
            shapes[(s.N, s.K)] += 1
        lines += [f"  {n}x{k}: {c} layers" for (n, k), c in sorted(shapes.items())]
        for n in sorted(self.tied):
            lines.append(f"  {n}: the lm_head and the embedding (its lookup decodes rows from the same planes)")
        for n, why in self.skipped.items():
            lines.append(f"  kept in fp32: {n} ({why})")
        return "\n".join(lines)


def _static_shape(expr) -> list[int] | None:
    ty = expr.ty
    shape = getattr(ty, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return None
    out = []
    for v in shape.values:
        if not isinstance(v, tvm.tirx.IntImm):
            return None
        out.append(int(v))
    return out


def _weight_uses(func: relax.Function, weights: set) -> dict:
    """For each weight var: the set of op names that consume it (directly or through permute_dims)."""
    uses: dict = {w: set() for w in weights}
    alias: dict = {}   # var bound to permute_dims(weight) -> weight
    perm = tvm.ir.Op.get("relax.permute_dims")

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            for a in e.args:
                base = alias.get(a, a) if isinstance(a, relax.Var) else None
                if base is not None and base in uses:
                    op = e.op.name if not (e.op.same_as(perm) and a in weights) else "permute_dims"
                    if op == "relax.take" and not (a.same_as(e.args[0]) and a in weights and
                                                   (e.attrs.axis is None or int(e.attrs.axis) == 0)):
                        op = "take (not an embedding lookup)"
                    uses[base].add(op)

    for block in func.body.blocks:
        for b in block.bindings:
            v = b.value
            if isinstance(v, relax.Call) and v.op.same_as(perm) and len(v.args) == 1 and v.args[0] in weights:
                alias[b.var] = v.args[0]
            relax.analysis.post_order_visit(v, visit)
    return uses


def _linear_weight(func_weights: set, lookup, w_expr):
    """-> (weight var, layout) if w_expr is a weight param or permute_dims(weight param), else None."""
    perm = tvm.ir.Op.get("relax.permute_dims")
    if isinstance(w_expr, relax.Var) and w_expr in func_weights:
        return w_expr, "kn"
    if isinstance(w_expr, relax.Var):
        bound = lookup(w_expr)
        if isinstance(bound, relax.Call) and bound.op.same_as(perm) and len(bound.args) == 1:
            src = bound.args[0]
            axes = bound.attrs.axes
            if src in func_weights and (axes is None or [int(a) for a in axes] == [1, 0]):
                return src, "nk"
    return None


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, owner, fname, weights, eligible):
        super().__init__(mod)
        self.owner, self.fname, self.weights, self.eligible = owner, fname, weights, eligible
        self.new_params: dict = {}     # param name -> relax.Var (this function's)
        self.nbits = relax.Var(NBITS_NAME, relax.TensorType([1], "int32"))

    def _param(self, name, shape, dtype):
        if name not in self.new_params:
            self.new_params[name] = relax.Var(name, relax.TensorType(shape, dtype))
        return self.new_params[name]

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.take":
            return self._embedding(call)
        if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.shape_of" and \
                isinstance(call.args[0], relax.Var) and call.args[0].name in self.eligible:
            return relax.ShapeExpr(_static_shape(call.args[0]))   # the weight parameter goes away
        m = self._match_linear(call)
        return call if m is None else self._linear(call, *m)

    def _embedding(self, call):
        """``take(W, ids, axis=0)`` of a rewritten tied weight -> rows decoded from its planes."""
        w, ids = call.args[0], call.args[1]
        axis = call.attrs.axis
        if not (isinstance(w, relax.Var) and w in self.weights and w.name in self.eligible) or \
                (axis is not None and int(axis) != 0):
            return call
        ishape, wshape = _static_shape(ids), _static_shape(w)
        o = self.owner
        if ishape is None or o.cpu is None:
            return call
        N, K = wshape
        S = int(np.prod(ishape)) if ishape else 1
        mode = o.cpu["mode"]
        width = table_width(o.max_bits, o.min_bits)
        gv = self._kernel(AnyPrecEmbed(S, N, K, o.max_bits, o.min_bits, width, mode))
        planes = self._param(f"{w.name}.planes", [o.max_bits, N, row_bytes(K)], "uint8")
        tables = self._cpu_tables(w.name, N)
        flat = self.builder_.emit(relax.op.reshape(ids, [S]))
        if ids.ty.dtype != "int64":
            flat = self.builder_.emit(relax.op.astype(flat, "int64"))
        y = self.builder_.emit(relax.call_tir(gv, [flat, planes, *tables, self._bits_of(w.name)],
                                              relax.TensorType([S, K], "float32")))
        return relax.op.reshape(y, list(ishape) + [K])

    def _match_linear(self, call):
        """``matmul(x, W^T)`` / ``matmul(x, W)`` on a weight parameter with a static input [.., K] ->
        (x, x shape, W var, layout, M, N, K); None when ``call`` is not such a linear layer."""
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.matmul" and len(call.args) == 2):
            return None
        found = _linear_weight(self.weights, self.lookup_binding, call.args[1])
        if found is None:
            return None
        wvar, layout = found
        wshape = _static_shape(wvar)
        N, K = (wshape[0], wshape[1]) if layout == "nk" else (wshape[1], wshape[0])
        x = call.args[0]
        xs = _static_shape(x)
        if xs is None or len(xs) < 1 or xs[-1] != K:
            self.owner.report.skipped.setdefault(wvar.name, f"input shape {xs} is not static [.., {K}]")
            return None
        M = int(np.prod(xs[:-1])) if len(xs) > 1 else 1
        return x, xs, wvar, layout, M, N, K

    def _fallback(self, call, x, xs, wvar, layout, M, N, K):
        """A layer kept in fp32: still avoid materializing permute_dims(W) on every call."""
        return self._dense(x, xs, wvar, M, N, K) if layout == "nk" else call

    def _site(self, name, N, K, layout, M):
        site = self.owner.report.rewritten.setdefault(name, LinearSite(name, N, K, layout,
                                                                       tied=name in self.owner.report.tied))
        site.M[self.fname] = M
        return site

    def _linear(self, call, x, xs, wvar, layout, M, N, K):
        name = wvar.name
        if name not in self.eligible:
            return self._fallback(call, x, xs, wvar, layout, M, N, K)
        o = self.owner
        self._site(name, N, K, layout, M)
        if o.cpu is None:
            gv = self._kernel(AnyPrecLinear(M, N, K, o.max_bits, o.min_bits))
            planes = self._param(f"{name}.planes", [o.max_bits, N, num_words(K)], "uint32")
            luts = self._param(f"{name}.luts", [N, lut_width(o.max_bits, o.min_bits)], "float16")
            return self._emit(gv, x, xs, [planes, luts, self.nbits], M, N, K)
        mode = o.cpu["mode"]
        gv = self._kernel(AnyPrecCPU(M, N, K, o.max_bits, o.min_bits, mode, o.cpu["isa"]))
        planes = self._param(f"{name}.planes", [o.max_bits, N, row_bytes(K)], "uint8")
        return self._emit(gv, x, xs, [planes, *self._cpu_tables(name, N), self._bits_of(name)], M, N, K)

    def _cpu_tables(self, name: str, N: int) -> list:
        """The CPU kernels' table parameters of a rewritten weight (linear layer and embedding alike): the fp16
        LUTs (exact mode), or the int16 tables and their per-row scales (int8 mode)."""
        o = self.owner
        width = table_width(o.max_bits, o.min_bits)
        if o.cpu["mode"] == "exact":
            return [self._param(f"{name}.luts", [N, width], "float16")]
        return [self._param(f"{name}.tabs", [N, width], TABLE_DTYPE),
                self._param(f"{name}.scales", [N, o.max_bits - o.min_bits + 1], "float32")]

    def _bits_of(self, name: str):
        """The bits input of a rewritten weight's kernel: the call's, or a pinned tied embedding/lm_head's."""
        o = self.owner
        if o.tied_bits is not None and name in o.report.tied:
            return relax.const(np.array([o.tied_bits], np.int32))
        return self.nbits

    def _kernel(self, spec):
        """One PrimFunc per kernel spec (``kernels.spec``), shared by every call site and function."""
        kname = spec.name()
        gv = self.owner.kernels.get(kname)
        if gv is None:
            gv = self.owner.kernels[kname] = self.builder_.add_func(spec.build(), kname)
        return gv

    def _dense(self, x, xs, wvar, M, N, K):
        # CPU prefill chunks: the register-tiled explicit loops (the scheduled TIR form runs at GEMV speed per
        # row: 16 against 245 GFLOPS at 32x49152x576); few rows (decode, verify) keep the tunable form
        tiled = self.owner.cpu is not None and M >= TILED_MIN_M
        gv = self._kernel(DenseNTCPU(M, N, K) if tiled else DenseNT(M, N, K))
        return self._emit(gv, x, xs, [wvar], M, N, K)

    def _emit(self, gv, x, xs, args, M, N, K):
        x2 = x if len(xs) == 2 else self.builder_.emit(relax.op.reshape(x, [M, K]))
        y = relax.call_tir(gv, [x2] + args, relax.TensorType([M, N], "float32"))
        if len(xs) != 2:
            y = relax.op.reshape(self.builder_.emit(y), xs[:-1] + [N])
        return y


class AnyPrecRewrite:
    """Rewrite every eligible linear layer of the given Relax functions (module pass-like callable).

    Weights are named by their Relax parameter names, which the ONNX importer takes from the initializers;
    ``exclude`` holds glob or regex patterns on them. After the call, ``report`` says what was rewritten.
    """

    rewriter = None   # the mutator class (default _Rewriter); subclasses (passes.act_quant) put their own

    def __init__(self, min_bits: int = 3, max_bits: int = 8, exclude=(), functions=None, cpu=None,
                 available=None, tied_bits=None):
        """``cpu``: None, the bitplane kernel of ``kernels.anyprec`` (GPU targets: uint32 planes, fp16 LUTs);
        {"mode": "int8"|"exact", "isa": ...}: the CPU kernel of ``kernels.lut_cpu`` (byte-sliced planes).
        ``available(name, tied)``: None, or why the weight cannot be rewritten (a parent without the layer).
        ``tied_bits``: a tied embedding/lm_head gets this bit-width as a constant instead of the call's."""
        self.tied_bits = tied_bits
        self.min_bits, self.max_bits, self.cpu, self.available = min_bits, max_bits, cpu, available
        self.exclude, self.functions = tuple(exclude or ()), functions
        self.report = RewriteReport()
        self.kernels: dict = {}

    def tied_unsupported(self) -> str | None:
        """Why a tied embedding/lm_head cannot be rewritten by this pass (None: it can)."""
        return "quantized on CPU targets only (the GPU kernels have no embedding lookup)" if self.cpu is None \
            else None

    def _eligible(self, func, weights) -> set:
        uses = _weight_uses(func, weights)
        ok = set()
        for w, ops in uses.items():
            name = w.name
            shape = _static_shape(w)
            if shape is None or len(shape) != 2:
                continue
            linear = {"permute_dims", "relax.matmul"}
            if not ops & linear:
                continue
            tied = "relax.take" in ops
            if not ops <= linear | {"relax.take", "relax.shape_of"}:   # shape_of: static, folded by the rewrite
                others = sorted(o.replace("relax.", "") for o in ops - linear)
                self.report.skipped[name] = f"shared with {', '.join(others)}"
                continue
            if matches_any(name, self.exclude) or (tied and matches_any(TIED_ALIAS, self.exclude)):
                self.report.skipped[name] = "excluded by pattern" + (" (tied embedding/lm_head)" if tied else "")
                continue
            if tied and self.tied_unsupported():
                self.report.skipped[name] = f"tied embedding/lm_head: {self.tied_unsupported()}"
                continue
            why = self.available(name, tied) if self.available is not None else None
            if why:
                self.report.skipped[name] = why
                continue
            ok.add(name)
            if tied:
                self.report.tied.add(name)
        return ok

    def __call__(self, mod: tvm.IRModule) -> tvm.IRModule:
        fnames = self.functions or [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, relax.Function)]
        n_inputs = {}
        for fname in fnames:
            func = mod[fname]
            n_in = int(func.attrs["num_input"]) if func.attrs is not None and "num_input" in func.attrs else \
                len(func.params)
            n_inputs[fname] = n_in
            weights = set(func.params[n_in:])
            rw = (self.rewriter or _Rewriter)(mod, self, fname, weights, self._eligible(func, weights))
            body = rw.visit_expr(func.body)
            mod = rw.builder_.get()
            params = list(func.params[:n_in]) + [rw.nbits] + list(func.params[n_in:]) + list(rw.new_params.values())
            mod[fname] = relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs)
        # drop the dead permute_dims/matmul of rewritten weights, then the parameters nobody uses any more
        mod = relax.transform.DeadCodeElimination(list(fnames))(mod)
        for fname in fnames:
            func, n_in = mod[fname], n_inputs[fname] + 1
            used = {v.name for v in relax.analysis.free_vars(func.body)}
            params = list(func.params[:n_in]) + [p for p in func.params[n_in:] if p.name in used]
            mod[fname] = relax.Function(params, func.body, func.ret_ty, func.is_pure, func.attrs) \
                .with_attr("num_input", n_in)
            self.report.functions[fname] = [p.name for p in params[n_in:]]
        return mod
