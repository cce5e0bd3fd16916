"""Inference: the condensed KV cache, prompt encoding, sampling and decoding, with streaming.

The cache holds only the layers that compute KVs (`config.kv_layers`): L layers for a standard
model, w+1 for LCKV with w warmup layers. That is the whole memory saving of the paper (Sec. 3).
After the prompt, one decode step is one pass over the layers: a layer reading from above sees
the cached KVs of earlier tokens only (the masked diagonal), so nothing is iterated.

Decoding lives here, outside the model, and uses only its public surface (`embed`, `step`,
`forward_parallel`, the group passes, `head`, `rope`), as gpt-fast's `prefill` and
`decode_one_token` do. Prompts of different lengths share a batch by left padding: the pad
positions are invisible to every layer (see `model.attention`), so each row is what it would be
alone.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import LCKVConfig
from .convergence import max_kv_change
from .model import LCKVModel, PassKVs, apply_rope

# ----------------------------------------------------------------------------------------------
# The cache


def cache_bytes(config: LCKVConfig, batch_size: int, length: int, dtype=torch.float32) -> int:
    """Bytes of a KVCache for `length` tokens, computed without allocating anything:
    kv layers x 2 (k and v) x n_kv_head x head_dim x length x batch x element size."""
    element = torch.empty((), dtype=dtype).element_size()
    return (len(config.kv_layers) * 2 * config.n_kv_head * config.head_dim * length * batch_size
            * element)


class KVCache:
    """Preallocated keys and values of the KV-computing layers.

    Contract: `write(layer, k, v)` appends k, v (B, n_kv_head, T, head_dim) after the tokens the
    layer already holds; `read(layer)` returns everything it holds; `seq_len` is the number of
    tokens all layers hold. Keys are stored rotated (RoPE) at their position in the cache.

    Streaming (StreamingLLM, Sec. 3.4): with `sink_size`, the cache keeps the first `sink_size`
    tokens plus the most recent ones; `evict(n)` drops the n oldest non-sink tokens, shifting the
    rest down and re-rotating their keys by -n, so every key is rotated by its slot in the cache,
    not its position in the text.
    """

    def __init__(self, config: LCKVConfig, batch_size: int, capacity: int, *, dtype=torch.float32,
                 device=None, sink_size: int | None = None, pad: Tensor | None = None):
        if capacity <= 0 or batch_size <= 0:
            raise ValueError(f"cache needs a positive capacity and batch, got {capacity}, "
                             f"{batch_size}")
        if sink_size is not None and not 0 <= sink_size < capacity:
            raise ValueError(f"sink_size={sink_size} must be in [0, capacity={capacity})")
        self.layers = config.kv_layers
        self.capacity, self.sink_size = capacity, sink_size
        self.shape = (batch_size, config.n_kv_head, capacity, config.head_dim)
        self.k = {j: torch.zeros(self.shape, dtype=dtype, device=device) for j in self.layers}
        self.v = {j: torch.zeros(self.shape, dtype=dtype, device=device) for j in self.layers}
        self.length = {j: 0 for j in self.layers}
        self.pad = pad  # (B,) left padding of each row, or None; see `attention`

    @property
    def seq_len(self) -> int:
        return min(self.length.values())

    def reset(self, pad: Tensor | None = None) -> None:
        """Forget every token (the buffers are kept for the next generation); pad: the new
        batch's left padding."""
        self.length = {j: 0 for j in self.layers}
        self.pad = pad

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.k, self.v) for t in d.values())

    def write(self, layer: int, k: Tensor, v: Tensor) -> None:
        B, H, C, D = self.shape
        T, start = k.size(2), self.length[layer]
        if k.shape != (B, H, T, D) or v.shape != k.shape:
            raise ValueError(f"layer {layer}: cache holds (B, n_kv_head, T, head_dim) = "
                             f"{(B, H, 'T', D)}, got k {tuple(k.shape)}, v {tuple(v.shape)}")
        if start + T > C:
            raise ValueError(f"layer {layer}: writing {T} tokens after {start} overflows the "
                             f"cache capacity {C}")
        self.k[layer][:, :, start:start + T] = k
        self.v[layer][:, :, start:start + T] = v
        self.length[layer] = start + T

    def read(self, layer: int) -> tuple[Tensor, Tensor]:
        n = self.length[layer]
        return self.k[layer][:, :, :n], self.v[layer][:, :, :n]

    def evict(self, n: int, cos: Tensor, sin: Tensor) -> None:
        """Drop the n oldest tokens after the sinks; cos, sin (hs,) hold the RoPE angle of n."""
        s = self.sink_size or 0
        for j in self.layers:
            end = self.length[j]
            if end - n < s:
                raise ValueError(f"cannot evict {n} of {end - s} non-sink tokens")
            kept_k = self.k[j][:, :, s + n:end].clone()
            self.k[j][:, :, s:end - n] = apply_rope(kept_k, cos, -sin)  # rotate back by n slots
            self.v[j][:, :, s:end - n] = self.v[j][:, :, s + n:end].clone()
            self.length[j] = end - n


