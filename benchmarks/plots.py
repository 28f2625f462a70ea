"""PNG plots of a results dict (matplotlib, Agg backend): latency vs bits, fraction of memory bandwidth,
perplexity vs memory, whole-model decode/prefill."""
from __future__ import annotations

from pathlib import Path

PEER_STYLE = {"numpy": ("numpy fp32", "tab:gray", "--"), "tvm-dense": ("TVM fp32 dense", "tab:green", ":"),
              "ort-fp32": ("ORT fp32 MatMul", "tab:orange", "-.")}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_log_ticks(ax, axis="y"):
    """Log axis with plain numbers (0.3, 1, 10) instead of 3x10^-1."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    a = ax.yaxis if axis == "y" else ax.xaxis
    a.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    a.set_major_formatter(fmt)
    a.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _err(rows):
    med = [r["median_s"] * 1e3 for r in rows]
    return med, [[m - r["min_s"] * 1e3 for m, r in zip(med, rows)], [r["max_s"] * 1e3 - m for m, r in zip(med, rows)]]


def latency_vs_bits(res: dict, path: Path) -> Path:
    plt = _plt()
    rows = res["kernels"]["rows"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    ms = sorted({r["M"] for r in rows})
    fig, axes = plt.subplots(len(ms), len(shapes), figsize=(3.2 * len(shapes), 3.0 * len(ms)), squeeze=False)
    for i, M in enumerate(ms):
        for j, shape in enumerate(shapes):
            ax = axes[i][j]
            sel = [r for r in rows if r["shape"] == shape and r["M"] == M]
            bp = sorted((r for r in sel if r["family"] == "bitplane"), key=lambda r: r["bits"])
            if bp:
                med, err = _err(bp)
                ax.errorbar([r["bits"] for r in bp], med, yerr=err, marker="o", color="tab:blue", label="bitplane (ours)",
                            capsize=2)
            for fam, (label, color, ls) in PEER_STYLE.items():
                for r in sel:
                    if r["family"] == fam:
                        ax.axhline(r["median_s"] * 1e3, color=color, ls=ls, label=label)
            for r in sel:
                if r["family"] == "ort-nbits":
                    mk = {32: "s", 128: "^"}[r["block"]]
                    face = "tab:red" if r["accuracy_level"] == 4 else "none"
                    ax.plot([r["bits"] + (0.12 if r["block"] == 128 else -0.12)], [r["median_s"] * 1e3], mk,
                            color="tab:red", markerfacecolor=face,
                            label=f"ORT NBits b{r['block']} acc{r['accuracy_level']}")
            ax.set_yscale("log")
            _plain_log_ticks(ax)
            ax.set_xticks(range(3, 9))
            ax.set_title(f"{'GEMV' if M == 1 else f'GEMM M={M}'} {shape}", fontsize=9)
            ax.grid(alpha=0.3, which="both")
            if j == 0:
                ax.set_ylabel("ms (median, bars min..max)")
            if i == len(ms) - 1:
                ax.set_xlabel("weight bits")
    handles, labels = axes[0][0].get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    fig.legend(uniq.values(), uniq.keys(), loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(f"Kernel latency vs weight bits ({res['machine']['cpu']}, {res['machine']['threads']} threads, "
                 f"{res['machine']['date']}; caches flushed before each call)", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def bandwidth_fraction(res: dict, path: Path, M: int = 1) -> Path:
    plt = _plt()
    rows = [r for r in res["kernels"]["rows"] if r["M"] == M]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(3.3 * len(shapes), 5.2), squeeze=False, sharey=True)
    labels = list(dict.fromkeys(r["label"] for r in rows))
    color = {"bitplane": "tab:blue", "tvm-dense": "tab:green", "numpy": "tab:gray", "ort-fp32": "tab:orange",
             "ort-nbits": "tab:red"}
    for j, shape in enumerate(shapes):
        ax = axes[0][j]
        by = {r["label"]: r for r in rows if r["shape"] == shape}
        vals = [by[l]["bw_fraction"] if l in by else 0 for l in labels]
        cols = [color.get(by[l]["family"], "k") if l in by else "w" for l in labels]
        ax.barh(range(len(labels)), vals, color=cols)
        ax.axvline(1.0, color="k", lw=1)
        ax.axvline(0.5, color="k", lw=1, ls="--")
        ax.set_title(shape, fontsize=9)
        ax.set_xlabel("bytes to read / time / DRAM BW")
        ax.grid(alpha=0.3, axis="x")
    axes[0][0].set_yticks(range(len(labels)))
    axes[0][0].set_yticklabels(labels, fontsize=7)
    axes[0][0].invert_yaxis()
    bw = res["bandwidth"]["dram"]["GBps"]
    fig.suptitle(f"GEMV effective bandwidth as a fraction of measured read bandwidth ({bw:.1f} GB/s, "
                 f"{res['machine']['threads']} threads); dashed = 50% goal", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def ppl_vs_memory(res: dict, path: Path) -> Path:
    plt = _plt()
    mem = {r["config"]: r for r in res["memory"]["rows"]}
    mem_by = {}
    for r in res["memory"]["rows"]:
        mem_by.setdefault((r.get("kind"), r["bits"], r.get("block")), r)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    pts = []
    for r in res["ppl"]["rows"]:
        c = r["config"]
        if c.startswith("tvm-anyprec"):
            m, col, mk = mem_by[("anyprec-read", r["bits"], None)], "tab:blue", "o"
        elif c == "onnxruntime fp32":
            m, col, mk = mem["fp32"], "k", "*"
        elif c.startswith("onnxruntime"):
            blk = int(c.split(" b")[1].split()[0])
            m, col, mk = mem_by[("ort-nbits", r["bits"], blk)], "tab:red", "s"
        elif c.startswith("RTN"):
            m, col, mk = mem_by[("rtn", 4, None)], "tab:purple", "D"
        else:
            continue
        pts.append((m["MiB"], r["ppl"], c, col, mk))
    for x, y, c, col, mk in pts:
        ax.plot([x], [y], mk, color=col)
        ax.annotate(c.replace("tvm-anyprec ", "ours ").replace("onnxruntime ", "ORT "), (x, y), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ours = sorted((p for p in pts if p[2].startswith("tvm-anyprec")), key=lambda p: p[0])
    ax.plot([p[0] for p in ours], [p[1] for p in ours], "-", color="tab:blue", alpha=0.5)
    parent = next(r for r in res["memory"]["rows"] if r.get("kind") == "anyprec-parent")
    ax.axvline(parent["MiB"], color="tab:blue", ls=":", label=f"our parent, all of 3..8 bits ({parent['MiB']:.0f} MiB)")
    ax.set_xscale("log")
    _plain_log_ticks(ax, "x")
    ax.set_xlabel("weight MiB of the quantized linear layers (read per token)")
    ax.set_ylabel(f"perplexity ({res['ppl']['text']}, {res['ppl']['windows']}x"
                  f"{res['ppl']['seqlen']} tokens)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title("SmolLM2-135M: perplexity vs weight memory", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def model_latency(res: dict, path: Path) -> Path:
    plt = _plt()
    rows = res["model"]["rows"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [r["config"] for r in rows]
    cols = ["tab:blue" if l.startswith("tvm-anyprec") else "tab:green" if l.startswith("TVM") else "tab:red"
            if "bit" in l else "tab:orange" for l in labels]
    a1.barh(range(len(rows)), [r["decode_tokens_per_s"] for r in rows], color=cols)
    a1.set_yticks(range(len(rows)))
    a1.set_yticklabels(labels, fontsize=7)
    a1.invert_yaxis()
    a1.set_xlabel("decode tokens/s (1 / median step)")
    pre = [r for r in rows if "prefill" in r]
    a2.barh(range(len(pre)), [r["prefill"]["median_s"] * 1e3 for r in pre], color=cols[:len(pre)])
    a2.set_yticks(range(len(pre)))
    a2.set_yticklabels([r["config"] for r in pre], fontsize=7)
    a2.invert_yaxis()
    a2.set_xlabel(f"prefill latency, {pre[0]['prefill_tokens']} tokens (ms, median)" if pre else "")
    for a in (a1, a2):
        a.grid(alpha=0.3, axis="x")
    fig.suptitle(f"SmolLM2-135M whole model ({res['machine']['threads']} threads, {res['machine']['date']})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def make_plots(res: dict, out_dir: Path, stem: str) -> list[str]:
    out = []
    if res.get("kernels", {}).get("rows"):
        out.append(latency_vs_bits(res, out_dir / f"{stem}-latency-vs-bits.png"))
        out.append(bandwidth_fraction(res, out_dir / f"{stem}-bandwidth-fraction.png"))
    if res.get("ppl", {}).get("rows") and res.get("memory"):
        out.append(ppl_vs_memory(res, out_dir / f"{stem}-ppl-vs-memory.png"))
    if res.get("model", {}).get("rows"):
        out.append(model_latency(res, out_dir / f"{stem}-model.png"))
    return [str(p) for p in out]
