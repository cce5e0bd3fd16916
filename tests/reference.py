"""Independent references: the same quantities as the package, computed another way.

An equivalence test holds the parallel computation against the sequential one; a bug in what both
share (how a layer reads its window, a RoPE table, which layers a group spans) changes both sides
alike and passes. The functions here share nothing with lckv_mini but the weights' names: they
read `layer_types` string by string, build RoPE from math.cos/math.sin, and decide what a query
sees from what exists at that moment of a token-by-token run, with no mask at all. They are slow
and plain on purpose; only the tests call them.
"""

from __future__ import annotations

import math
from itertools import product

import torch


def parse(layer_types: str) -> tuple[list[int], list[bool]]:
    """'0_3s_3_3' -> sources [0, 3, 3, 3], windowed [False, True, False, False]."""
    sources, windowed = [], []
    for entry in layer_types.split("_"):
        windowed.append(entry.endswith("s"))
        sources.append(int(entry[:-1] if entry.endswith("s") else entry))
    return sources, windowed


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean() + eps) * weight


def rotate(vec: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """RoPE on one head vector at position pos: the pair (i, i + d/2) turns by pos * theta^(-2i/d)
    (Llama's rotate-half pairing)."""
    d = vec.numel()
    half = d // 2
    out = vec.clone()
    for i in range(half):
        angle = pos * theta ** (-2 * i / d)
        c, s = math.cos(angle), math.sin(angle)
        out[i] = vec[i] * c - vec[i + half] * s
        out[i + half] = vec[i + half] * c + vec[i] * s
    return out


def reference_logits(model, tokens: list[int]) -> torch.Tensor:
    """Logits (T, vocab) of one row of tokens, computed token by token, layer by layer, head by
    head, as a reader would by hand from the paper's Sec. 2.1.

    A layer that computes KVs stores them for (layer, position) as it runs. A query at position t
    attends to every position whose KVs its source layer *has already stored*: for a source at or
    below the layer that includes t itself, for a source above it does not (the masked diagonal
    follows from the order of computation, nothing masks it). A layer marked "s" keeps the last
    `sliding_window` positions only. A query that sees nothing outputs zero.
    """
    c = model.config
    W = {name: t.detach() for name, t in model.state_dict().items()}
    head = W["model.embed_tokens.weight"] if c.tie_embeddings else W["lm_head.weight"]
    sources, windowed = parse(c.layer_types)
    nh, nkv, d = c.n_head, c.n_kv_head, c.head_dim
    keys, values = {}, {}  # (layer, position, kv head) -> vector
    logits = []
    for t, token in enumerate(tokens):
        x = W["model.embed_tokens.weight"][token].clone()
        for i, src in enumerate(sources):
            p = f"model.layers.{i}."
            h = rms_norm(x, W[p + "input_layernorm.weight"], c.norm_eps)
            if src == i:
                k = (W[p + "self_attn.k_proj.weight"] @ h).view(nkv, d)
                v = (W[p + "self_attn.v_proj.weight"] @ h).view(nkv, d)
                for j in range(nkv):
                    keys[i, t, j] = rotate(k[j], t, c.rope_theta)
                    values[i, t, j] = v[j]
            seen = [pos for pos in range(t + 1) if (src, pos, 0) in keys]
            if windowed[i]:
                seen = [pos for pos in seen if t - pos < c.sliding_window]
            q = (W[p + "self_attn.q_proj.weight"] @ h).view(nh, d)
            outs = []
            for hq in range(nh):
                j = hq // (nh // nkv)  # GQA: consecutive query heads share a KV head
                if not seen:
                    outs.append(torch.zeros(d, dtype=x.dtype))
                    continue
                qr = rotate(q[hq], t, c.rope_theta)
                scores = torch.stack([qr @ keys[src, pos, j] for pos in seen]) / math.sqrt(d)
                weights = torch.softmax(scores, dim=0)
                outs.append(sum(w * values[src, pos, j] for w, pos in zip(weights, seen)))
            x = x + W[p + "self_attn.o_proj.weight"] @ torch.cat(outs)
            h = rms_norm(x, W[p + "post_attention_layernorm.weight"], c.norm_eps)
            gate, up = W[p + "mlp.gate_proj.weight"] @ h, W[p + "mlp.up_proj.weight"] @ h
            x = x + W[p + "mlp.down_proj.weight"] @ (torch.nn.functional.silu(gate) * up)
        logits.append(head @ rms_norm(x, W["model.norm.weight"], c.norm_eps))
    return torch.stack(logits)


def brute_force_groups(layer_types: str) -> list[tuple[int, int]]:
    """The iteration groups from first principles: a layer i reading a layer s above it ties every
    layer from i to s into one computation that must be iterated (i needs s's output of the same
    token, which needs i's). Tie them pairwise with a union-find; a group is a connected set of
    two or more layers (each comes out contiguous)."""
    sources, _ = parse(layer_types)
    parent = list(range(len(sources)))

    def root(a):
        while parent[a] != a:
            a = parent[a]
        return a

    for i, s in enumerate(sources):
        for j in range(i, s + 1):  # empty unless s > i
            parent[root(j)] = root(i)
    members = {}
    for i in range(len(sources)):
        members.setdefault(root(i), []).append(i)
    groups = [(min(m), max(m)) for m in members.values() if len(m) > 1]
    for lo, hi in groups:
        assert sorted(i for m in members.values() if lo in m for i in m) == list(range(lo, hi + 1))
    return sorted(groups)


def every_layer_types(n_layer: int):
    """Every valid layer_types string of n_layer layers (a layer that others read reads itself)."""
    for sources in product(range(n_layer), repeat=n_layer):
        if all(sources[s] == s for s in sources):
            yield "_".join(map(str, sources))
