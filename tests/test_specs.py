"""Kernel specs: names as the passes and manifests have always written them, the dict round trip a manifest
stores, clear errors for what is not a spec, and tune's message for an artifact that records no specs."""
from __future__ import annotations

import pytest

pytest.importorskip("tvm")

from tvm_anyprec.errors import AnyPrecError, KernelError, TuningError  # noqa: E402
from tvm_anyprec.kernels.registry import FAMILIES, spec_from_dict, spec_of  # noqa: E402
from tvm_anyprec.kernels.anyprec import AnyPrecLinear  # noqa: E402
from tvm_anyprec.kernels.attention import CacheAttention  # noqa: E402
from tvm_anyprec.kernels.dense import DenseNT  # noqa: E402
from tvm_anyprec.kernels.embed import AnyPrecEmbed  # noqa: E402
from tvm_anyprec.kernels.intgemm import ActQuant, IntGemm  # noqa: E402
from tvm_anyprec.tune.driver import specs_of_manifest  # noqa: E402

SPECS = [AnyPrecLinear(1, 576, 1536, 8, 3), DenseNT(32, 49152, 576), ActQuant(5, 576, 4, 64, words=True),
         IntGemm(1, 1536, 576, 64), CacheAttention(9, 3, 1, 8192, 64, 0.125), CacheAttention(4, 1, 5, 512, 256, 0.0625, 512),
         AnyPrecEmbed(1, 49152, 576, 8, 3, 520)]


def test_names_are_the_ones_artifacts_and_logs_use():
    assert [s.name() for s in SPECS] == ["anyprec_linear_m1_n576_k1536_b3to8", "dense_nt_m32_n49152_k576",
                                         "act_quant_m5_k576_a4_g64", "int_gemm_w4_m1_n1536_k576_g64",
                                         "cache_attention_h9_kv3_s1_t8192_d64", "cache_attention_h4_kv1_s5_t512_d256_w512",
                                         "anyprec_embed_s1_n49152_k576_b3to8_exact"]
    assert set(FAMILIES) == {"anyprec_linear", "anyprec_cpu", "dense_nt", "act_quant", "int_gemm", "cache_attention",
                             "anyprec_embed", "dense_nt_cpu"}


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.family)
def test_round_trip_through_the_manifest_dict(spec):
    d = spec.to_dict()
    assert d["family"] == spec.family and spec_from_dict(d) == spec and hash(spec_from_dict(d)) == hash(spec)


def test_built_kernel_carries_its_spec():
    f = SPECS[0].build()
    assert spec_of(f) == SPECS[0] and spec_of(SPECS[0].make()) is None


def test_not_a_spec_is_a_clear_error():
    with pytest.raises(KernelError, match="not a kernel spec"):
        spec_from_dict({"family": "conv2d"})
    with pytest.raises(KernelError, match="does not know"):
        spec_from_dict({**SPECS[1].to_dict(), "tile": 8})
    with pytest.raises(KernelError):
        spec_from_dict({"family": "dense_nt", "M": 1})
    assert issubclass(KernelError, AnyPrecError)


def test_manifest_without_specs_asks_for_a_recompile():
    old = {"kind": "compiled", "kernels": {"anyprec_linear_m1_n576_k576_b3to8": "default"}}
    with pytest.raises(TuningError, match="compile it again"):
        specs_of_manifest(old, "art")
    new = {"kernel_specs": {s.name(): s.to_dict() for s in SPECS}}
    assert specs_of_manifest(new) == {s.name(): s for s in SPECS}
