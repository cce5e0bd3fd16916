"""Inference speed: generation throughput against batch size (Fig. 4), prompt encoding latency,
and streaming decode latency against cache size (Fig. 5)."""

from __future__ import annotations

import inspect
import statistics
from dataclasses import replace

import torch

from ..config import LCKVConfig
from ..generate import GREEDY, KVCache, Sampling, cache_bytes, encode_prompt, generate
from ..model import LCKVModel
from .common import (
    SHAPES,
    CheckSettings,
    Deadline,
    attempt,
    dtype_of,
    free_memory,
    is_cuda,
    is_oom,
    measure_bandwidth,
    table,
    timeit,
    variants,
)
from .memory import max_batch, param_count

# ----------------------------------------------------------------------------------------------
# Generation throughput (Fig. 4)


def batch_sizes(limit: int) -> list[int]:
    sizes = [1]
    while sizes[-1] * 2 < limit:
        sizes.append(sizes[-1] * 2)
    return sorted(set(sizes + [limit])) if limit >= 1 else []


def bench_throughput(args) -> dict:
    shape = replace(SHAPES[args.shape], block_size=max(SHAPES[args.shape].block_size,
                                                       args.prompt_len + args.gen_len))
    device, dtype = args.device, dtype_of(args.dtype)
    budget = int(args.cpu_budget_gib * 2**30)
    bandwidth = measure_bandwidth(device)
    rows, best = [], {}
    for name, config in variants(shape, args.w).items():
        limit = max_batch(config, budget, args.prompt_len, args.gen_len, dtype)
        limit = min(limit, args.max_batch_cap) if args.max_batch_cap else limit
        torch.manual_seed(0)
        model = LCKVModel(config).to(device=device, dtype=dtype).eval()
        for B in batch_sizes(limit):
            idx = torch.randint(0, config.vocab_size, (B, args.prompt_len), device=device)
            g = torch.Generator(device=device).manual_seed(0)
            run = lambda: generate(model, idx, args.gen_len, sampling=Sampling(), generator=g)  # noqa
            with torch.inference_mode():
                times = timeit(run, device, untimed=1, reps=args.reps)
            tps = B * args.gen_len / statistics.median(times)
            rows.append({"model": name, "batch": B, "max_batch": limit, "times_s": times,
                         "tokens_per_s": tps})
            best[name] = max(best.get(name, (0, 0)), (tps, B))
        del model
    # Traffic model: each decode step reads the weights once and, per sequence, the KVs of every
    # layer at the current length (each layer reads its source's KVs: L layer-reads for LCKV too).
    std_cfg = variants(shape)["standard"]
    e = torch.empty((), dtype=dtype).element_size()
    weights = param_count(std_cfg) * e
    kv_read = std_cfg.n_layer * 2 * std_cfg.n_kv_head * std_cfg.head_dim * e * (
        args.prompt_len + args.gen_len / 2)

    def predicted_tps(B):  # tokens/s if every step moved its bytes at the measured bandwidth
        return B * bandwidth / (weights + B * kv_read)

    summary = []
    std_tps, std_B = best["standard"]
    for name, (tps, B) in best.items():
        ratio = tps / std_tps
        model_ratio = predicted_tps(B) / predicted_tps(std_B)
        summary.append({"model": name, "best_batch": B, "best_tokens_per_s": tps,
                        "ratio_vs_standard": ratio, "traffic_model_ratio": model_ratio,
                        "batch_ratio_bound": B / std_B,
                        "measured_over_model": ratio / model_ratio})
    table(rows, ["model", "batch", "max_batch", "tokens_per_s"],
          f"Throughput: {args.shape} shape, prompt {args.prompt_len}, generation {args.gen_len}, "
          f"budget {args.cpu_budget_gib} GiB, {args.dtype} on {device}")
    table(summary, list(summary[0]), f"Best throughput under the budget (bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s, weights {weights / 2**20:.1f} MiB)")
    return {"rows": rows, "summary": summary, "bandwidth_bytes_per_s": bandwidth,
            "weights_bytes": weights, "kv_read_bytes_per_seq_step": kv_read,
            "settings": {"shape": args.shape, "prompt_len": args.prompt_len,
                         "gen_len": args.gen_len, "budget_gib": args.cpu_budget_gib,
                         "dtype": args.dtype}}


# ----------------------------------------------------------------------------------------------
# Prompt encoding latency


