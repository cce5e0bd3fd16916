"""Print text from a checkpoint written by the training script.

    python -m lckv_mini.sample --checkpoint out/ckpt.pt --prompt "ROMEO:"

Without streaming the prompt and the new tokens must fit the model's block: --max-new-tokens
defaults to the rest of it, and a larger value is refused. --sink-size and --window-size
stream past the block (StreamingLLM, paper Sec. 3.4); then --max-new-tokens is required.
"""

from __future__ import annotations

import argparse
import math

import torch

from .checkpoint import load_model, resolve_device
from .data import DataError, Tokenizer
from .generate import Sampling, generate
from .model import LCKVModel

DEFAULT_SAMPLING = Sampling(temperature=0.8, top_k=50)


def sample_text(model: LCKVModel, tokenizer: Tokenizer, prompt: str,
                max_new_tokens: int | None = None, sampling: Sampling = DEFAULT_SAMPLING, *,
                seed: int = 0, prefill: str = "parallel", sink_size: int | None = None,
                window_size: int | None = None, compile: bool = False) -> str:
    """Continue `prompt` with the decoder and return the text (prompt included).

    compile: decode through torch.compile (see `generate`).
    max_new_tokens: None fills the rest of the block (not streaming). Without streaming, more
    than the block holds raises ValueError (from `generate`), as does a streaming call without
    max_new_tokens."""
    device = model.lm_head.weight.device
    idx = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)
    if max_new_tokens is None:
        if sink_size is not None or window_size is not None:
            raise ValueError("streaming has no block to fill: give max_new_tokens")
        max_new_tokens = model.config.block_size - idx.size(1)
    g = torch.Generator(device=device).manual_seed(seed)
    out = generate(model, idx, max_new_tokens, sampling=sampling, generator=g, prefill=prefill,
                   sink_size=sink_size, window_size=window_size, compile=compile)
    return tokenizer.decode(out[0].tolist())


def check_args(args: argparse.Namespace) -> None:
    """The flags that need no model: one line naming the flag, before the checkpoint is read."""
    streaming = args.sink_size is not None or args.window_size is not None
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.max_new_tokens is not None and args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not args.prompt:
        raise ValueError("--prompt is empty: give at least one character")
    if streaming:
        if args.sink_size is None or args.window_size is None:
            raise ValueError("streaming needs both --sink-size and --window-size")
        if args.sink_size < 0 or args.window_size < 1:
            raise ValueError(f"--sink-size must be >= 0 and --window-size >= 1, got "
                             f"{args.sink_size} and {args.window_size}")
        if args.max_new_tokens is None:
            raise ValueError("streaming has no block to fill: give --max-new-tokens")


def check_fit(args: argparse.Namespace, block_size: int, prompt_len: int) -> None:
    """The prompt and the new tokens against the model's block (or the streaming cache)."""
    if args.sink_size is not None:
        capacity = args.sink_size + args.window_size
        if capacity > block_size:
            raise ValueError(f"--sink-size {args.sink_size} + --window-size {args.window_size} "
                             f"= {capacity} exceeds the model's block_size={block_size}")
        if prompt_len > capacity:
            raise ValueError(f"the prompt's {prompt_len} tokens do not fit the streaming cache "
                             f"of --sink-size + --window-size = {capacity} tokens")
        return
    room = block_size - prompt_len
    if room < 1:
        raise ValueError(f"the prompt's {prompt_len} tokens fill the model's block_size="
                         f"{block_size}: shorten --prompt")
    if args.max_new_tokens is not None and args.max_new_tokens > room:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} and the prompt's {prompt_len} "
                         f"tokens exceed the model's block_size={block_size}: ask for at most "
                         f"{room}, or stream past the block with --sink-size and --window-size "
                         f"(e.g. --sink-size 4 --window-size {block_size - 4})")


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a ckpt.pt written by train_shakespeare.py")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: the rest of the model's block after the prompt")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefill", choices=["parallel", "sequential", "adaptive"], default="parallel")
    p.add_argument("--sink-size", type=int, default=None, help="streaming: first tokens kept")
    p.add_argument("--window-size", type=int, default=None, help="streaming: latest tokens kept")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true", help="decode through torch.compile: the "
                   "first sample compiles (seconds to minutes), the rest are faster")
    args = p.parse_args(argv)
    try:
        check_args(args)
        model, tokenizer, _ = load_model(args.checkpoint, resolve_device(args.device))
        try:
            prompt_len = len(tokenizer.encode(args.prompt))
        except ValueError as e:
            raise ValueError(f"--prompt {args.prompt!r}: {e}") from None
        check_fit(args, model.config.block_size, prompt_len)
        texts = []
        for i in range(args.num_samples):
            texts.append(sample_text(
                model, tokenizer, args.prompt, args.max_new_tokens,
                Sampling(args.temperature, args.top_k, args.top_p), seed=args.seed + i,
                prefill=args.prefill,
                sink_size=args.sink_size, window_size=args.window_size, compile=args.compile))
            print(texts[-1] + ("\n---------------" if args.num_samples > 1 else ""))
    except (DataError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    return texts


if __name__ == "__main__":
    main()
