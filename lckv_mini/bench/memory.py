"""Memory (the paper's Table 1 setting): KV bytes per token and the largest batch under a memory
budget, computed without allocating the model; checked against a real allocation."""

from __future__ import annotations

import torch

from ..config import LCKVConfig
from ..generate import KVCache, cache_bytes
from ..model import LCKVModel
from .common import SHAPES, table, variants


def param_count(config: LCKVConfig) -> int:
    """Parameters of LCKVModel(config), counted exactly on the meta device (nothing allocated)."""
    with torch.device("meta"):
        return LCKVModel(config).num_params()


def activation_bytes(config: LCKVConfig, prompt_len: int, dtype) -> int:
    """Working memory per sequence while encoding the prompt (the peak of generation), an
    estimate: hidden states, the MLP's inner activations, two passes' iterated KVs, logits."""
    e = torch.empty((), dtype=dtype).element_size()
    C, I, P = config.n_embd, config.intermediate_size, prompt_len
    kv = 2 * config.n_kv_head * config.head_dim * P * 2 * max(1, len(config.kv_layers))
    return (P * (4 * C + 3 * I) + kv) * e + config.vocab_size * 4


def max_batch(config: LCKVConfig, budget: int, prompt_len: int, gen_len: int, dtype) -> int:
    """Largest batch whose weights + KV cache + activations fit in `budget` bytes."""
    e = torch.empty((), dtype=dtype).element_size()
    free = budget - param_count(config) * e
    per_seq = (cache_bytes(config, 1, prompt_len + gen_len, dtype)
               + activation_bytes(config, prompt_len, dtype))
    return max(0, free // per_seq)


def bench_memory(args) -> dict:
    rows = []
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        dtype = torch.float16 if shape_name == "llama-7b" else torch.float32
        budget = int((args.budget_gib if shape_name == "llama-7b" else args.cpu_budget_gib)
                     * 2**30)
        for name, config in variants(shape).items():
            rows.append({
                "shape": shape_name, "model": name, "layer_types": config.layer_types,
                "kv_layers": len(config.kv_layers), "dtype": str(dtype).split(".")[-1],
                "kv_bytes_per_token": cache_bytes(config, 1, 1, dtype),
                "weights_bytes": param_count(config) * torch.empty((), dtype=dtype).element_size(),
                "budget_bytes": budget,
                "max_batch": max_batch(config, budget, args.prompt_len, args.gen_len, dtype)})
        std = next(r for r in rows if r["shape"] == shape_name and r["model"] == "standard")
        for r in rows:
            if r["shape"] == shape_name:
                r["kv_ratio"] = r["kv_bytes_per_token"] / std["kv_bytes_per_token"]
                r["batch_ratio"] = r["max_batch"] / max(1, std["max_batch"])
                r["batch_target"] = 0.9 * shape.n_layer / r["kv_layers"]
    # The predictor against a real allocation on the small shape.
    checks = []
    for name, config in variants(SHAPES["tiny"]).items():
        cache = KVCache(config, 3, 50)
        model = LCKVModel(config)
        checks.append({"model": name, "predicted_cache": cache_bytes(config, 3, 50),
                       "allocated_cache": cache.nbytes, "predicted_params": param_count(config),
                       "real_params": model.num_params()})
    table(rows, ["shape", "model", "kv_layers", "kv_bytes_per_token", "kv_ratio", "max_batch",
                 "batch_ratio", "batch_target"],
          f"Memory: prompt {args.prompt_len} + generation {args.gen_len} tokens")
    table(checks, list(checks[0]), "Predictor vs real allocation (tiny shape, batch 3, 50 tokens)")
    return {"rows": rows, "allocation_check": checks,
            "settings": {"prompt_len": args.prompt_len, "gen_len": args.gen_len}}
