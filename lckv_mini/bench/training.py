"""Training cost: the FLOP count of a training step with the paper's iteration (Sec. 2.2), the
measured step time against it, and the saving from cutting the passes' wasted work."""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from dataclasses import replace

import torch
from torch import Tensor

from ..config import LCKVConfig, make_layer_types
from ..model import LCKVModel, PassKVs
from .common import (
    SHAPES,
    CheckSettings,
    Deadline,
    attempt,
    dtype_of,
    free_memory,
    is_cuda,
    sync,
    table,
    timeit,
    variants,
)

# ----------------------------------------------------------------------------------------------
# Training cost


def layer_flops(config: LCKVConfig, i: int, Tq: int, Tk: int | None = None, how: str = "full"
                ) -> int:
    """Forward matmul FLOPs of layer i for Tq queries against Tk keys (default Tk = Tq, a whole
    sequence): its k and v projections if it computes KVs, q and o, the scores and the weighted
    sum, the MLP. how: "full", "kv_only" (k and v only) or "no_attention" (the MLP only)."""
    Tk = Tq if Tk is None else Tk
    C, I = config.n_embd, config.intermediate_size
    q_dim, kv_dim = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    kv = 2 * Tq * 2 * C * kv_dim if config.kv_sources[i] == i else 0
    attn = 2 * Tq * 2 * C * q_dim + 2 * 2 * Tq * Tk * q_dim
    mlp = 2 * Tq * 3 * C * I
    return {"full": kv + attn + mlp, "kv_only": kv, "no_attention": mlp}[how]


def group_pass_flops(config: LCKVConfig, group: tuple[int, int], T: int, m: int, b: int,
                     skip_wasted: bool = True) -> list[int]:
    """Forward FLOPs of each of the m + b passes of an iteration group over T tokens. With
    skip_wasted (what the model does), the group's top layer only computes k and v before the
    last pass, and in the first pass the layers reading from above (zero KVs) skip attention."""
    lo, hi = group
    costs = []
    for p in range(m + b):
        last, first = p == m + b - 1, p == 0
        cost = 0
        for i in range(lo, hi + 1):
            how = "full"
            if skip_wasted and i == hi and not last:
                how = "kv_only"
            elif skip_wasted and first and config.kv_sources[i] > i:
                how = "no_attention"
            cost += layer_flops(config, i, T, how=how)
        costs.append(cost)
    return costs


def training_flops(config: LCKVConfig, T: int, m: int, b: int, skip_wasted: bool = True
                   ) -> float:
    """Matmul FLOPs of one training step per sequence, counting the iteration (Sec. 2.2): layers
    outside the iteration groups run once (forward + backward = 3 forward costs); each group
    (every one of them, bottom up) runs m forward-only passes and b passes with backward, as
    `group_pass_flops` counts them."""
    inside = {i for lo, hi in config.iteration_groups for i in range(lo, hi + 1)}
    total = sum(3 * layer_flops(config, i, T) for i in range(config.n_layer) if i not in inside)
    for group in config.iteration_groups:
        costs = group_pass_flops(config, group, T, m, b, skip_wasted)
        total += sum(costs[:m]) + 3 * sum(costs[m:])
    return total + 3 * 2 * T * config.n_embd * config.vocab_size


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
# The GPU check's training part: tokens/s, MFU, LCKV/standard step time, peak memory

# Peak dense bfloat16 tensor-core FLOP/s (no sparsity) from the vendors' datasheets, by a piece of
# torch.cuda.get_device_name(); the first match wins, so longer names come first.
PEAK_BF16 = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("GH200", 989e12), ("H200 NVL", 835e12),
    ("H100", 989e12), ("H200", 989e12), ("B200", 2250e12), ("A100", 312e12),
    ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("RTX 4090", 165e12),
)


def peak_flops(name: str) -> float | None:
    """The datasheet's dense bfloat16 peak of a device named `name`, or None if not listed."""
    return next((flops for key, flops in PEAK_BF16 if key in name), None)


