"""What every benchmark shares: the shapes, the LCKV variants of a shape, the GPU check's
settings, timing on CPU or GPU, time limits and recorded failures, the machine's description,
and the printed tables."""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
import traceback
from dataclasses import dataclass, field, replace

import torch

from ..config import LCKVConfig, make_layer_types

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


@dataclass(frozen=True)
class CheckSettings:
    """The GPU check's sizes and limits (gpu_check.FULL and TINY hold the two sets)."""
    # correctness: a small model, every layout; T tokens, so m + b >= T makes parallel = sequential
    check_shape: LCKVConfig
    check_len: int  # T
    check_window: int  # sliding window of the YOCO layout (below T, so it matters)
    sdpa_shape: tuple[int, int, int, int]  # (B, n_head, T, head_dim) of the SDPA backend check
    # training: GPT-2 small
    train_shape: LCKVConfig
    train_batch: int
    train_reps: int  # timed steps (after 2 untimed)
    compile_backend: str  # torch.compile's backend
    compile_models: tuple[str, ...]  # which of standard, lckv w=2, lckv w=10 are also compiled
    matmul_n: int  # the measured matmul is (n, n) @ (n, n)
    # decoding (Fig. 4): ~1B
    decode_shape: LCKVConfig
    prompt_len: int
    gen_len: int
    first_batch: int
    batch_cap: int
    # seconds each part may start new measurements for
    time_limits: dict = field(default_factory=dict)
    peak_flops: float | None = None  # the card's peak bf16 FLOP/s (MFU's denominator), if known


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


def is_cuda(device) -> bool:
    return str(device).startswith("cuda")


class Deadline:
    """A part's time limit, checked between measurements (one that has started runs to its end)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()

    def passed(self) -> bool:
        return self.left() <= 0

    def skipped(self) -> dict:
        return {"skipped": f"time limit of {self.seconds:g} s reached"}


def free_memory(device) -> None:
    """Give the freed blocks back to the card (on CUDA), so the next model starts clean."""
    if is_cuda(device):
        gc.collect()
        torch.cuda.empty_cache()


def attempt(row: dict, deadline: Deadline, fn) -> dict:
    """row plus what fn() measured; if the time limit has passed, or fn raises, row says so
    instead (with the traceback), and the caller goes on with its next measurement."""
    if deadline.passed():
        return {**row, **deadline.skipped()}
    try:
        return {**row, **fn()}
    except Exception as e:
        return {**row, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


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
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))

