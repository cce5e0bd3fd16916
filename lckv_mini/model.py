"""The LCKV model: a Llama decoder whose layers may read another layer's keys and values.

What differs from a vanilla Llama (Wu & Tu, "Layer-Condensed KV Cache", ACL 2024):
- `LCKVConfig.layer_types` says, for every layer i, which layer's KVs its queries attend to.
  Only layers that read themselves compute KVs (and have k/v projections); the rest only read.
- A layer reading a layer *above* itself cannot see its own token's KV (the diagonal is masked,
  Sec. 2.1): that KV does not exist yet when the token is processed sequentially.
- Because of those upward reads, the sequential computation (Fig. 2a, `mode="sequential"`) is
  replaced in training by an iteration from zero KVs (Fig. 2b, `mode="parallel"`, Sec. 2.2):
  m passes without gradient, then b passes with gradient. With n passes over n tokens the two
  are the same computation (Theorem 1); the tests check it.

The module names follow Hugging Face's Llama so that weights move in and out by name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class LCKVConfig:
    vocab_size: int = 50304
    n_layer: int = 12  # L
    n_head: int = 12  # query heads
    n_kv_head: int = 12  # key/value heads (GQA when smaller than n_head)
    n_embd: int = 768
    intermediate_size: int = 2048  # SwiGLU hidden width
    block_size: int = 1024  # longest sequence (RoPE table size)
    # Which layer's KVs each layer reads: "0_6_6_6_6_6_6_7" (the official code's format) or a list
    # such as [0, 6, 6, 6, 6, 6, 6, 7]; a trailing "s" ("3s") makes that layer's attention use a
    # sliding window. None means a standard transformer (layer i reads layer i).
    layer_types: str | Sequence[int | str] | None = None
    sliding_window: int | None = None  # window, in tokens, of the layers marked "s"
    forward_passes: int = 7  # m: passes without gradient in parallel training (Sec. 2.2)
    backward_passes: int = 2  # b: passes with gradient that follow them
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size",
                     "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:
            raise ValueError(f"head size n_embd/n_head={self.head_dim} must be even for RoPE")
        if self.forward_passes < 0:
            raise ValueError(f"forward_passes (m) must be >= 0, got {self.forward_passes}")
        if self.backward_passes < 1:
            raise ValueError(f"backward_passes (b) must be >= 1, got {self.backward_passes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        sources, sliding = parse_layer_types(self.layer_types, self.n_layer)
        if any(sliding) and (self.sliding_window is None or self.sliding_window <= 0):
            raise ValueError(f"layer_types {self.layer_types!r} marks sliding-window layers but "
                             f"sliding_window={self.sliding_window!r} is not a positive integer")
        # Keep the canonical string form: it is what checkpoints store.
        self.layer_types = "_".join(f"{s}{'s' if w else ''}" for s, w in zip(sources, sliding))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_sources(self) -> tuple[int, ...]:
        """kv_sources[i]: the layer whose KVs layer i attends to."""
        return parse_layer_types(self.layer_types, self.n_layer)[0]

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        return parse_layer_types(self.layer_types, self.n_layer)[1]

    @property
    def kv_layers(self) -> tuple[int, ...]:
        """The layers that compute (and, at inference, cache) KVs: those that read themselves."""
        return tuple(i for i, s in enumerate(self.kv_sources) if s == i)

    @property
    def iteration_block(self) -> tuple[int, int] | None:
        """(lo, hi): the smallest block of layers containing every read from above, or None.

        Sec. 2.2 iterates only this block; layers below it run once before, layers above once after.
        """
        up = [(i, s) for i, s in enumerate(self.kv_sources) if s > i]
        if not up:
            return None
        return min(i for i, _ in up), max(s for _, s in up)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_layer_types(spec, n_layer: int) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """Parse a layer_types spec into (kv source of each layer, sliding flag of each layer).

    Raises ValueError naming the problem for a malformed spec.
    """
    if spec is None:
        return tuple(range(n_layer)), (False,) * n_layer
    parts = spec.split("_") if isinstance(spec, str) else list(spec)
    if len(parts) != n_layer:
        raise ValueError(f"layer_types {spec!r} describes {len(parts)} layers but "
                         f"n_layer={n_layer}")
    sources, sliding = [], []
    for i, part in enumerate(parts):
        text = str(part).strip()
        window = text.endswith("s")
        digits = text[:-1] if window else text
        if not digits.isdigit():
            raise ValueError(f"layer_types {spec!r}: entry {i} is {part!r}; expected a layer index "
                             "with an optional trailing 's' (sliding window), e.g. '3' or '3s'")
        src = int(digits)
        if src >= n_layer:
            raise ValueError(f"layer_types {spec!r}: layer {i} reads layer {src}, which is out of "
                             f"range for n_layer={n_layer}")
        sources.append(src)
        sliding.append(window)
    for i, src in enumerate(sources):
        if sources[src] != src:
            raise ValueError(f"layer_types {spec!r}: layer {i} reads layer {src}, but layer "
                             f"{src} computes no KVs (it reads layer {sources[src]}); a layer "
                             "that others read must read itself")
    return tuple(sources), tuple(sliding)


# Builders for the common layouts (the paper's Sec. 2 and its Sec. 4 comparisons).


def standard_layers(n_layer: int) -> str:
    """Every layer reads its own KVs: a standard transformer."""
    return "_".join(str(i) for i in range(n_layer))


def lckv_layers(n_layer: int, warmup: int = 2) -> str:
    """LCKV with w warmup layers: the "sandwich" of Sec. 2.3.

    w/2 bottom and w/2 top layers keep standard attention; every middle layer reads the topmost
    non-warmup layer t = L - 1 - w/2. With w = 0 every layer reads the top layer L - 1.
    """
    if warmup < 0 or warmup % 2 or warmup > n_layer:
        raise ValueError(f"warmup w={warmup} must be even and in [0, n_layer={n_layer}]")
    half = warmup // 2
    top = n_layer - 1 - half  # the layer whose KVs the middle layers read
    return "_".join(str(i if i < half or i >= top else top) for i in range(n_layer))


def cla_layers(n_layer: int, group: int = 2) -> str:
    """Cross-Layer Attention: in each group of g consecutive layers the first computes KVs and
    the others read them (Brandon et al., 2024)."""
    if group <= 0:
        raise ValueError(f"CLA group size must be positive, got {group}")
    return "_".join(str(i - i % group) for i in range(n_layer))


def yoco_layers(n_layer: int) -> str:
    """YOCO: the bottom half is sliding-window self-attention, the top half reads the KVs of one
    middle layer (the last of the bottom half) with full causal attention (Sun et al., 2024)."""
    if n_layer < 2:
        raise ValueError(f"YOCO needs at least 2 layers, got n_layer={n_layer}")
    half = n_layer // 2
    return "_".join(f"{i}s" if i < half else str(half - 1) for i in range(n_layer))


def make_layer_types(kind: str, n_layer: int, *, warmup: int = 2, group: int = 2) -> str:
    """Build layer_types by name: "standard", "lckv", "cla" or "yoco"."""
    if kind == "standard":
        return standard_layers(n_layer)
    if kind == "lckv":
        return lckv_layers(n_layer, warmup)
    if kind == "cla":
        return cla_layers(n_layer, group)
    if kind == "yoco":
        return yoco_layers(n_layer)
    raise ValueError(f"unknown layer layout {kind!r}; expected standard, lckv, cla or yoco")


# ----------------------------------------------------------------------------------------------
# Attention with the zero-output rule


def visible_keys(q_start: int, Tq: int, Tk: int, mask_diagonal: bool,
                 window: int | None = None, device=None) -> Tensor:
    """(Tq, Tk) boolean mask: may the query at position q_start + i see the key at position j?

    Causal (j <= p), strictly so when the diagonal is masked (j < p: a layer reading from above
    never sees its own token's KV), and within the last `window` positions if windowed.
    """
    q_pos = torch.arange(q_start, q_start + Tq, device=device)[:, None]
    k_pos = torch.arange(Tk, device=device)[None, :]
    allowed = k_pos < q_pos if mask_diagonal else k_pos <= q_pos
    if window is not None:
        allowed &= q_pos - k_pos < window
    return allowed


def attention(q: Tensor, k: Tensor, v: Tensor, *, q_start: int, mask_diagonal: bool,
              window: int | None = None) -> Tensor:
    """Causal attention of queries at positions q_start.. over keys at positions 0..Tk-1.

    q: (B, nh, Tq, hs); k, v: (B, nkv, Tk, hs) -> (B, nh, Tq, hs).
    A query at p sees keys at p' <= p (p' < p when mask_diagonal, i.e. reading a layer above),
    and only p - p' < window with a sliding window. The one rule for a query that sees no key
    (token 0 with the diagonal masked): its output is exactly zero, never NaN.
    """
    B, nh, Tq, hs = q.shape
    Tk = k.size(2)
    gqa = nh != k.size(1)
    if Tk == 0:
        return q.new_zeros(B, nh, Tq, hs)
    if window is None and q_start == 0 and Tq == Tk:  # a whole sequence: training and prefill
        if not mask_diagonal:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        # Diagonal masked: query t sees keys 0..t-1, which is an ordinary causal mask between
        # queries 1..T-1 and keys 0..T-2. Query 0 sees nothing and gets zero.
        out = F.scaled_dot_product_attention(q[:, :, 1:], k[:, :, :-1], v[:, :, :-1],
                                             is_causal=True, enable_gqa=gqa)
        return torch.cat([q.new_zeros(B, nh, 1, hs), out], dim=2)
    if window is None and Tq == 1 and Tk == q_start + (not mask_diagonal):  # decoding: sees all
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    allowed = visible_keys(q_start, Tq, Tk, mask_diagonal, window, q.device)  # (Tq, Tk)
    sees_some = allowed.any(dim=-1, keepdim=True)  # (Tq, 1)
    # Rows that see nothing attend everywhere (keeps softmax finite) and are then zeroed.
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~sees_some, enable_gqa=gqa)
    return torch.where(sees_some, out, 0.0)


# ----------------------------------------------------------------------------------------------
# Where a layer's KVs live while a forward runs. Each store has write(layer, k, v) and read(layer).


class PassKVs(dict):
    """The parallel computation's store: KVs of all T tokens, replaced when a layer recomputes
    them. During pass p a layer reading from above finds pass p-1's KVs here, because its source
    has not run yet in pass p; a layer reading itself or below finds this pass's."""

    def write(self, layer: int, k: Tensor, v: Tensor) -> None:
        self[layer] = (k, v)

    def read(self, layer: int) -> tuple[Tensor, Tensor]:
        return self[layer]