def measure_matmul(device, n: int, dtype) -> float:
    """FLOP/s of a large (n, n) @ (n, n) matmul: what the card sustains in practice."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / statistics.median(timeit(lambda: a @ b, device, untimed=3, reps=10))


def training_step(model: LCKVModel, run, idx: Tensor, autocast):
    """One forward and backward (no optimizer step), as `bench train` times it."""
    def step():
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = run(idx[:, :-1], idx[:, 1:])[1]
        loss.backward()
    return step


def time_training(config: LCKVConfig, device, settings: CheckSettings, autocast, compiled: bool
                  ) -> dict:
    """Step time, tokens/s and FLOP/s of one model, eager or compiled."""
    B, T = settings.train_batch, config.block_size
    torch.manual_seed(0)
    model = LCKVModel(config).to(device)
    if compiled:
        torch.compiler.reset()
    run = torch.compile(model, backend=settings.compile_backend) if compiled else model
    idx = torch.randint(config.vocab_size, (B, T + 1), device=device)
    step = training_step(model, run, idx, autocast)
    sync(device)
    t0 = time.perf_counter()
    step()  # compiles, when compiled
    sync(device)
    first = time.perf_counter() - t0
    times = timeit(step, device, untimed=1, reps=settings.train_reps)
    median = statistics.median(times)
    flops = B * training_flops(config, T, config.forward_passes, config.backward_passes)
    return {"first_step_s": first, "times_s": times, "median_s": median,
            "tokens_per_s": B * T / median, "flops_per_step": flops, "flops_per_s": flops / median}


def training_memory(config: LCKVConfig, device, settings: CheckSettings, autocast, ckpt: bool
                    ) -> dict:
    """Peak memory of one training step (after one untimed step), with or without activation
    checkpointing; measured on CUDA only."""
    B, T = settings.train_batch, config.block_size
    torch.manual_seed(0)
    model = LCKVModel(config).to(device)
    model.activation_checkpointing = ckpt
    idx = torch.randint(config.vocab_size, (B, T + 1), device=device)
    step = training_step(model, model, idx, autocast)
    step()
    out = {"before_step_bytes": None, "peak_bytes": None}
    if is_cuda(device):
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        out["before_step_bytes"] = torch.cuda.memory_allocated(device)
    out["step_s"] = timeit(step, device, untimed=0, reps=1)[0]
    if is_cuda(device):
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def part_training(device, settings: CheckSettings, deadline: Deadline) -> dict:
    cuda, peak = is_cuda(device), settings.peak_flops
    shape = settings.train_shape
    dtype = torch.bfloat16 if cuda else torch.float32
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    matmul = measure_matmul(device, settings.matmul_n, dtype)
    models = variants(shape, (2, 10))

    def measure(row, fn):
        row = attempt(row, deadline, fn)
        free_memory(device)
        return row

    # eager first, then peak memory, then the compiled models (compiling is the slow part)
    rows = [measure({"model": name, "compiled": False},
                    lambda: time_training(config, device, settings, autocast, False))
            for name, config in models.items()]
    memory = [measure({"model": name, "activation_checkpointing": ckpt},
                      lambda: training_memory(models[name], device, settings, autocast, ckpt))
              for name in ("standard", "lckv w=2") for ckpt in (False, True)]
    rows += [measure({"model": name, "compiled": True},
                     lambda: time_training(models[name], device, settings, autocast, True))
             for name in settings.compile_models if name in models]
    for r in rows:
        std = next((s for s in rows if s["model"] == "standard"
                    and s["compiled"] == r["compiled"] and "median_s" in s), None)
        if "median_s" in r:
            r["mfu"] = r["flops_per_s"] / peak if peak else None
            r["mfu_vs_matmul"] = r["flops_per_s"] / matmul
        if "median_s" in r and std:
            r["time_ratio"] = r["median_s"] / std["median_s"]
            r["flop_ratio"] = r["flops_per_step"] / std["flops_per_step"]
    summary = {f"{r['model']}{' compiled' if r['compiled'] else ''}": {
        k: r.get(k) for k in ("tokens_per_s", "mfu", "mfu_vs_matmul", "time_ratio", "flop_ratio")}
        for r in rows if "median_s" in r}
    summary["matmul_flops_per_s"] = matmul
    summary["peak_flops_per_s"] = peak
    summary["peak_bytes"] = {f"{r['model']}{' ckpt' if r['activation_checkpointing'] else ''}":
                             r.get("peak_bytes") for r in memory}
    return {"dtype": "bfloat16 autocast" if cuda else "float32", "rows": rows, "memory": memory,
            "summary": summary,
            "config": {"shape": shape.to_dict(), "batch": settings.train_batch,
                       "seq_len": shape.block_size, "reps": settings.train_reps,
                       "compile_backend": settings.compile_backend,
                       "compiled_models": list(settings.compile_models),
                       "matmul_n": settings.matmul_n, "step": "forward + backward, no optimizer",
                       "peak_memory": "torch.cuda.max_memory_allocated" if cuda
                       else "not measured off CUDA"}}
