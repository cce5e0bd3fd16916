"""Measuring the iteration: how the KVs approach the sequential ones pass by pass (Fig. 3,
Theorem 1). Uses only the model's public surface."""

from __future__ import annotations

import torch
from torch import Tensor

from .model import LCKVModel


def iterated_kv_layers(model: LCKVModel) -> list[int]:
    """The KV layers inside an iteration group: the KVs that the iteration refines."""
    return [j for g in model.config.iteration_groups for j in model.group_kv_layers(g)]


def kv_passes(model: LCKVModel, idx: Tensor, n_passes: int):
    """Yield the KVs that the parallel computation produces with p passes per group, for
    p = 0 .. n_passes (inference: no gradient).

    Each item maps every iterated KV layer to its (k, v), (B, nkv, T, hs); item 0 is the zero
    start. With one group, item p is the group's KVs after its p-th pass; with several, group k
    runs its p passes on group k-1's output after p passes, exactly as training with m + b = p.
    """
    if not model.config.iteration_groups:
        raise ValueError(f"layer_types {model.config.layer_types!r} has no layer reading from "
                         "above: there is nothing to iterate")
    layers = iterated_kv_layers(model)
    # no_grad only around the work: a context held open across a yield would switch gradients
    # off in the caller too.
    with torch.no_grad():
        x = model.embed(idx)
        zeros = x.new_zeros(idx.size(0), model.config.n_kv_head, idx.size(1),
                            model.config.head_dim)
    yield {j: (zeros, zeros) for j in layers}
    for p in range(1, n_passes + 1):
        with torch.no_grad():
            _, kv = model.forward_parallel(x, p - 1, 1)
        yield {j: kv[j] for j in layers}


def max_kv_change(before: dict, after: dict, pad: Tensor | None = None) -> float:
    """Largest absolute change of any KV entry between two stores of the same layers; with pad
    (B,), the left-padding positions of each row are left out."""
    worst = 0.0
    for layer in before:
        for a, b in zip(after[layer], before[layer]):
            diff = (a - b).abs()  # (B, nkv, T, hs)
            if pad is not None:
                real = torch.arange(diff.size(2), device=diff.device)[None, :] >= pad[:, None]
                diff = diff * real[:, None, :, None]
            worst = max(worst, diff.max().item())
    return worst


def kv_convergence(model: LCKVModel, idx: Tensor, n_passes: int) -> list[float]:
    """Mean squared change of the iterated KVs from one pass to the next (the paper's Fig. 3).

    Entry p is the MSE between the KVs after pass p+1 and after pass p (pass 0: the zero start),
    averaged over the iterated KV layers. With T tokens it is zero from entry T on (Theorem 1:
    pass T already gives the sequential KVs, so pass T+1 changes nothing).
    """
    snapshots = list(kv_passes(model, idx, n_passes))
    return [torch.stack([((a - b) ** 2).mean() for j in new for a, b in zip(new[j], old[j])])
            .mean().item() for old, new in zip(snapshots, snapshots[1:])]


@torch.no_grad()
def prefix_exactness(model: LCKVModel, idx: Tensor, n_passes: int, rtol: float = 1e-9
                     ) -> list[int]:
    """After k passes, how many leading tokens have KVs equal (to rtol) to the sequential ones:
    the staircase behind Theorem 1, which should read 1, 2, 3, ... up to T."""
    _, seq = model.forward_sequential(idx)
    counts = []
    for kv in list(kv_passes(model, idx, n_passes))[1:]:
        exact = torch.ones(idx.size(1), dtype=torch.bool, device=idx.device)
        for j, pair in kv.items():
            for par, ref in zip(pair, seq.read(j)):
                err = (par - ref).abs().amax(dim=(0, 1, 3))  # per token
                exact &= err <= rtol * ref.abs().max().clamp_min(1e-30)
        counts.append(int(exact.int().cumprod(0).sum()))
    return counts
