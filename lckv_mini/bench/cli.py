"""The command line: `python -m lckv_mini.bench <name> ...` runs one benchmark (or all) and writes
its JSON (and PNG with --plot); `gpu-check` has a command line of its own (see gpu_check.py)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import gpu_check, quality, realmodel
from .common import SHAPES, machine
from .compiled import bench_compiled
from .layouts import bench_layouts
from .memory import bench_memory
from .plots import PLOTS, plot
from .throughput import bench_prefill, bench_streaming, bench_throughput
from .training import bench_passes, bench_train

BENCHES = {"memory": bench_memory, "throughput": bench_throughput, "prefill": bench_prefill,
           "train": bench_train, "passes": bench_passes, "streaming": bench_streaming,
           "layouts": bench_layouts, "compiled": bench_compiled}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m lckv_mini.bench",
        description="LCKV vs standard benchmarks (ratios in one run).",
        epilog="gpu-check: every correctness, training and decoding check on an accelerator in "
               "one command; see `python -m lckv_mini.bench gpu-check --help` and docs/gpu.md.")
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
    p.add_argument("--layout-layers", type=int, default=12, help="depth for the layouts benchmark")
    p.add_argument("--layout-kv", type=int, nargs="+", default=[6],
                   help="KV layers of the study's families (6 of 12: 2x; 3: 4x)")
    p.add_argument("--layout-prompt-len", type=int, default=512,
                   help="prompt length of the layouts benchmark's prompt encoding")
    p.add_argument("--sliding-window", type=int, default=128, help="window of YOCO's and "
                   "Gemma's sliding layers in the layouts benchmark")
    p.add_argument("--compile-steps", type=int, default=12,
                   help="compiled: training steps timed per model, eager and compiled")
    p.add_argument("--decode-len", type=int, default=128, help="compiled: tokens decoded")
    p.add_argument("--compile-backend", default="inductor", help="compiled: torch.compile's "
                   "backend (aot_eager traces without generating code: the tests use it)")
    p.add_argument("--model", default=None, help="compiled: a Hugging Face Llama folder, to "
                   "compare with transformers' generate (needs transformers)")
    p.add_argument("--compiled-parts", nargs="+", default=["train", "decode", "transformers"],
                   choices=["train", "decode", "transformers"], help="compiled: which parts")
    p.add_argument("--hf-new-tokens", type=int, default=32, help="compiled: tokens generated "
                   "in the transformers comparison")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="bench_results", help="folder for JSON and PNGs")
    p.add_argument("--plot", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["gpu-check"]:
        return gpu_check.main(argv[1:])
    if argv[:1] in (["conversion"], ["continued"]):  # a real model: see realmodel.py
        return realmodel.main(argv[0], argv[1:])
    if argv[:1] == ["quality"]:  # trains models for an hour: see quality.py
        return quality.main(argv[1:])
    args = parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # "all" leaves out `compiled`, which compiles for minutes (run it on its own)
    names = [n for n in BENCHES if n != "compiled"] if args.bench == "all" else [args.bench]
    results = {}
    for name in names:
        result = BENCHES[name](args)
        result.update(bench=name, machine=machine(), device=args.device,
                      args={k: v for k, v in vars(args).items()},
                      time=time.strftime("%Y-%m-%dT%H:%M:%S"))
        path = out_dir / f"{name}.json"
        path.write_text(json.dumps(result, indent=1, default=str))
        if args.plot and name in PLOTS:
            result["plot"] = str(plot(name, result, out_dir))
        results[name] = result
        print(f"-> {path}" + (f", {result['plot']}" if args.plot else ""))
    return results