# ----------------------------------------------------------------------------------------------
# Sampling: the options in one place, and small pure functions


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn: temperature (0 is greedy), then top-k, then top-p."""
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


GREEDY = Sampling(temperature=0.0)


def logits_to_probs(logits: Tensor, sampling: Sampling = Sampling()) -> Tensor:
    """(B, V) logits -> (B, V) probabilities after temperature, top-k and top-p (nucleus).
    Temperature must be positive here (greedy decoding needs no probabilities)."""
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None:
        kth = torch.topk(logits, min(sampling.top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p is not None:
        # Keep the smallest set of most likely tokens whose total probability reaches top_p:
        # a token stays if the probability of the tokens ranked above it is still below top_p.
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        above = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, above >= sampling.top_p)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(logits: Tensor, sampling: Sampling = Sampling(),
           generator: torch.Generator | None = None) -> Tensor:
    """(B, V) logits -> (B, 1) token ids."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    return torch.multinomial(logits_to_probs(logits, sampling), 1, generator=generator)


# ----------------------------------------------------------------------------------------------
# Prompt encoding and decoding

ADAPTIVE_TOL = 1e-5  # largest KV change between two passes at which adaptive prefill stops


def left_pad(prompts, device=None) -> tuple[Tensor, Tensor | None]:
    """A (B, P) tensor, or a list of token sequences of any lengths, -> (idx (B, P), pad).

    Shorter prompts are padded on the left (with token 0, never seen); pad (B,) counts each
    row's padding, None when every prompt has the same length.
    """
    if isinstance(prompts, Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"expected prompts of shape (batch, time) or a list of token "
                             f"sequences, got a tensor of shape {tuple(prompts.shape)}")
        if prompts.size(1) == 0:
            raise ValueError("the prompt is empty: give at least one token")
        return prompts, None
    rows = [torch.as_tensor(p, dtype=torch.long, device=device) for p in prompts]
    if not rows:
        raise ValueError("no prompts were given")
    for i, row in enumerate(rows):
        if row.dim() != 1:
            raise ValueError(f"prompt {i} has shape {tuple(row.shape)}; each prompt in a list "
                             "must be a 1-D sequence of token ids")
        if row.numel() == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token")
    P = max(len(r) for r in rows)
    pad = torch.tensor([P - len(r) for r in rows], device=rows[0].device)
    idx = torch.stack([torch.cat([r.new_zeros(P - len(r)), r]) for r in rows])
    return idx, (pad if bool(pad.any()) else None)


def last_token_layers(config: LCKVConfig) -> range:
    """The layers above the last KV layer. They write nothing to the cache, so prompt encoding
    needs their output for the last token only (empty when the top layer computes KVs: LCKV)."""
    return range(max(config.kv_layers) + 1, config.n_layer)


@torch.no_grad()
def adaptive_parallel(model: LCKVModel, x: Tensor, kv: PassKVs, max_passes: int, tol: float,
                      stop: int | None = None) -> tuple[Tensor, int]:
    """The parallel computation, each group stopping at the first pass whose largest KV change
    (over real tokens) is within tol, at most max_passes. Returns hidden states and the most
    passes any group used. stop: as in `LCKVModel.forward_parallel`."""
    done, most = 0, 1
    for group in model.config.iteration_groups:
        x = model.run_layers(x, kv, range(done, group[0]))
        model.start_group(x, kv, group)
        layers = model.group_kv_layers(group)
        for p in range(max_passes):
            before = {j: kv[j] for j in layers}
            h = model.group_pass(x, kv, group, first=p == 0, last=True)
            if p > 0 and max_kv_change(before, kv, kv.pad) <= tol:
                break
        most = max(most, p + 1)
        x, done = h, group[1] + 1
    stop = model.config.n_layer if stop is None else stop
    return model.run_layers(x, kv, range(done, stop)), most


