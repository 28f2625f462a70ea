"""The CPU bitplane kernel (kernels/lut_cpu.py) against numpy references built from the parent's planes and LUTs.

Every bit-width 3..8, both accuracy modes, odd shapes (K = 576, 1536, 4095: a partial last group of 256; N not
a multiple of the row tile), M = 1, 5, 32. Exact mode: within fp32 rounding of a float64 reference. int8 mode:
with unit scales and integer inputs the int32 group sums are exact in fp32, so the output equals numpy's integer
reference bit for bit; with real-valued inputs, numpy's quantization of the same inputs.
"""
from __future__ import annotations

import numpy as np
import pytest
import tvm

from tvm_anyprec.kernels.anyprec import lut_offset, lut_width
from tvm_anyprec.kernels.lut_cpu import LUT_PAD, cpu_isa, make_anyprec_cpu
from tvm_anyprec.quant import byteslice as bsl
from tvm_anyprec.quant.bitplanes import pack_bitplanes, unpack_bitplanes

B, MINB = 8, 3
WIDTHS = list(range(MINB, B + 1))
HOST = {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": 2}
ISAS = ["generic"] + {"avx512gfni": ["avx2", "avx512", "avx512gfni"], "avx512": ["avx2", "avx512"],
                      "avx2": ["avx2"]}.get(cpu_isa(HOST), [])


def _build(M, N, K, mode, isa):
    f = make_anyprec_cpu(M, N, K, B, MINB, mode, isa)
    return tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}),
                       target=tvm.target.Target(HOST))["main"]


def _layer(rng, N, K):
    codes = rng.integers(0, 1 << B, (N, K))
    planes = pack_bitplanes(codes, B)
    luts = rng.standard_normal((N, lut_width(B, MINB))).astype(np.float16)
    return planes, bsl.to_byte_sliced(planes, K), luts


def _run(fn, arrays, bits, M, N, dev=None):
    dev = dev or tvm.cpu()
    a = [tvm.runtime.tensor(np.ascontiguousarray(v), dev) for v in arrays]
    a += [tvm.runtime.tensor(np.array([bits], np.int32), dev), tvm.runtime.tensor(np.zeros((M, N), np.float32), dev)]
    fn(*a)
    return a[-1].numpy()


def _int_layer(rng, M, N, K):
    """Integer int16 tables (|q| <= 1000, both bytes used) with unit scales and integer activations with one
    |x| = 127 per block of 32: every float step of int8 mode is exact."""
    _planes, bs, _luts = _layer(rng, N, K)
    tabs = np.zeros((N, lut_width(B, MINB) + LUT_PAD), np.int16)
    for b in WIDTHS:
        q = rng.integers(-1000, 1001, (N, 1 << b))
        q[:, 0] = 1000
        if b in bsl.BYTE_TABLE_BITS:   # the int16 tables there are 256 x an int8 value (int_tables)
            q = 256 * rng.integers(-4, 5, (N, 1 << b))
        else:                          # FORM_GRID x A + r (int_tables, byteslice.in_form)
            a = rng.integers(-60, 61, (N, 16, 1))
            r = rng.integers(-96, 97, (N, 16, 1 << (b - 4)))
            r[:, :, -1] = -r[:, :, 0] + rng.integers(0, 32, (N, 16))   # (first + last) >> 5 is A
            q = (bsl.FORM_GRID * a + r).reshape(N, 1 << b)
            assert bsl.in_form(q, b).all() and (bsl.cluster_base(q, b) == a[:, :, 0]).all()
        tabs[:, lut_offset(b, MINB):lut_offset(b, MINB) + (1 << b)] = q
    src = bsl.decode_order(K)
    xp = rng.integers(-9, 10, (M, src.size))
    xp[:, src < 0] = 0
    first = (np.arange(0, src.size, 256)[:, None] + np.array([128 * h + 8 * j for h in (0, 1) for j in range(4)]))
    first = first.ravel()[src[first.ravel()] >= 0]
    xp[:, first] = 127
    x = np.zeros((M, K), np.float32)
    x[:, src[src >= 0]] = xp[:, src >= 0]
    return x, bs, tabs, np.ones((N, len(WIDTHS)), np.float32), xp


