"""Eager against torch.compile, and both against what the hardware allows (issue 18).

    python -m lckv_mini.bench compiled [--model FOLDER]

In one run: the machine's limits (a large float32 matmul's FLOP/s, a large read's bytes/s); the
training step of the standard model and LCKV w=2, eager and compiled (loss curves compared,
compile time, the steps after which compiling pays, FLOP/s achieved against the matmul's); the
decode step at batch 1 and at the largest batch that fits the memory budget, eager and compiled,
against its memory-traffic bound; and, given a Hugging Face Llama folder with `transformers`
installed, `transformers`' greedy `generate` beside ours on the same weights, tokens compared.

A decode step must read every weight once and, in every attention layer, the cached KVs of the
tokens before it. LCKV holds fewer KVs but its layers still read them, from the top layer: the
bytes read per step are the standard model's (what it saves is memory, hence batch size).
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from dataclasses import replace

import torch

from ..generate import GREEDY, CompileWarning, generate, why_inductor_fails
from ..model import LCKVModel
from ..train import compile_for_training
from .common import SHAPES, machine, measure_bandwidth, sync, table, timeit, variants
from .memory import max_batch
from .training import measure_matmul, training_flops

# ----------------------------------------------------------------------------------------------
# Training


def train_run(model: LCKVModel, batches, backend: str | None, device) -> dict:
    """AdamW steps on `batches`, each step timed, compiled with `backend` unless None; returns
    the losses and the step times (the first one includes compiling, when compiled)."""
    run = model if backend is None else compile_for_training(model, backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, times = [], []
    for x, y in batches:
        sync(device)
        t0 = time.perf_counter()
        _, loss = run(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return {"losses": losses, "times_s": times}


def bench_training(shape, device, batch: int, T: int, steps: int, matmul: float, backend: str
                   ) -> list[dict]:
    rows = []
    for name, config in variants(replace(shape, block_size=T), (2,)).items():
        torch.manual_seed(0)
        model = LCKVModel(config).to(device).train()
        g = torch.Generator().manual_seed(1)
        batches = [(torch.randint(config.vocab_size, (batch, T), generator=g).to(device),
                    torch.randint(config.vocab_size, (batch, T), generator=g).to(device))
                   for _ in range(steps)]
        flops = batch * training_flops(config, T, config.forward_passes, config.backward_passes)
        eager = train_run(copy.deepcopy(model), batches, None, device)
        torch.compiler.reset()
        compiled = train_run(copy.deepcopy(model), batches, backend, device)
        for kind, r in (("eager", eager), ("compiled", compiled)):
            step = statistics.median(r["times_s"][2:])  # after the first (compiling) steps
            rows.append({"model": name, "kind": kind, "median_step_s": step,
                         "first_step_s": r["times_s"][0], "flops_per_step": flops,
                         "achieved_flops": flops / step, "of_matmul": flops / step / matmul,
                         "losses": r["losses"], "times_s": r["times_s"]})
        e, c = rows[-2], rows[-1]
        # what the first two steps took beyond a step: the compile, and any second one
        c["compile_s"] = sum(t - c["median_step_s"] for t in c["times_s"][:2])
        c["speedup"] = e["median_step_s"] / c["median_step_s"]
        gain = e["median_step_s"] - c["median_step_s"]
        c["pays_after_steps"] = c["compile_s"] / gain if gain > 0 else None
        c["max_loss_diff"] = max(abs(a - b) for a, b in zip(e["losses"], c["losses"]))
    for kind in ("eager", "compiled"):
        std, lckv = (next(r for r in rows if r["model"] == n and r["kind"] == kind)
                     for n in ("standard", "lckv w=2"))
        lckv["ratio_vs_standard"] = lckv["median_step_s"] / std["median_step_s"]
        lckv["flop_ratio"] = lckv["flops_per_step"] / std["flops_per_step"]
        lckv["ratio_off_flops"] = lckv["ratio_vs_standard"] / lckv["flop_ratio"] - 1
    return rows


# ----------------------------------------------------------------------------------------------
# Decoding


def weight_bytes(model: LCKVModel) -> int:
    """Bytes a decode step reads of the weights: all of them but the embedding table, of which
    it reads one row per sequence (the head is read whole, tied to it or not)."""
    emb = model.model.embed_tokens.weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.config.tie_embeddings:
        return total  # the one matrix is read whole, as the head
    return total - emb.numel() * emb.element_size()


def kv_read_bytes(model: LCKVModel, batch: int, position: int) -> int:
    """Bytes of cached KVs a decode step at `position` reads: every attention layer reads its
    source's keys and values of the tokens before it (one layer's worth each, LCKV or not)."""
    c, p = model.config, model.lm_head.weight
    per_token = 2 * c.n_kv_head * c.head_dim * p.element_size()
    return c.n_layer * batch * position * per_token


def decode_time(model: LCKVModel, idx, n_new: int, device, reps: int, **kw) -> float:
    """Seconds per decode step: generating n_new tokens minus generating 1, over n_new - 1
    (what is left is the decode steps, without the prompt encoding)."""
    def run(n):
        return statistics.median(timeit(lambda: generate(model, idx, n, sampling=GREEDY, **kw),
                                         device, untimed=1, reps=reps))
    return (run(n_new) - run(1)) / (n_new - 1)


def bench_decoding(shape, device, P: int, G: int, budget: int, reps: int, bandwidth: float,
                   backend: str) -> list[dict]:
    rows = []
    for name, config in variants(replace(shape, block_size=max(shape.block_size, P + G)),
                                 (2,)).items():
        torch.manual_seed(0)
        model = LCKVModel(config).to(device).eval()
        largest = max_batch(config, budget, P, G, torch.float32)
        for B in sorted({1, max(1, largest)}):
            idx = torch.randint(config.vocab_size, (B, P), device=device)
            torch.compiler.reset()
            t0 = time.perf_counter()
            compiled_tokens = generate(model, idx, G, sampling=GREEDY, compile=backend)
            first = time.perf_counter() - t0
            same = torch.equal(compiled_tokens, generate(model, idx, G, sampling=GREEDY))
            # the bound counts the KVs a step needs (the tokens before it, on average P + G/2),
            # which is what both decoders read
            bound = (weight_bytes(model) + kv_read_bytes(model, B, P + G // 2)) / bandwidth
            for kind, kw in (("eager", {}), ("compiled", {"compile": backend})):
                step = decode_time(model, idx, G, device, reps, **kw)
                rows.append({"model": name, "batch": B, "kind": kind, "step_ms": 1e3 * step,
                             "bound_ms": 1e3 * bound, "of_bound": step / bound,
                             "tokens_per_s": B / step,
                             **({"first_generate_s": first, "same_tokens": same}
                                if kind == "compiled" else {})})
    return rows


# ----------------------------------------------------------------------------------------------
# Against transformers, on a real model


def bench_transformers(folder: str, device, G: int, batches=(1, 8), reps: int = 2,
                       backend: str = "inductor") -> dict:
    """Greedy generation tokens/s of transformers' LlamaForCausalLM.generate and of ours (eager
    and compiled with `backend`) on the same float32 weights, prompts of 16 random token ids."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return {"skipped": "transformers is not installed"}
    from ..pretrained import from_pretrained
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    ours = from_pretrained(folder).to(device).eval()
    rows = []
    for B in batches:
        g = torch.Generator().manual_seed(B)
        idx = torch.randint(ours.config.vocab_size, (B, 16), generator=g).to(device)

        def hf_generate():
            return hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=G,
                               min_new_tokens=G, do_sample=False, pad_token_id=0)

        with torch.inference_mode():
            ref = hf_generate()
            hf_s = statistics.median(timeit(hf_generate, device, 0, reps))
        row = {"batch": B, "new_tokens": G, "transformers_tokens_per_s": B * G / hf_s}
        for kind, kw in (("eager", {}), ("compiled", {"compile": backend})):
            torch.compiler.reset()
            out = generate(ours, idx, G, sampling=GREEDY, **kw)  # compiles, when compiled
            s = statistics.median(timeit(lambda kw=kw: generate(ours, idx, G, sampling=GREEDY,
                                                                **kw), device, 0, reps))
            row[f"{kind}_tokens_per_s"] = B * G / s
            row[f"{kind}_vs_transformers"] = row[f"{kind}_tokens_per_s"] / row[
                "transformers_tokens_per_s"]
            row[f"{kind}_same_tokens"] = torch.equal(out, ref)
        rows.append(row)
    return {"model": folder, "rows": rows}


