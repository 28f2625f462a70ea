"""Python API with the same verbs as the command line: quantize, compile, run, eval, inspect."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from . import data
from .quant.patterns import ACT_EXCLUDE, DEFAULT_EXCLUDE
from .artifact import MANIFEST, ArtifactError, memory_summary, read_manifest, refuse_overwrite

EVAL_WINDOWS, EVAL_SEQLEN = 16, 128
CALIB_WINDOWS = 8

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- quantize
def quantize(out, model=None, scheme: str = "nonuniform", seed_bits: int = 3, max_bits: int = 8,
             group_size: int = 128, calib_windows: int = CALIB_WINDOWS, seqlen: int = EVAL_SEQLEN,
             exclude=DEFAULT_EXCLUDE, force: bool = False, progress: bool = True):
    """Quantize a model into an any-precision parent directory. Returns (Parent, manifest)."""
    from .quant.anyprec import check_bits
    from .quant.model import fisher_information, find_linears, quantize_model

    out = Path(out)
    if scheme == "nonuniform":
        check_bits(seed_bits, max_bits)  # fail before the slow steps
    refuse_overwrite(out, force)
    src = data.resolve_model(model)
    t0 = time.time()
    m, tok = data.load_model(src)
    logger.info(f"loaded {src.name} ({sum(p.numel() for p in m.parameters()) / 1e6:.1f}M parameters) "
         f"in {time.time() - t0:.1f}s")
    fisher = None
    calib = {"windows": 0}
    if scheme == "nonuniform" and calib_windows > 0:
        windows = data.token_windows(tok, data.CALIB_TEXT, calib_windows, seqlen)
        fisher = fisher_information(m, windows, find_linears(m, exclude), progress=progress)
        calib = {"text": data.CALIB_TEXT, "windows": calib_windows, "seqlen": seqlen}
    parent = quantize_model(m, scheme, seed_bits, max_bits, group_size, fisher, exclude, progress)
    parent.info.update({"source": {"model": str(src), "name": src.name, "sha256": data.source_sha256(src)},
                        "calibration": calib, "exclude": list(exclude)})
    manifest = parent.save(out)
    logger.info(f"wrote {out} ({manifest['files']['weights.safetensors']['bytes'] / 2**20:.1f} MiB) "
         f"in {time.time() - t0:.1f}s")
    return parent, manifest


def format_memory_report(parent) -> str:
    from .quant.model import memory_table

    lines = [f"memory: parent holding {parent.bit_widths[0]}..{parent.max_bits} bits vs one "
             f"{parent.max_bits}-bit model and vs {len(parent.bit_widths)} separate models (LUTs/scales counted)",
             f"{'layer type':<14}{'n':>4} {'shape':>10} {'parent MiB':>11} {'8-bit MiB':>10} {'separate MiB':>13}"
             f" {'parent/8bit':>12} {'separate/parent':>16}"]
    for r in memory_table(parent):
        lines.append(f"{r['type']:<14}{r['count']:>4} {r['shape']:>10} {r['parent'] / 2**20:>11.2f} "
                     f"{r['single'] / 2**20:>10.2f} {r['separate'] / 2**20:>13.2f} {r['parent/single']:>12.3f} "
                     f"{r['separate/parent']:>16.2f}")
    fp = sum(a.nbytes for a in parent.fp_tensors.values())
    lines.append(f"kept in full precision (fp32, {fp / 2**20:.1f} MiB): "
                 + ", ".join(_summarize_names(parent.fp_tensors)))
    if parent.tied:
        lines.append("tied (stored once): " + ", ".join(f"{a} = {b}" for a, b in parent.tied.items()))
    return "\n".join(lines)


def _summarize_names(names) -> list[str]:
    import re
    groups = {}
    for n in names:
        groups.setdefault(re.sub(r"\.\d+\.", ".*.", n), 0)
        groups[re.sub(r"\.\d+\.", ".*.", n)] += 1
    return [f"{g} (x{c})" if c > 1 else g for g, c in sorted(groups.items())]


# ----------------------------------------------------------------------------- eval
def eval_torch(parent_dir, bits=None, windows: int = EVAL_WINDOWS, seqlen: int = EVAL_SEQLEN,
               baselines: bool = True) -> list[dict]:
    """Perplexity per bit-width, dequantizing the parent into the torch model (the reference numbers)."""
    from .quant.model import Parent, perplexity, rtn_weights, swapped_weights

    parent = Parent.load(parent_dir)
    bits = parent.bit_widths if bits is None else list(bits)
    for b in bits:
        parent.check_bits(b)
    m, tok = data.load_model(parent.info.get("source", {}).get("model"))
    ids = data.token_windows(tok, data.EVAL_TEXT, windows, seqlen)
    rows = []

    def add(label, b, ppl):
        rows.append({"config": label, "bits": b, "ppl": ppl})
        logger.info(f"  {label:<28} ppl {ppl:9.3f}")

    logger.info(f"perplexity on {data.EVAL_TEXT}: {windows} windows x {seqlen} tokens (torch, dequantized weights)")
    add("fp32", 32, perplexity(m, ids))
    if baselines:
        with swapped_weights(m, rtn_weights(m, 4, 128, parent.info.get("exclude", ("lm_head",)))):
            add("RTN 4-bit g128", 4, perplexity(m, ids))
    for b in bits:
        with swapped_weights(m, parent.dequantized(b)):
            add(f"{parent.scheme} {b}-bit", b, perplexity(m, ids))
    return rows


def format_table(rows: list[dict]) -> str:
    base = next((r["ppl"] for r in rows if r["config"] == "fp32"), None)
    out = [f"{'config':<28}{'bits':>5}{'ppl':>10}{'vs fp32':>10}"]
    for r in rows:
        rel = f"{(r['ppl'] / base - 1) * 100:+.2f}%" if base else ""
        out.append(f"{r['config']:<28}{r['bits']:>5}{r['ppl']:>10.3f}{rel:>10}")
    return "\n".join(out)


def inspect(path) -> dict:
    """The manifest (checksums verified); a compiled artifact also gets "memory": the bytes of its weights and of
    one KV cache (computed, not stored; ``artifact.memory_summary``)."""
    m = read_manifest(path, verify=True)
    if m.get("kind") == "compiled":
        m["memory"] = memory_summary(m)
    return m


def evaluate(path, bits=None, windows: int = EVAL_WINDOWS, seqlen: int = EVAL_SEQLEN, baselines: bool = True) -> list[dict]:
    """``eval`` verb: a parent directory is evaluated with torch, a compiled artifact with TVM."""
    kind = read_manifest(path, verify=False).get("kind")
    if kind == "parent":
        return eval_torch(path, bits, windows, seqlen, baselines)
    if kind == "compiled":
        from .runtime import eval_artifact
        return eval_artifact(path, bits, windows, seqlen)
    raise ArtifactError(f"{path}: unknown artifact kind {kind!r}")


# ----------------------------------------------------------------------------- export / compile / run
EXPORT_CHUNK = 32
SOURCE_MARKER = "SOURCE"   # written by export next to the ONNX files: the model (and tokenizer) they came from


def export(out, model=None, chunk: int = EXPORT_CHUNK, max_len: int | None = None,
           verify_chunk=None, prune_ratio: float = 0.0, prune_layer: int | None = None) -> Path:
    """Export the model to ONNX: ``out/decode.onnx`` (1 token/step), ``out/prefill.onnx`` (chunk tokens) and the
    verify graphs, the verifying pass of self-speculative decoding: ``verify_chunk`` tokens per call (an int or
    several: ``verify.onnx`` the largest, ``verify_<n>.onnx`` the others; None: ``onnx_import.VERIFY_CHUNKS``,
    3 and 5; 0 or empty: none).
    ``max_len``: the KV cache length (None: the model's context, at most ``frontend.export.DEFAULT_MAX_CONTEXT``).
    ``prune_ratio`` > 0: the prefill graph prunes that fraction of each chunk's tokens from ``prune_layer`` on
    (default: the middle layer), Agile-Quant's token pruning (see frontend/export.py); decode and verify are
    not pruned. The settings are recorded in the graph's spec (ONNX metadata, then the artifact manifest)."""
    from .frontend.export import check_pruning, default_max_len, export_onnx, share_weights
    from .frontend.onnx_import import VERIFY_CHUNKS, graph_names, is_verify_name

    out = Path(out)
    src = data.resolve_model(model)
    m, _tok = data.load_model(src)
    max_len = int(max_len or default_max_len(m))
    prune_layer = check_pruning(prune_ratio, prune_layer, m.config.num_hidden_layers, chunk)  # before exporting
    t0 = time.time()
    graphs = graph_names(chunk, VERIFY_CHUNKS if verify_chunk is None else verify_chunk)
    if any(not 1 < s <= max_len for g, s in graphs if is_verify_name(g)):
        raise ValueError(f"verify chunks must be in 2..{max_len}, got {verify_chunk}")
    for name, s in graphs:
        prune = (prune_ratio, prune_layer) if name == "prefill" else (0.0, None)
        export_onnx(m, out / f"{name}.onnx", s, max_len, *prune)
        logger.info(f"exported {out / (name + '.onnx')} (chunk {s}, cache {max_len}"
            + (f", pruning {prune_ratio:g} of the tokens from layer {prune_layer}" if prune[0] else "")
            + f") [{time.time() - t0:.0f}s]")
    logger.info(f"the graphs share {share_weights([out / f'{n}.onnx' for n, _ in graphs]) / 2**20:.0f} MiB of weights")
    (out / SOURCE_MARKER).write_text(str(src) + "\n")
    return out


def graph_pruning(source) -> dict:
    """{graph file: (prune_ratio, prune_layer)} of the prefill graphs in an ONNX file or directory."""
    from .frontend.export import read_spec
    from .frontend.onnx_import import function_name, is_verify_name, load_onnx, onnx_files

    out = {}
    for path in onnx_files(source):
        if path.stem == "decode" or is_verify_name(path.stem):
            continue
        spec = read_spec(load_onnx(path))
        if spec is not None and function_name(path, spec) == "prefill":
            out[path.name] = (spec.prune_ratio, spec.prune_layer)
    return out


def _check_graph_pruning(source, prune_ratio, prune_layer) -> None:
    """--prune-ratio/--prune-layer given with ONNX graphs: the pruning is built into the graph at export, so
    the flags must describe it."""
    graphs = graph_pruning(source)
    if not graphs:
        raise ValueError(f"--prune-ratio: {source} has no prefill graph exported by tvm-anyprec; pruning is built "
                         "into the graph at export (`tvm-anyprec export --prune-ratio R`)")
    for name, (r, layer) in graphs.items():
        if abs(r - float(prune_ratio)) > 1e-9 or (prune_layer is not None and r and layer != prune_layer):
            have = f"prunes {r:g} of the tokens from layer {layer}" if r else "does not prune tokens"
            raise ValueError(f"{name} {have}, but --prune-ratio {prune_ratio:g}"
                             + (f" --prune-layer {prune_layer}" if prune_layer is not None else "")
                             + " was asked; token pruning is built into the graph at export: re-export with "
                             "`tvm-anyprec export --prune-ratio R [--prune-layer L]` (or compile the model by name)")


def compile(source, out, target: str = "x86", parent=None, exclude=None, force: bool = False,
            tuning_log=None, tokenizer=None, act_bits: int | None = None,
            act_outlier: str = "smooth", act_int4_all: bool = False, prune_ratio: float | None = None,
            prune_layer: int | None = None, accuracy: str | None = None, input_shapes: dict | None = None,
            lm_head_bits: int | str | None = "auto") -> dict:
    """ONNX file/dir -> artifact. ``accuracy`` (CPU targets): "int8" (default) or "exact", see
    ``schemes.anyprec.AnyPrec``. ``lm_head_bits``: the quantized tied lm_head/embedding runs at this
    bit-width whatever bits a call asks for (needs the lm_head in the parent: ``exclude=()``); None: fp32; "auto"
    (default; ``exclude`` None): ``schemes.anyprec.auto_lm_head_bits`` if the parent has the lm_head (one made
    here from a model does), else fp32. ``source`` may also be a model ('smollm2', .gguf, HF dir): then the ONNX
    export (``<out>.onnx/``) and the quantized parent (``<out>.parent/``) are made first when missing.
    ``act_bits`` 8|4: low-bit activations (W4A8, or W4A4 after self-attention / everywhere with
    ``act_int4_all``) instead of the bitplane operator; no parent is needed, the outlier handling is calibrated
    on the calibration text with the source model (see README "Low-bit activations").
    ``prune_ratio`` (and ``prune_layer``): token pruning in the prefill graph (see ``export``). With a model
    source the export is made (again, if its pruning differs) with these settings; ONNX sources must already
    have been exported with them (checked). None: whatever the graphs have (a model source: no pruning).
    ``input_shapes``: {input name: dims} for an ONNX graph from elsewhere whose inputs have dynamic dimensions."""
    from .compiler import compile_model
    from .frontend.onnx_import import exported
    from .schemes.anyprec import lm_head_plan, lm_head_settle

    lm_head_bits, exclude, auto = lm_head_plan(lm_head_bits, target, exclude, act_bits)
    if prune_ratio is not None and not 0.0 <= float(prune_ratio) < 1.0:
        raise ValueError(f"--prune-ratio must be in [0, 1), got {prune_ratio}")
    out, src = Path(out), Path(str(source))
    is_onnx = _is_onnx(src)
    if not is_onnx:
        model = data.resolve_model(source)
        onnx_dir = out.with_name(out.name + ".onnx")
        ratio = float(prune_ratio or 0.0)
        if not exported(onnx_dir, EXPORT_CHUNK):
            export(onnx_dir, model, prune_ratio=ratio, prune_layer=prune_layer)
        else:
            try:
                _check_graph_pruning(onnx_dir, ratio, prune_layer)
            except ValueError:
                logger.info(f"{onnx_dir}: exported with other token-pruning settings; exporting again")
                export(onnx_dir, model, prune_ratio=ratio, prune_layer=prune_layer)
        if parent is None and act_bits is None:
            parent = out.with_name(out.name + ".parent")
            if not (Path(parent) / MANIFEST).exists():
                quantize(parent, model, exclude=exclude, force=True)
        tokenizer = tokenizer or str(model)
        src = onnx_dir
    else:
        if prune_ratio is not None:
            _check_graph_pruning(src, prune_ratio, prune_layer)
        elif prune_layer is not None:
            raise ValueError("--prune-layer needs --prune-ratio")
    if is_onnx and tokenizer is None:
        marker = (src if src.is_dir() else src.parent) / SOURCE_MARKER
        if marker.exists():
            tokenizer = marker.read_text().strip()
    act = stats = None
    if act_bits is not None:
        from .quant import activations as A
        act = A.preset(act_bits, act_outlier, not act_int4_all)
        if act_outlier != "none":
            if tokenizer is None:
                raise ValueError("outlier calibration needs the source model: compile a model, or ONNX from "
                                 "`export` (its SOURCE marker), or pass act_outlier='none'")
            stats = calibrate_activations(tokenizer, exclude)
    lm_head_bits, exclude = lm_head_settle(lm_head_bits, exclude, auto, parent)
    return compile_model(src, out, target=target, parent=parent, exclude=exclude, force=force,
                         tuning_log=tuning_log, tokenizer=tokenizer, act_quant=act, act_stats=stats,
                         accuracy=accuracy, input_shapes=input_shapes, lm_head_bits=lm_head_bits)


_CALIB_MEMO: dict = {}


def calibrate_activations(model=None, exclude=ACT_EXCLUDE, windows: int = CALIB_WINDOWS,
                          seqlen: int = EVAL_SEQLEN) -> dict:
    """Per-channel max |x| of every linear input on the calibration text (for low-bit activations).
    Memoized per process (same model, exclusions, windows and length): compiling several activation
    variants of one model calibrates once."""
    from .quant.activations import calibrate_absmax
    from .quant.model import find_linears

    key = (str(data.resolve_model(model)), tuple(exclude or ()), windows, seqlen)
    if key in _CALIB_MEMO:
        return _CALIB_MEMO[key]
    m, tok = data.load_model(model)
    t0 = time.time()
    stats = calibrate_absmax(m, data.token_windows(tok, data.CALIB_TEXT, windows, seqlen), find_linears(m, exclude))
    logger.info(f"activation statistics from {windows} windows of {data.CALIB_TEXT} in {time.time() - t0:.1f}s")
    _CALIB_MEMO[key] = stats
    return stats


def load(artifact, remote=None):
    """-> runtime.Session: load once, then ``generate(prompt, bits=...)`` with any bit-width.

    ``remote``: where to run. None: this machine, or, for an aarch64 artifact on an x86 host, the emulated
    board (qemu-aarch64, set up by scripts/setup_arm.sh) with the CPU model of the artifact's preset.
    "qemu" or "qemu:<cpu>": the emulated board; "HOST:PORT": a TVM RPC server on a real device
    (``python -m tvm.exec.rpc_server --port PORT`` on the board); or a ``tvm.rpc.RPCSession``."""
    from .runtime import Session
    from .targets import TargetError, host_arch

    tp = read_manifest(artifact, kind="compiled", verify=False)["target"]
    if remote is None:
        if tp["arch"] == "aarch64" and host_arch() != "aarch64":
            from .targets.arm import missing
            why = missing()
            if why:
                raise TargetError(f"{artifact} is an aarch64 artifact ({tp['name']}) and this machine is "
                                  f"{host_arch()}; the emulated board is not available: {why}")
            remote = "qemu"
    if remote is None:
        return Session(artifact)
    if not isinstance(remote, str):
        return Session(artifact, remote=remote)
    if remote == "qemu" or remote.startswith("qemu:"):
        from .targets.arm import qemu_session
        cpu = remote.partition(":")[2] or tp.get("qemu_cpu", "max")
        logger.info(f"running on the emulated aarch64 board: qemu-aarch64 -cpu {cpu} (emulated, slow; not performance)")
        # under emulation a wide GEMM costs ~100x a decode step: prompts are fed token by token
        return Session(artifact, remote=qemu_session(cpu), remote_files=True, prompt_fn="decode")
    host, _, port = remote.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"remote must be 'qemu', 'qemu:<cpu>' or HOST:PORT of a TVM RPC server, got {remote!r}")
    from tvm import rpc
    try:
        sess = rpc.connect(host, int(port))
    except Exception as e:
        raise TargetError(f"cannot connect to the TVM RPC server at {remote}: {e}") from e
    return Session(artifact, remote=sess)


