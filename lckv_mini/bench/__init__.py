"""Benchmarks of the paper's efficiency claims, LCKV against a standard model of the same shape.

    python -m lckv_mini.bench memory      # Table 1 setting: KV bytes per token, largest batch
    python -m lckv_mini.bench throughput  # Fig. 4: generation tokens/s vs batch under a budget
    python -m lckv_mini.bench prefill     # prompt encoding: sequential vs parallel vs adaptive
    python -m lckv_mini.bench train       # training step time vs the FLOP-count prediction
    python -m lckv_mini.bench passes      # the passes with and without their wasted work
    python -m lckv_mini.bench streaming   # Fig. 5: per-token latency and memory vs cache size
    python -m lckv_mini.bench layouts     # arXiv 2410.14442's nine families: step and prefill
                                          # cost vs FLOPs; fast prefill of YOCO and Gemma
    python -m lckv_mini.bench quality --out DIR  # the nine families' exact loss at a 2x and a 4x
                                          # smaller cache, 3 seeds each (about an hour)
    python -m lckv_mini.bench compiled [--model FOLDER]  # eager vs torch.compile, against the
                                          # matmul and memory-traffic limits (and transformers)
    python -m lckv_mini.bench all
    python -m lckv_mini.bench gpu-check --out results/<device>  # the GPU check (docs/gpu.md)

Absolute times on a shared machine are noisy; every figure that matters is a ratio of two
measurements taken side by side in one run. Each run prints a table and writes JSON (config,
machine, torch version, raw timings, medians); --plot writes PNGs (needs matplotlib).

Files, one question each:
    common.py       shapes, LCKV variants, the GPU check's settings, timing, time limits, tables
    memory.py       Table 1: KV bytes per token, the largest batch under a budget
    throughput.py   Fig. 4 throughput (and the GPU check's decoding part), prompt encoding
                    latency, Fig. 5 streaming
    training.py     the training step's FLOP count and time, the passes' wasted work, and the GPU
                    check's training part (tokens/s, MFU, peak memory)
    layouts.py      the follow-up study's families side by side: training step and prompt
                    encoding against their FLOP counts; fast prefill on and off
    quality.py      the follow-up study's quality question: the families trained and scored
                    exactly, run by run (resumable), with the seeds' noise
    compiled.py     eager against torch.compile (training and decoding), the hardware's limits,
                    transformers' generate on a real model
    correctness.py  the GPU check's correctness part: the device against the CPU's answers
    gpu_check.py    the GPU check: its sizes, running the parts, summary.md
    plots.py        PNGs shaped like the paper's figures
    cli.py          the command line
"""

from .cli import BENCHES, main, parse_args
from .common import SHAPES, dtype_of, machine, measure_bandwidth, sync, table, timeit, variants
from .gpu_check import PARTS
from .layouts import bench_layouts, prefill_flops
from .memory import activation_bytes, bench_memory, max_batch, param_count
from .plots import PLOTS, plot, ratio_bars
from .throughput import batch_sizes, bench_prefill, bench_streaming, bench_throughput
from .training import (
    bench_passes,
    bench_train,
    group_pass_flops,
    layer_flops,
    naive_parallel,
    peak_flops,
    training_flops,
)

__all__ = ["BENCHES", "PARTS", "PLOTS", "SHAPES", "activation_bytes", "batch_sizes",
           "bench_layouts", "bench_memory", "bench_passes", "bench_prefill", "bench_streaming",
           "bench_throughput", "bench_train", "dtype_of", "group_pass_flops", "layer_flops",
           "machine", "main", "max_batch", "measure_bandwidth", "naive_parallel", "param_count",
           "parse_args", "peak_flops", "plot", "prefill_flops", "ratio_bars", "sync", "table",
           "timeit", "training_flops", "variants"]
