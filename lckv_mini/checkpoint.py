"""Training checkpoints: one self-describing file, written atomically, read with
weights_only=True. The trainer, the sampler and the notebooks share this module."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import LCKVConfig
from .data import Tokenizer, atomic_write
from .model import LCKVModel

CHECKPOINT = "ckpt.pt"
REQUIRED = ("model", "model_config", "tokenizer", "step")


def resolve_device(name: str) -> str:
    """The device named by --device: for "auto" cuda, then mps, then cpu; any other name must be
    a device this machine has (ValueError otherwise)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps() else "cpu"
    try:
        kind = torch.device(name).type
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; valid: auto, cpu, cuda, cuda:N, "
                         "mps") from None
    if (kind == "cuda" and not torch.cuda.is_available()) or (kind == "mps" and not has_mps()):
        raise ValueError(f"--device {name}: this machine (torch {torch.__version__}) has no "
                         f"{kind} device; use --device auto or cpu")
    return name


def has_mps() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def rng_state() -> dict:
    """Every random stream a training step draws from (CPU, and CUDA or MPS when present), so a
    resumed run with dropout continues exactly."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if has_mps():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and has_mps():
        torch.mps.set_rng_state(state["mps"])


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write state to path atomically: a crash leaves the previous checkpoint intact."""
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise ValueError(f"a checkpoint needs {list(REQUIRED)}; {missing} missing")
    atomic_write(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, device="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is corrupt or not an lckv-mini checkpoint: {e}") from e
    missing = set(REQUIRED) - set(ckpt if isinstance(ckpt, dict) else ())
    if missing:
        raise ValueError(f"checkpoint {path} lacks {sorted(missing)}: not an lckv-mini checkpoint")
    # map_location moved every tensor to `device`; a generator's state must be a CPU byte tensor
    if isinstance(ckpt.get("rng"), dict):
        ckpt["rng"] = {k: [s.cpu() for s in v] if isinstance(v, list) else v.cpu()
                       for k, v in ckpt["rng"].items()}
    return ckpt


def load_model(path: str | os.PathLike, device="cpu") -> tuple[LCKVModel, Tokenizer, dict]:
    """The model (in eval mode) and tokenizer stored in a training checkpoint, and the
    checkpoint itself."""
    ckpt = load_checkpoint(path, device)
    with torch.device("meta"):
        model = LCKVModel(LCKVConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"], assign=True)
    model.tie_weights()
    return model.to(device).eval(), Tokenizer.from_dict(ckpt["tokenizer"]), ckpt


def check_same_config(saved: dict, wanted: dict, path) -> None:
    """A resumed run must build the model it saved: name every field that differs."""
    diff = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
    if diff:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs requested {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"checkpoint {path} was trained with a different model config ({lines}); "
                         "pass the same settings, or a different --out-dir to start afresh")