@torch.no_grad()
def encode_prompt(model: LCKVModel, idx: Tensor, cache: KVCache, mode: str = "parallel",
                  tol: float = ADAPTIVE_TOL, fast_prefill: bool = True) -> tuple[Tensor, int]:
    """Encode the prompt idx (B, P) into an empty cache (whose `pad` marks left padding);
    returns (logits of the last token (B, V), passes used per group).

    "parallel": the paper's iteration with m + b passes per group (exact when m + b >= P,
    Theorem 1). "sequential": token by token (P steps). "adaptive": each group iterates until no
    cached KV changes by more than `tol` between two passes, at most m + b passes.
    fast_prefill (parallel and adaptive): run the `last_token_layers` on the last token only.
    """
    c = model.config
    if mode == "sequential":
        x = model.embed(idx)
        for t in range(idx.size(1)):
            h = model.step(x[:, t:t + 1], cache)
        passes = idx.size(1)
    elif mode in ("parallel", "adaptive"):
        kv = PassKVs(pad=cache.pad)
        m, b = c.forward_passes, c.backward_passes
        above = last_token_layers(c) if fast_prefill else range(c.n_layer, c.n_layer)  # none
        if mode == "parallel":
            h, _ = model.forward_parallel(model.embed(idx), m, b, kv, stop=above.start)
            passes = m + b if c.iteration_groups else 1
        else:
            h, passes = adaptive_parallel(model, model.embed(idx), kv, m + b, tol, above.start)
        if above:
            # Fast prefill (YOCO's prefill early exit, vLLM's fast prefill): the layers above the
            # last KV layer write no KVs, so only the last token's output is needed from them;
            # run on it alone, they still attend to every prompt token's cached KVs.
            h = model.run_layers(h[:, -1:], kv, above, q_start=idx.size(1) - 1)
        for j in c.kv_layers:
            cache.write(j, *kv[j])
    else:
        raise ValueError(f"prefill must be 'parallel', 'sequential' or 'adaptive', got {mode!r}")
    return model.head(h[:, -1:])[:, -1], passes


@torch.no_grad()
def decode_one_token(model: LCKVModel, token: Tensor, cache: KVCache) -> Tensor:
    """One step: token (B, 1) -> logits (B, V) of the next token; one pass over the layers."""
    return model.head(model.step(model.embed(token), cache))[:, -1]


# ----------------------------------------------------------------------------------------------
# Compiled decoding (gpt-fast's recipe, with one dynamic size): torch.compile builds one graph
# for a (model, batch, capacity) and every position reuses it. `decode_one_token` stays the
# reference.


class CacheSlot:
    """A KVCache as the compiled decode step sees it: the new token's KVs land at slot `pos`, a
    (1,) tensor (a number would be baked into the graph), and a read returns the first
    `visible.size(0)` slots (pos + 1: the tokens so far and the new one). That size is the one
    dynamic dimension of the graph (`CompiledDecoder` marks it), so one graph serves every
    position and attention reads only the slots written so far; the causal mask in `attention`
    does the rest (padding, the masked diagonal). gpt-fast reads the whole buffer behind a mask
    instead, which keeps every shape static but made large batches decode slower than eager
    here: at batch 65 most of a step is attention, over 3x the keys it needs."""

    def __init__(self, cache: KVCache, pos: Tensor, visible: Tensor):
        self.cache, self.seq_len, self.pad = cache, pos, cache.pad
        self.n = visible.size(0)

    def write(self, layer: int, k: Tensor, v: Tensor) -> None:
        self.cache.k[layer].index_copy_(2, self.seq_len, k)
        self.cache.v[layer].index_copy_(2, self.seq_len, v)

    def read(self, layer: int) -> tuple[Tensor, Tensor]:
        return self.cache.k[layer][:, :, :self.n], self.cache.v[layer][:, :, :self.n]