class GrowingKVs:
    """The sequential computation's store: KVs appended token by token with torch.cat, so that
    gradients flow through them (the decoder uses the preallocated `KVCache` instead)."""

    def __init__(self, config: LCKVConfig, batch_size: int, dtype, device):
        empty = torch.zeros(batch_size, config.n_kv_head, 0, config.head_dim, dtype=dtype,
                            device=device)
        self.kv = {layer: (empty, empty) for layer in config.kv_layers}

    @property
    def seq_len(self) -> int:
        return next(iter(self.kv.values()))[0].size(2)

    def write(self, layer: int, k: Tensor, v: Tensor) -> None:
        old_k, old_v = self.kv[layer]
        self.kv[layer] = (torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2))

    def read(self, layer: int) -> tuple[Tensor, Tensor]:
        return self.kv[layer]


# ----------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin, (length, head_dim), in the rotate-half convention (as Llama)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, h, T, hs) by the angles whose cos/sin (T, hs) are given."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """One attention module for every layer kind: which KVs it reads is data (`source`)."""

    def __init__(self, config: LCKVConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.source = config.kv_sources[layer]
        self.computes_kv = self.source == layer
        self.mask_diagonal = self.source > layer  # reading from above: own token's KV not yet there
        self.window = config.sliding_window if config.sliding_layers[layer] else None
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.head_dim
        kv_dim = config.n_kv_head * config.head_dim
        self.q_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        if self.computes_kv:  # a layer that only reads has no k/v weights at all
            self.k_proj = nn.Linear(config.n_embd, kv_dim, bias=False)
            self.v_proj = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.o_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv, q_start: int) -> Tensor:
        B, T, C = x.size()
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        q = apply_rope(q, cos, sin)
        if self.computes_kv:
            k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
            v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
            kv.write(self.layer, apply_rope(k, cos, sin), v)  # keys are stored rotated
        k, v = kv.read(self.source)  # (B, nkv, Tk, hs)
        y = attention(q, k, v, q_start=q_start, mask_diagonal=self.mask_diagonal,
                      window=self.window)
        return self.dropout(self.o_proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LCKVConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config: LCKVConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv, q_start: int) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, q_start)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------------------------
