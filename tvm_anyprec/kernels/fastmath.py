"""e^x in plain float32 arithmetic, so LLVM vectorizes the loops around it.

On CPUs ``T.exp`` lowers to a call of libm's ``expf`` per element: a loop holding one is never vectorized. In a
decode step of SmolLM2-135M the SiLU's sigmoid and the attention's softmax spent 7% of the main thread's time in
``expf`` (perf, Zen 4); a 1536-value SiLU takes 4.2 us with ``expf`` and 0.45 us with this form.

``exp_f32(x)``: Cody-Waite range reduction x = n ln2 + r (|r| <= ln2 / 2, ln2 split in two so n ln2 is exact),
e^r by its Taylor polynomial of degree 7 (truncation below 3e-9 relative, under fp32's rounding), 2^n by the
exponent bits. x is clamped to [-87, 88] (2^n stays a normal number): e^x of a smaller x is 1.6e-38, not 0, and
of a larger one 1.65e38, not inf, which no caller here can tell apart (softmax weights, sigmoid's 1 + e^-x).
Relative error against numpy's float64 exp: about 2e-7 (tests/test_small_ops.py).
"""
from __future__ import annotations

import tvm

LOG2E = 1.4426950408889634
LN2_HI = 0.693359375            # 8 significant bits: n * LN2_HI is exact for |n| < 2^16
LN2_LO = -2.1219444005469057e-4
LO, HI = -87.0, 88.0
TAYLOR = [1.0 / 5040, 1.0 / 720, 1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0]


def exp_f32(x):
    """e^x of a float32 PrimExpr, scalar or vector (see the module docstring)."""
    f = lambda v: tvm.tirx.const(v, "float32")   # noqa: E731
    lanes = x.ty.dtype.lanes
    suffix = f"x{lanes}" if lanes > 1 else ""
    x = tvm.tirx.max(tvm.tirx.min(x, f(HI)), f(LO))
    n = tvm.tirx.floor(x * f(LOG2E) + f(0.5))
    r = (x - n * f(LN2_HI)) - n * f(LN2_LO)
    p = f(TAYLOR[0])
    for c in TAYLOR[1:]:
        p = p * r + f(c)
    bits = tvm.tirx.shift_left(tvm.tirx.Cast("int32" + suffix, n) + 127, 23)
    return p * tvm.tirx.reinterpret("float32" + suffix, bits)


def sigmoid_f32(x):
    """1 / (1 + e^-x) of a float32 scalar PrimExpr."""
    one = tvm.tirx.const(1.0, "float32")
    return one / (one + exp_f32(-x))


def _elementwise(fn, name: str):
    def compute(x):
        from tvm import te
        return te.compute(x.shape, lambda *i: fn(x(*i)), name=name, tag="elemwise")
    return compute


exp_te = _elementwise(exp_f32, "fast_exp")
sigmoid_te = _elementwise(sigmoid_f32, "fast_sigmoid")