def decode_static(model: LCKVModel, token: Tensor, cache: KVCache, pos: Tensor,
                  visible: Tensor) -> Tensor:
    """`decode_one_token` in the form torch.compile is given: the token at position pos (a (1,)
    tensor), reading the first visible.size(0) = pos + 1 slots of the cache (only the size of
    `visible` is used: a size can be a symbolic dimension, a Python int would be baked in)."""
    return model.head(model.step(model.embed(token), CacheSlot(cache, pos, visible)))[:, -1]


_compiled_decode: dict = {}  # backend -> the compiled decode_static

# Inductor leaves matmuls to the BLAS library, whose one-row products (a batch-1 decode step)
# read the weights at well under the memory bandwidth on CPUs: 5-8 GB/s on the 2-core test
# machine, whose large reads run at 20-34 GB/s. Inductor's own `decompose_mm_pass` rewrites a
# one-row matmul whose other sides are at most 2048 as a multiply-and-sum that it compiles into
# one vectorised loop over the weights: the batch-1 step of the `cpu` shape falls from 8.4 to 4.1
# ms (docs/benchmarks.md). A head wider than 2048 (SmolLM2's 49,152-token vocabulary) stays
# with BLAS, as do batches > 1 (there the pass measured no faster) and GPUs (its GPU rule is for
# tall, thin products). The pass's limits cannot be changed here: it copies them from inductor's
# config when first imported, before any options given to torch.compile apply.
DECODE_INDUCTOR_OPTIONS = {"post_grad_fusion_options": {"decompose_mm_pass": {}}}


class CompileWarning(UserWarning):
    """torch.compile could not be used here; the eager code ran instead (the tests turn this
    warning into an error, so that a graph break cannot hide behind the fallback)."""


def failure(e: Exception) -> str:
    """One line saying why torch.compile failed (dynamo wraps the backend's own exception)."""
    cause = getattr(e, "inner_exception", None) or e
    return f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0][:200]}"


def fallback_message(e: Exception) -> str:
    """The warning of a compiled decode step that fell back to eager, saying why."""
    why = failure(e)
    if why.startswith("FailOnRecompileLimitHit"):
        # every model layout, batch size and cache capacity decoded in this process is a graph
        # of the one compiled decode_static, and dynamo keeps a fixed number of them
        return ("compile=True: the compiled decode step has as many graphs as torch.compile "
                "keeps for one function (dynamo's recompile_limit, 8 by default: one per model "
                "layout, batch size and cache capacity decoded in this process); decoding "
                "eagerly instead. torch.compiler.reset() discards the graphs")
    return (f"compile=True: torch.compile could not build the decode step here ({why}); "
            f"decoding eagerly instead")


def why_inductor_fails(device) -> str | None:
    """None if torch.compile's default backend builds and runs code on `device` here, else why
    not (inductor needs a C++ compiler on CPU, Triton on GPU): found by compiling a one-line
    function with inductor's cache off, so that a run can choose eager before its first step
    instead of stopping in it."""
    try:
        torch.compile(lambda t: t * 2 + 1, options={"fx_graph_cache": False})(
            torch.ones(4, device=device))
    except Exception as e:  # whatever the backend raises, the answer is "not here"
        return failure(e)
    return None


def compiled_capacity(needed: int, block_size: int) -> int:
    """The cache capacity compiled decoding allocates: the next power of two (at most
    block_size), so that a handful of graphs serve generations of every length."""
    return min(block_size, 1 << max(needed - 1, 0).bit_length())


