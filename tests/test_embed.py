"""A tied embedding / lm_head as one any-precision layer: the embedding kernel (kernels/embed.py) against numpy
on the byte-sliced planes (every bit-width, both modes, negative ids, K not a multiple of 64), and the Relax
rewrite of a graph that gathers and multiplies the same weight (passes/anyprec_rewrite.py)."""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

import tvm_anyprec.kernels  # noqa: F401  (the stack-locals lowering)
from tvm_anyprec.kernels.anyprec import lut_offset, lut_width
from tvm_anyprec.kernels.embed import AnyPrecEmbed
from tvm_anyprec.kernels.lut_cpu import LUT_PAD
from tvm_anyprec.kernels.spec import spec_of
from tvm_anyprec.passes.anyprec_rewrite import AnyPrecRewrite
from tvm_anyprec.quant.bitplanes import pack_bitplanes
from tvm_anyprec.quant.byteslice import codes_from_byte_sliced, int_tables, to_byte_sliced

B, MINB = 8, 3


@pytest.mark.kernel
@pytest.mark.parametrize("mode", ["exact", "int8"])
def test_embedding_rows_decoded_from_the_planes(mode):
    rng = np.random.default_rng(0)
    N, K, S = 300, 200, 5
    codes = rng.integers(0, 1 << B, (N, K)).astype(np.uint8)
    planes = to_byte_sliced(pack_bitplanes(codes, B), K)
    luts = rng.standard_normal((N, lut_width(B, MINB))).astype(np.float16)
    tabs, scales = int_tables(luts, range(MINB, B + 1))
    width = luts.shape[1] + LUT_PAD
    tables = [np.pad(luts, ((0, 0), (0, LUT_PAD)))] if mode == "exact" else \
        [np.pad(tabs, ((0, 0), (0, LUT_PAD))), scales]
    ids = np.array([0, N - 1, -1, 7, 123], np.int64)
    rows = np.where(ids < 0, ids + N, ids)
    f = tvm.compile(AnyPrecEmbed(S, N, K, B, MINB, width, mode).build().with_attr("global_symbol", "main"),
                    target="llvm")
    for b in range(MINB, B + 1):
        y = tvm.runtime.empty((S, K), "float32")
        f(tvm.runtime.tensor(ids), tvm.runtime.tensor(planes), *[tvm.runtime.tensor(t) for t in tables],
          tvm.runtime.tensor(np.array([b], np.int32)), y)
        c = lut_offset(b, MINB) + codes_from_byte_sliced(planes, K, b)[rows].astype(np.int64)
        np.testing.assert_array_equal(c - lut_offset(b, MINB), codes[rows] >> (B - b))   # the child's top bits
        if mode == "exact":
            want = np.take_along_axis(luts[rows].astype(np.float32), c, 1)
        else:
            want = np.take_along_axis(tabs[rows].astype(np.float32), c, 1) * scales[rows, b - MINB][:, None]
        np.testing.assert_array_equal(y.numpy(), want)


def _tied_module(V=96, H=64, S=3):
    """main(ids [1, S]; W [V, H]) = matmul(take(W, ids), permute_dims(W)): an embedding tied to the lm_head."""
    bb = relax.BlockBuilder()
    ids = relax.Var("ids", relax.TensorType([1, S], "int64"))
    w = relax.Var("model.embed_tokens.weight", relax.TensorType([V, H], "float32"))
    with bb.function("main", [ids, w], attrs={"num_input": 1}):
        with bb.dataflow():
            x = bb.emit(relax.op.take(w, ids, axis=0))
            out = bb.emit_output(bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(w)))))
        bb.emit_func_output(out)
    return bb.get()


CPU = {"mode": "exact", "isa": "generic"}


@pytest.mark.unit
def test_tied_weight_becomes_one_layer_on_cpu():
    rw = AnyPrecRewrite(3, 8, exclude=(), cpu=CPU)
    mod = rw(_tied_module())
    name = "model.embed_tokens.weight"
    assert rw.report.tied == {name} and rw.report.rewritten[name].tied
    assert rw.report.functions["main"] == [f"{name}.planes", f"{name}.luts"]   # no fp32 copy of the weight
    families = sorted(spec_of(f).family for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))
    assert families == ["anyprec_cpu", "anyprec_embed"]


@pytest.mark.unit
@pytest.mark.parametrize("exclude, cpu, why", [(("lm_head",), CPU, "excluded by pattern"),
                                               ((), None, "CPU targets only")])
def test_tied_weight_kept_in_fp32(exclude, cpu, why):
    rw = AnyPrecRewrite(3, 8, exclude=exclude, cpu=cpu)
    rw(_tied_module())
    assert rw.report.rewritten == {} and why in rw.report.skipped["model.embed_tokens.weight"]


@pytest.mark.unit
def test_shape_of_a_tied_weight_is_folded():
    """ONNX exports read the embedding's shape (Shape -> shape_of): the weight still becomes one layer."""
    bb = relax.BlockBuilder()
    ids = relax.Var("ids", relax.TensorType([1, 3], "int64"))
    w = relax.Var("W", relax.TensorType([96, 64], "float32"))
    with bb.function("main", [ids, w], attrs={"num_input": 1}):
        with bb.dataflow():
            shp = bb.emit(relax.op.shape_of(w))
            x = bb.emit(relax.op.take(w, ids, axis=0))
            y = bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(w))))
            out = bb.emit_output(relax.Tuple([y, shp]))
        bb.emit_func_output(out)
    rw = AnyPrecRewrite(3, 8, exclude=(), cpu=CPU)
    mod = rw(bb.get())
    assert rw.report.tied == {"W"} and "W" not in rw.report.functions["main"]
    assert "shape_of" not in mod["main"].script()


def test_lm_head_auto_only_where_the_avx512_bodies_run():
    """compile's default lm_head: pinned at 7 bits on presets whose kernels are the AVX-512 bodies, fp32 on
    the others (x86-64-v4 lacks VBMI and runs the AVX2 bodies; ARM and GPU presets)."""
    from tvm_anyprec.kernels.lut_cpu import cpu_isa
    from tvm_anyprec.kernels.lut_layout import WIDE_ISAS
    from tvm_anyprec.schemes.anyprec import AUTO_LM_HEAD_BITS, auto_lm_head_bits
    from tvm_anyprec.targets import preset

    assert auto_lm_head_bits("x86-avx2") is None and auto_lm_head_bits("x86-avx512") is None
    assert auto_lm_head_bits("arm-neon") is None and auto_lm_head_bits("cuda-sm80") is None
    host = cpu_isa(preset("x86")["target"])
    assert auto_lm_head_bits("x86") == (AUTO_LM_HEAD_BITS if host in WIDE_ISAS else None)


@pytest.mark.parametrize("arg, want", [("auto", "auto"), ("fp32", None), ("7", 7)])
def test_lm_head_bits_argument(arg, want):
    from tvm_anyprec.cli import _lm_head_bits

    assert _lm_head_bits(arg) == want


def test_lm_head_bits_argument_rejects_other_words(capsys):
    from tvm_anyprec import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["compile", "x.onnx", "-o", "y", "--lm-head-bits", "half"])
    assert e.value.code == 2
    assert "expected auto, fp32 or a bit-width" in capsys.readouterr().err
