"""PNGs shaped like the paper's figures, one per benchmark (needs matplotlib)."""

from __future__ import annotations

from pathlib import Path


def ratio_bars(rows, category):
    """Bars of the measured ratio beside the FLOP prediction, one pair per category."""
    return [(label, {category(r): r[key] for r in rows})
            for label, key in (("measured", "time_ratio"), ("FLOP count", "flop_ratio"))]


# How each benchmark is drawn: lines (y against x, one line per value of `lines`) or grouped bars
# (`series` gives (label, {category: value}) pairs).
PLOTS = {
    "memory": dict(title="Largest batch under the memory budget (Table 1 setting)",
                   ylabel="batch (sequences)", ylog=True,
                   series=lambda rows: [(shape, {r["model"]: r["max_batch"] for r in rows
                                                 if r["shape"] == shape})
                                        for shape in dict.fromkeys(r["shape"] for r in rows)]),
    "throughput": dict(title="Generation throughput against batch size (Fig. 4)", lines="model",
                       x="batch", y="tokens_per_s", xlabel="batch size (sequences)",
                       ylabel="generated tokens/s", xlog=True),
    "prefill": dict(title="Prompt encoding latency", lines="mode", x="prompt_len", y="median_ms",
                    xlabel="prompt length (tokens)", ylabel="latency (ms)"),
    "train": dict(title="Training step time relative to the standard model",
                  ylabel="step time / standard",
                  series=lambda rows: ratio_bars([r for r in rows if r["mode"] == "parallel"],
                                                 lambda r: r["model"])),
    "passes": dict(title="Passes without their wasted work: step time after / before",
                   ylabel="after / before",
                   series=lambda rows: ratio_bars(rows, lambda r: f"{r['n_layer']} layers")),
    "layouts": dict(draw=lambda result, out_dir: plot_layouts(result, out_dir)),
    "streaming": dict(title="Streaming decode latency against cache size (Fig. 5)",
                      lines="model", x="cache_tokens", y="ms_per_token",
                      xlabel="cache size (tokens)", ylabel="ms per generated token"),
}


def plot(name: str, result: dict, out_dir: Path) -> Path:
    """A PNG shaped like the paper's figure for this benchmark (needs matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    spec, rows = PLOTS[name], result["rows"]
    if "draw" in spec:
        return spec["draw"](result, out_dir)
    fig, ax = plt.subplots(figsize=(6, 4))
    if "lines" in spec:
        for key in dict.fromkeys(r[spec["lines"]] for r in rows):
            pts = [(r[spec["x"]], r[spec["y"]]) for r in rows if r[spec["lines"]] == key]
            ax.plot(*zip(*pts), marker="o", label=str(key))
        ax.set_xlabel(spec["xlabel"])
        if spec.get("xlog"):
            ax.set_xscale("log", base=2)
    else:
        series = spec["series"](rows)
        cats = list(dict.fromkeys(c for _, values in series for c in values))
        width = 0.8 / len(series)
        for k, (label, values) in enumerate(series):
            bars = ax.bar([i + k * width for i in range(len(cats))],
                          [values.get(c, 0) for c in cats], width, label=label)
            ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(cats))], cats)
        if spec.get("rotate"):
            ax.tick_params(axis="x", labelrotation=60, labelsize=7)
        if spec.get("ylog"):
            ax.set_yscale("log")
    ax.set_ylabel(spec["ylabel"])
    ax.set_title(f"{spec['title']}\n{result['device']}, {result['machine']['cpu_count']} CPU "
                 f"cores, torch {result['machine']['torch']}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path



def plot_layouts(result: dict, out_dir: Path) -> Path:
    """The nine families, one panel per (part, cache size): bars of the measured time relative
    to standard, grouped by partition, with the FLOP count's prediction as a black tick."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result["rows"] if r["part"] in ("train", "prefill")
            and r["family"] != "standard"]
    sizes = sorted({r["kv_layers"] for r in rows}, reverse=True)
    parts = {"train": "training step (m=7, b=2)", "prefill": "prompt encoding"}
    n_layer = max(r["kv_layers"] for r in result["rows"] if r.get("family") == "standard")
    positions = ("bottom", "middle", "top")
    fig, axes = plt.subplots(len(parts), len(sizes), figsize=(4.2 * len(sizes), 6.4),
                             sharey="row", squeeze=False)
    for (part, label), ax_row in zip(parts.items(), axes):
        for k, ax in zip(sizes, ax_row):
            for j, partition in enumerate(("pizza", "sandwich", "lasagna")):
                for i, pos in enumerate(positions):
                    r = next((r for r in rows if r["part"] == part and r["kv_layers"] == k
                              and r["family"] == f"{partition}-{pos}"), None)
                    if r is None:
                        continue
                    x = 4 * j + i
                    ax.bar(x, r["time_ratio"], 0.8, color=f"C{i}",
                           hatch="//" if r.get("same_as") else None,
                           label=pos if j == 0 else None)
                    ax.plot([x - 0.4, x + 0.4], [r["flop_ratio"]] * 2, color="black", lw=2,
                            label="FLOP prediction" if (j, i) == (0, 0) else None)
            ax.axhline(1.0, color="0.4", ls="--", lw=1, label="standard (1.0)")
            ax.set_xticks([1, 5, 9], ["pizza", "sandwich", "lasagna"])
            ax.set_axisbelow(True)
            ax.grid(axis="y", alpha=0.3)
            ax.set_title(f"{label}, {k} of {n_layer} layers cache KVs", fontsize=10)
        ax_row[0].set_ylabel("time / standard's time")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, [f"KV target: {t}" if t in positions else t for t in labels],
               loc="lower center", ncol=5, fontsize=8, frameon=False)
    m = result["machine"]
    fig.suptitle(f"The follow-up study's nine families against the standard model\n"
                 f"{result['device']}, {m['cpu_count']} cores, torch {m['torch']}; hatched: "
                 "the same layout as another family", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path = out_dir / "layouts.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
