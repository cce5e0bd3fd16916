"""The follow-up study's quality question at toy scale (arXiv 2410.14442): the exact validation
loss of each of the nine families at a 2x and a 4x smaller cache than the standard model's,
several seeds each, characters of tiny Shakespeare.

    python -m lckv_mini.bench quality --out results/cpu-2core --plot

Every run trains one layout with one seed (the recipe is the same for all: AdamW, the paper's
m=7, b=2 for the iterated layouts, the same batches for every layout given a seed) and scores it
with the sequential computation, which is what generation computes, so an iterated layout is
not flattered by its training computation. Runs are written one file each under
<out>/quality_runs/ as they finish: an interrupted run resumes where it stopped, and processes
started side by side share the work (each run is claimed by a lock file). quality.json gathers
the runs of the recipe asked for, with the noise rule of notebook 06 (two standard errors of a
difference of means, from the seed spread pooled over every layout).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..config import PARTITIONS, TARGETS, LCKVConfig, make_layer_types
from ..data import Tokenizer, atomic_write_bytes, get_batch, read_text, shakespeare_path, split
from ..model import LCKVModel
from .common import machine, table
from .layouts import FAMILIES
from .realmodel import exact_loss, lr_at, validation_windows

RECIPE = ("layers", "n_embd", "n_head", "seq_len", "batch", "steps", "lr", "warmup", "m", "b",
          "windows")  # what a run's result depends on, besides its layout and seed


def layouts(n_layer: int, kv: list[int]) -> dict:
    """(family, KV layers) -> layer_types, and "standard"; a family that the builder refuses at
    that size (lasagna-middle, whose middle is its top) is left out."""
    out = {("standard", n_layer): make_layer_types("standard", n_layer)}
    for k in kv:
        for family in FAMILIES:
            try:
                out[family, k] = make_layer_types(family, n_layer, n_kv_layers=k)
            except ValueError:
                pass
    return out


def run_key(recipe: dict, layer_types: str, seed: int) -> str:
    blob = json.dumps({**recipe, "layer_types": layer_types, "seed": seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def claim(lock: Path) -> bool:
    """Take the run behind `lock` for this process (False: another live process has it). A lock
    left by a process that is gone (killed, crashed) is taken over, so a run resumes."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(lock.read_text() or 0), 0)
            return False  # its process is alive
        except (ProcessLookupError, ValueError):
            lock.unlink(missing_ok=True)
            return claim(lock)
        except PermissionError:
            return False  # alive, another user's
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def train_and_score(recipe: dict, layer_types: str, seed: int, vocab: int, train_ids,
                    windows) -> dict:
    """Train one layout from seed `seed` and return its exact validation loss."""
    torch.manual_seed(seed)
    config = LCKVConfig(vocab_size=vocab, n_layer=recipe["layers"], n_head=recipe["n_head"],
                        n_kv_head=recipe["n_head"], n_embd=recipe["n_embd"],
                        intermediate_size=round(8 * recipe["n_embd"] / 3),
                        block_size=recipe["seq_len"], layer_types=layer_types,
                        forward_passes=recipe["m"], backward_passes=recipe["b"])
    model = LCKVModel(config)
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=recipe["lr"], betas=(0.9, 0.95))
    data = torch.Generator().manual_seed(seed)  # the same batches for every layout
    losses, t0 = [], time.perf_counter()
    model.train()
    for step in range(recipe["steps"]):
        x, y = get_batch(train_ids, recipe["batch"], recipe["seq_len"], data)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe["steps"], recipe["lr"], recipe["warmup"])
        _, loss = model(x, y)  # parallel: m + b passes over the iterated layers
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    seconds = time.perf_counter() - t0
    model.eval()
    return {"layer_types": layer_types, "seed": seed, "exact": exact_loss(model, windows),
            "train_loss_last10": float(np.mean(losses[-10:])), "first_loss": losses[0],
            "train_seconds": seconds, "kv_layers": len(config.kv_layers),
            "groups": len(config.iteration_groups)}


def noise(runs: list[dict]) -> tuple[float, float]:
    """(seed SD pooled over every layout, the threshold for a difference of two layouts' means:
    two standard errors)."""
    by = {}
    for r in runs:
        by.setdefault(r["layer_types"], []).append(r["exact"])
    spread = [np.var(v, ddof=1) for v in by.values() if len(v) > 1]
    sd = float(np.sqrt(np.mean(spread))) if spread else float("nan")
    n = max(len(v) for v in by.values())
    return sd, 2 * sd * np.sqrt(2 / n)