class CompiledDecoder:
    """Decode steps through torch.compile (fullgraph: a graph break is an error), with the
    given backend ("inductor" generates C++ or GPU kernels; "aot_eager" only traces; None runs
    `decode_static` uncompiled: what the compiler is given, for the tests).

    Where the backend cannot build the step (inductor without a C++ compiler, for one), it warns
    once (`CompileWarning`) and decodes eagerly: a failed compile happens before the step runs,
    and the eager step rewrites the same slot, so nothing is lost. One instance serves one
    generation (one model and cache): `generate_stream` makes a new one for each."""

    def __init__(self, backend: str | None = "inductor"):
        if backend is None:
            self.step, self.failed, self.checked = decode_static, False, None
            return
        if backend not in _compiled_decode:  # one wrapper per backend, reused by every call
            options = DECODE_INDUCTOR_OPTIONS if backend == "inductor" else None
            # dynamic=False: no size turns dynamic by itself (so a full streaming read stays a
            # static graph of its own); the one marked in __call__ is dynamic from the start
            _compiled_decode[backend] = torch.compile(decode_static, backend=backend,
                                                      fullgraph=True, dynamic=False,
                                                      options=options)
        self.step, self.failed = _compiled_decode[backend], False
        self.checked = None  # the kind of step (whole cache read or not) last fully checked

    def step_checking_fewer_guards(self, *args) -> Tensor | None:
        """The step, checking only the dynamo guards that once told two graphs apart, or None
        where that is not enough. Checking them all costs ~0.4 ms a step (a seventh of a batch-1
        step of the `cpu` shape); once a step of this generation has, the later steps of the
        same kind see the same model, cache and tensor shapes (only the marked length grows,
        within the range that step checked). Where a recompile would be needed, or this torch
        has no such stance, the call raises before running anything, and the caller runs the
        step with every guard under its own stance (which this one replaces for the step: a
        caller's "fail_on_recompile" still fails, since the recompile is tried again under it;
        an existing graph still runs under a caller's "force_eager")."""
        try:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return self.step(*args)
        except Exception:
            return None

    @torch.no_grad()
    def __call__(self, model: LCKVModel, token: Tensor, cache: KVCache) -> Tensor:
        if self.failed:
            return decode_one_token(model, token, cache)
        start = cache.seq_len
        pos = torch.tensor([start], device=token.device)
        visible = torch.empty(start + 1, dtype=torch.bool, device=token.device)
        # Reading the whole buffer (a streaming cache, once full) is a shape of its own for
        # torch.compile (the read is then contiguous): a second graph, with that size static.
        whole = start + 1 == cache.capacity
        if not whole:
            torch._dynamo.mark_dynamic(visible, 0)  # one graph for every length, not one each
        args = (model, token, cache, pos, visible)
        try:
            logits = self.step_checking_fewer_guards(*args) if self.checked == whole else None
            if logits is None:
                logits = self.step(*args)
        except Exception as e:  # compiling failed: the step did not run, run it eagerly
            self.failed = True
            warnings.warn(fallback_message(e), CompileWarning, stacklevel=3)
            return decode_one_token(model, token, cache)
        for j in cache.layers:
            cache.length[j] = start + 1
        self.checked = whole
        return logits


@torch.no_grad()
def generate_stream(model: LCKVModel, prompts, max_new_tokens: int, *,
                    sampling: Sampling = Sampling(), generator: torch.Generator | None = None,
                    prefill: str = "parallel", stop_tokens=None, sink_size: int | None = None,
                    window_size: int | None = None, tol: float = ADAPTIVE_TOL,
                    cache: KVCache | None = None, fast_prefill: bool = True,
                    compile: bool | str = False):
    """Yield (next tokens (B, 1), the logits they were sampled from (B, V)) one step at a time.
    See `generate` for the arguments. `cache`: a KVCache to fill (it is reset first) instead of
    a new one, to reuse its buffers or to watch it; its capacity must fit the generation."""
    c = model.config
    param = model.lm_head.weight
    idx, pad = left_pad(prompts, param.device)
    model.check_input(idx)
    B, P = idx.shape
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    streaming = sink_size is not None or window_size is not None
    if streaming:
        if sink_size is None or window_size is None or sink_size < 0 or window_size < 1:
            raise ValueError("streaming needs both sink_size >= 0 and window_size >= 1, got "
                             f"sink_size={sink_size}, window_size={window_size}")
        if pad is not None:
            raise ValueError("prompts of different lengths cannot stream: the attention sinks "
                             "would be padding; stream them one at a time")
        capacity = sink_size + window_size
        if capacity > c.block_size:
            raise ValueError(f"sink_size + window_size = {capacity} exceeds block_size="
                             f"{c.block_size}")
        if P > capacity:
            raise ValueError(f"prompt of {P} tokens does not fit the streaming cache of "
                             f"sink_size + window_size = {capacity} tokens")
    else:
        capacity = P + max_new_tokens
        if capacity > c.block_size:
            raise ValueError(f"prompt ({P}) + max_new_tokens ({max_new_tokens}) = {capacity} "
                             f"exceeds block_size={c.block_size}; use sink_size and window_size "
                             "to stream past it")
    stop = torch.tensor(sorted(set(stop_tokens or ())), dtype=idx.dtype, device=idx.device)
    if cache is None:
        if compile and not streaming:  # a few capacities, so a few graphs
            capacity = compiled_capacity(capacity, c.block_size)
        cache = KVCache(c, B, capacity, dtype=param.dtype, device=param.device,
                        sink_size=sink_size if streaming else None, pad=pad)
    else:
        fits = cache.capacity == capacity if streaming else cache.capacity >= capacity
        if cache.shape[0] != B or not fits or cache.sink_size != (sink_size if streaming else None):
            raise ValueError(f"the given cache (batch {cache.shape[0]}, capacity {cache.capacity}, "
                             f"sink_size {cache.sink_size}) does not fit this generation (batch "
                             f"{B}, {capacity} tokens, sink_size {sink_size})")
        cache.reset(pad=pad)
    capacity = cache.capacity
    step = decode_one_token
    if compile:
        step = CompiledDecoder("inductor" if compile is True else compile)
    logits, _ = encode_prompt(model, idx, cache, prefill, tol, fast_prefill)
    done = torch.zeros(B, 1, dtype=torch.bool, device=idx.device)
    token = idx[:, -1:]
    for i in range(max_new_tokens):
        # a finished row repeats the stop token it produced
        token = torch.where(done, token, sample(logits, sampling, generator))
        if len(stop):
            done |= torch.isin(token, stop)
        yield token, logits
        if i == max_new_tokens - 1 or bool(done.all()):
            return
        if cache.seq_len == capacity:  # streaming: make room for one more token
            cos, sin = model.rope(1, 1, param.dtype, param.device)
            cache.evict(1, cos[0], sin[0])
        logits = step(model, token, cache)


