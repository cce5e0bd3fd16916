"""Theorem 1 and its consequences: the parallel computation equals the sequential one."""

import pytest
import torch
from conftest import configs, random_model, random_tokens, record, rel_err
from hypothesis import example, given
from hypothesis import strategies as st

from lckv_mini.config import LCKVConfig, make_layer_types
from lckv_mini.convergence import kv_convergence, kv_passes, prefix_exactness

seeds = st.integers(0, 2**16)


def small(layer_types, n_layer=4):
    return LCKVConfig(vocab_size=17, n_layer=n_layer, n_head=2, n_kv_head=1, n_embd=8,
                      intermediate_size=12, block_size=16, layer_types=layer_types,
                      sliding_window=3)


def grads(model):
    # A parameter the loss never reached (a query that saw no key) has no .grad: count it as 0.
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
            for n, p in model.named_parameters()}


def loss_and_grads(model, idx, targets, **kw):
    model.zero_grad(set_to_none=True)
    _, loss = model(idx, targets, **kw)
    loss.backward()
    return loss.detach(), grads(model)


# T counted down from 7: hypothesis favours small draws, and the claims bite on long sequences
@given(config=configs(), T=st.integers(0, 6).map(lambda k: 7 - k), B=st.integers(1, 2),
       m=st.integers(0, 2), seed=seeds)
@example(config=small(make_layer_types("lckv", 4, warmup=0)), T=7, B=2, m=0, seed=0)
@example(config=small(make_layer_types("lckv", 6, warmup=2), n_layer=6), T=7, B=1, m=2, seed=1)
@example(config=small("2_2_2_5_5_5", n_layer=6), T=6, B=2, m=1, seed=2)  # two groups
@example(config=small("1_1_3_3_5_5", n_layer=6), T=5, B=1, m=0, seed=3)  # three groups
def test_theorem1_gradients_equal_when_every_pass_has_gradient(config, T, B, m, seed):
    record("theorem1", config, T, m + T)
    # Theorem 1: with b >= T the parallel graph contains the whole sequential graph.
    model = random_model(config, seed)
    idx = random_tokens(config, B, T + 1, seed)
    x, y = idx[:, :-1], idx[:, 1:]
    seq_loss, seq_grads = loss_and_grads(model, x, y, mode="sequential")
    par_loss, par_grads = loss_and_grads(model, x, y, forward_passes=m, backward_passes=T)
    assert rel_err(par_loss, seq_loss) <= 1e-10
    assert seq_grads.keys() == par_grads.keys()
    # A gradient that is zero in exact arithmetic (e.g. repeated tokens) is rounding noise on
    # both sides, so relative errors are taken against at least 1e-3 of the whole gradient.
    floor = 1e-3 * torch.stack([g.norm() for g in seq_grads.values()]).norm()
    for name, g in seq_grads.items():
        assert (par_grads[name] - g).norm() <= 1e-10 * torch.maximum(g.norm(), floor), name


@given(config=configs(), T=st.integers(1, 8), seed=seeds, data=st.data())
def test_logits_equal_when_passes_cover_the_sequence(config, T, seed, data):
    b = data.draw(st.integers(1, T), label="b")
    m = data.draw(st.integers(max(0, T - b), T - b + 2), label="m")
    record("logits", config, T, m + b)
    model = random_model(config, seed)
    idx = random_tokens(config, 2, T, seed)
    seq, _ = model(idx, mode="sequential")
    par, _ = model(idx, forward_passes=m, backward_passes=b)
    assert rel_err(par, seq) <= 1e-10


@given(config=configs(families=("lckv", "random")), T=st.integers(1, 8), seed=seeds)
def test_prefix_exactness_after_k_passes(config, T, seed):
    model = random_model(config, seed)
    idx = random_tokens(config, 2, T, seed)
    counts = prefix_exactness(model, idx, T) if config.iteration_groups else [T] * T
    for k, exact in enumerate(counts, start=1):
        assert exact >= k  # after k passes the first k tokens are exact
    assert counts[-1] == T


@given(config=configs(families=("lckv", "random")), T=st.integers(1, 8), seed=seeds)
def test_kv_convergence_reaches_zero_by_pass_T(config, T, seed):
    if not config.iteration_groups:
        return
    model = random_model(config, seed)
    mse = kv_convergence(model, random_tokens(config, 2, T, seed), T + 2)
    assert len(mse) == T + 2
    assert all(v <= 1e-20 for v in mse[T:])


@given(config=configs(), T=st.integers(2, 8), seed=seeds, data=st.data())
def test_causality(config, T, seed, data):
    t = data.draw(st.integers(0, T - 2), label="t")
    mode = data.draw(st.sampled_from(["parallel", "sequential"]), label="mode")
    m, b = data.draw(st.integers(0, 3), label="m"), data.draw(st.integers(1, 3), label="b")
    model = random_model(config, seed)
    idx = random_tokens(config, 2, T, seed)
    changed = idx.clone()
    changed[:, t + 1:] = (changed[:, t + 1:] + 1) % config.vocab_size
    kw = dict(mode=mode, forward_passes=m, backward_passes=b)
    before, _ = model(idx, **kw)
    after, _ = model(changed, **kw)
    assert torch.equal(before[:, :t + 1], after[:, :t + 1])


# The checks above must be able to fail: one pass too few, or gradient cut one pass too early,
# gives a visible difference on every layout that reads from above.
UPWARD = [make_layer_types("lckv", 4, warmup=0), make_layer_types("lckv", 4, warmup=2),
          "1_1_3_3", "3_1_1_3s"]


@pytest.mark.parametrize("layer_types", UPWARD)
def test_one_pass_too_few_changes_the_logits(layer_types):
    config = small(layer_types)
    model, T = random_model(config, 0), 6
    idx = random_tokens(config, 2, T, 0)
    seq, _ = model(idx, mode="sequential")
    par, _ = model(idx, forward_passes=T - 2, backward_passes=1)
    assert (par[:, -1] - seq[:, -1]).abs().max() > 1e-6
    assert torch.allclose(par[:, :-1], seq[:, :-1], rtol=0, atol=1e-12)  # the rest is exact
    assert prefix_exactness(model, idx, T) == list(range(1, T + 1))
    assert kv_convergence(model, idx, T)[T - 1] > 1e-12


@pytest.mark.parametrize("layer_types", UPWARD)
def test_gradient_stopped_one_pass_too_early_changes_the_gradient(layer_types):
    config = small(layer_types)
    model, T = random_model(config, 1), 6
    idx = random_tokens(config, 2, T + 1, 1)
    x, y = idx[:, :-1], idx[:, 1:]
    _, seq = loss_and_grads(model, x, y, mode="sequential")
    _, par = loss_and_grads(model, x, y, forward_passes=1, backward_passes=T - 1)
    assert max(rel_err(par[n], seq[n]) for n in seq) > 1e-6


def test_kv_passes_leaves_the_callers_gradient_mode_alone():
    config = small(UPWARD[1])
    model, idx = random_model(config, 0), random_tokens(config, 1, 4, 0)
    for kv in kv_passes(model, idx, 3):
        assert torch.is_grad_enabled()  # between passes the caller still has gradients
        assert not any(t.requires_grad for pair in kv.values() for t in pair)
