"""Figure helpers for the teaching notebooks: one style, and the longer drawings, so that the
notebook cells keep to the idea they teach.

Every function takes the numbers the notebook computed and returns a matplotlib Figure (the
notebook shows it); nothing here computes a result the notebook asserts. The style: a title on
every figure, axes labelled with their units, a legend wherever there is more than one curve,
log scales where values span orders of magnitude, gridlines behind the data.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
from matplotlib.lines import Line2D

STYLE = {"figure.dpi": 100, "axes.grid": True, "grid.alpha": 0.3, "axes.axisbelow": True,
         "axes.spines.top": False, "axes.spines.right": False, "axes.titlesize": 11,
         "legend.fontsize": 8}


def style() -> None:
    """The notebooks' one plotting style (gridlines behind bars and lines)."""
    plt.rcParams.update(STYLE)


def _nodes_off(ax) -> None:
    """A node diagram: no grid, integer ticks."""
    ax.grid(False)
    ax.set_axisbelow(True)


# ----------------------------------------------------------------------------------------------
# Notebook 1


def query_grid(configs: dict, seen_nodes, t_q: int, l_q: int, T: int):
    """After the paper's Fig. 1: one panel per layout, a node per (token, layer); the query node
    (t_q, l_q), the nodes whose KVs it attends to (seen_nodes(config, t, layer) -> (seen, masked)),
    and the node hidden by the masked diagonal."""
    n = len(configs)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.8 * rows + 0.6), sharex=True,
                             sharey=True, squeeze=False)
    for ax, (name, c) in zip(axes.flat, configs.items()):
        L = c.n_layer
        seen, masked = seen_nodes(c, t_q, l_q)
        for i in range(L):
            computes = c.kv_sources[i] == i
            ax.scatter(range(T), [i] * T, s=90, zorder=2, edgecolors="0.45",
                       facecolors="0.75" if computes else "white", linewidths=1)
        if seen:
            ax.scatter(*zip(*seen), s=90, zorder=3, color="C0", edgecolors="C0")
        for k, s in seen:
            ax.plot([t_q, k], [l_q, s], color="C0", lw=0.6, alpha=0.5, zorder=1)
        if masked:
            ax.scatter(*masked, marker="x", s=160, color="C3", lw=2.5, zorder=4)
        ax.scatter([t_q], [l_q], marker="*", s=320, color="C1", edgecolors="k", zorder=5)
        ax.set_title(f"{name}: layer {l_q} reads layer {c.kv_sources[l_q]}\n"
                     f"{len(c.kv_layers)} of {L} layers compute KVs", fontsize=10)
        _nodes_off(ax)
        ax.set_yticks(range(L))
        ax.set_xticks(range(T))
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("token position")
    for ax in axes[:, 0]:
        ax.set_ylabel("layer")
    handles = [
        Line2D([], [], ls="", marker="*", ms=14, color="C1", mec="k", label="the query node"),
        Line2D([], [], ls="", marker="o", ms=9, color="C0", label="KVs the query attends to"),
        Line2D([], [], ls="", marker="x", ms=10, mew=2.5, color="C3",
               label="hidden by the masked diagonal (not computed yet)"),
        Line2D([], [], ls="", marker="o", ms=9, mfc="0.75", mec="0.45",
               label="node that computes (and caches) KVs"),
        Line2D([], [], ls="", marker="o", ms=9, mfc="white", mec="0.45",
               label="node without KVs (reads another layer)"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.suptitle(f"After the paper's Fig. 1: whose KVs does the query at token {t_q}, "
                 f"layer {l_q} read?")
    fig.tight_layout(rect=(0, 0.9 / (3.8 * rows + 0.6), 1, 1))
    return fig


def masks(masks: dict):
    """Boolean (query, key) masks side by side; blue: visible."""
    fig, axes = plt.subplots(1, len(masks), figsize=(3.7 * len(masks), 3.6))
    for ax, (title, m) in zip(axes, masks.items()):
        ax.imshow(m, cmap="Blues", vmin=0, vmax=1.3)
        ax.set_title(title)
        ax.set_xlabel("key position (token)")
        ax.set_ylabel("query position (token)")
        ax.grid(False)
    fig.suptitle("Which keys each query may see (blue: visible)")
    fig.tight_layout()
    return fig


def cache_bars(per_token: dict, n_kv_layers: dict, title: str):
    """Bytes per token of each variant as bars labelled with KiB and the number of KV layers."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    kib = [b / 2**10 for b in per_token.values()]
    bars = ax.bar(list(per_token), kib, color=[f"C{i}" for i in (7, 0, 2, 1, 4)][:len(kib)])
    ax.bar_label(bars, [f"{k:.0f} KiB\n({n_kv_layers[n]} layers)"
                        for n, k in zip(per_token, kib)], padding=2)
    ax.set_axisbelow(True)
    ax.set_ylabel("KV cache per token (KiB)")
    ax.set_xlabel("layout")
    ax.set_ylim(0, 1.25 * max(kib))
    ax.set_title(title)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# Notebook 2


def computation_graphs(seq_deps: dict, par_deps: dict, exact_from: dict, n_layer: int, T: int,
                       passes: int, title: str):
    """After the paper's Fig. 2: (a) the sequential computation, nodes (layer, token), coloured by
    the pass from which the parallel computation gets them exact (exact_from); (b) the parallel
    one, nodes (pass, layer, token), one colour per pass. *_deps map a node to the nodes it
    reads; a parallel dependency on pass 0 (the zero KVs) is drawn as a short grey stub."""
    colours = plt.get_cmap("viridis")(
        [0.1 + 0.8 * p / max(1, passes - 1) for p in range(passes)])
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 6.2),
                               gridspec_kw={"width_ratios": [1, 1.15]})

    def arrow(ax, src, dst, colour, lw, alpha, rad=0.0):
        ax.annotate("", xy=dst, xytext=src, zorder=1,
                    arrowprops=dict(arrowstyle="-|>", color=colour, lw=lw, alpha=alpha,
                                    shrinkA=7, shrinkB=7, mutation_scale=9,
                                    connectionstyle=f"arc3,rad={rad}"))

    # (a) sequential: x = token, y = layer
    for (i, t), deps in seq_deps.items():
        for (j, u) in deps:
            up = j > i  # reads a layer above: the KVs of an earlier token
            arrow(a, (u, j), (t, i), "C3" if up else "0.55", 1.3 if up else 0.7,
                  0.9 if up else 0.5, rad=0.25 if (j == i and t - u > 1) else 0.0)
    for (i, t) in seq_deps:
        p = exact_from[i, t]  # None: never exact within the passes drawn
        colour = colours[p - 1] if p else (0.85, 0.85, 0.85, 1.0)
        light = 0.3 * colour[0] + 0.6 * colour[1] + 0.1 * colour[2] > 0.5
        a.scatter(t, i, s=300, color=colour, edgecolors="k", zorder=3)
        a.annotate(f"{p or '-'}", (t, i), ha="center", va="center", fontsize=9,
                   color="k" if light else "w", zorder=4)
    a.legend(handles=[Line2D([], [], color="C3", lw=1.3, label="reads the KVs of a layer above "
                             "(earlier tokens only)"),
                      Line2D([], [], color="0.55", lw=0.7, label="reads the layer below (residual) "
                             "or its own layer's KVs")],
             loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    a.set_xticks(range(T))
    a.set_yticks(range(n_layer))
    a.set_xlim(-0.5, T - 0.5)
    a.set_ylim(-0.5, n_layer - 0.5)
    a.set_xlabel("token position")
    a.set_ylabel("layer")
    a.set_title("(a) sequential: token by token\n(number: the pass that makes the node exact)")
    _nodes_off(a)

    # (b) parallel: x = token, y = pass p's layers stacked above pass p-1's
    def y(p, i):
        return (p - 1) * (n_layer + 0.8) + i

    for (p, i, t), deps in par_deps.items():
        if any(q == 0 for q, _, _ in deps):  # reads the zero start: one stub from below
            arrow(b, (t - 0.3, y(p, i) - 0.75), (t, y(p, i)), "0.6", 0.9, 0.7)
        for (q, j, u) in deps:
            if q == 0:
                continue
            if q < p:  # a KV of the previous pass (a layer above, read before it runs again)
                arrow(b, (u, y(q, j)), (t, y(p, i)), colours[q - 1], 1.3, 0.9)
            else:
                arrow(b, (u, y(q, j)), (t, y(p, i)), "0.55", 0.6, 0.4,
                      rad=0.25 if (j == i and t - u > 1) else 0.0)
    for (p, i, t) in par_deps:
        b.scatter(t, y(p, i), s=200, color=colours[p - 1], edgecolors="k", zorder=3)
    b.set_xticks(range(T))
    b.set_yticks([y(p, i) for p in range(1, passes + 1) for i in range(n_layer)],
                 [f"pass {p}, layer {i}" for p in range(1, passes + 1) for i in range(n_layer)])
    b.set_xlim(-0.5, T - 0.5)
    b.set_xlabel("token position")
    b.set_title("(b) parallel: all tokens at once, pass after pass\n"
                "(coloured arrows: KVs of the previous pass; grey stubs: the zero start)")
    _nodes_off(b)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def wavefront(error, title: str):
    """log10 relative KV error per (pass, token), with the staircase t < p."""
    n_pass, T = error.shape
    fig, ax = plt.subplots(figsize=(7, 5.2))
    image = ax.imshow(error.clamp_min(1e-17).log10(), origin="lower", cmap="magma_r", vmin=-17,
                      vmax=0, aspect="auto")
    ax.step([t - 0.5 for t in range(T + 1)], [t + 0.5 for t in range(T + 1)], where="post",
            color="C0", lw=2, label="token t becomes exact at pass t + 1")
    fig.colorbar(image, label="log10 relative |KV after p passes - sequential KV|")
    ax.set_xlabel("token position t")
    ax.set_ylabel("passes p")
    ax.set_xlim(-0.5, T - 0.5)
    ax.set_title(title)
    ax.legend(loc="upper left")
    ax.grid(False)
    fig.tight_layout()
    return fig


def convergence(curves: dict, lengths: list, mark: int, title: str):
    """Fig. 3 extended to several lengths: one panel per model; for each length T, the relative
    error of the KVs against the exact ones after p passes (solid) and the relative change made
    by pass p (dotted). curves[model][T] = {"error": [...], "change": [...]}, entry p-1 for pass p.
    A value of exactly 0 ends a curve (log scale)."""
    models = list(curves)
    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 4.7), sharey=True,
                             squeeze=False)
    colour = {T: f"C{k}" for k, T in enumerate(lengths)}
    for ax, name in zip(axes[0], models):
        for T in lengths:
            for key, ls in (("error", "-"), ("change", ":")):
                values = [v if v > 0 else math.nan for v in curves[name][T][key]]
                ax.plot(range(1, len(values) + 1), values, ls, color=colour[T],
                        marker="." if key == "error" else None, ms=4)
        ax.axvline(mark, color="k", lw=1, ls="--")
        ax.set_yscale("log")
        ax.set_xlabel("passes p")
        ax.set_title(name)
    axes[0, 0].set_ylabel("relative size (|difference| / |KVs|)")
    handles = [Line2D([], [], color=colour[T], label=f"T = {T} tokens") for T in lengths]
    handles += [Line2D([], [], color="k", ls="-", marker=".", label="error vs exact KVs"),
                Line2D([], [], color="k", ls=":", label="change made by pass p"),
                Line2D([], [], color="k", ls="--", lw=1, label=f"m + b = {mark} (the paper's)")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def versus_length(values: dict, lengths: list, ylabel: str, title: str):
    """One line per model: a quantity against the sequence length (log-log)."""
    fig, ax = plt.subplots(figsize=(6.2, 4))
    for k, (name, ys) in enumerate(values.items()):
        ax.plot(lengths, ys, marker="o", color=f"C{k}", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths, [str(T) for T in lengths])
    ax.set_xlabel("sequence length T (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def gradient_error(bs: list, errors: list, title: str):
    """Relative gradient error against b (log scale)."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.semilogy(bs, errors, marker="o", label="|g_b - g_exact| / |g_exact|")
    ax.set_xlabel("b, passes with gradient (m = T - b without)")
    ax.set_ylabel("relative gradient error")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# Notebook 4


def cache_layout(layouts: dict, capacity: int, title: str):
    """One panel per layout: a row per layer, a cell per token slot of the cache, each cell drawn
    with its own border. layouts[name] = (kv_sources, cached layers, bytes): a cached layer's
    cells are filled; a layer without a buffer is a grey band naming the layer it reads."""
    from matplotlib.patches import Rectangle
    fig, axes = plt.subplots(1, len(layouts), figsize=(4.4 * len(layouts), 4.2), sharey=True,
                             squeeze=False)
    for ax, (name, (sources, cached, nbytes)) in zip(axes[0], layouts.items()):
        n_layer = len(sources)
        for i in range(n_layer):
            if i in cached:
                for t in range(capacity):
                    ax.add_patch(Rectangle((t - 0.5, i - 0.4), 1, 0.8, facecolor="C0",
                                           edgecolor="white", lw=1.2))
            else:
                ax.add_patch(Rectangle((-0.5, i - 0.4), capacity, 0.8, facecolor="0.92",
                                       edgecolor="0.7", lw=0.8))
                ax.text(capacity / 2 - 0.5, i, f"no buffer: reads layer {sources[i]}",
                        ha="center", va="center", fontsize=8, color="0.3")
        ax.set_xlim(-0.7, capacity - 0.3)
        ax.set_ylim(-0.7, n_layer - 0.3)
        ax.set_xticks(range(0, capacity, 4 if capacity > 8 else 1))
        ax.set_yticks(range(n_layer))
        ax.set_xlabel(f"token slot (one cell = one token's K and V, {capacity} slots)")
        ax.set_title(f"{name}: {len(cached)} of {n_layer} layers cached\n{nbytes:,} bytes")
        ax.grid(False)
    axes[0, 0].set_ylabel("layer")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def grouped_bars(values: dict, groups: list, group_labels: list, ylabel: str, title: str):
    """values[(name, group)] -> a number; one colour per name, bars grouped by `groups`,
    each bar labelled with its value; gridlines behind the bars."""
    names = list(dict.fromkeys(name for name, _ in values))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.set_axisbelow(True)
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        xs = [j + (k - (len(names) - 1) / 2) * width for j in range(len(groups))]
        bars = ax.bar(xs, [values[name, g] for g in groups], width, label=name,
                      color=["C7", "C0", "C2", "C1", "C3"][k % 5])
        ax.bar_label(bars, padding=2)
    ax.set_xticks(range(len(groups)), group_labels)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.15 * max(values.values()))
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def encoding_passes(passes: list, ms: list, seq_ms: float, error: list, kv_change: list,
                    stops: dict, cap: int, P: int):
    """Three panels sharing the passes axis: encoding time; the largest logit error against the
    sequential computation; the largest KV change made by pass p, with the adaptive encoding's
    stopping points (stops[tol] -> passes) and the model's own cap m + b shaded beyond."""
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(7.5, 9), sharex=True)
    ax1.plot(passes, ms, marker="o", label="parallel: p passes over all tokens")
    ax1.axhline(seq_ms, color="C3", ls="--", label=f"sequential: {P} one-token steps (exact)")
    ax1.set_ylabel("encoding time (ms, fastest run)")
    ax1.set_ylim(0, 1.15 * max(max(ms), seq_ms))
    ax1.set_title(f"Encoding a {P}-token prompt: time, error and KV change against passes")
    ax1.legend(loc="center left")
    ax2.semilogy(passes, [max(e, 1e-16) for e in error], marker="o", color="C0",
                 label="max |logit - sequential logit| over all positions")
    ax2.set_ylabel("logit error (logit units)")
    ax2.legend(loc="upper right")
    ax3.semilogy(passes[1:], kv_change[1:], marker="s", color="C1",
                 label="max |KV after pass p - KV after pass p-1|")
    for k, ((tol, p), color) in enumerate(zip(stops.items(), ["C2", "C4", "C5", "C6"])):
        ax3.axhline(tol, color=color, ls=":", lw=1)
        # growing rings, so that tolerances stopping at the same pass stay visible
        ax3.plot([p], [kv_change[p - 1]], marker="o", ms=9 + 5 * k, mfc="none", mec=color, mew=2,
                 ls="none", label=f"adaptive, tol {tol:g} (dotted): stops after {p} passes")
    ax3.set_ylabel("KV change (KV units)")
    ax3.set_xlabel("passes p")
    legend = ax3.legend(loc="lower left", fontsize=7)
    for handle in getattr(legend, "legend_handles", None) or legend.legendHandles:
        handle.set_markersize(8)  # the rings grow on the plot, not in the legend
    for ax in (ax1, ax2, ax3):
        ax.axvspan(cap + 0.5, passes[-1] + 0.5, color="0.93", zorder=0)
        ax.set_xticks(passes)
    ax1.text(cap + 0.7, ax1.get_ylim()[1] * 0.5,
             f"shaded: beyond m + b = {cap}\n(the model's own cap)",
             fontsize=7, va="center", color="0.4")
    fig.tight_layout()
    return fig


def memory_curves(memory: dict, n_new: int, title: str):
    """memory[(model, how)] -> bytes in use after each generated token. Plain caches solid and
    thin, streaming caches dashed, thick and drawn on top (the two coincide until the window
    fills)."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for (name, how), used in memory.items():
        plain = how == "plain cache"
        ax.plot(range(1, n_new + 1), [u / 2**10 for u in used],
                color="C7" if name == "standard" else "C0", ls="-" if plain else "--",
                lw=1.5 if plain else 2.8, zorder=2 if plain else 3, label=f"{name}, {how}")
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("KV cache in use (KiB)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig
