"""The parent format on disk: round trip, atomic writes, corruption, and the CLI's errors on bad artifacts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tvm_anyprec import artifact
from tvm_anyprec.artifact import FORMAT_VERSION, MANIFEST, WEIGHTS, ArtifactError
from tvm_anyprec.data import file_sha256
from tvm_anyprec.quant.model import Parent, quantize_model


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(37, 50), torch.nn.ReLU(), torch.nn.Linear(50, 19, bias=False))


@pytest.fixture(scope="module")
def parent():
    return quantize_model(tiny_model(), "nonuniform", 3, 8, progress=False)


@pytest.fixture()
def saved(parent, tmp_path):
    d = tmp_path / "parent"
    parent.save(d)
    return d


def leftovers(d: Path):
    return sorted(p.name for p in d.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tvm_anyprec", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


# ----------------------------------------------------------------------------- round trip
def test_quantize_model_finds_linears(parent):
    assert sorted(parent.layers) == ["0", "2"]
    assert parent.layers["0"].shape == (50, 37) and parent.layers["2"].shape == (19, 50)
    assert sorted(parent.fp_tensors) == ["0.bias"]
    assert parent.bit_widths == [3, 4, 5, 6, 7, 8]


@pytest.mark.parametrize("scheme", ["nonuniform", "uniform"])
def test_save_load_round_trip_bitwise(scheme, tmp_path):
    p = quantize_model(tiny_model(1), scheme, 3, 8, group_size=16, progress=False)
    d = tmp_path / "p"
    manifest = p.save(d)
    assert sorted(os.listdir(d)) == [MANIFEST, WEIGHTS]
    assert leftovers(d) == []
    on_disk = json.loads((d / MANIFEST).read_text())
    assert on_disk == manifest
    assert on_disk["format_version"] == FORMAT_VERSION and on_disk["kind"] == "parent"
    assert on_disk["scheme"] == scheme and on_disk["bit_widths"] == [3, 4, 5, 6, 7, 8]
    assert on_disk["files"][WEIGHTS]["sha256"] == file_sha256(d / WEIGHTS)
    assert on_disk["files"][WEIGHTS]["bytes"] == (d / WEIGHTS).stat().st_size
    assert on_disk["layers"]["0"]["shape"] == [50, 37]

    q = Parent.load(d)
    assert (q.scheme, q.seed_bits, q.max_bits, q.tied) == (p.scheme, p.seed_bits, p.max_bits, p.tied)
    a, b = p.tensors(), q.tensors()
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k
    for bits in p.bit_widths:
        for n in p.layers:
            assert p.layers[n].dequantize(bits).tobytes() == q.layers[n].dequantize(bits).tobytes()


def test_dequantized_children_close_to_weights(parent):
    m = tiny_model()
    w = m[0].weight.detach().numpy()
    errs = [float(np.abs(parent.dequantized(b)["0"] - w).max()) for b in parent.bit_widths]
    assert errs[-1] < 0.01 and all(a >= b for a, b in zip(errs, errs[1:])), errs


# ----------------------------------------------------------------------------- atomic write
def _failing_save(*a, **k):
    raise OSError("disk full (simulated)")


def test_failed_save_leaves_nothing(parent, tmp_path, monkeypatch):
    monkeypatch.setattr(artifact, "save_tensors", _failing_save)
    d = tmp_path / "out"
    with pytest.raises(OSError, match="simulated"):
        parent.save(d)
    assert not d.exists()
    assert leftovers(d) == []


def test_failed_save_keeps_existing_good_dir(parent, saved, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    monkeypatch.setattr(artifact, "save_tensors", _failing_save)
    with pytest.raises(OSError, match="simulated"):
        parent.save(saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert leftovers(saved) == []
    Parent.load(saved)  # still valid


def test_interrupted_save_keeps_existing_good_dir(parent, saved, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}

    def interrupted(d, manifest):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact, "write_manifest", interrupted)
    with pytest.raises(KeyboardInterrupt):
        parent.save(saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert leftovers(saved) == []


def test_save_replaces_existing_dir(parent, saved):
    (saved / "stale.txt").write_text("old")
    parent.save(saved)
    assert sorted(os.listdir(saved)) == [MANIFEST, WEIGHTS]
    assert leftovers(saved) == []


def test_atomic_dir_refuses_without_overwrite(tmp_path):
    d = tmp_path / "x"
    d.mkdir()
    with pytest.raises(ArtifactError, match="exists"):
        with artifact.atomic_dir(d, overwrite=False):
            pass
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ArtifactError, match="not a directory"):
        with artifact.atomic_dir(f):
            pass


# ----------------------------------------------------------------------------- corruption
def _flip_bytes(p: Path):
    b = bytearray(p.read_bytes())
    mid = len(b) // 2
    b[mid:mid + 8] = bytes(x ^ 0xFF for x in b[mid:mid + 8])
    p.write_bytes(bytes(b))


def _truncate(p: Path):
    b = p.read_bytes()
    p.write_bytes(b[: len(b) // 3])


CORRUPTIONS = {
    "flipped bytes": (lambda d: _flip_bytes(d / WEIGHTS), "checksum mismatch"),
    "truncated weights": (lambda d: _truncate(d / WEIGHTS), "truncated"),
    "missing weights": (lambda d: (d / WEIGHTS).unlink(), "missing"),
    "missing manifest": (lambda d: (d / MANIFEST).unlink(), "no manifest.json"),
    "garbage manifest": (lambda d: (d / MANIFEST).write_text("{not json"), "manifest.json is corrupt"),
    "binary manifest": (lambda d: (d / MANIFEST).write_bytes(os.urandom(64) + b"\xff\xfe"),
                        "manifest.json is corrupt"),
    "non-object manifest": (lambda d: (d / MANIFEST).write_text("[1, 2, 3]"), "manifest.json is corrupt"),
    "future version": (lambda d: _edit_manifest(d, format_version=FORMAT_VERSION + 1), "format version"),
    "wrong kind": (lambda d: _edit_manifest(d, kind="compiled"), "'compiled' artifact, expected 'parent'"),
    "manifest without sizes": (lambda d: _edit_manifest(d, files={WEIGHTS: {}}), "manifest.json is corrupt"),
    "layer missing from weights": (lambda d: _edit_manifest(d, layers={"0": {"shape": [50, 37]},
                                                                     "9": {"shape": [1, 1]}}),
                                   "lacks tensor '9."),
    "manifest without layers": (lambda d: _edit_manifest(d, layers=None) or _drop_key(d, "layers"),
                                "not a valid parent manifest"),
    "layer shape mismatch": (lambda d: _edit_manifest(d, layers={"0": {"shape": [50, 70]},
                                                               "2": {"shape": [19, 50]}}),
                             r"tensor 0.planes is uint32 \[8, 50, 2\], the manifest implies uint32 \[8, 50, 3\]"),
}


def _drop_key(d: Path, key):
    m = json.loads((d / MANIFEST).read_text())
    del m[key]
    (d / MANIFEST).write_text(json.dumps(m))


def _edit_manifest(d: Path, **kw):
    m = json.loads((d / MANIFEST).read_text())
    m.update(kw)
    (d / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_artifact_raises_artifact_error(saved, case):
    damage, msg = CORRUPTIONS[case]
    damage(saved)
    with pytest.raises(ArtifactError, match=msg):
        Parent.load(saved)


def test_corrupt_weights_without_verify_still_artifact_error(saved):
    _truncate(saved / WEIGHTS)
    with pytest.raises(ArtifactError, match="cannot read weights file"):
        Parent.load(saved, verify=False)


def test_missing_dir(tmp_path):
    with pytest.raises(ArtifactError, match="not an artifact directory"):
        Parent.load(tmp_path / "nope")


@pytest.mark.parametrize("case", ["flipped bytes", "truncated weights", "garbage manifest", "missing manifest"])
def test_cli_inspect_and_eval_fail_cleanly(saved, case):
    damage, msg = CORRUPTIONS[case]
    damage(saved)
    for verb in ("inspect", "eval"):
        r = cli(verb, saved)
        assert r.returncode != 0, (verb, r.stdout, r.stderr)
        assert "error:" in r.stderr and msg in r.stderr, (verb, r.stderr)
        assert "Traceback" not in r.stderr


def test_cli_inspect_good_artifact(saved):
    r = cli("inspect", saved)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["kind"] == "parent" and m["format_version"] == FORMAT_VERSION


def test_cli_missing_path(tmp_path):
    r = cli("inspect", tmp_path / "nope")
    assert r.returncode != 0 and "error:" in r.stderr and "Traceback" not in r.stderr


def test_cli_quantize_refuses_non_empty_dir(tmp_path):
    d = tmp_path / "existing"
    d.mkdir()
    (d / "keep.txt").write_text("precious")
    r = cli("quantize", "--out", d)
    assert r.returncode != 0
    assert "error:" in r.stderr and "already exists" in r.stderr and "--force" in r.stderr
    assert sorted(os.listdir(d)) == ["keep.txt"] and (d / "keep.txt").read_text() == "precious"
    assert leftovers(d) == []


def test_cli_quantize_bad_bits_fails_fast(tmp_path):
    r = cli("quantize", "--out", tmp_path / "q", "--seed-bits", "5")
    assert r.returncode != 0 and "error:" in r.stderr and "seed bit-width 5" in r.stderr
    assert not (tmp_path / "q").exists()


def test_gguf_conversions_are_cached_and_the_same(tmp_path, monkeypatch):
    """The tokenizer and the fp32 model converted from the GGUF are saved once in the cache; the saved ones
    are transformers' own conversion (same encoding, decoding, template and special tokens; same tensors and
    logits, still tied), loaded with the conversion disabled."""
    import torch

    from tvm_anyprec import data

    monkeypatch.setenv("TVM_ANYPREC_CACHE", str(tmp_path / "cache"))
    p = data.resolve_model("smollm2")
    d = data.gguf_cache(p)
    assert not d.exists()
    ref_model, ref = data.load_model(p)          # converted by transformers from the GGUF, and saved
    assert (d / "tokenizer" / "tokenizer.json").exists() and (d / "model" / "config.json").exists()
    monkeypatch.setattr(data, "_convert_gguf", None)     # (converting either again would fail now)
    model, tok = data.load_model(p)              # both from the cache
    assert tok is not ref and model is not ref_model
    text = data.corpus_text()[:4000] + " héllo wörld 你好 <|im_start|>\n\n\tend"
    ids = ref(text)["input_ids"]
    assert tok(text)["input_ids"] == ids and tok.decode(ids) == ref.decode(ids)
    assert (tok.eos_token_id, tok.bos_token_id, tok.all_special_tokens) == \
        (ref.eos_token_id, ref.bos_token_id, ref.all_special_tokens)
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    a, b = ref_model.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()   # still tied
    with torch.no_grad():
        x = torch.tensor([ids[:24]])
        assert torch.equal(model(x).logits, ref_model(x).logits)


def test_cached_conversion_saves_once_and_replaces_a_damaged_copy(tmp_path):
    """``data._cached``: converted and saved once, then loaded; a copy that fails to load is converted again
    and replaced; a save that declines or fails leaves no directory behind."""
    from tvm_anyprec import data

    calls = []

    def convert():
        calls.append("convert")
        return {"v": 7}

    def save(obj, tmp):
        tmp.mkdir()
        (tmp / "v").write_text(str(obj["v"]))

    load = lambda d: {"v": int((d / "v").read_text())}   # noqa: E731
    d = tmp_path / "x"
    assert data._cached(d, load, convert, save) == {"v": 7} and calls == ["convert"]
    assert data._cached(d, load, convert, save) == {"v": 7} and calls == ["convert"]       # from the copy
    (d / "v").write_text("damaged")
    assert data._cached(d, load, convert, save) == {"v": 7} and calls == ["convert"] * 2   # converted again
    assert (d / "v").read_text() == "7"
    e = tmp_path / "y"
    assert data._cached(e, load, convert, lambda obj, tmp: None) == {"v": 7} and not e.exists()   # declined

    def failing(obj, tmp):
        tmp.mkdir()
        raise OSError("disk full")

    assert data._cached(e, load, convert, failing) == {"v": 7}
    assert not e.exists() and not list(tmp_path.glob("y.tmp*"))
