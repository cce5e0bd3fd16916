"""Print text from a checkpoint written by the training script.

    python -m lckv_mini.sample --checkpoint out/ckpt.pt --prompt "ROMEO:" --max-new-tokens 200
"""

from __future__ import annotations

import argparse

import torch

from .checkpoint import load_model, resolve_device
from .data import DataError, Tokenizer
from .generate import Sampling, generate
from .model import LCKVModel

DEFAULT_SAMPLING = Sampling(temperature=0.8, top_k=50)


def sample_text(model: LCKVModel, tokenizer: Tokenizer, prompt: str, max_new_tokens: int,
                sampling: Sampling = DEFAULT_SAMPLING, *, seed: int = 0,
                prefill: str = "parallel", sink_size: int | None = None,
                window_size: int | None = None) -> str:
    """Continue `prompt` with the decoder and return the text (prompt included)."""
    device = model.lm_head.weight.device
    idx = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)
    streaming = sink_size is not None or window_size is not None
    if not streaming:  # stay inside the block size
        max_new_tokens = min(max_new_tokens, model.config.block_size - idx.size(1))
    g = torch.Generator(device=device).manual_seed(seed)
    out = generate(model, idx, max_new_tokens, sampling=sampling, generator=g, prefill=prefill,
                   sink_size=sink_size, window_size=window_size)
    return tokenizer.decode(out[0].tolist())


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a ckpt.pt written by train_shakespeare.py")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefill", choices=["parallel", "sequential", "adaptive"], default="parallel")
    p.add_argument("--sink-size", type=int, default=None, help="streaming: first tokens kept")
    p.add_argument("--window-size", type=int, default=None, help="streaming: latest tokens kept")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    try:
        model, tokenizer, _ = load_model(args.checkpoint, resolve_device(args.device))
        texts = []
        for i in range(args.num_samples):
            texts.append(sample_text(
                model, tokenizer, args.prompt, args.max_new_tokens,
                Sampling(args.temperature, args.top_k, args.top_p), seed=args.seed + i,
                prefill=args.prefill,
                sink_size=args.sink_size, window_size=args.window_size))
            print(texts[-1] + ("\n---------------" if args.num_samples > 1 else ""))
    except (DataError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    return texts


if __name__ == "__main__":
    main()
