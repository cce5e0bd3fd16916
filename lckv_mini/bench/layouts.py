"""The follow-up study's cost question at toy scale (arXiv 2410.14442): the training step and the
prompt encoding of each of its nine families at one number of KV layers, relative to the
standard model and side by side in one run, next to the FLOP count of each; and the fast prefill
of the downward layouts (YOCO, Gemma 3n / 4) on and off."""

from __future__ import annotations

import statistics
from dataclasses import replace

import torch

from ..config import PARTITIONS, TARGETS, LCKVConfig, make_layer_types
from ..generate import KVCache, encode_prompt, last_token_layers
from ..model import LCKVModel
from .common import SHAPES, dtype_of, table, timeit
from .training import group_pass_flops, layer_flops, training_flops

FAMILIES = [f"{p}-{t}" for p in PARTITIONS for t in TARGETS]


def prefill_flops(config: LCKVConfig, P: int, m: int, b: int, fast_prefill: bool = True) -> int:
    """Matmul FLOPs of encoding a prompt of P tokens (`encode_prompt`, parallel): the layers
    outside the iteration groups once, each group's m + b passes (forward only), the head on the
    last token; with fast_prefill the layers above the last KV layer on the last token only."""
    above = set(last_token_layers(config)) if fast_prefill else set()
    inside = {i for lo, hi in config.iteration_groups for i in range(lo, hi + 1)}
    total = sum(layer_flops(config, i, 1 if i in above else P, P)
                for i in range(config.n_layer) if i not in inside)
    for group in config.iteration_groups:
        total += sum(group_pass_flops(config, group, P, m, b))
    return total + 2 * config.n_embd * config.vocab_size


def family_layout(kind: str, n_layer: int, n_kv_layers: int) -> str:
    """A family's layout; a middle that the builder refuses (it is the top) gets the top's."""
    try:
        return make_layer_types(kind, n_layer, n_kv_layers=n_kv_layers)
    except ValueError:
        return make_layer_types(kind.replace("middle", "top"), n_layer, n_kv_layers=n_kv_layers)


def interleaved(fns: dict, device, reps: int) -> dict:
    """Seconds per call of each fn, rep by rep in turn, so that drift hits them all alike."""
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name] += timeit(fn, device, untimed=1, reps=1)
    return times


def bench_layouts(args) -> dict:
    L, P, T, B = args.layout_layers, args.layout_prompt_len, args.train_len, args.train_batch
    # layer_types=None: the shape's stored layout describes its own depth, not L
    shape = replace(SHAPES[args.shape], n_layer=L, layer_types=None,
                    sliding_window=args.sliding_window, block_size=max(T, P))
    m, b = shape.forward_passes, shape.backward_passes
    device, dtype = args.device, dtype_of(args.dtype)
    torch.manual_seed(0)
    tokens = torch.randint(0, shape.vocab_size, (B, max(T, P) + 1), device=device)

    def runs(config):  # one training step (parallel mode) and one prompt encoding of a model
        torch.manual_seed(0)
        model = LCKVModel(config).to(device=device, dtype=dtype)

        def train():
            model(tokens[:, :T], tokens[:, 1:T + 1])[1].backward()
            model.zero_grad(set_to_none=True)  # the models wait side by side: no grads kept

        def prefill(fast=True):
            with torch.inference_mode():
                encode_prompt(model, tokens[:1, :P],
                              KVCache(config, 1, P, dtype=dtype, device=device),
                              fast_prefill=fast)
        return train, prefill

    rows = []
    for k in args.layout_kv:
        layouts = {"standard": None, **{kind: family_layout(kind, L, k) for kind in FAMILIES}}
        distinct = list(dict.fromkeys(layouts.values()))  # each layout timed once
        fns = {}
        for lt in distinct:
            train, prefill = runs(replace(shape, layer_types=lt))
            fns[("train", lt)], fns[("prefill", lt)] = train, prefill
        times = interleaved(fns, device, args.reps)
        for part, flops in (("train", lambda c: training_flops(c, T, m, b)),
                            ("prefill", lambda c: prefill_flops(c, P, m, b))):
            std_config = replace(shape, layer_types=None)
            std_time = statistics.median(times[(part, None)])
            for kind, lt in layouts.items():
                config = replace(shape, layer_types=lt)
                median = statistics.median(times[(part, lt)])
                rows.append({"part": part, "kv_layers": len(config.kv_layers), "family": kind,
                             "layer_types": config.layer_types,
                             "same_as": ", ".join(other for other, o in layouts.items()
                                                  if o == lt and other != kind),
                             "groups": len(config.iteration_groups),
                             "times_s": times[(part, lt)], "median_ms": 1e3 * median,
                             "time_ratio": median / std_time,
                             "flop_ratio": flops(config) / flops(std_config)})
    # Fast prefill: the layers above the last KV layer on the last prompt token only
    fast_rows = []
    for kind in ("yoco", "gemma"):
        config = replace(shape, layer_types=make_layer_types(kind, L))
        _, prefill = runs(config)
        times = interleaved({"on": prefill, "off": lambda: prefill(False)}, device, args.reps)
        on, off = (statistics.median(times[key]) for key in ("on", "off"))
        skipped = last_token_layers(config)
        fast_rows.append({"part": "fast prefill", "family": kind, "prompt_len": P,
                          "layer_types": config.layer_types, "skipped_layers": len(skipped),
                          "skipped_share": len(skipped) / L, "times_s": times["on"],
                          "full_times_s": times["off"], "on_ms": 1e3 * on, "off_ms": 1e3 * off,
                          "time_ratio": on / off,
                          "flop_ratio": prefill_flops(config, P, m, b)
                          / prefill_flops(config, P, m, b, fast_prefill=False)})
    cols = ["kv_layers", "family", "groups", "median_ms", "time_ratio", "flop_ratio", "same_as"]
    for part, what in (("train", f"Training step (parallel, m={m}, b={b}), T={T}, batch {B}"),
                       ("prefill", f"Prompt encoding (parallel, fast prefill), {P} tokens")):
        table([r for r in rows if r["part"] == part], cols,
              f"{what}: {args.shape} shape, {L} layers, relative to standard")
    table(fast_rows, ["family", "layer_types", "skipped_share", "on_ms", "off_ms", "time_ratio",
                      "flop_ratio"],
          f"Fast prefill on / off: {P} tokens, window {args.sliding_window}, {L} layers")
    return {"rows": rows + fast_rows,
            "settings": {"shape": args.shape, "n_layer": L, "kv_layers": list(args.layout_kv),
                         "seq_len": T, "batch": B, "prompt_len": P, "m": m, "b": b,
                         "sliding_window": args.sliding_window, "dtype": args.dtype}}
