"""Benchmarks of the paper's efficiency claims, LCKV against a standard model of the same shape.

    python -m lckv_mini.bench memory      # Table 1 setting: KV bytes per token, largest batch
    python -m lckv_mini.bench throughput  # Fig. 4: generation tokens/s vs batch under a budget
    python -m lckv_mini.bench prefill     # prompt encoding: sequential vs parallel vs adaptive
    python -m lckv_mini.bench train       # training step time vs the FLOP-count prediction
    python -m lckv_mini.bench passes      # the passes with and without their wasted work
    python -m lckv_mini.bench streaming   # Fig. 5: per-token latency and memory vs cache size
    python -m lckv_mini.bench all

Absolute times on a shared machine are noisy; every figure that matters is a ratio of two
measurements taken side by side in one run. Each run prints a table and writes JSON (config,
machine, torch version, raw timings, medians); --plot writes PNGs (needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from .config import LCKVConfig, make_layer_types
from .generate import GREEDY, KVCache, Sampling, cache_bytes, encode_prompt, generate
from .model import LCKVModel, PassKVs

# ----------------------------------------------------------------------------------------------
# Shapes

SHAPES = {
    # Llama 2 7B, the paper's Table 1 model (nothing is allocated for it: memory only)
    "llama-7b": LCKVConfig(vocab_size=32000, n_layer=32, n_head=32, n_kv_head=32, n_embd=4096,
                           intermediate_size=11008, block_size=4096),
    # A small shape whose cache dominates memory on a CPU: deep, narrow, long context
    "cpu": LCKVConfig(vocab_size=512, n_layer=16, n_head=4, n_kv_head=4, n_embd=256,
                      intermediate_size=688, block_size=2048),
    # The tests' shape: seconds
    "tiny": LCKVConfig(vocab_size=64, n_layer=4, n_head=2, n_kv_head=2, n_embd=32,
                       intermediate_size=64, block_size=128),
}


def variants(shape: LCKVConfig, ws=(2, 10)) -> dict[str, LCKVConfig]:
    """The standard model and LCKV with each number w of warmup layers (skipping w that do not
    fit the depth)."""
    out = {"standard": replace(shape, layer_types=None)}
    for w in ws:
        if w < shape.n_layer:
            out[f"lckv w={w}"] = replace(shape, layer_types=make_layer_types("lckv", shape.n_layer,
                                                                             warmup=w))
    return out


# ----------------------------------------------------------------------------------------------
# Measuring


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn, device="cpu", untimed: int = 1, reps: int = 3) -> list[float]:
    """Seconds per call over `reps` calls after `untimed` calls (caches, allocator, threads)."""
    for _ in range(untimed):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def measure_bandwidth(device="cpu", mbytes: int = 256, reps: int = 5) -> float:
    """Sustained read bandwidth (bytes/s): the median time to sum a large float32 buffer."""
    x = torch.ones(mbytes * 2**20 // 4, device=device)
    return x.numel() * 4 / statistics.median(timeit(lambda: x.sum(), device, 1, reps))


def dtype_of(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# ----------------------------------------------------------------------------------------------
# Memory (Table 1): nothing is allocated


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
# Training cost


def training_flops(config: LCKVConfig, T: int, m: int, b: int, skip_wasted: bool = True
                   ) -> float:
    """Matmul FLOPs of one training step per sequence, counting the iteration (Sec. 2.2): layers
    outside the iteration groups run once (forward + backward = 3 forward costs); each group
    runs m forward-only passes and b passes with backward. With skip_wasted (what the model
    does), the group's top layer only computes k and v before the last pass, and in the first
    pass the layers reading from above (zero KVs) skip their attention."""
    C, I, V = config.n_embd, config.intermediate_size, config.vocab_size
    q_dim, kv_dim = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    kv = 2 * T * 2 * C * kv_dim  # k and v projections
    attn = 2 * T * 2 * C * q_dim + 2 * 2 * T * T * q_dim  # q, o; scores and weighted sum
    mlp = 2 * T * 3 * C * I

    def layer(i, how="full"):  # forward FLOPs of layer i over T tokens
        own_kv = kv if config.kv_sources[i] == i else 0
        return {"full": own_kv + attn + mlp, "kv_only": own_kv, "no_attention": mlp}[how]

    inside = {i for lo, hi in config.iteration_groups for i in range(lo, hi + 1)}
    total = sum(3 * layer(i) for i in range(config.n_layer) if i not in inside)
    for lo, hi in config.iteration_groups:
        for p in range(m + b):
            last, first = p == m + b - 1, p == 0
            cost = 0
            for i in range(lo, hi + 1):
                how = "full"
                if skip_wasted and i == hi and not last:
                    how = "kv_only"
                elif skip_wasted and first and config.kv_sources[i] > i:
                    how = "no_attention"
                cost += layer(i, how)
            total += cost * (1 if p < m else 3)
    return total + 3 * 2 * T * C * V


def naive_parallel(model: LCKVModel, x, m: int, b: int):
    """The parallel computation as it was before the wasted work was cut: every pass runs every
    layer of the group in full. Same results; kept to measure the saving side by side."""
    kv, done = PassKVs(), 0
    for lo, hi in model.config.iteration_groups:
        x = model.run_layers(x, kv, range(done, lo))
        model.start_group(x, kv, (lo, hi))
        for p in range(m + b):
            with torch.set_grad_enabled(torch.is_grad_enabled() and p >= m):
                h = model.run_layers(x, kv, range(lo, hi + 1))
        x, done = h, hi + 1
    return model.run_layers(x, kv, range(done, model.config.n_layer)), kv


def bench_train(args) -> dict:
    shape = replace(SHAPES[args.shape], block_size=max(args.train_len, args.seq_train_len))
    device, dtype = args.device, dtype_of(args.dtype)
    rows = []
    for name, config in variants(shape, args.w).items():
        torch.manual_seed(0)
        model = LCKVModel(config).to(device=device, dtype=dtype)
        for mode, T in (("parallel", args.train_len), ("sequential", args.seq_train_len)):
            if mode == "sequential" and name == "standard":
                continue
            idx = torch.randint(0, config.vocab_size, (args.train_batch, T + 1), device=device)

            def step():
                model.zero_grad(set_to_none=True)
                model(idx[:, :-1], idx[:, 1:], mode=mode)[1].backward()

            times = timeit(step, device, untimed=1, reps=args.reps)
            rows.append({"model": name, "mode": mode, "seq_len": T, "times_s": times,
                         "median_ms": 1e3 * statistics.median(times),
                         "flops": training_flops(config, T, config.forward_passes,
                                                 config.backward_passes)
                         if mode == "parallel" else None})
    std = next(r for r in rows if r["model"] == "standard")
    for r in rows:
        if r["mode"] == "parallel":
            r["time_ratio"] = r["median_ms"] / std["median_ms"]
            r["flop_ratio"] = r["flops"] / std["flops"]
            r["within_flops_plus_10pct"] = r["time_ratio"] <= 1.1 * r["flop_ratio"]
    table(rows, ["model", "mode", "seq_len", "median_ms", "time_ratio", "flop_ratio",
                 "within_flops_plus_10pct"],
          f"Training step: {args.shape} shape, batch {args.train_batch}, "
          f"m={shape.forward_passes}, b={shape.backward_passes}")
    return {"rows": rows, "settings": {"shape": args.shape, "batch": args.train_batch}}


def bench_passes(args) -> dict:
    """Training-step time of LCKV w=2 with every pass in full (before) and with the wasted work
    cut (after, what the model does), interleaved in one run, next to the FLOP prediction."""
    device, dtype = args.device, dtype_of(args.dtype)
    rows = []
    for n_layer in args.pass_layers:
        config = replace(SHAPES[args.shape], n_layer=n_layer, block_size=args.train_len,
                         layer_types=make_layer_types("lckv", n_layer, warmup=2))
        torch.manual_seed(0)
        model = LCKVModel(config).to(device=device, dtype=dtype)
        idx = torch.randint(0, config.vocab_size, (args.train_batch, args.train_len + 1),
                            device=device)
        m, b = config.forward_passes, config.backward_passes

        def step(parallel):
            model.zero_grad(set_to_none=True)
            h, _ = parallel(model, model.embed(idx[:, :-1]), m, b)
            logits = model.head(h)
            torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                              idx[:, 1:].flatten()).backward()

        plans = {"before": naive_parallel, "after": LCKVModel.forward_parallel}
        times = {name: [] for name in plans}
        for _ in range(args.reps):  # interleaved, so drift in the machine hits both alike
            for name, plan in plans.items():
                times[name] += timeit(lambda: step(plan), device, untimed=1, reps=1)
        before, after = (statistics.median(times[k]) for k in ("before", "after"))
        T = args.train_len
        rows.append({"n_layer": n_layer, "layer_types": config.layer_types,
                     "before_ms": 1e3 * before, "after_ms": 1e3 * after,
                     "times_s": times, "time_ratio": after / before,
                     "flop_ratio": training_flops(config, T, m, b)
                     / training_flops(config, T, m, b, skip_wasted=False)})
    table(rows, ["n_layer", "before_ms", "after_ms", "time_ratio", "flop_ratio"],
          f"Cutting the wasted work of the passes: LCKV w=2, {args.shape} shape, T={args.train_len}"
          f", batch {args.train_batch}, m+b={SHAPES[args.shape].forward_passes}"
          f"+{SHAPES[args.shape].backward_passes}")
    return {"rows": rows, "settings": {"shape": args.shape, "batch": args.train_batch,
                                       "seq_len": args.train_len}}


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
# Output


def table(rows: list[dict], cols: list[str], title: str) -> None:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 1e4:
            return f"{v:,}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


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


BENCHES = {"memory": bench_memory, "throughput": bench_throughput, "prefill": bench_prefill,
           "train": bench_train, "passes": bench_passes, "streaming": bench_streaming}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="LCKV vs standard benchmarks (ratios in one run).")
    p.add_argument("bench", choices=[*BENCHES, "all"])
    p.add_argument("--shape", default="cpu", choices=list(SHAPES), help="for timed benchmarks")
    p.add_argument("--shapes", nargs="+", default=["llama-7b", "cpu"], help="for memory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--budget-gib", type=float, default=80.0, help="llama-7b memory budget")
    p.add_argument("--cpu-budget-gib", type=float, default=0.12, help="budget of small shapes")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--gen-len", type=int, default=1024)
    p.add_argument("--w", type=int, nargs="+", default=[2, 10],
                   help="LCKV warmup-layer counts w to compare")
    p.add_argument("--max-batch-cap", type=int, default=None, help="never time larger batches")
    p.add_argument("--prompt-lens", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--train-len", type=int, default=256)
    p.add_argument("--seq-train-len", type=int, default=16)
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--pass-layers", type=int, nargs="+", default=[6, 12],
                   help="depths for the passes benchmark")
    p.add_argument("--windows", type=int, nargs="+", default=[28, 124, 508])
    p.add_argument("--stream-len", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="bench_results", help="folder for JSON and PNGs")
    p.add_argument("--plot", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(BENCHES) if args.bench == "all" else [args.bench]
    results = {}
    for name in names:
        result = BENCHES[name](args)
        result.update(bench=name, machine=machine(), device=args.device,
                      args={k: v for k, v in vars(args).items()},
                      time=time.strftime("%Y-%m-%dT%H:%M:%S"))
        path = out_dir / f"{name}.json"
        path.write_text(json.dumps(result, indent=1, default=str))
        if args.plot:
            result["plot"] = str(plot(name, result, out_dir))
        results[name] = result
        print(f"-> {path}" + (f", {result['plot']}" if args.plot else ""))
    return results


if __name__ == "__main__":
    main()
