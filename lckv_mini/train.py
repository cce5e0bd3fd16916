"""Training: a flat loop (nanoGPT-style) for standard and LCKV models, on one process or many.

`train(TrainConfig(...))` is what `train_shakespeare.py` and the notebooks call. Multi-process
runs go through torchrun (its RANK / WORLD_SIZE variables): every rank draws the same global
batch and takes its own rows, so N ranks compute exactly what one rank would with the same
global batch; rank 0 alone evaluates, logs and saves.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import tempfile
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from .checkpoint import (
    CHECKPOINT,
    check_same_config,
    load_checkpoint,
    resolve_device,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import LAYOUTS, LCKVConfig, make_layer_types
from .data import (
    DataError,
    Tokenizer,
    atomic_write_bytes,
    get_batch,
    read_text,
    shakespeare_path,
    split,
    tokenize_cached,
)
from .generate import CompileWarning, Sampling, why_inductor_fails
from .model import LCKVModel
from .pretrained import check_init_folder, init_config, init_model, load_tokenizer
from .sample import sample_text

LOG = "log.jsonl"


@dataclass
class TrainConfig:
    # data
    data: str | None = None  # a local text file; None: tiny Shakespeare, downloaded once
    cache_dir: str | None = None  # downloads and token caches (default $LCKV_CACHE_DIR, ~/.cache)
    tokenizer: str = "gpt2"  # "gpt2" (tiktoken r50k_base) or "char"
    compact_vocab: bool = True  # keep only the GPT-2 ids the corpus uses
    # model
    # A local Hugging Face Llama folder to continue training from: its config.json sets the
    # model's shape (n_layer ... tie_embeddings below are then ignored), its weights are
    # converted to layers_kind, its tokenizer.json replaces `tokenizer`. See pretrained.py.
    init_from: str | None = None
    layers_kind: str = "lckv"  # one of config.LAYOUTS, or a raw layer_types string
    warmup_layers: int = 2  # w, for lckv: standard layers kept at the bottom and top
    cla_group: int = 2
    n_kv_layers: int | None = None  # for the families of arXiv 2410.14442 (default n_layer // 2)
    n_layer: int = 6
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 128
    intermediate_size: int = 344
    block_size: int = 128
    sliding_window: int | None = None  # for "s" layers (yoco); default block_size // 4
    forward_passes: int = 7  # m
    backward_passes: int = 2  # b
    dropout: float = 0.0
    tie_embeddings: bool = True
    # optimisation
    mode: str = "parallel"  # or "sequential": token by token, for tiny runs and teaching
    batch_size: int = 16  # rows per micro-step per process
    grad_accum: int = 1
    max_iters: int = 800
    lr: float = 2e-3
    min_lr: float = 2e-4
    lr_warmup_iters: int = 30  # linear learning-rate warmup
    lr_decay_iters: int | None = None  # cosine horizon; default max_iters
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    activation_checkpointing: bool = False  # recompute layers in backward: less memory, more time
    # evaluation, logging, checkpoints
    eval_interval: int = 100
    eval_iters: int = 10
    out_dir: str = "out"
    resume: bool = False
    sample_tokens: int | None = None  # None: the rest of the block after the prompt
    prompt: str = "\n"
    temperature: float = 0.8
    top_k: int | None = 50
    # system
    device: str = "auto"  # auto: cuda, then mps, then cpu
    compile: bool = False
    seed: int = 1337
    progress: bool = True


# Learning-rate schedules by name (--lr-preset); explicit --lr etc. still win. "continue":
# continued training of a pretrained model (--init-from), whose weights a from-scratch rate
# would wreck: a small peak, a short warmup, decay by 10x.
LR_PRESETS = {"scratch": dict(lr=2e-3, min_lr=2e-4, lr_warmup_iters=30),
              "continue": dict(lr=3e-5, min_lr=3e-6, lr_warmup_iters=10)}

# A few seconds on a CPU: what the tests and `--smoke` run.
# Its own --out-dir, so that it never collides with the default run's out/.
SMOKE = dict(n_layer=4, n_head=2, n_kv_head=1, n_embd=32, intermediate_size=64, block_size=32,
             batch_size=4, max_iters=20, lr_warmup_iters=2, eval_interval=10, eval_iters=2,
             out_dir=os.path.join("out", "smoke"))


def compile_for_training(model: LCKVModel, backend: str = "inductor", fullgraph: bool = False):
    """torch.compile(model), with the RoPE table of the model's dtype and device built first:
    built inside the first compiled call, it would change what the second call sees (a guard on
    the table cache) and the whole model would compile twice (24 s more on the `cpu` shape,
    86 s more for LCKV w=2's unrolled passes, measured)."""
    p = next(model.parameters())
    model.rope(0, 1, p.dtype, p.device)
    return torch.compile(model, backend=backend, fullgraph=fullgraph)


def model_config(cfg: TrainConfig, vocab_size: int) -> LCKVConfig:
    if cfg.init_from:  # shape, vocabulary and RoPE from the folder; layout and passes from cfg
        return init_config(cfg.init_from, cfg.layers_kind, warmup=cfg.warmup_layers,
                           group=cfg.cla_group, n_kv_layers=cfg.n_kv_layers,
                           sliding_window=cfg.sliding_window or max(1, cfg.block_size // 4),
                           forward_passes=cfg.forward_passes,
                           backward_passes=cfg.backward_passes, dropout=cfg.dropout)
    layer_types = (make_layer_types(cfg.layers_kind, cfg.n_layer, warmup=cfg.warmup_layers,
                                    group=cfg.cla_group, n_kv_layers=cfg.n_kv_layers)
                   if cfg.layers_kind in LAYOUTS else cfg.layers_kind)
    return LCKVConfig(vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                      n_kv_head=cfg.n_kv_head, n_embd=cfg.n_embd,
                      intermediate_size=cfg.intermediate_size, block_size=cfg.block_size,
                      layer_types=layer_types,
                      sliding_window=cfg.sliding_window or max(1, cfg.block_size // 4),
                      forward_passes=cfg.forward_passes, backward_passes=cfg.backward_passes,
                      tie_embeddings=cfg.tie_embeddings, dropout=cfg.dropout)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters."""
    horizon = cfg.lr_decay_iters or cfg.max_iters
    if step < cfg.lr_warmup_iters:
        return cfg.lr * (step + 1) / (cfg.lr_warmup_iters + 1)
    if step >= horizon:
        return cfg.min_lr
    ratio = (step - cfg.lr_warmup_iters) / max(1, horizon - cfg.lr_warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def unigram_entropy(ids: np.ndarray) -> float:
    """Entropy (nats) of the token frequencies: the loss of a model that ignores context."""
    counts = np.bincount(np.asarray(ids, dtype=np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# ----------------------------------------------------------------------------------------------
# Checking the settings: every flag, before any file or folder is made


class ConfigError(ValueError):
    """A setting out of its range, or settings that contradict each other. The message is one
    line that names the flag (the TrainConfig field, with dashes)."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# Integer fields and their least value; those in OPTIONAL may also be None (their default).
INT_MIN = {"n_layer": 1, "n_head": 1, "n_kv_head": 1, "n_embd": 1, "intermediate_size": 1,
           "block_size": 1, "forward_passes": 0, "backward_passes": 1, "warmup_layers": 0,
           "cla_group": 1, "n_kv_layers": 1, "sliding_window": 1, "batch_size": 1,
           "grad_accum": 1, "max_iters": 0, "lr_warmup_iters": 0, "lr_decay_iters": 1,
           "eval_interval": 1, "eval_iters": 1, "sample_tokens": 0, "top_k": 1}
OPTIONAL = {"n_kv_layers", "sliding_window", "lr_decay_iters", "sample_tokens", "top_k"}
# Float fields: (test, the range in words).
FLOAT_RANGE = {"lr": (lambda v: v > 0, "> 0"),
               "min_lr": (lambda v: v >= 0, ">= 0"),
               "weight_decay": (lambda v: v >= 0, ">= 0"),
               "grad_clip": (lambda v: v >= 0, ">= 0 (0: no clipping)"),
               "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
               "temperature": (lambda v: v >= 0, ">= 0 (0: greedy)")}
MODES = ("parallel", "sequential")
TOKENIZERS = ("gpt2", "char")
LAYER_TYPES = re.compile(r"\d+s?(_\d+s?)*")  # "0_6_6_6_6_6_6_7", "0s_1s_2s_3s_3_3_3_3"


def check_config(cfg: TrainConfig) -> LCKVConfig:
    """Refuse any setting that would fail later or silently do nothing, with a one-line message
    naming the flag. Reads files (the data file's presence, the checkpoint's, an --init-from
    folder's config.json) but makes none: `train` calls it before anything is created. Returns
    the model config the settings describe (with a placeholder vocabulary size)."""
    for name, least in INT_MIN.items():
        value = getattr(cfg, name)
        if value is None and name in OPTIONAL:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{flag(name)} must be an integer >= {least}, got {value!r}")
    for name, (holds, what) in FLOAT_RANGE.items():
        value = getattr(cfg, name)
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or not math.isfinite(value) or not holds(value)):
            raise ConfigError(f"{flag(name)} must be {what}, got {value!r}")
    if cfg.min_lr > cfg.lr:
        raise ConfigError(f"--min-lr {cfg.min_lr} exceeds --lr {cfg.lr}: the schedule decays "
                          "from --lr down to --min-lr")
    if cfg.mode not in MODES:
        raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    if cfg.activation_checkpointing and cfg.mode == "sequential":
        raise ConfigError("--activation-checkpointing applies to the parallel computation only; "
                          "drop it or use --mode parallel")
    if cfg.tokenizer not in TOKENIZERS and not cfg.init_from:
        raise ConfigError(f"unknown tokenizer {cfg.tokenizer!r} (--tokenizer); valid: "
                          f"{', '.join(TOKENIZERS)}")
    if cfg.layers_kind not in LAYOUTS and not LAYER_TYPES.fullmatch(cfg.layers_kind):
        raise ConfigError(f"unknown --layers-kind {cfg.layers_kind!r}; valid: "
                          f"{', '.join(LAYOUTS)}, or a layer_types string such as 0_6_6_6_6_6_6_7")
    if cfg.sample_tokens != 0 and not cfg.prompt:
        raise ConfigError("--prompt is empty: the sample needs at least one character "
                          "(or --sample-tokens 0: no sample)")
    resolve_device(cfg.device)  # an unknown or absent device
    if cfg.data and not Path(cfg.data).is_file():
        raise DataError(f"data file {cfg.data} does not exist (--data)")
    ckpt_path = Path(cfg.out_dir) / CHECKPOINT
    if cfg.resume and not ckpt_path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
    if not cfg.resume and ckpt_path.exists():
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue it, or choose "
                              "another --out-dir (nothing was overwritten)")
    if cfg.init_from:  # the folder's model type before anything else of it
        check_init_folder(cfg.init_from)
    config = model_config(cfg, vocab_size=1)  # layout, heads, passes: any vocabulary will do
    if cfg.init_from and cfg.block_size > config.block_size:
        raise ConfigError(f"--block-size {cfg.block_size} exceeds the model's "
                          f"max_position_embeddings={config.block_size} ({cfg.init_from})")
    if cfg.sample_tokens is not None and cfg.sample_tokens >= cfg.block_size:
        raise ConfigError(f"--sample-tokens {cfg.sample_tokens} and the prompt do not fit the "
                          f"block of {cfg.block_size} tokens; ask for fewer, or leave it unset "
                          "(the rest of the block)")
    return config


def sample_length(cfg: TrainConfig, tokenizer: Tokenizer) -> int:
    """How many tokens the final sample has: --sample-tokens, or by default the rest of the
    training block after the prompt. The prompt must encode and leave room for them."""
    if cfg.sample_tokens == 0:
        return 0
    try:
        n = len(tokenizer.encode(cfg.prompt))
    except ValueError as e:
        raise ConfigError(f"--prompt {cfg.prompt!r}: {e}") from None
    room = cfg.block_size - n
    if room < 1:
        raise ConfigError(f"--prompt is {n} tokens, which leaves no room in --block-size "
                          f"{cfg.block_size}: shorten it (or --sample-tokens 0: no sample)")
    if cfg.sample_tokens is not None and cfg.sample_tokens > room:
        raise ConfigError(f"--sample-tokens {cfg.sample_tokens} and the prompt's {n} tokens "
                          f"exceed --block-size {cfg.block_size}: ask for at most {room}, or "
                          "leave it unset (the rest of the block)")
    return room if cfg.sample_tokens is None else cfg.sample_tokens


def check_writable(folder: Path) -> None:
    """Make sure `folder` can take the checkpoint and the log before any work: create it and a
    probe file, then remove both (and any parent made here), so a refusal leaves nothing."""
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"--out-dir {folder} is not writable: {e.strerror or e}") from None
    finally:
        for p in made:
            try:
                p.rmdir()
            except OSError:
                pass