def test_int_tables_byte_tables_at_low_bits():
    """At BYTE_TABLE_BITS the int16 tables are 256 x an int8 value (zero low bytes: the AVX-512 body reads only the
    high bytes there), with a scale per row no worse than the max scale's; above, FORM_GRID x A + r (the AVX2 body
    reads them as a 16-entry table and a byte tree), at a step 4x finer than an int8 table's on sorted rows."""
    rng = np.random.default_rng(2)
    luts = (rng.standard_normal((64, lut_width(B, MINB))) * rng.uniform(0.01, 3, (64, 1))).astype(np.float16)
    tabs, scales = bsl.int_tables(luts, WIDTHS)
    for t, b in enumerate(WIDTHS):
        part = luts[:, lut_offset(b, MINB):lut_offset(b, MINB) + (1 << b)].astype(np.float32)
        q = tabs[:, lut_offset(b, MINB):lut_offset(b, MINB) + (1 << b)].astype(np.int32)
        err = np.abs(q * scales[:, t:t + 1] - part)
        amax = np.abs(part).max(1, keepdims=True)
        if b in bsl.BYTE_TABLE_BITS:
            assert (q % 256 == 0).all() and (np.abs(q) <= 127 * 256).all(), b
            assert (err <= 256 * scales[:, t:t + 1] / 2 * 1.0001).all(), b          # rounding only, no clipping
            s_max = amax / 127                                                    # the max scale's error
            err_max = ((part - s_max * np.rint(part / s_max)) ** 2).sum(1)
            assert ((err ** 2).sum(1) <= err_max * 1.0001 + 1e-12).all(), b
        else:   # FORM_GRID x A + r: rounding only, at a step finer than an int8 table's on sorted centroids
            assert bsl.in_form(q, b).all() and (err <= scales[:, t:t + 1] * 0.501).all(), b
    srt = np.sort(luts.astype(np.float32), axis=1)
    for b in WIDTHS[2:]:
        part = srt[:, :1 << b]
        q, sc = bsl.form_table(part, b)
        assert bsl.in_form(q, b).all() and np.median(sc / np.abs(part).max(1)) < 1 / 127 / 4, b


