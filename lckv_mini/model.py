"""The LCKV model: a Llama decoder whose layers may read another layer's keys and values.

What differs from a vanilla Llama (Wu & Tu, "Layer-Condensed KV Cache", ACL 2024):
- `LCKVConfig.layer_types` says, for every layer i, which layer's KVs its queries attend to.
  Only layers that read themselves compute KVs (and have k/v projections); the rest only read.
- A layer reading a layer *above* itself cannot see its own token's KV (the diagonal is masked,
  Sec. 2.1): that KV does not exist yet when the token is processed sequentially.
- Because of those upward reads, the sequential computation (Fig. 2a, `forward_sequential`) is
  replaced in training by an iteration from zero KVs (Fig. 2b, `forward_parallel`, Sec. 2.2):
  each iteration group (`config.iteration_groups`) runs m passes without gradient, then b passes
  with gradient. With n passes over n tokens the two are the same computation (Theorem 1); the
  tests check it.

Public surface used by decoding (`generate.py`) and the measurements (`convergence.py`):
`embed`, `run_layers`, `start_group`, `group_pass`, `forward_parallel`, `step`,
`forward_sequential`, `head`, `rope`. The module names follow Hugging Face's Llama so that
weights move in and out by name. This file imports only the config.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .config import LCKVConfig

# ----------------------------------------------------------------------------------------------
# Attention with the zero-output rule


def visible_keys(q_start: int, Tq: int, Tk: int, mask_diagonal: bool,
                 window: int | None = None, device=None) -> Tensor:
    """(Tq, Tk) boolean mask: may the query at position q_start + i see the key at position j?

    Causal (j <= p), strictly so when the diagonal is masked (j < p: a layer reading from above
    never sees its own token's KV), and within the last `window` positions if windowed.
    q_start: an int, or a (1,) tensor (compiled decoding: the position is data, so one graph
    serves every position).
    """
    q_pos = q_start + torch.arange(Tq, device=device)[:, None]
    k_pos = torch.arange(Tk, device=device)[None, :]
    allowed = k_pos < q_pos if mask_diagonal else k_pos <= q_pos
    if window is not None:
        allowed &= q_pos - k_pos < window
    return allowed


def attention(q: Tensor, k: Tensor, v: Tensor, *, q_start: int, mask_diagonal: bool,
              window: int | None = None, pad: Tensor | None = None) -> Tensor:
    """Causal attention of queries at positions q_start.. over keys at positions 0..Tk-1.

    q: (B, nh, Tq, hs); k, v: (B, nkv, Tk, hs) -> (B, nh, Tq, hs).
    A query at p sees keys at p' <= p (p' < p when mask_diagonal, i.e. reading a layer above),
    and only p - p' < window with a sliding window. pad (B,): row b's first pad[b] positions are
    left padding, invisible as keys. The one rule for a query that sees no key (token 0 with the
    diagonal masked, or a padding position): its output is exactly zero, never NaN.
    q_start may be a (1,) tensor: the compiled decode step's position, known only when it runs
    (Tk is then a symbolic size; the mask below does the same work either way).
    """
    B, nh, Tq, hs = q.shape
    Tk = k.size(2)
    gqa = nh != k.size(1)
    if Tk == 0:
        return q.new_zeros(B, nh, Tq, hs)
    short_cut = pad is None and window is None and isinstance(q_start, int)  # a known position
    if short_cut and q_start == 0 and Tq == Tk:  # training and prefill
        if not mask_diagonal:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        # Diagonal masked: query t sees keys 0..t-1, which is an ordinary causal mask between
        # queries 1..T-1 and keys 0..T-2. Query 0 sees nothing and gets zero.
        out = F.scaled_dot_product_attention(q[:, :, 1:], k[:, :, :-1], v[:, :, :-1],
                                             is_causal=True, enable_gqa=gqa)
        return torch.cat([q.new_zeros(B, nh, 1, hs), out], dim=2)
    if short_cut and Tq == 1 and Tk == q_start + (not mask_diagonal):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)  # decoding: sees all
    allowed = visible_keys(q_start, Tq, Tk, mask_diagonal, window, q.device)  # (Tq, Tk)
    if pad is not None:
        real = torch.arange(Tk, device=q.device)[None, :] >= pad[:, None]  # (B, Tk)
        allowed = (allowed[None] & real[:, None, :])[:, None]  # (B, 1, Tq, Tk)
    sees_some = allowed.any(dim=-1, keepdim=True)
    # Rows that see nothing attend everywhere (keeps softmax finite) and are then zeroed.
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~sees_some, enable_gqa=gqa)
    return torch.where(sees_some, out, 0.0)


# ----------------------------------------------------------------------------------------------
# Where a layer's KVs live while a forward runs. Each store has write(layer, k, v), read(layer),
# seq_len, and pad: None, or (B,) counts of left padding in each row (see `attention`).


class PassKVs(dict):
    """The parallel computation's store: KVs of all T tokens, replaced when a layer recomputes
    them. During pass p a layer reading from above finds pass p-1's KVs here, because its source
    has not run yet in pass p; a layer reading itself or below finds this pass's."""

    def __init__(self, kvs=(), pad: Tensor | None = None):
        super().__init__(kvs)
        self.pad = pad

    seq_len = 0  # every write holds the whole sequence: queries start at position 0

    def write(self, layer: int, k: Tensor, v: Tensor) -> None:
        self[layer] = (k, v)

    def read(self, layer: int) -> tuple[Tensor, Tensor]:
        return self[layer]