def summarise(recipe: dict, runs: list[dict], kv: list[int]) -> dict:
    lay = layouts(recipe["layers"], kv)
    by = {}
    for r in runs:
        by.setdefault(r["layer_types"], []).append(r["exact"])
    std = lay["standard", recipe["layers"]]
    sd, threshold = noise(runs)
    std_mean = float(np.mean(by[std])) if std in by else float("nan")
    rows = []
    for (family, k), spec in lay.items():
        if spec not in by:
            continue
        mean = float(np.mean(by[spec]))
        delta = mean - std_mean
        rows.append({"family": family, "kv_layers": k, "layer_types": spec,
                     "same_as": ", ".join(f for (f, kk), s in lay.items()
                                          if s == spec and (f, kk) != (family, k)),
                     "seeds": len(by[spec]), "mean": mean, "min": min(by[spec]),
                     "max": max(by[spec]), "delta": delta,
                     "verdict": "standard" if family == "standard" else
                     "within the noise" if abs(delta) <= threshold else
                     "higher" if delta > 0 else "lower"})
    return {"rows": rows, "seed_sd": sd, "threshold": threshold, "standard_mean": std_mean}


def run_quality(args) -> dict:
    recipe = {k: getattr(args, k) for k in RECIPE}
    text = (read_text(args.data) if args.data
            else shakespeare_path(args.cache_dir).read_text("utf-8"))
    if args.data:  # another text: other results (tiny Shakespeare's recipes stay as they were)
        recipe["data"] = hashlib.sha256(text.encode()).hexdigest()[:16]
    tokenizer = Tokenizer.fit("char", text)
    train_ids, val_ids = split(np.array(tokenizer.encode(text), dtype=np.int64))
    windows = validation_windows(val_ids, args.windows, args.seq_len)
    runs_dir = Path(args.out) / "quality_runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    lay = layouts(args.layers, args.kv)
    distinct = list(dict.fromkeys(lay.values()))
    todo = [(spec, seed) for seed in args.seeds for spec in distinct]
    for i, (spec, seed) in enumerate(todo):
        path = runs_dir / f"{run_key(recipe, spec, seed)}.json"
        lock = path.with_suffix(".lock")
        if path.exists() or not claim(lock):  # done, or being done by a parallel process
            continue
        try:
            r = train_and_score(recipe, spec, seed, tokenizer.vocab_size, train_ids, windows)
            atomic_write_bytes(path, json.dumps({**r, "recipe": recipe}, indent=1).encode())
        finally:
            lock.unlink(missing_ok=True)
        print(f"[{i + 1}/{len(todo)}] {spec:36s} seed {seed:5d}  exact {r['exact']:.4f}  "
              f"({r['train_seconds']:.0f} s)", flush=True)
    runs = [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))]
    runs = [r for r in runs if r.pop("recipe") == recipe and r["layer_types"] in distinct]
    summary = summarise(recipe, runs, args.kv)
    table(summary["rows"], ["kv_layers", "family", "seeds", "mean", "delta", "verdict",
                            "same_as"],
          f"Exact validation loss (nats/char), {args.layers} layers x {args.n_embd}, "
          f"{args.steps} steps; noise threshold {summary['threshold']:.3f}")
    return {**summary, "runs": runs, "recipe": recipe, "kv": list(args.kv)}