# ----------------------------------------------------------------------------------------------


def bench_compiled(args) -> dict:
    if args.compile_backend == "inductor" and (why := why_inductor_fails(args.device)):
        raise SystemExit(f"bench compiled: inductor cannot compile on this machine ({why})")
    with warnings.catch_warnings():  # a silent fallback would time eager code as compiled
        warnings.simplefilter("error", CompileWarning)
        return measure_compiled(args)


def measure_compiled(args) -> dict:
    device, shape = args.device, SHAPES[args.shape]
    matmul = measure_matmul(device, 1024, torch.float32)
    bandwidth = measure_bandwidth(device, mbytes=256)
    print(f"matmul {matmul / 1e9:.1f} GFLOP/s, read bandwidth {bandwidth / 1e9:.1f} GB/s")
    parts = args.compiled_parts
    train = bench_training(shape, device, args.train_batch, args.train_len, args.compile_steps,
                           matmul, args.compile_backend) if "train" in parts else []
    table(train, ["model", "kind", "median_step_s", "first_step_s", "of_matmul", "speedup",
                  "compile_s", "pays_after_steps", "max_loss_diff", "ratio_vs_standard",
                  "flop_ratio"], f"Training step ({args.shape} shape, batch {args.train_batch} "
                                 f"x {args.train_len} tokens), eager vs compiled")
    budget = int(args.cpu_budget_gib * 2**30)
    decode = bench_decoding(shape, device, args.prompt_len, args.decode_len, budget, args.reps,
                            bandwidth, args.compile_backend) if "decode" in parts else []
    table(decode, ["model", "batch", "kind", "step_ms", "bound_ms",
                   "of_bound", "tokens_per_s",
                   "first_generate_s", "same_tokens"],
          f"Decode step ({args.shape} shape, prompt {args.prompt_len}, {args.decode_len} new "
          f"tokens), against its memory-traffic bound")
    hf = (bench_transformers(args.model, device, args.hf_new_tokens,
                             backend=args.compile_backend)
          if args.model and "transformers" in parts
          else {"skipped": "no --model folder given" if not args.model else "not asked for"})
    if "rows" in hf:
        table(hf["rows"], ["batch", "transformers_tokens_per_s", "eager_tokens_per_s",
                           "compiled_tokens_per_s", "eager_vs_transformers",
                           "compiled_vs_transformers", "eager_same_tokens",
                           "compiled_same_tokens"], f"Greedy generation on {args.model}")
    return {"limits": {"matmul_flops": matmul, "read_bytes_per_s": bandwidth},
            "training": train, "decoding": decode, "transformers": hf,
            "config": {"shape": args.shape, "train_batch": args.train_batch,
                       "train_len": args.train_len, "steps": args.compile_steps,
                       "prompt_len": args.prompt_len, "decode_len": args.decode_len,
                       "budget_gib": args.cpu_budget_gib, "backend": args.compile_backend},
            "machine": machine()}
