"""Shared test helpers: hypothesis strategies over small LCKV configurations, float64 models."""

import os
from collections import defaultdict

import notebook_runner
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from lckv_mini.config import LCKVConfig, gemma_layers, make_layer_types
from lckv_mini.model import LCKVModel, PassKVs

# Every run draws the same examples, wherever it runs (the README's command, CI): a verdict never
# depends on luck. LCKV_EXPLORE=1 draws fresh random examples instead (a search for new failing
# cases); tests/test_zz_coverage.py then reports the shares it sees rather than failing on them.
EXPLORE = os.environ.get("LCKV_EXPLORE", "") not in ("", "0")
settings.register_profile(
    "default", deadline=None, max_examples=int(os.environ.get("LCKV_EXAMPLES", 100)),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=not EXPLORE, print_blob=True)
settings.load_profile("default")
# The models here are tiny: one thread is faster than two and does not fight other processes.
torch.set_num_threads(1)

# "study": a family of arXiv 2410.14442 (pizza/sandwich/lasagna x bottom/middle/top);
# "groups": lasagna-top or -middle, which have several iteration groups; "gemma": the downward
# sharing of Gemma 3n / 4 (sliding and full layers, the top ones shared). Hypothesis favours the
# first entries of a sampled_from (and small integers, False): the families that read from above
# come first, and "random" always has a read from above, so most examples (CI's derandomised set
# included) reach the case the equivalence claims are about; tests/test_zz_coverage.py counts.
FAMILIES = ("random", "lckv", "groups", "study", "random", "standard", "cla", "yoco", "gemma",
            "random", "lckv", "groups", "random")
UPWARD_FAMILIES = ("random", "lckv", "groups", "study")
SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@st.composite
def layer_types(draw, n_layer: int, family: str):
    """A valid layer_types string of the given family for n_layer layers."""
    if family == "lckv":
        w = draw(st.sampled_from([w for w in range(0, n_layer + 1, 2)]))
        return make_layer_types("lckv", n_layer, warmup=w)
    if family == "cla":
        return make_layer_types("cla", n_layer, group=draw(st.integers(1, 3)))
    if family == "yoco":
        return make_layer_types("yoco", max(n_layer, 2))
    if family == "standard":
        return make_layer_types("standard", n_layer)
    if family == "study":
        kind = draw(st.sampled_from([f"{p}-{t}" for p in ("pizza", "sandwich", "lasagna")
                                     for t in ("bottom", "middle", "top")]))
        top = n_layer // 2 if kind.startswith("lasagna") else n_layer - 1
        if top < 1:
            return make_layer_types("lckv", n_layer, warmup=0)
        k = draw(st.integers(1, top))
        try:
            return make_layer_types(kind, n_layer, n_kv_layers=k)
        except ValueError:  # a middle that is the top (blocks of two) is asked for as the top
            return make_layer_types(kind.replace("middle", "top"), n_layer, n_kv_layers=k)
    if family == "gemma":
        # Gemma 3n / 4: sliding layers, every period-th full, the last n_shared layers reading
        # the last layer of their type below them; as many shared as the types allow
        period = draw(st.sampled_from([2, 5, 3, 1]))
        n_shared = n_layer - 1 - draw(st.integers(0, n_layer - 1))
        while True:
            try:
                return gemma_layers(n_layer, n_shared, period)
            except ValueError:  # a shared layer's type has no layer below the shared ones
                n_shared -= 1
    if family == "groups":
        if n_layer < 4:
            return make_layer_types("lckv", n_layer, warmup=0)
        k = draw(st.integers(2, n_layer // 2))
        # lasagna-middle has a group only where a block holds 3 layers or more
        kind = "lasagna-middle" if n_layer // k >= 3 and draw(st.booleans()) else "lasagna-top"
        return make_layer_types(kind, n_layer, n_kv_layers=k)
    # random: any set of KV-computing layers; one layer r reads a layer s above it, every other
    # non-KV layer reads one of them (above it when it can, mostly), some windowed
    computes = draw(st.lists(st.booleans(), min_size=n_layer, max_size=n_layer))
    forced = {}
    if n_layer >= 2:
        s = draw(st.integers(1, n_layer - 1))
        r = draw(st.integers(0, s - 1))
        computes[s], computes[r], forced[r] = True, False, s
    elif not any(computes):
        computes[0] = True
    kv = [i for i, c in enumerate(computes) if c]
    parts = []
    for i, c in enumerate(computes):
        above = [j for j in kv if j > i]
        pool = kv if not above or draw(st.integers(0, 3)) == 3 else above
        src = i if c else forced.get(i, draw(st.sampled_from(pool)))
        parts.append(f"{src}{'s' if draw(st.integers(0, 3)) == 3 else ''}")
    return "_".join(parts)


@st.composite
def configs(draw, families=FAMILIES, max_layers: int = 6, min_layers: int = 1, **overrides):
    family = draw(st.sampled_from(families))
    lo = max(min_layers, 2 if family == "yoco" else 1)
    n_layer = max_layers - draw(st.integers(0, max_layers - lo))  # hypothesis favours deep here
    n_kv_head = draw(st.sampled_from([1, 2]))
    n_head = n_kv_head * draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([2, 4, 8]))
    fields = dict(vocab_size=draw(st.integers(5, 40)), n_layer=n_layer, n_head=n_head,
                  n_kv_head=n_kv_head, n_embd=n_head * head_dim,
                  intermediate_size=draw(st.integers(4, 24)), block_size=16,
                  layer_types=draw(layer_types(n_layer, family)),
                  sliding_window=draw(st.integers(1, 4)),
                  tie_embeddings=draw(st.booleans()))
    fields.update(overrides)
    return LCKVConfig(**fields)


# A short play that the training tests write to a file and train on (character tokens).
PLAY = "".join(f"{name}:\nThou art {word}, and I am {other}; {word} be the {other} of night.\n\n"
               for name, word, other in [("ROMEO", "fair", "moon"), ("JULIET", "sweet", "star"),
                                         ("NURSE", "old", "sun"), ("TYBALT", "proud", "sword")]
               ) * 40


@pytest.fixture
def play(tmp_path):
    path = tmp_path / "play.txt"
    path.write_text(PLAY)
    return path


def random_model(config: LCKVConfig, seed: int, std: float = 0.3) -> LCKVModel:
    """A float64 model with every parameter (norms included) drawn at a scale where each layer
    visibly changes the result: small init would let a wrong mask hide under the tolerance."""
    torch.manual_seed(seed)
    model = LCKVModel(config).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, std)
    return model.eval()


