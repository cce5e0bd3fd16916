"""The GPU check, one command: does the package compute right, and how fast, on an accelerator?

    python -m lckv_mini.bench gpu-check --out results/<device-name> [--device cuda] [--tiny]

Three parts, each in its own try/except and with its own time limit: a part that fails records
{"ok": false, "error", "traceback"} and the next part runs. Each part writes <part>.json (the
machine, torch, the sizes, the raw timings, a flat `summary`); the run ends with summary.md, a
Markdown table a README can quote. docs/gpu.md describes every field.
- correctness: in float32 on the device, the parallel computation against the sequential one
  (Theorem 1: logits and gradients), cached greedy decoding against the sequential model, a
  ragged batch against each prompt alone; bfloat16 with the zero-output rule; which SDPA backend
  serves each attention form.
- training: tokens/s, MFU and the LCKV/standard step-time ratio beside the FLOP prediction at a
  GPT-2-small shape, eager and compiled; peak memory with and without activation checkpointing.
- decoding (Fig. 4): generation tokens/s against batch size at a ~1B shape, the batch doubling
  until out of memory, and the best-throughput ratio LCKV/standard.
Time limits are checked between measurements: a measurement that has started runs to its end.
This file holds the sizes and runs the parts; each part lives with its question:
correctness.py, training.py (part_training), throughput.py (part_decoding).
--tiny shrinks every size so that the command runs in seconds on a CPU (a smoke test).
"""


from __future__ import annotations

import argparse
import json
import re
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from ..config import LCKVConfig
from .common import CheckSettings, Deadline, free_memory, is_cuda, machine, sync
from .correctness import part_correctness
from .throughput import part_decoding
from .training import part_training, peak_flops

# ----------------------------------------------------------------------------------------------
# The sizes: the default ones fit about eight minutes on an H100/H200; --tiny, seconds on a CPU

FULL = CheckSettings(
    check_shape=LCKVConfig(vocab_size=512, n_layer=8, n_head=4, n_kv_head=2, n_embd=128,
                           intermediate_size=256, block_size=64),
    check_len=24, check_window=5, sdpa_shape=(2, 16, 1024, 128),
    train_shape=LCKVConfig(vocab_size=50304, n_layer=12, n_head=12, n_kv_head=12, n_embd=768,
                           intermediate_size=2048, block_size=1024),
    train_batch=8, train_reps=5, compile_backend="inductor",
    compile_models=("standard", "lckv w=2", "lckv w=10"), matmul_n=8192,
    decode_shape=LCKVConfig(vocab_size=32000, n_layer=24, n_head=16, n_kv_head=16, n_embd=2048,
                            intermediate_size=5632, block_size=4096),
    prompt_len=2048, gen_len=2048, first_batch=16, batch_cap=1024,
    time_limits={"correctness": 60, "training": 180, "decoding": 240})

TINY = CheckSettings(
    check_shape=LCKVConfig(vocab_size=64, n_layer=4, n_head=2, n_kv_head=1, n_embd=32,
                           intermediate_size=64, block_size=32),
    check_len=8, check_window=3, sdpa_shape=(2, 4, 16, 16),
    train_shape=LCKVConfig(vocab_size=64, n_layer=4, n_head=2, n_kv_head=2, n_embd=32,
                           intermediate_size=64, block_size=16, forward_passes=1,
                           backward_passes=1),
    train_batch=2, train_reps=1, compile_backend="eager", compile_models=("lckv w=2",),
    matmul_n=128,
    decode_shape=LCKVConfig(vocab_size=64, n_layer=4, n_head=2, n_kv_head=2, n_embd=32,
                            intermediate_size=64, block_size=32),
    prompt_len=6, gen_len=6, first_batch=1, batch_cap=4,
    time_limits={"correctness": 30, "training": 30, "decoding": 30})


# ----------------------------------------------------------------------------------------------
# The machine


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if is_cuda(device) else str(device)