@torch.no_grad()
def generate(model: LCKVModel, prompts, max_new_tokens: int, *,
             sampling: Sampling = Sampling(), generator: torch.Generator | None = None,
             prefill: str = "parallel", stop_tokens=None, sink_size: int | None = None,
             window_size: int | None = None, tol: float = ADAPTIVE_TOL,
             cache: KVCache | None = None, fast_prefill: bool = True,
             compile: bool | str = False):
    """Continue the prompts by up to max_new_tokens tokens.

    prompts: a (B, P) tensor, or a list of token sequences of any lengths (padded on the left,
    invisibly: each row is what it would be alone). sampling: temperature (0 is greedy), top_k,
    top_p; `generator` seeds it. prefill: "parallel" (m + b passes), "sequential" or "adaptive"
    (see `encode_prompt`; fast_prefill runs the layers above the last KV layer on the last
    prompt token only). stop_tokens: a row that samples one of them stops (it repeats that
    token while the other rows go on); generation ends when every row has stopped. With
    sink_size and window_size the cache streams (StreamingLLM): it keeps the first sink_size
    tokens and the latest ones, so memory is flat and generation may run past block_size.
    compile: True (inductor) or a torch.compile backend's name: decode through torch.compile
    (`CompiledDecoder`; the first call for a model, batch and cache size compiles, seconds to
    minutes; the logits may differ from the eager ones in the last bits, so the greedy tokens
    match except, in principle, at a near-tie).
    The model runs in eval mode (no dropout) and gets its mode back afterwards.
    Returns (B, P + n) tokens for a tensor, or a list of 1-D tensors (each prompt and its
    continuation) for a list.
    """
    was_training = model.training
    model.eval()
    try:
        new = [t for t, _ in generate_stream(
            model, prompts, max_new_tokens, sampling=sampling, generator=generator,
            prefill=prefill, stop_tokens=stop_tokens, sink_size=sink_size,
            window_size=window_size, tol=tol, cache=cache, fast_prefill=fast_prefill,
            compile=compile)]
    finally:
        model.train(was_training)
    if isinstance(prompts, Tensor):
        return torch.cat([prompts, *new], dim=1)
    tail = torch.cat(new, dim=1) if new else None
    return [torch.cat([torch.as_tensor(p, dtype=torch.long, device=model.lm_head.weight.device),
                       *([] if tail is None else [tail[i]])]) for i, p in enumerate(prompts)]