def bench_prefill(args) -> dict:
    shape = SHAPES[args.shape]
    device, dtype = args.device, dtype_of(args.dtype)
    rows = []
    config = variants(shape, (2,))["lckv w=2"]
    torch.manual_seed(0)
    model = LCKVModel(config).to(device=device, dtype=dtype).eval()
    m, b = config.forward_passes, config.backward_passes
    for P in args.prompt_lens:
        idx = torch.randint(0, config.vocab_size, (1, P), device=device)
        for mode in ("sequential", "parallel", "adaptive"):
            passes = []

            def run():
                cache = KVCache(config, 1, P, dtype=dtype, device=device)
                passes.append(encode_prompt(model, idx, cache, mode)[1])

            with torch.inference_mode():
                times = timeit(run, device, untimed=1, reps=args.reps)
            rows.append({"prompt_len": P, "mode": mode, "passes": passes[-1],
                         "times_s": times, "median_ms": 1e3 * statistics.median(times)})
        seq = next(r for r in rows if r["prompt_len"] == P and r["mode"] == "sequential")
        for r in rows[-3:]:
            r["speedup_vs_sequential"] = seq["median_ms"] / r["median_ms"]
    table(rows, ["prompt_len", "mode", "passes", "median_ms", "speedup_vs_sequential"],
          f"Prompt encoding: {args.shape} shape, LCKV w=2, m+b={m + b}, random weights")
    return {"rows": rows, "settings": {"shape": args.shape, "dtype": args.dtype}}


# ----------------------------------------------------------------------------------------------
# Streaming (Fig. 5)


def bench_streaming(args) -> dict:
    shape = SHAPES[args.shape]
    device, dtype = args.device, dtype_of(args.dtype)
    rows = []
    for name, config in variants(shape, (2,)).items():
        torch.manual_seed(0)
        model = LCKVModel(config).to(device=device, dtype=dtype).eval()
        for window in args.windows:
            idx = torch.randint(0, config.vocab_size, (1, 4), device=device)
            n_new = args.stream_len

            def run():
                generate(model, idx, n_new, sampling=GREEDY, sink_size=4, window_size=window)

            with torch.inference_mode():
                times = timeit(run, device, untimed=1, reps=args.reps)
            rows.append({"model": name, "cache_tokens": 4 + window, "generated": n_new,
                         "cache_bytes": cache_bytes(config, 1, 4 + window, dtype),
                         "times_s": times,
                         "ms_per_token": 1e3 * statistics.median(times) / n_new})
    table(rows, ["model", "cache_tokens", "generated", "cache_bytes", "ms_per_token"],
          f"Streaming (sink 4 + window): {args.shape} shape, {args.stream_len} tokens generated "
          "(a cache smaller than that evicts)")
    return {"rows": rows, "settings": {"shape": args.shape, "stream_len": args.stream_len}}


# ----------------------------------------------------------------------------------------------
# The GPU check's decoding part (Fig. 4 on a card): the batch doubling until out of memory


def decode_options(backend: str = "inductor") -> dict:
    """Decoding speed-ups that `generate` offers: how to ask (compiled: with torch.compile's
    `backend`), or why not."""
    params = inspect.signature(generate).parameters
    return {"compiled": {"compile": backend} if "compile" in params
            else {"skipped": "generate has no compile option"},
            "cuda_graph": {"cuda_graph": True} if "cuda_graph" in params
            else {"skipped": "generate has no cuda_graph option (CUDA graphs are not offered)"}}