# ----------------------------------------------------------------------------------------------
# The loop


@torch.no_grad()
def estimate_loss(model: LCKVModel, splits: dict, cfg: TrainConfig, device, ctx) -> dict:
    """Mean loss over eval_iters batches per split, on the same batches every time (own seed).
    Evaluates in eval mode (no dropout) and leaves the model in the mode it found it."""
    was_training = model.training
    model.eval()
    out = {}
    for name, ids in splits.items():
        g = torch.Generator().manual_seed(cfg.seed + 1)
        losses = []
        for _ in range(cfg.eval_iters):
            x, y = get_batch(ids, cfg.batch_size, cfg.block_size, g, device)
            with ctx:
                losses.append(model(x, y, mode=cfg.mode)[1].item())
        out[name] = float(np.mean(losses))
    model.train(was_training)
    return out


def setup_distributed(cfg: TrainConfig) -> tuple[int, int, str]:
    """(rank, world size, device) from torchrun's environment; one process without it."""
    device = resolve_device(cfg.device)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, device
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return int(os.environ["RANK"]), world, device


def cut_log(path: Path, step: int) -> None:
    """Drop the log records after `step` (the checkpoint's), so that a resumed run logs every
    step once and its log equals an uninterrupted run's. A line torn by a crash while it was
    written (the last one) is dropped too."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append((json.loads(line)["step"], line))
        except (ValueError, KeyError, TypeError):
            if i < len(lines) - 1:
                raise ValueError(f"{path}, line {i + 1}, is not a log record: "
                                 f"{line[:60]!r}") from None
    keep = [line for s, line in records if s <= step]
    atomic_write_bytes(path, "".join(line + "\n" for line in keep).encode())


def train(cfg: TrainConfig) -> dict:
    """Train as configured; returns a summary (losses, throughput, the sample, paths).
    Bad settings raise ConfigError (or DataError, FileExistsError, FileNotFoundError) before
    any file or folder is made."""
    check_config(cfg)
    rank, world, device = setup_distributed(cfg)
    try:
        return train_loop(cfg, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


def train_loop(cfg: TrainConfig, rank: int, world: int, device: str) -> dict:
    master, ddp = rank == 0, world > 1
    device_type = "cuda" if device.startswith("cuda") else device
    out_dir = Path(cfg.out_dir)
    ckpt_path, log_path = out_dir / CHECKPOINT, out_dir / LOG
    if master:
        check_writable(out_dir)

    # Data and tokenizer (a resumed run keeps the checkpoint's tokenizer)
    text = read_text(cfg.data) if cfg.data else shakespeare_path(cfg.cache_dir).read_text("utf-8")
    ckpt = load_checkpoint(ckpt_path, device) if cfg.resume else None
    if ckpt and ckpt["step"] >= cfg.max_iters:
        raise ConfigError(f"{ckpt_path} is at step {ckpt['step']} and --max-iters is "
                          f"{cfg.max_iters}: nothing to train; raise --max-iters to continue")
    tokenizer = (Tokenizer.from_dict(ckpt["tokenizer"]) if ckpt
                 else load_tokenizer(cfg.init_from) if cfg.init_from
                 else Tokenizer.fit(cfg.tokenizer, text, compact=cfg.compact_vocab))
    config = model_config(cfg, tokenizer.vocab_size)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's "
                         f"vocab_size is {config.vocab_size}")
    if ckpt:
        check_same_config(ckpt["model_config"], config.to_dict(), ckpt_path)
    train_ids, val_ids = split(tokenize_cached(text, tokenizer, cfg.cache_dir))
    for name, part in (("training", train_ids), ("validation", val_ids)):
        if len(part) <= cfg.block_size:
            raise DataError(f"the {name} split has {len(part)} tokens, not more than block_size="
                            f"{cfg.block_size}: use a smaller --block-size or more data")
    n_sample = sample_length(cfg, tokenizer)

    # Model and optimiser
    torch.manual_seed(cfg.seed)
    model = (init_model(cfg.init_from, config, device) if cfg.init_from and not ckpt
             else LCKVModel(config).to(device))
    model.activation_checkpointing = cfg.activation_checkpointing
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(0.9, 0.95))
    data_gen = torch.Generator().manual_seed(cfg.seed)
    step, best_val, resumed_at = 0, float("inf"), None
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        data_gen.set_state(ckpt["rng"]["data"])
        set_rng_state(ckpt["rng"])
        step, best_val = ckpt["step"], ckpt["best_val_loss"]
        resumed_at = step  # the checkpoint was saved right after this step's evaluation
        if master:
            cut_log(log_path, step)
    raw_model = model  # saved and evaluated: the model before compile / DDP wrap it
    if cfg.compile:
        why = why_inductor_fails(device)
        if why is None:
            model = compile_for_training(model)
        elif master:
            warnings.warn(f"--compile: torch.compile cannot build code on this machine ({why}); "
                          "training eagerly instead", CompileWarning, stacklevel=2)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model)
    ctx = (torch.autocast(device_type, dtype=torch.bfloat16) if device_type == "cuda"
           else nullcontext())

    splits = {"train": train_ids, "val": val_ids}
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * world
    entropy = unigram_entropy(train_ids)
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"{len(train_ids) + len(val_ids):,} tokens ({tokenizer.kind}, vocab "
              f"{tokenizer.vocab_size:,}); unigram entropy {entropy:.3f} nats; "
              f"{raw_model.num_params():,} parameters; layer_types {config.layer_types}; mode "
              f"{cfg.mode} (m={config.forward_passes}, b={config.backward_passes}); device "
              f"{device} x {world}")
    history, losses = [], None

    def log(record: dict) -> None:
        history.append(record)
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def save() -> None:
        save_checkpoint(ckpt_path, {
            "model": raw_model.state_dict(), "model_config": config.to_dict(),
            "train_config": asdict(cfg), "optimizer": optimizer.state_dict(), "step": step,
            "best_val_loss": best_val, "tokenizer": tokenizer.to_dict(),
            "rng": {**rng_state(), "data": data_gen.get_state()}})

    bar = tqdm(total=cfg.max_iters, initial=step, disable=not (master and cfg.progress),
               dynamic_ncols=True)
    while True:
        # Evaluate and save every eval_interval steps and at the end (rank 0 only); a resumed
        # run does not repeat the evaluation its checkpoint was saved after (the log has it).
        if (master and step != resumed_at
                and (step % cfg.eval_interval == 0 or step == cfg.max_iters)):
            losses = estimate_loss(raw_model, splits, cfg, device, ctx)
            best_val = min(best_val, losses["val"])
            log({"step": step, "eval_train_loss": losses["train"], "val_loss": losses["val"]})
            tqdm.write(f"step {step}: train {losses['train']:.4f}, val {losses['val']:.4f}")
            save()
        if step >= cfg.max_iters:
            break

        # One optimiser step over grad_accum micro-batches
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            # Every rank draws the same global batch and keeps its own rows.
            x, y = get_batch(train_ids, cfg.batch_size * world, cfg.block_size, data_gen)
            rows = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
            x, y = x[rows].to(device), y[rows].to(device)
            sync = nullcontext() if not ddp or micro == cfg.grad_accum - 1 else model.no_sync()
            with sync, ctx:
                _, loss = model(x, y, mode=cfg.mode)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.item() / cfg.grad_accum
        if ddp:  # log the global batch's loss, not this rank's share
            total = torch.tensor(loss_sum, device=device)
            dist.all_reduce(total)
            loss_sum = total.item() / world
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device_type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        step += 1
        if master:
            log({"step": step, "train_loss": loss_sum, "lr": lr,
                 "tokens_per_s": tokens_per_step / dt, "seconds": dt})
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}",
                            tok_s=f"{tokens_per_step / dt:,.0f}")
        bar.update(1)
    bar.close()

    summary = {"step": step, "history": history, "unigram_entropy": entropy,
               "checkpoint": str(ckpt_path), "layer_types": config.layer_types,
               "params": raw_model.num_params()}
    if master and losses:
        summary.update(train_loss=losses["train"], val_loss=losses["val"])
        rates = [r["tokens_per_s"] for r in history if "tokens_per_s" in r]
        summary["tokens_per_s"] = float(np.median(rates)) if rates else None
        if n_sample:
            summary["sample"] = sample_text(
                raw_model, tokenizer, cfg.prompt, n_sample,
                Sampling(temperature=cfg.temperature, top_k=cfg.top_k), seed=cfg.seed)
            print(f"--- sample ---\n{summary['sample']}\n--------------")
    return summary


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description="Train a standard or LCKV model on tiny Shakespeare "
                                "(or any text file).")
    p.add_argument("--smoke", action="store_true", help="a tiny model for a few seconds")
    p.add_argument("--tokenizer", choices=["gpt2", "char"])
    p.add_argument("--full-vocab", dest="compact_vocab", action="store_false", default=None,
                   help="keep GPT-2's whole 50,257-id vocabulary")
    p.add_argument("--no-tie", dest="tie_embeddings", action="store_false", default=None)
    p.add_argument("--layers-kind", help=f"one of {', '.join(LAYOUTS)}, or a layer_types "
                   "string such as 0_6_6_6_6_6_6_7")
    p.add_argument("--mode", choices=["parallel", "sequential"])
    p.add_argument("--lr-preset", choices=sorted(LR_PRESETS),
                   help="lr, min_lr and lr_warmup_iters by name (default with --init-from: "
                   "'continue')")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("--compile", action="store_true", default=None)
    p.add_argument("--resume", action="store_true", default=None)
    p.add_argument("--activation-checkpointing", action="store_true", default=None,
                   help="recompute each layer in the backward pass: less memory, more time")
    skip = {"tokenizer", "compact_vocab", "tie_embeddings", "layers_kind", "mode", "progress",
            "compile", "resume", "activation_checkpointing"}
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        kind = {"int": int, "float": float, "str": str}
        typ = next((t for n, t in kind.items() if str(f.type).startswith(n)), str)
        p.add_argument("--" + f.name.replace("_", "-"), type=typ, default=None,
                       help=f"default {f.default!r}")
    args = p.parse_args(argv)
    # Continued training from a pretrained folder takes the gentle schedule unless told otherwise.
    preset = args.lr_preset or ("continue" if args.init_from else None)
    values = {**(SMOKE if args.smoke else {}), **LR_PRESETS.get(preset, {}),
              **{k: v for k, v in vars(args).items()
                 if v is not None and k not in ("smoke", "lr_preset")}}
    return TrainConfig(**values)


def main(argv=None) -> dict:
    try:
        return train(parse_args(argv))
    except (DataError, FileExistsError, FileNotFoundError, ImportError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