@pytest.mark.parametrize("K", [576, 1536, 4095])
def test_byte_sliced_layout_round_trips(K):
    rng = np.random.default_rng(K)
    codes = rng.integers(0, 256, (7, K))
    planes = pack_bitplanes(codes, 8)
    bs = bsl.to_byte_sliced(planes, K)
    assert bs.shape == (8, 7, 8 * -(-K // 64))
    for bits in (3, 5, 8):
        assert (bsl.codes_from_byte_sliced(bs, K, bits) == unpack_bitplanes(planes, K, bits)).all()
    # the stated bit order: bit i of byte l of block j is weight 64j + 8i + l (plane 0 = MSB)
    k = 64 * 1 + 8 * 5 + 3
    assert ((bs[0, :, 8 * 1 + 3] >> 5) & 1 == codes[:, k] >> 7).all()
    src = bsl.decode_order(K)
    assert sorted(src[src >= 0].tolist()) == list(range(K))


# every SIMD body at M = 1 and 32 (the AVX-512 bodies serve M <= 32; the AVX2 ones run larger M there)
CASES = [(isa, 1, 37, K) for isa in ISAS[1:] for K in (576, 1536)] + \
    [(isa, 32, 13, 1536) for isa in dict.fromkeys(ISAS[1:2] + ISAS[-1:])] + \
    [(ISAS[-1], 5, 19, 4095), ("generic", 5, 19, 4095)] + \
    [(ISAS[-1], 32, 13, 576), (ISAS[-1], 3, 11, 640)]   # last groups of one and two blocks (GFNI: compact)
CASES = list(dict.fromkeys(CASES))


@pytest.mark.parametrize("isa,M,N,K", CASES)
def test_exact_mode_matches_numpy(isa, M, N, K):
    rng = np.random.default_rng(M * 7 + K)
    _planes, bs, luts = _layer(rng, N, K)
    x = rng.standard_normal((M, K)).astype(np.float32)
    fn = _build(M, N, K, "exact", isa)
    padded = np.pad(luts, ((0, 0), (0, LUT_PAD)))
    for b in WIDTHS:
        y = _run(fn, [x, bs, padded], b, M, N)
        ref = bsl.reference_exact(x, bs, luts, K, b, lut_offset(b, MINB))
        scale = np.abs(x).sum(1, keepdims=True) * np.abs(luts.astype(np.float32)).max()
        assert (np.abs(y - ref) <= 1e-6 * scale).all(), (b, np.abs(y - ref).max())


@pytest.mark.parametrize("isa,M,N,K", CASES)
def test_int8_mode_integer_sums_are_exact(isa, M, N, K):
    """int16 tables with |q| <= 1000 (both bytes used, negative values included) and scale 1, activations with
    max |x| = 127 per block of 32: every float step is exact, so Y must equal the numpy integer reference."""
    rng = np.random.default_rng(M * 11 + K)
    x, bs, tabs, scales, xp_int = _int_layer(rng, M, N, K)
    L = lut_width(B, MINB)
    fn = _build(M, N, K, "int8", isa)
    for b in WIDTHS:
        y = _run(fn, [x, bs, tabs, scales], b, M, N)
        acc = bsl.reference_int8_acc(xp_int.astype(np.int8), bs, tabs[:, :L], K, b, lut_offset(b, MINB))
        assert (y == acc.sum((-1, -2, -3)).astype(np.float32)).all(), b


@pytest.mark.parametrize("isa", ISAS)
def test_int8_mode_matches_numpy_quantization(isa):
    M, N, K = 5, 21, 1536
    rng = np.random.default_rng(3)
    _planes, bs, luts = _layer(rng, N, K)
    x = rng.standard_normal((M, K)).astype(np.float32)
    tabs, scales = bsl.int_tables(luts, WIDTHS)
    fn = _build(M, N, K, "int8", isa)
    for b in WIDTHS:
        y = _run(fn, [x, bs, np.pad(tabs, ((0, 0), (0, LUT_PAD))), scales], b, M, N)
        ref = bsl.reference_int8(x, bs, tabs, scales, K, b, lut_offset(b, MINB), b - MINB)
        exact = bsl.reference_exact(x, bs, luts, K, b, lut_offset(b, MINB))
        assert np.abs(y - ref).max() <= 1e-3 * np.abs(ref).max(), b      # float ties of the rounding only
        assert np.abs(y - exact).max() <= 5e-2 * np.abs(exact).max(), b  # and close to the exact product


@pytest.mark.parametrize("isa", ISAS)
def test_two_bit_seed_parent_widths(isa):
    """A parent from a 2-bit seed (widths 2..5): int_tables keeps 2 bits as plain int16 (max scale; the 16 A + r form
    needs 16 clusters), and both modes of every body the host runs equal numpy at every width (the codes of the
    unmasked AVX2 decode at b <= 3 index vpshufb / vpermps tables correctly at 2 bits too)."""
    M, N, K, hi, lo = 3, 19, 576, 5, 2
    rng = np.random.default_rng(7)
    codes = rng.integers(0, 1 << hi, (N, K))
    bs = bsl.to_byte_sliced(pack_bitplanes(codes, hi), K)
    luts = np.sort(rng.standard_normal((N, lut_width(hi, lo))), axis=1).astype(np.float16)
    widths = range(lo, hi + 1)
    tabs, scales = bsl.int_tables(luts, widths)
    x = rng.standard_normal((M, K)).astype(np.float32)
    for mode, tables in (("int8", [np.pad(tabs, ((0, 0), (0, LUT_PAD))), scales]),
                         ("exact", [np.pad(luts, ((0, 0), (0, LUT_PAD)))])):
        f = make_anyprec_cpu(M, N, K, hi, lo, mode, isa).with_attr("global_symbol", "main")
        fn = tvm.compile(tvm.IRModule({"main": f}), target=tvm.target.Target(HOST))["main"]
        for b in widths:
            y = _run(fn, [x, bs, *tables], b, M, N)
            off = lut_offset(b, lo)
            ref = bsl.reference_int8(x, bs, tabs, scales, K, b, off, b - lo) if mode == "int8" else \
                bsl.reference_exact(x, bs, luts, K, b, off)
            assert np.abs(y - ref).max() <= 1e-3 * np.abs(ref).max(), (mode, b)


@pytest.mark.parametrize("isa", ISAS[1:])
@pytest.mark.parametrize("mode", ["int8", "exact"])
def test_verify_rows_equal_decode_calls(isa, mode):
    """At M = 5 (the verify graph) each row of X gets bit for bit what an M = 1 call on that row gets (AVX-512:
    the same body summing each row in the M = 1 order; AVX2: the same sums in the same order): self-speculative
    decoding then keeps plain greedy decoding's tokens, int8 mode included."""
    M, N, K = 5, 23, 576
    rng = np.random.default_rng(5)
    _planes, bs, luts = _layer(rng, N, K)
    x = rng.standard_normal((M, K)).astype(np.float32)
    if mode == "exact":
        tables = [np.pad(luts, ((0, 0), (0, LUT_PAD)))]
    else:
        tabs, scales = bsl.int_tables(luts, WIDTHS)
        tables = [np.pad(tabs, ((0, 0), (0, LUT_PAD))), scales]
    many, one = _build(M, N, K, mode, isa), _build(1, N, K, mode, isa)
    for b in (3, 6, 8):
        y = _run(many, [x, bs, *tables], b, M, N)
        for m in range(M):
            np.testing.assert_array_equal(y[m], _run(one, [x[m:m + 1], bs, *tables], b, 1, N)[0])


def test_bits_outside_the_range_are_clamped():
    M, N, K = 1, 9, 576
    rng = np.random.default_rng(1)
    _planes, bs, luts = _layer(rng, N, K)
    x = rng.standard_normal((M, K)).astype(np.float32)
    fn = _build(M, N, K, "exact", ISAS[-1])
    padded = np.pad(luts, ((0, 0), (0, LUT_PAD)))
    np.testing.assert_array_equal(_run(fn, [x, bs, padded], 1, M, N), _run(fn, [x, bs, padded], MINB, M, N))
    np.testing.assert_array_equal(_run(fn, [x, bs, padded], 12, M, N), _run(fn, [x, bs, padded], B, M, N))


def test_simd_bodies_are_chosen_only_where_the_cpu_has_them():
    assert cpu_isa({"kind": "llvm", "mcpu": "x86-64"}) == "generic"
    assert cpu_isa({"kind": "llvm", "mcpu": "x86-64-v3"}) == "avx2"
    assert cpu_isa({"kind": "llvm", "mcpu": "x86-64-v4"}) == "avx2"     # AVX-512 without VBMI / VNNI
    assert cpu_isa({"kind": "llvm", "mcpu": "skylake-avx512"}) == "avx2"
    assert cpu_isa({"kind": "llvm", "mcpu": "znver4"}) == "avx512gfni"
    assert cpu_isa({"kind": "llvm", "mcpu": "icelake-server"}) == "avx512gfni"
    assert cpu_isa({"kind": "llvm", "mcpu": "znver4", "mattr": ["-gfni"]}) == "avx512"
    assert cpu_isa({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76"}) == "dotprod"
    assert cpu_isa({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"}) == "neon"
    assert cpu_isa({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76", "mattr": ["-dotprod"]}) \
        == "neon"
    from tvm_anyprec.targets import preset
    assert {p: cpu_isa(preset(p)["target"]) for p in ARM_ISA} == ARM_ISA


def test_avx512_bodies_decode_with_gfni_only_where_chosen():
    """The GFNI decode (``vgf2p8affineqb``) is in the "avx512gfni" build and not in the plain AVX-512 one (assembly
    for a Zen 4 target: nothing runs, so any host can check it)."""
    def asm(isa):
        f = make_anyprec_cpu(1, 16, 576, B, MINB, "int8", isa).with_attr("global_symbol", "main")
        lib = tvm.compile(tvm.IRModule({"main": f}), target=tvm.target.Target({"kind": "llvm", "mcpu": "znver4"}))
        return lib.mod.inspect_source("s")

    with_gfni, without = asm("avx512gfni"), asm("avx512")
    assert "vgf2p8affineqb" in with_gfni and "vpdpbusd" in with_gfni
    assert "vgf2p8affineqb" not in without and "vpdpbusd" in without


def test_avx2_int8_body_multiplies_bytes_at_every_bit_width():
    """AVX2 int8 mode multiplies table bytes by the int8 activations with ``vpmaddubsw`` (sign moved onto the table
    bytes by ``vpsignb``) at every bit-width: at 3 / 4 bits the high bytes of the byte tables, at 5..8 the
    FORM_GRID A + r tables' two bytes (a ``vpblendvb`` tree for r); no table is re-joined into int16 and no
    activation widened. Assembly for a Zen 3 target: nothing runs (the sums are checked bit-exact above)."""
    def asm(lo, hi):
        f = make_anyprec_cpu(1, 16, 576, hi, lo, "int8", "avx2").with_attr("global_symbol", "main")
        lib = tvm.compile(tvm.IRModule({"main": f}), target=tvm.target.Target({"kind": "llvm", "mcpu": "znver3"}))
        return lib.mod.inspect_source("s")

    low, high = asm(3, 4), asm(5, 8)
    assert "vpmaddubsw" in low and "vpsignb" in low and "vpblendvb" not in low
    assert "vpmaddubsw" in high and "vpsignb" in high and "vpblendvb" in high
    assert not any(op in text for op in ("vpunpcklbw", "vpmovsxbw") for text in (low, high))


# ------------------------------------------------------------------ the aarch64 bodies on the emulated boards

ARM_ISA = {"arm-neon": "neon", "arm-dotprod": "dotprod", "arm-i8mm": "i8mm"}
# per preset (a library of these kernels takes ~6 s each to build): M = 1 with K = 576 / 1536 / 4095, M = 5 (verify,
# odd: i8mm pairs the last row with itself) and M = 32 (the prefill chunk) where the body differs from NEON's
ARM_CASES = {"arm-neon": [(1, 37, 576), (1, 21, 1536), (5, 19, 4095), (1, 19, 4095)],
             "arm-dotprod": [(1, 19, 4095), (5, 19, 4095), (32, 9, 576)],
             "arm-i8mm": [(1, 19, 4095), (5, 19, 4095), (32, 9, 576)]}


@pytest.fixture(scope="module", params=list(ARM_ISA))
def arm_board(request, tmp_path_factory):
    """Every aarch64 case of one preset in one library (arm-neon: Cortex-A72, plain NEON, both modes; arm-dotprod:
    Cortex-A76, int8 mode's sdot body; arm-i8mm: qemu's "max" CPU, sdot at M = 1 and smmla above; their exact mode
    is the NEON code), loaded on the emulated board of that CPU model; and the host's assembly."""
    from tvm_anyprec.targets import arm, preset

    if arm.missing():
        pytest.skip(f"no emulated aarch64 board: {arm.missing()}")
    p = preset(request.param)
    modes = ("exact", "int8") if request.param == "arm-neon" else ("int8",)
    funcs = {f"{mode}_{M}_{N}_{K}": make_anyprec_cpu(M, N, K, B, MINB, mode, cpu_isa(p["target"]))
             for mode in modes for M, N, K in ARM_CASES[request.param]}
    lib = tvm.compile(tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()}),
                      target=tvm.target.Target(p["target"]))
    path = tmp_path_factory.mktemp("arm") / f"lut_{request.param}.so"
    lib.export_library(str(path), fcompile=arm.cross_compiler())
    sess = arm.qemu_session(p["qemu_cpu"])
    sess.upload(str(path))
    yield request.param, sess, sess.load_module(path.name), lib.mod.inspect_source("s")


def test_arm_bodies_match_numpy_and_x86(arm_board):
    """The aarch64 bodies (tbl lookups; sdot on arm-dotprod, + smmla at M > 1 on arm-i8mm) on their CPU models: exact mode within fp32 rounding of
    numpy and of the x86 build; int8 mode's integer sums bit for bit against numpy's integer reference and the x86
    build, and real-valued inputs as numpy quantizes them."""
    name, sess, lib, _asm = arm_board
    for M, N, K in ARM_CASES[name][:-1] if name == "arm-neon" else ARM_CASES[name]:
        _check_arm_case(name, sess, lib, M, N, K)


def _check_arm_case(name, sess, lib, M, N, K):
    rng = np.random.default_rng(M + K)
    _planes, bs, luts = _layer(rng, N, K)
    x = rng.standard_normal((M, K)).astype(np.float32)
    padded = np.pad(luts, ((0, 0), (0, LUT_PAD)))
    host = _build(M, N, K, "exact", ISAS[-1])
    xi, bsi, tabs, scales, xp = _int_layer(rng, M, N, K)
    host_int = _build(M, N, K, "int8", ISAS[-1])
    rtabs, rscales = bsl.int_tables(luts, WIDTHS)
    L = lut_width(B, MINB)
    for b in WIDTHS:
        if name == "arm-neon":
            y = _run(lib[f"exact_{M}_{N}_{K}"], [x, bs, padded], b, M, N, sess.cpu())
            ref = bsl.reference_exact(x, bs, luts, K, b, lut_offset(b, MINB))
            scale = np.abs(x).sum(1, keepdims=True) * np.abs(luts.astype(np.float32)).max()
            assert (np.abs(y - ref) <= 1e-6 * scale).all(), (b, np.abs(y - ref).max())
            assert (np.abs(y - _run(host, [x, bs, padded], b, M, N)) <= 1e-6 * scale).all(), b
        yi = _run(lib[f"int8_{M}_{N}_{K}"], [xi, bsi, tabs, scales], b, M, N, sess.cpu())
        acc = bsl.reference_int8_acc(xp.astype(np.int8), bsi, tabs[:, :L], K, b, lut_offset(b, MINB))
        np.testing.assert_array_equal(yi, acc.sum((-1, -2, -3)).astype(np.float32), err_msg=str(b))
        np.testing.assert_array_equal(yi, _run(host_int, [xi, bsi, tabs, scales], b, M, N), err_msg=str(b))
        yr = _run(lib[f"int8_{M}_{N}_{K}"], [x, bs, np.pad(rtabs, ((0, 0), (0, LUT_PAD))), rscales], b, M, N,
                  sess.cpu())
        ref = bsl.reference_int8(x, bs, rtabs, rscales, K, b, lut_offset(b, MINB), b - MINB)
        assert np.abs(yr - ref).max() <= 1e-3 * np.abs(ref).max(), b      # float ties of the rounding only


def test_arm_verify_rows_equal_decode_calls(arm_board):
    """On the board as on x86: each row of an M = 5 call equals an M = 1 call on that row bit for bit (int8 mode),
    so self-speculative decoding on ARM keeps plain greedy decoding's tokens."""
    _name, sess, lib, _asm = arm_board
    N, K = 19, 4095
    rng = np.random.default_rng(7)
    _planes, bs, luts = _layer(rng, N, K)
    x = rng.standard_normal((5, K)).astype(np.float32)
    tabs, scales = bsl.int_tables(luts, WIDTHS)
    tables = [np.pad(tabs, ((0, 0), (0, LUT_PAD))), scales]
    for b in (3, 6, 8):
        y = _run(lib[f"int8_5_{N}_{K}"], [x, bs, *tables], b, 5, N, sess.cpu())
        for m in range(5):
            np.testing.assert_array_equal(y[m], _run(lib[f"int8_1_{N}_{K}"], [x[m:m + 1], bs, *tables], b, 1, N,
                                                     sess.cpu())[0])


def test_arm_bodies_use_their_instructions(arm_board):
    """arm-neon: tbl lookups, smlal products, no sdot / smmla (runs on every aarch64 CPU); arm-dotprod: int8 mode's
    products by sdot (no smlal left, no smmla); arm-i8mm: sdot (M = 1) and smmla / usmmla (M > 1)."""
    name, _sess, _lib, asm = arm_board
    ops = {ln.split()[0] for ln in asm.splitlines() if ln.startswith("\t") and not ln.strip().startswith(".")}
    assert "tbl" in ops, sorted(ops)
    if name == "arm-neon":
        assert "fcvtl" in ops and ops & {"smlal", "smlal2"}, sorted(ops)
        assert not ops & {"sdot", "smmla", "usdot"}
    elif name == "arm-dotprod":
        assert "sdot" in ops and not ops & {"smlal", "smlal2", "smmla", "usmmla", "usdot"}, sorted(ops)
    else:
        assert {"sdot", "smmla", "usmmla"} <= ops and not ops & {"smlal", "smlal2"}, sorted(ops)


def test_i8mm_body_takes_weight_rows_in_pairs():
    with pytest.raises(ValueError, match="even"):
        make_anyprec_cpu(5, 19, 576, B, MINB, "int8", "i8mm", rows={3: 1})
    make_anyprec_cpu(1, 19, 576, B, MINB, "int8", "i8mm", rows={3: 1})   # the GEMV is the sdot body: any rows


def test_arm_bodies_read_one_byte_at_byte_table_bits():
    """At BYTE_TABLE_BITS (tables 256 x an int8 value) the sdot / smmla bodies look up and multiply the high bytes
    only: half the tbl and sdot of 5 bits at M = 1, no usmmla at M = 5 (the assembly; the results are checked on the
    boards above, which run every bit-width)."""
    from tvm_anyprec.targets import preset

    def ops(isa, preset_name, M, b):
        f = make_anyprec_cpu(M, 16, 1024, b, b, "int8", isa).with_attr("global_symbol", "main")
        asm = tvm.compile(tvm.IRModule({"main": f}), target=tvm.target.Target(preset(preset_name)["target"]))
        return [ln.split()[0] for ln in asm.mod.inspect_source("s").splitlines()
                if ln.startswith("\t") and not ln.strip().startswith(".")]

    low, high = ops("dotprod", "arm-dotprod", 1, 4), ops("dotprod", "arm-dotprod", 1, 5)
    assert 4 in bsl.BYTE_TABLE_BITS and 5 not in bsl.BYTE_TABLE_BITS
    assert 2 * low.count("sdot") == high.count("sdot") > 0
    assert 2 * sum(o.startswith("tbl") for o in low) == sum(o.startswith("tbl") for o in high)
    low, high = ops("i8mm", "arm-i8mm", 5, 4), ops("i8mm", "arm-i8mm", 5, 5)
    assert low.count("usmmla") == 0 < high.count("usmmla") and low.count("smmla") == high.count("smmla") > 0