def run(artifact, prompt: str, bits: int = 8, max_new_tokens: int = 32) -> str:
    return load(artifact).generate(prompt, max_new_tokens, bits)


# ----------------------------------------------------------------------------- tune
def _is_onnx(src: Path) -> bool:
    return src.suffix == ".onnx" or (src.is_dir() and any(src.glob("*.onnx")))


def kernel_specs_of(source, exclude=DEFAULT_EXCLUDE, target: str = "x86") -> dict:
    """{kernel name: KernelSpec} of a model: from a compiled artifact's manifest, or by importing ONNX graphs
    (a file or directory) and running the rewrite pass the ``target`` preset's compile runs (its tunable
    linear kernels: on CPUs the fp32 dense ones, the bitplane kernel being explicit loops; on GPUs both), or,
    for a model name ('smollm2', a .gguf, an HF directory), by exporting it first (into the cache directory,
    once)."""
    from .errors import TuningError
    from .frontend.onnx_import import exported, import_onnx
    from .tune.driver import specs_of_manifest, tunable_specs

    src = Path(str(source))
    if (src / MANIFEST).exists():
        m = read_manifest(src, verify=False)
        if m.get("kind") != "compiled":
            raise TuningError(f"{src} is a {m.get('kind')!r} directory: give a compiled artifact, ONNX or a model")
        return specs_of_manifest(m, str(src))
    if not _is_onnx(src):
        model = data.resolve_model(source)
        src = data.cache_dir() / "onnx" / model.stem
        if not exported(src, EXPORT_CHUNK):
            export(src, model)
    from .schemes.anyprec import AnyPrec
    from .targets import preset

    rw = AnyPrec(3, 8).rewrite_pass(exclude, preset(target))
    return tunable_specs(rw(import_onnx(src).mod))


