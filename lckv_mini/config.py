"""The model's configuration and the layouts of cross-layer KV sharing.

`LCKVConfig.layer_types` says, for every layer i, which layer's KVs its queries attend to. From it
the config derives, once, the layers that compute KVs and the *iteration groups*: the blocks of
layers that must be iterated because some layer in them reads a layer above itself (Sec. 2.2 of
Wu & Tu, ACL 2024, generalised to several groups as in the authors' follow-up study, Wu, Wu & Tu,
NAACL 2025, arXiv 2410.14442).

This file imports nothing of the package; `model.py` imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
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
    # sliding window. None means a standard transformer (layer i reads layer i). Stored in the
    # canonical string form, which is what checkpoints hold.
    layer_types: str | Sequence[int | str] | None = None
    sliding_window: int | None = None  # window, in tokens, of the layers marked "s"
    forward_passes: int = 7  # m: passes without gradient in parallel training (Sec. 2.2)
    backward_passes: int = 2  # b: passes with gradient that follow them
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    dropout: float = 0.0
    head_dim: int | None = None  # per-head width; None: n_embd // n_head (some Llamas differ)

    # Derived once from the fields above (not arguments, not stored in checkpoints).
    kv_sources: tuple[int, ...] = field(init=False, repr=False, compare=False)
    sliding_layers: tuple[bool, ...] = field(init=False, repr=False, compare=False)
    kv_layers: tuple[int, ...] = field(init=False, repr=False, compare=False)
    iteration_groups: tuple[tuple[int, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size",
                     "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        head_dim = self.n_embd // self.n_head if self.head_dim is None else self.head_dim
        if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
            raise ValueError(f"head size {head_dim!r} must be a positive even integer for RoPE")
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
        derived = dict(
            head_dim=head_dim,
            layer_types="_".join(f"{s}{'s' if w else ''}" for s, w in zip(sources, sliding)),
            kv_sources=sources, sliding_layers=sliding,
            kv_layers=tuple(i for i, s in enumerate(sources) if s == i),
            iteration_groups=iteration_groups(sources))
        for name, value in derived.items():  # frozen: set once, here
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict:
        """The arguments that rebuild this config: LCKVConfig(**config.to_dict())."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}


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