# The model


class LCKVModel(nn.Module):
    def __init__(self, config: LCKVConfig):
        super().__init__()
        self.config = config
        # Named as Hugging Face's LlamaForCausalLM, so state dicts map one to one.
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
            layers=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            norm=RMSNorm(config.n_embd, config.norm_eps),
        ))
        self.drop = nn.Dropout(config.dropout)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(config.head_dim, config.block_size, config.rope_theta)
        self.register_buffer("rope_cos", cos.float(), persistent=False)
        self.register_buffer("rope_sin", sin.float(), persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- input checks ------------------------------------------------------------------------

    def check_input(self, idx: Tensor) -> None:
        """Clear errors for malformed token batches (shape, length, id range)."""
        if idx.dim() != 2:
            raise ValueError(f"expected token ids of shape (batch, time), got {tuple(idx.shape)}")
        if idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"token ids must be int64 or int32, got {idx.dtype}")
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={self.config.block_size}")
        if idx.numel() and not torch.compiler.is_compiling():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} is out of range for vocab_size="
                                 f"{self.config.vocab_size}")

    # -- the pieces shared by every computation ------------------------------------------------

    def _run_layers(self, x: Tensor, kv, layers: range, q_start: int = 0) -> Tensor:
        T = x.size(1)
        cos = self.rope_cos[q_start:q_start + T].to(x.dtype)
        sin = self.rope_sin[q_start:q_start + T].to(x.dtype)
        for i in layers:
            x = self.model.layers[i](x, cos, sin, kv, q_start)
        return x

    def _head(self, x: Tensor, targets: Tensor | None) -> tuple[Tensor, Tensor | None]:
        logits = self.lm_head(self.model.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
        return logits, loss

    def _zero_kvs(self, x: Tensor) -> PassKVs:
        """The iteration's starting point: zero KVs for every KV layer of the iteration block.
        (Only those read from above are read before being written; zeros give them exactly
        zero attention output, since every value is zero.)"""
        B, T, _ = x.shape
        c = self.config
        zeros = x.new_zeros(B, c.n_kv_head, T, c.head_dim)
        return PassKVs({j: (zeros, zeros) for j in self.iterated_kv_layers})

    @property
    def iterated_kv_layers(self) -> list[int]:
        block = self.config.iteration_block
        return [j for j in self.config.kv_layers if block and block[0] <= j <= block[1]]

    def _iterate(self, x: Tensor, kv: PassKVs, n_passes: int, grad_from: int):
        """Run the iteration block n_passes times on the same input x, yielding the block's output
        after each pass; passes before `grad_from` run without gradient (Sec. 2.2)."""
        lo, hi = self.config.iteration_block
        for p in range(n_passes):
            with torch.set_grad_enabled(torch.is_grad_enabled() and p >= grad_from):
                h = self._run_layers(x, kv, range(lo, hi + 1))
            yield h

    # -- parallel (Fig. 2b) --------------------------------------------------------------------

    def forward_parallel(self, x: Tensor, m: int, b: int, tol: float | None = None
                         ) -> tuple[Tensor, PassKVs, int]:
        """The iterative parallel computation on embeddings x (B, T, C).

        Layers below the iteration block run once; the block runs m passes without gradient and
        b with gradient, each reading the KVs of the pass before (starting from zeros); layers
        above it run once on the last pass's output. With `tol`, stop as soon as no KV changed by
        more than tol between two passes (adaptive prompt encoding, inference only).
        Returns the final hidden states, the final KVs of every KV layer and the passes used.
        """
        L, block = self.config.n_layer, self.config.iteration_block
        kv = PassKVs()
        if block is None:  # nothing reads from above: one pass is exact
            return self._run_layers(x, kv, range(L)), kv, 1
        lo, hi = block
        x = self._run_layers(x, kv, range(lo))
        kv.update(self._zero_kvs(x))
        passes = 0
        prev = dict(kv)
        for h in self._iterate(x, kv, m + b, grad_from=m):  # noqa: B007 (h is used below)
            passes += 1
            if tol is not None:
                if passes > 1 and max_kv_change(prev, kv) <= tol:
                    break
                prev = dict(kv)
        return self._run_layers(h, kv, range(hi + 1, L)), kv, passes

    # -- sequential (Fig. 2a) ------------------------------------------------------------------

    def step(self, idx: Tensor, kv) -> Tensor:
        """Process one new token per row, idx (B, 1), against the KVs of the tokens before it.

        One pass over the layers: a layer reading from above sees the stored KVs of earlier
        tokens only (the masked diagonal), so nothing needs iterating. Returns hidden (B, 1, C).
        """
        x = self.drop(self.model.embed_tokens(idx))
        return self._run_layers(x, kv, range(self.config.n_layer), q_start=kv.seq_len)

    def forward_sequential(self, idx: Tensor, kv=None) -> tuple[Tensor, object]:
        """The readable reference: token by token, each token seeing the final KVs of the tokens
        before it. Returns hidden states (B, T, C) and the KV store."""
        B, T = idx.shape
        if kv is None:
            kv = GrowingKVs(self.config, B, self.model.embed_tokens.weight.dtype, idx.device)
        hs = [self.step(idx[:, t:t + 1], kv) for t in range(T)]
        return torch.cat(hs, dim=1), kv

    # -- the public entry point ----------------------------------------------------------------

    def forward(self, idx: Tensor, targets: Tensor | None = None, *, mode: str = "parallel",
                forward_passes: int | None = None, backward_passes: int | None = None
                ) -> tuple[Tensor, Tensor | None]:
        """idx (B, T) -> (logits (B, T, vocab), loss or None). mode: "parallel" or "sequential";
        forward_passes (m) and backward_passes (b) override the config's."""
        self.check_input(idx)
        if mode == "sequential":
            h, _ = self.forward_sequential(idx)
        elif mode == "parallel":
            m = self.config.forward_passes if forward_passes is None else forward_passes
            b = self.config.backward_passes if backward_passes is None else backward_passes
            if m < 0 or b < 1:
                raise ValueError(f"need forward_passes >= 0 and backward_passes >= 1, got {m}, {b}")
            h, _, _ = self.forward_parallel(self.drop(self.model.embed_tokens(idx)), m, b)
        else:
            raise ValueError(f"mode must be 'parallel' or 'sequential', got {mode!r}")
        return self._head(h, targets)

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, **kwargs) -> Tensor:
        """Sample a continuation; see `lckv_mini.generate.generate` for the options."""
        from .generate import generate
        return generate(self, idx, max_new_tokens, **kwargs)

    # -- weights in Hugging Face's names -------------------------------------------------------

    def hf_state_dict(self) -> dict[str, Tensor]:
        """The weights under Hugging Face Llama names (k/v only for the KV-computing layers)."""
        return dict(self.state_dict())  # the modules carry these names; tied weights appear twice

    @classmethod
    def from_hf_state_dict(cls, state_dict: dict[str, Tensor], config: LCKVConfig) -> LCKVModel:
        """Build a model from Llama-named weights.

        A dict with k/v weights in layers that compute none under `config` (a standard Llama
        loaded into an LCKV layout) is accepted: each KV layer gets the mean of the k/v weights of
        the layers that read it (the MLKV initialisation offered by the official code).
        The model takes the dtype of the embedding in the dict.
        """
        sd = dict(state_dict)
        if "model.embed_tokens.weight" not in sd:
            raise KeyError("state dict has no model.embed_tokens.weight: not a Llama-named dict")
        model = cls(config).to(sd["model.embed_tokens.weight"].dtype)
        if config.tie_embeddings:  # one tensor under two names
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        for j in config.kv_layers:
            readers = [i for i, s in enumerate(config.kv_sources) if s == j]
            for proj in ("k_proj", "v_proj"):
                names = [f"model.layers.{i}.self_attn.{proj}.weight" for i in readers]
                found = [sd[n] for n in names if n in sd]
                if not found:
                    raise KeyError(f"state dict has no {proj} weights for layer {j} nor for any "
                                   f"layer reading it ({readers})")
                sd[names[readers.index(j)]] = torch.stack(found).mean(0)
        for i in range(config.n_layer):  # k/v of layers that only read are dropped
            if i not in config.kv_layers:
                for proj in ("k_proj", "v_proj"):
                    sd.pop(f"model.layers.{i}.self_attn.{proj}.weight", None)
        own = model.state_dict()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        if missing or unexpected:
            raise KeyError(f"state dict does not match the config: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
        for name, tensor in sd.items():
            if tensor.shape != own[name].shape:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} in the state dict, "
                                 f"{tuple(own[name].shape)} expected by the config")
        model.load_state_dict(sd)
        return model


