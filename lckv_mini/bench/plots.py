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
    "layouts": dict(title="The study's families: training step time relative to standard",
                    ylabel="step time / standard",
                    rotate=True,
                    series=lambda rows: ratio_bars(
                        [r for r in rows if r["part"] == "train"],
                        lambda r: f"{r['family']}, {r['kv_layers']} KV")),
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