def iteration_groups(sources: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """The blocks (lo, hi) of layers that the parallel computation iterates, bottom up.

    A layer that reads a layer above itself opens a group; the group extends to the highest layer
    that any layer inside it reads, until nothing inside reads beyond its top. Layers between
    groups run once. (The single group of LCKV is the paper's Sec. 2.2; several groups arise in
    e.g. lasagna-top layouts of arXiv 2410.14442.) The top `hi` of a group is always a KV layer.
    """
    groups, i, L = [], 0, len(sources)
    while i < L:
        if sources[i] <= i:
            i += 1
            continue
        lo, hi = i, sources[i]
        j = lo
        while j <= hi:  # hi may grow while we scan
            hi = max(hi, sources[j])
            j += 1
        groups.append((lo, hi))
        i = hi + 1
    return tuple(groups)


# ----------------------------------------------------------------------------------------------
# Layout builders: the paper's Sec. 2 and 4, and the families of arXiv 2410.14442


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


def gemma_layers(n_layer: int, n_shared: int | None = None, period: int = 5) -> str:
    """The downward sharing of Gemma 3n and Gemma 4: sliding-window layers ("s") with every
    `period`-th layer full (4 sliding : 1 full for period 5), and the last `n_shared` layers
    computing no KVs: each reads the last layer below them of its own type (sliding or full).

    The window itself is the config's `sliding_window`. n_shared=None: the most layers, up to a
    third of them (Gemma 3n E2B shares 10 of 30), whose types all occur below the shared ones.
    Raises ValueError if a shared layer has no layer of its type below the shared ones.
    """
    if period < 1:
        raise ValueError(f"period must be >= 1 (every period-th layer is full), got {period}")
    sliding = [(i + 1) % period != 0 for i in range(n_layer)]
    if n_shared is None:
        n_shared = next(n for n in range(n_layer // 3, -1, -1)
                        if set(sliding[n_layer - n:]) <= set(sliding[:n_layer - n]))
    if not 0 <= n_shared < n_layer:
        raise ValueError(f"n_shared must be in [0, n_layer - 1 = {n_layer - 1}], got {n_shared}")
    first = n_layer - n_shared  # the first shared layer
    sources = list(range(n_layer))
    for i in range(first, n_layer):
        same = [j for j in range(first) if sliding[j] == sliding[i]]
        if not same:
            kind = "sliding" if sliding[i] else "full"
            raise ValueError(f"gemma layout: shared layer {i} is {kind}, but no layer below the "
                             f"{n_shared} shared ones is; share fewer layers or change the period")
        sources[i] = same[-1]
    return "_".join(f"{src}{'s' if w else ''}" for src, w in zip(sources, sliding))


TARGETS = ("bottom", "middle", "top")
PARTITIONS = ("pizza", "sandwich", "lasagna")


def _target(lo: int, hi: int, position: str) -> int:
    """The KV layer of the block lo..hi that the block's other layers read. "middle" is the lower
    middle, but never the bottom: lo + max(1, (hi - lo) // 2), so a block of two reads its top."""
    return {"bottom": lo, "middle": lo + max(1, (hi - lo) // 2), "top": hi}[position]


def _shared_sources(partition: str, position: str, L: int, k: int) -> list[int]:
    """The source of every layer in `shared_layers`' layout (arguments checked there)."""
    if partition == "lasagna":
        size, extra = divmod(L, k)
        blocks, lo = [], 0
        for g in range(k):
            hi = lo + size + (g < extra) - 1
            blocks.append((lo, hi))
            lo = hi + 1
    else:
        standard = k - 1
        bottom = standard if partition == "pizza" else standard - standard // 2
        blocks = [(bottom, L - 1 - (standard - bottom))]
    sources = list(range(L))
    for lo, hi in blocks:
        sources[lo:hi + 1] = [_target(lo, hi, position)] * (hi - lo + 1)
    return sources


def shared_layers(partition: str, position: str, n_layer: int, n_kv_layers: int) -> str:
    """One configuration of the unified framework of cross-layer KV sharing (arXiv 2410.14442).

    The L layers are split into n_kv_layers KV layers, which compute KVs, and the rest, which read
    one of them (the "target"). `partition` says how:
    - "pizza": the bottom n_kv_layers - 1 layers are standard; the layers above them form one
      block that shares one target layer.
    - "sandwich": those n_kv_layers - 1 standard layers are split between the bottom and the top
      (the extra one at the bottom when the count is odd); the middle block shares one target.
    - "lasagna": the layers are cut into n_kv_layers consecutive blocks of (nearly) equal size,
      the larger blocks at the bottom when L does not divide evenly; each block shares its own
      target.
    `position` places the target in its block: "bottom", "middle" or "top". So CLA is
    lasagna-bottom, LCKV is sandwich-top (n_kv_layers = w + 1), and YOCO is close to pizza-bottom
    (YOCO's readers use a separate projection of the layer below).
    "Middle" is the lower middle of the block but never its bottom (lo + max(1, (hi - lo) // 2)):
    of the lower middle, the upper middle and this, the one reading that reproduces both of the
    authors' configurations that are published as text: their README's
    sandwich-middle for 22 layers, 0_10_..._10_21 (a block of 20 reads its lower middle, 10), and
    their lasagna-middle with 6 KV layers of 12, whose training costs what lasagna-top's does
    (whyNLP/LCKV issue #10), so a block of two reads its top.
    A middle that gives the layout of the top (every block holds two layers) is refused with a
    ValueError that names the top; bottom and middle, bottom and top never coincide.
    Reading of the study where it is silent: the counts above (the standard layers are
    n_kv_layers - 1, the lasagna blocks as even as possible) are this package's choice; pizza and
    sandwich coincide for n_kv_layers <= 2 (nothing to split), which is not refused.
    """
    if partition not in PARTITIONS:
        raise ValueError(f"unknown partition {partition!r}; expected one of {PARTITIONS}")
    if position not in TARGETS:
        raise ValueError(f"unknown target position {position!r}; expected one of {TARGETS}")
    k, L = n_kv_layers, n_layer
    if partition == "lasagna" and not 1 <= k <= L // 2:
        raise ValueError(f"lasagna needs 1 <= n_kv_layers <= n_layer // 2 = {L // 2} (every "
                         f"block shares among at least 2 layers), got n_kv_layers={k}")
    if partition != "lasagna" and not 1 <= k <= L - 1:
        raise ValueError(f"{partition} needs 1 <= n_kv_layers <= n_layer - 1 = {L - 1} (the "
                         f"shared block holds at least 2 layers), got n_kv_layers={k}")
    sources = _shared_sources(partition, position, L, k)
    if position == "middle" and sources == _shared_sources(partition, "top", L, k):
        raise ValueError(f"{partition}-middle with {k} KV layers of {L} is the layout "
                         f"{partition}-top gives ({'_'.join(map(str, sources))}): every block "
                         f"holds two layers, whose middle is its top; ask for {partition}-top")
    return "_".join(map(str, sources))


def make_layer_types(kind: str, n_layer: int, *, warmup: int = 2, group: int = 2,
                     n_kv_layers: int | None = None, period: int = 5) -> str:
    """Build layer_types by name.

    "standard", "lckv" (with `warmup` w), "cla" (with `group`), "yoco", "gemma" (Gemma 3n / 4:
    `period`, and `n_kv_layers` non-shared layers, default `gemma_layers`'), or a family of arXiv
    2410.14442 written partition-position, e.g. "sandwich-middle" or "lasagna-top", with
    `n_kv_layers` KV layers (default: half the layers, the study's 2x reduction).
    """
    if kind == "standard":
        return standard_layers(n_layer)
    if kind == "lckv":
        return lckv_layers(n_layer, warmup)
    if kind == "cla":
        return cla_layers(n_layer, group)
    if kind == "yoco":
        return yoco_layers(n_layer)
    if kind == "gemma":
        return gemma_layers(n_layer, None if n_kv_layers is None else n_layer - n_kv_layers,
                            period)
    partition, _, position = kind.partition("-")
    if partition in PARTITIONS and position in TARGETS:
        return shared_layers(partition, position, n_layer,
                             max(1, n_layer // 2) if n_kv_layers is None else n_kv_layers)
    families = [f"{p}-{t}" for p in PARTITIONS for t in TARGETS]
    raise ValueError(f"unknown layer layout {kind!r}; expected standard, lckv, cla, yoco, gemma "
                     f"or one of {', '.join(families)}")


LAYOUTS = ("standard", "lckv", "cla", "yoco", "gemma",
           *(f"{p}-{t}" for p in PARTITIONS for t in TARGETS))


# ----------------------------------------------------------------------------------------------
# Who can serve what: engines that support only downward sharing (Gemma 3n / 4 in vLLM)


@dataclass(frozen=True)
class Serving:
    """Can an engine that supports only downward KV sharing serve a layout? If not, `layer` is
    the first layer that breaks it and `reason` says why."""
    ok: bool
    layer: int | None = None
    reason: str = "every layer reads itself or a layer below it, one attention type per target"


def can_serve_downward(layout: LCKVConfig | str | Sequence[int | str]) -> Serving:
    """Whether a layout (a config, or a layer_types spec) can be served by an engine that supports
    only downward KV sharing, as vLLM does (`kv_sharing_target_layer_name` must name an earlier
    layer): every layer reads itself or a layer below it, and the layers that read a target share
    one attention type (sliding or full), since the engine gives them one cache and one mask.
    The target's own window is not counted: it masks only the target's queries (YOCO's top
    sliding layer is read in full; YOCO itself gives its readers a projection of their own).

    A layer reading a layer above needs what such an engine never does: in training and prompt
    encoding the iteration (Sec. 2.2), because the KVs it reads are computed after it runs on the
    same token; in decoding the masked diagonal, since its own token's KVs do not exist yet.
    """
    if isinstance(layout, LCKVConfig):
        sources, sliding = layout.kv_sources, layout.sliding_layers
    else:
        n_layer = len(layout.split("_") if isinstance(layout, str) else layout)
        sources, sliding = parse_layer_types(layout, n_layer)
    kind = {True: "sliding", False: "full"}
    first_reader = {}  # target -> its first reader (below the target's other readers)
    for i, src in enumerate(sources):
        if src > i:
            return Serving(False, i, f"layer {i} reads layer {src}, above it: layer {src}'s KVs "
                           f"of a token are computed after layer {i} runs on it, which training "
                           "and prompt encoding meet by iterating and decoding by masking the "
                           "diagonal; a downward-only engine does neither")
        if src == i:
            continue
        j = first_reader.setdefault(src, i)
        if sliding[j] != sliding[i]:
            return Serving(False, i, f"layer {i} ({kind[sliding[i]]} attention) reads layer "
                           f"{src}, which layer {j} ({kind[sliding[j]]} attention) reads too: "
                           "the layers that share one cache must share one attention type")
    return Serving(True)