# ----------------------------------------------------------------------------------------------
# Measuring the iteration (Fig. 3)


def max_kv_change(before: dict, after: dict) -> float:
    """Largest absolute change of any KV entry between two stores of the same layers."""
    return max((a - b).abs().max().item() for layer in before
               for a, b in zip(after[layer], before[layer]))


def kv_passes(model: LCKVModel, idx: Tensor, n_passes: int):
    """Yield the KVs after each pass of the iteration (inference: no gradient).

    Each item maps every KV layer inside the iteration block to its (k, v), (B, nkv, T, hs);
    item 0 is the zero start, item p the KVs after p passes.
    """
    block = model.config.iteration_block
    if block is None:
        raise ValueError(f"layer_types {model.config.layer_types!r} has no layer reading from "
                         "above: there is nothing to iterate")
    # no_grad only around the work: a context held open across a yield would switch gradients
    # off in the caller too. _iterate already runs passes before grad_from without gradient.
    with torch.no_grad():
        kv = PassKVs()
        x = model._run_layers(model.model.embed_tokens(idx), kv, range(block[0]))
        kv.update(model._zero_kvs(x))
    yield {j: kv[j] for j in model.iterated_kv_layers}
    for _ in model._iterate(x, kv, n_passes, grad_from=n_passes):
        yield {j: kv[j] for j in model.iterated_kv_layers}


def kv_convergence(model: LCKVModel, idx: Tensor, n_passes: int) -> list[float]:
    """Mean squared change of the iterated KVs from one pass to the next (the paper's Fig. 3).

    Entry p is the MSE between the KVs after pass p+1 and after pass p (pass 0: the zero start),
    averaged over the KV layers of the iteration block. It reaches 0 by pass T (Theorem 1).
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