def first_batch(settings: CheckSettings, predicted: int | None) -> int:
    """Where the doubling starts: settings.first_batch, or, when the memory predictor knows the
    card, the power of two near an eighth of the predicted largest batch, so that the few
    doublings a time limit allows reach the largest batches (Fig. 4's best throughput)."""
    if not predicted:
        return settings.first_batch
    return max(settings.first_batch, 1 << max(0, (predicted // 8).bit_length() - 1))


def sweep(model: LCKVModel, device, settings: CheckSettings, share: Deadline, start: int) -> dict:
    """Generation tokens/s at batch start, 2 start, 4 start, ... until out of memory, the batch
    cap, or the time share (the next batch takes at least as long as the last)."""
    cuda, P, G = is_cuda(device), settings.prompt_len, settings.gen_len
    rows, B, last = [], start, 0.0
    while True:
        if B > settings.batch_cap:
            return {"rows": rows, "stopped": f"batch cap {settings.batch_cap}"}
        if share.left() < last:
            return {"rows": rows, "stopped": "time limit"}
        idx = torch.randint(model.config.vocab_size, (B, P), device=device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        oom = False
        try:
            with torch.inference_mode():
                last = timeit(lambda: generate(model, idx, G, sampling=GREEDY), device,
                              untimed=0, reps=1)[0]
        except Exception as e:
            if not is_oom(e):
                raise
            oom = True
        if oom:  # freed outside the except block, once the traceback's tensors are gone
            idx = None
            free_memory(device)
            return {"rows": rows, "stopped": f"out of memory at batch {B}"}
        rows.append({"batch": B, "times_s": [last], "tokens_per_s": B * G / last,
                     "peak_bytes": torch.cuda.max_memory_allocated(device) if cuda else None})
        B *= 2


def decode_model(config: LCKVConfig, device, dtype, settings: CheckSettings, share: Deadline,
                 total_bytes: int | None) -> dict:
    """The batch sweep of one model, then each decoding speed-up at its best batch."""
    P, G = settings.prompt_len, settings.gen_len
    torch.manual_seed(0)
    model = LCKVModel(config).to(device=device, dtype=dtype).eval()
    predicted = max_batch(config, total_bytes, P, G, dtype) if total_bytes else None
    with torch.inference_mode():  # kernels, allocator
        generate(model, torch.zeros(1, 8, dtype=torch.long, device=device), 2, sampling=GREEDY)
    out = {"kv_layers": len(config.kv_layers), "predicted_max_batch": predicted,
           **sweep(model, device, settings, share, first_batch(settings, predicted))}
    best = max(out["rows"], key=lambda r: r["tokens_per_s"], default=None)
    out.update(best_batch=best and best["batch"], best_tokens_per_s=best and best["tokens_per_s"])
    for option, kwargs in decode_options(settings.compile_backend).items():
        if "skipped" in kwargs or best is None:
            out[option] = kwargs if "skipped" in kwargs else {"skipped": "no batch ran"}
            continue
        idx = torch.randint(config.vocab_size, (best["batch"], P), device=device)
        out[option] = attempt({"batch": best["batch"]}, share, lambda: {"times_s": timeit(
            lambda: generate(model, idx, G, sampling=GREEDY, **kwargs), device, 1, 1)})
        if "times_s" in out[option]:
            out[option]["tokens_per_s"] = best["batch"] * G / out[option]["times_s"][0]
    return out


def part_decoding(device, settings: CheckSettings, deadline: Deadline) -> dict:
    cuda = is_cuda(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    P, G = settings.prompt_len, settings.gen_len
    shape = replace(settings.decode_shape, block_size=max(settings.decode_shape.block_size, P + G))
    bandwidth = measure_bandwidth(device, mbytes=1024 if cuda else 64)
    total = torch.cuda.get_device_properties(device).total_memory if cuda else None
    models = variants(shape, (2, 10))
    per_model = []
    for k, (name, config) in enumerate(models.items()):
        share = Deadline(deadline.left() / (len(models) - k))  # time a model leaves passes on
        entry = attempt({"model": name}, deadline,
                        lambda: decode_model(config, device, dtype, settings, share, total))
        entry.setdefault("best_tokens_per_s", None)
        entry.setdefault("stopped", entry.get("error") or entry.get("skipped"))
        per_model.append(entry)
        free_memory(device)
    std = per_model[0]["best_tokens_per_s"]
    for e in per_model:
        e["ratio_vs_standard"] = e["best_tokens_per_s"] / std if std and e["best_tokens_per_s"] \
            else None
    rows = [{"model": e["model"], **r} for e in per_model for r in e.pop("rows", [])]
    summary = {e["model"]: {k: e.get(k) for k in ("best_batch", "best_tokens_per_s",
                                                  "ratio_vs_standard", "stopped")}
               for e in per_model}
    # Fig. 4 compares the largest batches that fit: the ratio means that only if every model
    # stopped because memory (or the cap) said so, not the clock.
    summary["comparable"] = all(str(e["stopped"]).startswith(("out of memory", "batch cap"))
                                for e in per_model)
    return {"dtype": str(dtype)[6:], "rows": rows, "models": per_model, "summary": summary,
            "bandwidth_bytes_per_s": bandwidth,
            "config": {"shape": shape.to_dict(), "prompt_len": P, "gen_len": G,
                       "first_batch": settings.first_batch, "batch_cap": settings.batch_cap,
                       "sampling": "greedy", "prefill": "parallel",
                       "timed": "generate(): prompt encoding and every decode step"}}