def plot_quality(result: dict, path: Path | None = None):
    """One panel per cache size: each family's seeds as dots and their mean with its range, the
    standard model's mean as a dashed line inside a band of +- the noise threshold. Returns
    the Figure (saved to path when given)."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    color = {"bottom": "C0", "middle": "C1", "top": "C3"}
    recipe, rows = result["recipe"], result["rows"]
    by = {}
    for r in result["runs"]:
        by.setdefault(r["layer_types"], []).append(r["exact"])
    std = next(r for r in rows if r["family"] == "standard")
    band = result["threshold"]
    fig, axes = plt.subplots(1, len(result["kv"]), figsize=(6 * len(result["kv"]), 4.4),
                             sharey=True, squeeze=False)
    built = layouts(recipe["layers"], result["kv"])
    for ax, k in zip(axes[0], result["kv"]):
        ax.axhspan(std["mean"] - band, std["mean"] + band, color="0.88", zorder=0)
        ax.axhline(std["mean"], color="0.45", ls="--", lw=1, zorder=1)
        ax.scatter([-1.5] * std["seeds"], by[std["layer_types"]], s=10, color="0.45", zorder=3)
        ticks, labels, seen = [-1.5], ["standard"], set()
        for p, partition in enumerate(PARTITIONS):
            for t, target in enumerate(TARGETS):
                x = 4.5 * p + 1.25 * t
                row = next((r for r in rows if r["family"] == f"{partition}-{target}"
                            and r["kv_layers"] == k), None)
                ticks.append(x)
                labels.append(target)
                if row is None and (f"{partition}-{target}", k) in built:
                    continue  # not run (yet)
                if row is None:
                    ax.text(x, 0.03, "refused:\nits middle\nis its top", ha="center",
                            va="bottom", fontsize=7, color="0.35",
                            transform=ax.get_xaxis_transform())
                    continue
                values, c = by[row["layer_types"]], color[target]
                ax.scatter([x] * len(values), values, s=10, color=c, alpha=0.6, zorder=3)
                ax.errorbar(x, row["mean"], yerr=[[row["mean"] - row["min"]],
                                                  [row["max"] - row["mean"]]],
                            fmt="o", ms=7, color=c, capsize=3, zorder=4,
                            mfc="white" if row["layer_types"] in seen else c)
                seen.add(row["layer_types"])
            ax.text(4.5 * p + 1.25, -0.1, partition, ha="center", va="top", fontsize=10,
                    transform=ax.get_xaxis_transform())
        ax.set_xticks(ticks, labels, fontsize=8)
        ax.set_title(f"{recipe['layers'] // k}x smaller cache ({k} of {recipe['layers']} "
                     "layers compute KVs)")
        ax.grid(axis="x", visible=False)
    axes[0][0].set_ylabel("exact validation loss (nats per character)")
    handles = [Line2D([], [], color="0.45", ls="--", label="standard (mean of seeds)"),
               Patch(color="0.88", label=f"± noise threshold ({band:.3f} nats)"),
               *[Line2D([], [], marker="o", ls="", color=c, label=f"{t} target")
                 for t, c in color.items()]]
    if any(r["same_as"] for r in rows):
        handles.append(Line2D([], [], marker="o", ls="", color="0.3", mfc="white",
                              label="same layout as a family to its left"))
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=8, frameon=False)
    fig.suptitle(f"The study's families at toy scale: {recipe['layers']} layers x "
                 f"{recipe['n_embd']}, {recipe['steps']} steps, m={recipe['m']}, "
                 f"b={recipe['b']}, {max(r['seeds'] for r in rows)} seeds, tiny Shakespeare "
                 "characters", fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m lckv_mini.bench quality",
                                description=__doc__.strip().splitlines()[0])
    p.add_argument("--out", required=True, help="folder for quality.json, the runs (and PNG)")
    p.add_argument("--data", default=None, help="a local text file (default: tiny Shakespeare)")
    p.add_argument("--cache-dir", default=None, help="tiny Shakespeare (default: download)")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--kv", type=int, nargs="+", default=[6, 3],
                   help="KV layers of the families (6 and 3 of 12: a 2x and a 4x smaller cache)")
    p.add_argument("--n-embd", type=int, default=32)
    p.add_argument("--n-head", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=3e-3, help="peak; cosine decay to a tenth")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--m", type=int, default=7, help="passes without gradient")
    p.add_argument("--b", type=int, default=2, help="passes with gradient")
    p.add_argument("--windows", type=int, default=32, help="validation windows of --seq-len")
    p.add_argument("--seeds", type=int, nargs="+", default=[1337, 2024, 3])
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--plot", action="store_true", help="write quality.png")
    args = p.parse_args(argv)
    for name in ("layers", "n_embd", "n_head", "seq_len", "batch", "steps", "windows"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if any(k < 1 or k > args.layers for k in args.kv):
        p.error(f"--kv must lie between 1 and --layers ({args.layers})")
    return args


def main(argv) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run_quality(args)
    result.update(bench="quality", machine=machine(), args=vars(args),
                  time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    path = Path(args.out) / "quality.json"
    atomic_write_bytes(path, json.dumps(result, indent=1, default=str).encode())
    print(f"-> {path}")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        plot_quality(result, Path(args.out) / "quality.png")
        print(f"-> {Path(args.out) / 'quality.png'}")
    return result