class GrowingKVs:
    """The sequential computation's store: KVs appended token by token with torch.cat, so that
    gradients flow through them (the decoder uses the preallocated `KVCache` instead)."""

    def __init__(self, config: LCKVConfig, batch_size: int, dtype, device,
                 pad: Tensor | None = None):
        empty = torch.zeros(batch_size, config.n_kv_head, 0, config.head_dim, dtype=dtype,
                            device=device)
        self.kv = {layer: (empty, empty) for layer in config.kv_layers}
        self.pad = pad

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


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin, (length, head_dim), float64, in the rotate-half convention (as Llama).
    Made on the CPU whatever the default device (some accelerators have no float64); `rope`
    moves them once per dtype and device."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu")
                               / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float64, device="cpu"), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, h, T, hs) by the angles whose cos/sin (T, hs) are given."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# How a layer runs in one pass of an iteration group (the rest of the time it runs "full").
FULL = "full"
KV_ONLY = "kv_only"  # the group's top KV layer before the last pass: its output feeds nothing
NO_ATTENTION = "no_attention"  # first pass, reading from above: zero KVs give zero attention


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
        q_dim, kv_dim = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        self.q_proj = nn.Linear(config.n_embd, q_dim, bias=False)
        if self.computes_kv:  # a layer that only reads has no k/v weights at all
            self.k_proj = nn.Linear(config.n_embd, kv_dim, bias=False)
            self.v_proj = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def write_kv(self, x: Tensor, cos: Tensor, sin: Tensor, kv) -> None:
        """Compute this layer's keys (stored rotated) and values and write them to the store."""
        B, T, _ = x.size()
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        kv.write(self.layer, apply_rope(k, cos, sin), v)  # (B, nkv, T, hs)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv, q_start: int) -> Tensor:
        B, T, _ = x.size()
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        q = apply_rope(q, cos, sin)
        if self.computes_kv:
            self.write_kv(x, cos, sin, kv)
        k, v = kv.read(self.source)  # (B, nkv, Tk, hs)
        y = attention(q, k, v, q_start=q_start, mask_diagonal=self.mask_diagonal,
                      window=self.window, pad=kv.pad)
        return self.dropout(self.o_proj(y.transpose(1, 2).reshape(B, T, -1)))


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
        self.input_layernorm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv, q_start: int,
                how: str = FULL) -> Tensor:
        if how == KV_ONLY:
            self.self_attn.write_kv(self.input_layernorm(x), cos, sin, kv)
            return x
        if how != NO_ATTENTION:  # with zero values every attention output is exactly zero
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
            norm=nn.RMSNorm(config.n_embd, eps=config.norm_eps),
        ))
        self.drop = nn.Dropout(config.dropout)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
        # Recompute layers in the backward pass instead of keeping their activations (training).
        self.activation_checkpointing = False
        # RoPE tables per (dtype, device), made on first use from float64 angles, so a float64
        # model rotates in float64 and nothing needs rebuilding after a load onto the meta device.
        self._rope: dict = {}
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def init_weights(self) -> None:
        """Normal(0, 0.02) weights, unit norms, and GPT-2's scaled init of the projections that
        write into the residual stream."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, mean=0.0, std=0.02)

    def tie_weights(self) -> None:
        """With tie_embeddings, make the head the embedding matrix (one parameter, two names);
        call it again after `load_state_dict(..., assign=True)`, which replaces both."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

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

    # -- the pieces every computation is made of ----------------------------------------------

    def rope(self, start: int | Tensor, length: int, dtype, device) -> tuple[Tensor, Tensor]:
        """cos, sin (length, head_dim) of positions start..start+length-1 (start: an int, or a
        (1,) tensor in the compiled decode step)."""
        key = (dtype, str(device))
        if key not in self._rope:
            cos, sin = rope_tables(self.config.head_dim, self.config.block_size,
                                   self.config.rope_theta)
            self._rope[key] = (cos.to(device, dtype), sin.to(device, dtype))
        cos, sin = self._rope[key]
        if isinstance(start, Tensor):  # gathered, not sliced: a slice would fix the position
            pos = start + torch.arange(length, device=cos.device)
            return cos[pos], sin[pos]
        return cos[start:start + length], sin[start:start + length]

    def embed(self, idx: Tensor) -> Tensor:
        """Token ids (B, T) -> embeddings (B, T, C)."""
        return self.drop(self.model.embed_tokens(idx))

    def head(self, h: Tensor) -> Tensor:
        """Hidden states (B, T, C) -> logits (B, T, vocab)."""
        return self.lm_head(self.model.norm(h))

    def run_layers(self, x: Tensor, kv, layers, q_start: int = 0, how=None) -> Tensor:
        """Run `layers` once on x (B, T, C), the tokens at positions q_start.., against the store
        kv. how: None (every layer in full) or a dict layer -> FULL / KV_ONLY / NO_ATTENTION."""
        cos, sin = self.rope(q_start, x.size(1), x.dtype, x.device)
        # Checkpointing holds for the parallel store only: a recomputed layer must read the KVs
        # it read the first time, so they are handed over as a private store of their own.
        ckpt = self.activation_checkpointing and torch.is_grad_enabled() and type(kv) is PassKVs
        for i in layers:
            mode = FULL if how is None else how.get(i, FULL)
            block = self.model.layers[i]
            if not ckpt:
                x = block(x, cos, sin, kv, q_start, mode)
                continue
            src = block.self_attn.source
            own = PassKVs({} if src == i else {src: kv.read(src)}, pad=kv.pad)
            x = checkpoint(block, x, cos, sin, own, q_start, mode, use_reentrant=False)
            if i in own:
                kv.write(i, *own.read(i))
        return x

    # -- parallel (Fig. 2b) --------------------------------------------------------------------

    def group_kv_layers(self, group: tuple[int, int]) -> list[int]:
        lo, hi = group
        return [j for j in self.config.kv_layers if lo <= j <= hi]

    def start_group(self, x: Tensor, kv: PassKVs, group: tuple[int, int]) -> None:
        """The iteration's starting point: zero KVs for the group's KV layers. (Only those read
        from above are read before being written; zero values give them exactly zero attention
        output, which is why the first pass skips their attention.)"""
        B, T, _ = x.shape
        zeros = x.new_zeros(B, self.config.n_kv_head, T, self.config.head_dim)
        for j in self.group_kv_layers(group):
            kv.write(j, zeros, zeros)

    def group_pass(self, x: Tensor, kv: PassKVs, group: tuple[int, int], *, first: bool,
                   last: bool) -> Tensor:
        """One pass of an iteration group on its input x (B, T, C): every layer reads the KVs the
        previous pass left (from above) or this pass wrote (itself, below). Returns the group's
        output if `last`, else x unchanged: before the last pass the top KV layer only has to
        write its KVs, since its output feeds nothing until then."""
        lo, hi = group
        how = {} if last else {hi: KV_ONLY}
        if first:
            how.update({i: NO_ATTENTION for i in range(lo, hi + 1)
                        if self.config.kv_sources[i] > i})
        h = self.run_layers(x, kv, range(lo, hi + 1), how=how)
        return h if last else x

    def iterate_group(self, x: Tensor, kv: PassKVs, group: tuple[int, int], m: int, b: int
                      ) -> Tensor:
        """Sec. 2.2 for one group: m passes without gradient, then b with gradient, from zero KVs.
        Returns the group's output after the last pass."""
        self.start_group(x, kv, group)
        with torch.no_grad():
            for p in range(m):
                self.group_pass(x, kv, group, first=p == 0, last=False)
        for p in range(b):
            h = self.group_pass(x, kv, group, first=m + p == 0, last=p == b - 1)
        return h

    def forward_parallel(self, x: Tensor, m: int, b: int, kv: PassKVs | None = None,
                         stop: int | None = None) -> tuple[Tensor, PassKVs]:
        """The iterative parallel computation on embeddings x (B, T, C).

        Layers outside the iteration groups run once; each group runs m passes without gradient
        and b with gradient on the output of what lies below it (group k's input is group k-1's
        final output). Returns the final hidden states and the store holding every KV layer's
        final KVs. kv: an empty PassKVs to fill (to pass left padding), else a new one.
        stop: run the layers below it only (above every group; the caller runs the rest).
        """
        if m < 0 or b < 1:
            raise ValueError(f"need forward_passes m >= 0 and backward_passes b >= 1, got {m}, {b}")
        groups = self.config.iteration_groups
        stop = self.config.n_layer if stop is None else stop
        if groups and stop <= groups[-1][1]:
            raise ValueError(f"stop={stop} cuts the iteration group {groups[-1]}")
        kv = PassKVs() if kv is None else kv
        done = 0
        for group in groups:
            x = self.run_layers(x, kv, range(done, group[0]))
            x = self.iterate_group(x, kv, group, m, b)
            done = group[1] + 1
        return self.run_layers(x, kv, range(done, stop)), kv

    # -- sequential (Fig. 2a) ------------------------------------------------------------------

    def step(self, x: Tensor, kv) -> Tensor:
        """Process one new token per row, embeddings x (B, 1, C), against the KVs of the tokens
        before it (kv.seq_len of them). One pass over the layers: a layer reading from above sees
        the stored KVs of earlier tokens only (the masked diagonal), so nothing needs iterating.
        Returns hidden (B, 1, C)."""
        return self.run_layers(x, kv, range(self.config.n_layer), q_start=kv.seq_len)

    def forward_sequential(self, idx: Tensor, kv=None) -> tuple[Tensor, object]:
        """The readable reference: token by token, each token seeing the final KVs of the tokens
        before it. Returns hidden states (B, T, C) and the KV store."""
        B, T = idx.shape
        if kv is None:
            kv = GrowingKVs(self.config, B, self.model.embed_tokens.weight.dtype, idx.device)
        x = self.embed(idx)
        hs = [self.step(x[:, t:t + 1], kv) for t in range(T)]
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
            h, _ = self.forward_parallel(self.embed(idx), m, b)
        else:
            raise ValueError(f"mode must be 'parallel' or 'sequential', got {mode!r}")
        logits = self.head(h)
        if targets is None:
            return logits, None
        # float32 at least, the logits' own dtype when wider (a float64 model stays exact)
        wide = logits if logits.dtype == torch.float64 else logits.float()
        return logits, F.cross_entropy(wide.view(-1, wide.size(-1)), targets.reshape(-1),
                                       ignore_index=-1)