def random_tokens(config: LCKVConfig, batch: int, T: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, T), generator=g)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture
def shared_data():
    path = os.path.abspath(SHARED)
    if not os.path.isdir(path):
        pytest.skip("../shared/data is not present")
    return path


def naive_parallel(model: LCKVModel, x: torch.Tensor, m: int, b: int):
    """An independent, plain implementation of the per-group plan (arXiv 2410.14442's reading
    of Sec. 2.2): layers outside groups once; each group m passes without gradient then b with,
    every layer in full every pass, from zero KVs; group k's input is group k-1's output."""
    c = model.config
    cos, sin = model.rope(0, x.size(1), x.dtype, x.device)
    kv, layer = PassKVs(), model.model.layers
    i = 0
    while i < c.n_layer:
        group = next((g for g in c.iteration_groups if g[0] == i), None)
        if group is None:
            x = layer[i](x, cos, sin, kv, 0)
            i += 1
            continue
        lo, hi = group
        for j in range(lo, hi + 1):
            if c.kv_sources[j] == j:
                zeros = x.new_zeros(x.size(0), c.n_kv_head, x.size(1), c.head_dim)
                kv.write(j, zeros, zeros)
        for p in range(m + b):
            with torch.set_grad_enabled(torch.is_grad_enabled() and p >= m):
                h = x
                for j in range(lo, hi + 1):
                    h = layer[j](h, cos, sin, kv, 0)
        x, i = h, hi + 1
    return x, kv


# What the property tests draw, recorded as they run, so tests/test_zz_coverage.py can check that
# the examples (CI's derandomised set included) reach the cases the claims are about.
DRAWN = defaultdict(list)


def record(test: str, config: LCKVConfig, T: int, passes: int | None = None, **extra) -> None:
    DRAWN[test].append(dict(
        reads_above=any(s > i for i, s in enumerate(config.kv_sources)),
        groups=len(config.iteration_groups), gqa=config.n_head != config.n_kv_head, T=T,
        passes=passes, **extra))


def pytest_collection_finish(session):
    """Start the notebooks in the background as soon as we know they will be needed."""
    if any(getattr(item, "originalname", None) == "test_notebook_runs" for item in session.items):
        notebook_runner.start()


def pytest_sessionfinish(session):
    notebook_runner.stop()