def device_info(device) -> dict:
    info = {**machine(), "device": str(device), "device_name": device_name(device),
            "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if is_cuda(device):
        props = torch.cuda.get_device_properties(device)
        info.update(capability=f"{props.major}.{props.minor}", memory_bytes=props.total_memory,
                    multiprocessors=props.multi_processor_count, cuda_version=torch.version.cuda,
                    cudnn_version=torch.backends.cudnn.version())
    return info


# ----------------------------------------------------------------------------------------------
# Running the parts, and the summary

PARTS = {"correctness": part_correctness, "training": part_training, "decoding": part_decoding}


def run_part(name: str, device, settings: CheckSettings) -> dict:
    """One part, in its own try/except: what it measured, or the error and its traceback."""
    limit = settings.time_limits[name]
    t0 = time.perf_counter()
    try:
        result = {"ok": True, **PARTS[name](device, settings, Deadline(limit))}
    except Exception as e:
        result = {"ok": False, "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc()}
    free_memory(device)
    sync(device)
    return {"part": name, **result, "seconds": time.perf_counter() - t0, "time_limit_s": limit}


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e3 else f"{v:,.0f}"
    return str(v)


def summary_markdown(results: dict, info: dict, tiny: bool) -> str:
    """summary.md: one table per part, short enough to quote in a README."""
    lines = [f"# GPU check: {info['device_name']}", "",
             f"torch {info['torch']}, {info['device']}" + (", --tiny sizes (a smoke test, not a "
                                                           "measurement)" if tiny else ""), "",
             "| part | ok | seconds | result |", "|---|---|---|---|"]
    for name, r in results.items():
        if not r["ok"]:
            head = f"error: {r['error'].splitlines()[0][:120]}"
        elif name == "correctness":
            s = r["summary"]
            head = (f"{s['passed']}/{s['checks']} checks pass; worst rel. error: logits "
                    f"{fmt(s['worst_theorem1_rel_err'])}, gradients {fmt(s['worst_grad_rel_err'])}"
                    f", decoding {fmt(s['worst_decode_rel_err'])}")
        elif name == "training":
            s = r["summary"]
            head = "; ".join(f"{k} {fmt(v['tokens_per_s'])} tok/s" for k, v in s.items()
                             if isinstance(v, dict) and "tokens_per_s" in v)
        else:
            s = r["summary"]
            head = "; ".join(f"{k} x{fmt(v['ratio_vs_standard'])}" for k, v in s.items()
                             if isinstance(v, dict))
        lines.append(f"| {name} | {r['ok']} | {r['seconds']:.0f} | {head} |")
    train = results.get("training", {})
    if train.get("ok"):
        lines += ["", f"Training ({train['dtype']}, batch {train['config']['batch']} x "
                  f"{train['config']['seq_len']} tokens, forward + backward):", "",
                  "| model | compiled | tokens/s | MFU | MFU vs matmul | time ratio | FLOP ratio |",
                  "|---|---|---|---|---|---|---|"]
        for r in train["rows"]:
            lines.append(f"| {r['model']} | {r['compiled']} | " + " | ".join(
                fmt(r.get(k)) for k in ("tokens_per_s", "mfu", "mfu_vs_matmul", "time_ratio",
                                        "flop_ratio")) + " |")
        lines += ["", "| model | activation checkpointing | peak memory (GiB) | step (s) |",
                  "|---|---|---|---|"]
        for r in train["memory"]:
            peak = r.get("peak_bytes")
            lines.append(f"| {r['model']} | {r['activation_checkpointing']} | "
                         f"{fmt(peak / 2**30 if peak else None)} | {fmt(r.get('step_s'))} |")
    dec = results.get("decoding", {})
    if dec.get("ok"):
        c = dec["config"]
        lines += ["", f"Decoding ({dec['dtype']}, prompt {c['prompt_len']} + {c['gen_len']} "
                  "generated tokens, greedy; Fig. 4):", "",
                  "| model | KV layers | best batch | best tokens/s | ratio vs standard | stopped |"
                  " compiled | CUDA graphs |", "|---|---|---|---|---|---|---|---|"]
        for e in dec["models"]:
            extra = [fmt(e.get(o, {}).get("tokens_per_s", e.get(o, {}).get("skipped")))
                     for o in ("compiled", "cuda_graph")]
            stopped = str(e.get("stopped")).splitlines()[0][:80]
            lines.append(f"| {e['model']} | {fmt(e.get('kv_layers'))} | "
                         f"{fmt(e.get('best_batch'))} | {fmt(e.get('best_tokens_per_s'))} | "
                         f"{fmt(e.get('ratio_vs_standard'))} | {stopped} | {' | '.join(extra)} |")
    return "\n".join(lines) + "\n"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m lckv_mini.bench gpu-check",
        description="Correctness, training and decoding on an accelerator, in one command: one "
                    "JSON per part and summary.md (docs/gpu.md).")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="folder (default: results/<device name>)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: seconds on a CPU")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    p.add_argument("--time-limit", nargs="+", default=[], metavar="PART=SECONDS",
                   help="override a part's time limit, e.g. decoding=300")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the card's peak bf16 TFLOP/s, if PEAK_BF16 does not list it")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default: inductor; eager with --tiny)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = args.device
    if is_cuda(device) and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: torch {torch.__version__} sees no CUDA device")
    settings = TINY if args.tiny else FULL
    limits = dict(settings.time_limits)
    for item in args.time_limit:
        part, _, seconds = item.partition("=")
        if part not in PARTS:
            raise SystemExit(f"--time-limit {item!r}: the parts are {', '.join(PARTS)}")
        limits[part] = float(seconds)
    settings = replace(settings, time_limits=limits,
                       compile_backend=args.compile_backend or settings.compile_backend,
                       peak_flops=args.peak_tflops * 1e12 if args.peak_tflops
                       else peak_flops(device_name(device)))
    results, threads = {}, torch.get_num_threads()
    if args.tiny and not is_cuda(device):
        torch.set_num_threads(1)  # tiny models: one thread is faster, and fights no one for cores
    try:
        info = device_info(device)
        out = Path(args.out or Path("results") / slug(info["device_name"]))
        out.mkdir(parents=True, exist_ok=True)
        for name in args.parts:
            print(f"gpu-check: {name} (time limit {limits[name]:g} s) ...", flush=True)
            result = run_part(name, device, settings)
            result.update(device=str(device), device_name=info["device_name"], machine=info,
                          torch=torch.__version__, tiny=args.tiny,
                          time=time.strftime("%Y-%m-%dT%H:%M:%S"))
            (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
            print(f"  ok={result['ok']} in {result['seconds']:.1f} s -> {out / (name + '.json')}"
                  + ("" if result["ok"] else f"\n  {result['error']}"), flush=True)
            results[name] = result
    finally:
        torch.set_num_threads(threads)
    (out / "summary.md").write_text(summary_markdown(results, info, args.tiny))
    print(f"-> {out / 'summary.md'}")
    return results