def model_kernels(source, exclude=DEFAULT_EXCLUDE, target: str = "x86") -> dict:
    """{kernel name: PrimFunc} of ``kernel_specs_of``."""
    return {name: spec.build() for name, spec in kernel_specs_of(source, exclude, target).items()}


def is_act_artifact(source) -> bool:
    """A compiled artifact with low-bit activations (``compile --act-bits``)?"""
    return (Path(str(source)) / MANIFEST).exists() and "act_quant" in read_manifest(Path(str(source)), verify=False)


def tune(source, target: str = "x86", trials: int = 32, log_dir=None, rpc=None, only=None, space: str = "project",
         progress: bool = True, seed: int = 0, exclude=DEFAULT_EXCLUDE) -> list[dict]:
    """Tune every distinct kernel of ``source`` (see ``kernel_specs_of``) for the ``target`` preset into
    ``log_dir`` (default ``env.default_log_dir(target)``); resumable (``tune.driver``). ``rpc``: a
    ``tune.RPC`` of remote devices. Returns one row per kernel."""
    from .tune.driver import TuneConfig, tune_kernels

    cfg = TuneConfig(target, trials, log_dir, rpc, only, space, progress, seed)
    return tune_kernels(kernel_specs_of(source, exclude, target), cfg)


def tune_variants(artifact, target: str, log_dir=None, rpc=None, progress: bool = True) -> list[dict]:
    """Measure the ARM integer-GEMM variants of a ``compile --act-bits`` artifact on the target's board and
    keep the fastest per kernel (``tune.variants``); ``compile`` then applies them."""
    from .tune.variants import tune_int_gemm_variants

    return tune_int_gemm_variants(read_manifest(artifact, kind="compiled", verify=False), target, log_dir, rpc,
                                  progress, where=str(artifact))
