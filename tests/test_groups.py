"""The per-group iteration plan, the passes without wasted work, float64 RoPE, activation
checkpointing, and the stop rule of adaptive prompt encoding."""

import math

import pytest
import torch
from conftest import (
    UPWARD_FAMILIES,
    configs,
    naive_parallel,
    random_model,
    random_tokens,
    record,
    rel_err,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lckv_mini.config import LCKVConfig, make_layer_types
from lckv_mini.convergence import kv_passes, max_kv_change
from lckv_mini.generate import KVCache, encode_prompt
from lckv_mini.model import LCKVModel, PassKVs

seeds = st.integers(0, 2**16)
MULTI = ("groups",)


def small(layer_types, n_layer=6, **kw):
    return LCKVConfig(vocab_size=23, n_layer=n_layer, n_head=2, n_kv_head=1, n_embd=8,
                      intermediate_size=12, block_size=16, layer_types=layer_types,
                      sliding_window=3, **kw)


def loss_and_grads(model, run):
    model.zero_grad(set_to_none=True)
    loss = run()
    loss.backward()
    # A parameter the loss reached only through exact zeros may have no .grad: count it as 0.
    return loss.detach(), {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                           for n, p in model.named_parameters()}


def parallel_loss(model, idx, m, b, plan=None):
    x, y = idx[:, :-1], idx[:, 1:]
    if plan is None:
        return model(x, y, forward_passes=m, backward_passes=b)[1]
    h, _ = plan(model, model.embed(x), m, b)
    return torch.nn.functional.cross_entropy(model.head(h).flatten(0, 1), y.flatten())


# -- Theorem 1 holds group by group ---------------------------------------------------------


@settings(max_examples=50)
@given(config=configs(families=MULTI, min_layers=4), T=st.integers(1, 6), m=st.integers(0, 1),
       seed=seeds)
@example(config=small("1_1_3_3_5_5"), T=5, m=0, seed=0)  # three groups
@example(config=small("2_2_2_5_5_5"), T=6, m=1, seed=1)  # two groups
@example(config=small("0_2_2_4_4_5"), T=4, m=0, seed=2)  # two groups between standard layers
def test_theorem1_on_several_groups_values_and_every_gradient(config, T, m, seed):
    assert len(config.iteration_groups) >= 2
    record("theorem1_groups", config, T, m + T)
    model = random_model(config, seed)
    idx = random_tokens(config, 2, T + 1, seed)
    seq_loss, seq = loss_and_grads(model, lambda: model(idx[:, :-1], idx[:, 1:],
                                                        mode="sequential")[1])
    par_loss, par = loss_and_grads(model, lambda: parallel_loss(model, idx, m, T))
    assert rel_err(par_loss, seq_loss) <= 1e-10
    floor = 1e-3 * torch.stack([g.norm() for g in seq.values()]).norm()
    for name, g in seq.items():
        assert (par[name] - g).norm() <= 1e-10 * torch.maximum(g.norm(), floor), name


@given(config=configs(families=UPWARD_FAMILIES), T=st.integers(3, 8), seed=seeds, data=st.data())
@example(config=small("1_1_3_3_5_5"), T=8, seed=0, data=None)
def test_parallel_equals_an_independent_per_group_plan_below_T_passes(config, T, seed, data):
    # m + b < T: not exact, so this checks the plan itself (which layers, which input, how many
    # passes), against the plain implementation in conftest.
    m, b = (3, 1) if data is None else (data.draw(st.integers(0, 3)), data.draw(st.integers(1, 2)))
    record("plan_below_T", config, T, m + b)
    model = random_model(config, seed)
    idx = random_tokens(config, 2, T, seed)
    with torch.no_grad():
        ours, _ = model.forward_parallel(model.embed(idx), m, b)
        ref, _ = naive_parallel(model, model.embed(idx), m, b)
    assert rel_err(ours, ref) <= 1e-12


def test_one_block_plan_differs_from_the_per_group_plan():
    # Iterating the span of all groups as one block (the old plan) gives other logits when
    # m + b < T: the per-group plan is a real choice, and the tests above would see a change.
    model = random_model(small("1_1_3_3_5_5"), 0)
    idx = random_tokens(model.config, 2, 8, 0)
    m, b = 3, 1
    with torch.no_grad():
        x = model.embed(idx)
        ours, _ = model.forward_parallel(x, m, b)
        kv = PassKVs()
        model.start_group(x, kv, (0, 5))
        for _ in range(m + b):
            h = model.run_layers(x, kv, range(6))
    assert rel_err(ours, h) > 1e-3


@pytest.mark.parametrize("layer_types", ["1_1_3_3_5_5", make_layer_types("lckv", 6, warmup=2),
                                         "5_5_5_5_5_5"])
def test_one_pass_gives_zero_attention_to_every_layer_reading_from_above(layer_types):
    # The iteration starts from zero KVs: after one pass, a layer reading from above has seen
    # nothing but zeros, so its attention output is exactly zero for every token.
    model = random_model(small(layer_types), 0)
    idx = random_tokens(model.config, 2, 7, 0)
    outputs = {}
    hooks = [model.model.layers[i].self_attn.register_forward_hook(
        lambda mod, args, out, i=i: outputs.setdefault(i, out))
        for i in range(6) if model.config.kv_sources[i] > i]
    with torch.no_grad():
        x = model.embed(idx)
        kv = PassKVs()
        for lo, hi in model.config.iteration_groups:  # a full first pass, nothing skipped
            model.start_group(x, kv, (lo, hi))
        model.run_layers(x, kv, range(6))
    for h in hooks:
        h.remove()
    assert outputs and all(torch.equal(o, torch.zeros_like(o)) for o in outputs.values())
    with torch.no_grad():  # and the package's first pass agrees with that full pass
        one, _ = model.forward_parallel(model.embed(idx), 0, 1)
        ref, _ = naive_parallel(model, model.embed(idx), 0, 1)
    assert torch.equal(one, ref)


# -- no wasted work: bit-identical ----------------------------------------------------------


@settings(max_examples=50)
@given(config=configs(families=UPWARD_FAMILIES), T=st.integers(1, 8), seed=seeds,
       m=st.integers(0, 3), b=st.integers(1, 3))
@example(config=small(make_layer_types("lckv", 6, warmup=2)), T=8, seed=0, m=7, b=2)
@example(config=small("1_1_3_3_5_5"), T=8, seed=0, m=2, b=2)
def test_skipping_the_wasted_work_is_bit_identical(config, T, seed, m, b):
    model = random_model(config, seed)
    idx = random_tokens(config, 2, T + 1, seed)
    loss, grads = loss_and_grads(model, lambda: parallel_loss(model, idx, m, b))
    ref_loss, ref = loss_and_grads(model, lambda: parallel_loss(model, idx, m, b, naive_parallel))
    assert torch.equal(loss, ref_loss)
    for name in ref:
        if m >= 1:  # the first pass has no gradient: the same operations in the same order
            assert torch.equal(grads[name], ref[name]), name
        else:  # with m = 0 the skipped zeros change which terms autograd sums in what order
            assert torch.allclose(grads[name], ref[name], rtol=1e-12, atol=1e-15), name


def test_the_top_layer_runs_only_its_kv_projections_before_the_last_pass():
    model = random_model(small(make_layer_types("lckv", 6, warmup=2)), 0)
    top = model.config.iteration_groups[0][1]
    calls = {"q": 0, "k": 0, "mlp": 0}
    layer = model.model.layers[top]
    layer.self_attn.q_proj.register_forward_hook(lambda *a: calls.__setitem__("q", calls["q"] + 1))
    layer.self_attn.k_proj.register_forward_hook(lambda *a: calls.__setitem__("k", calls["k"] + 1))
    layer.mlp.register_forward_hook(lambda *a: calls.__setitem__("mlp", calls["mlp"] + 1))
    with torch.no_grad():
        model(random_tokens(model.config, 1, 5, 0), forward_passes=7, backward_passes=2)
    assert calls == {"q": 1, "k": 9, "mlp": 1}


# -- float64 means float64 ------------------------------------------------------------------


def test_rope_tables_are_exact_in_float64_after_dtype_round_trips():
    config = small(None, rope_theta=50000.0)
    model = LCKVModel(config).float().double()
    cos, sin = model.rope(0, 16, torch.float64, "cpu")
    hs = config.head_dim
    for pos in (1, 7, 15):
        for i in range(hs // 2):
            angle = pos / 50000.0 ** (2 * i / hs)
            for col in (i, i + hs // 2):
                assert abs(cos[pos, col].item() - math.cos(angle)) <= 1e-15
                assert abs(sin[pos, col].item() - math.sin(angle)) <= 1e-15


def test_a_float64_model_computes_its_loss_in_float64():
    model = random_model(small(None), 0)
    idx = random_tokens(model.config, 2, 6, 0)
    logits, loss = model(idx[:, :-1], idx[:, 1:])
    assert loss.dtype == torch.float64
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
    assert torch.equal(loss, ref)


# -- activation checkpointing ---------------------------------------------------------------


@pytest.mark.parametrize("layer_types", [make_layer_types("lckv", 6, warmup=2), "1_1_3_3_5_5",
                                         "0_1s_1s_3s_3s_3s"])
def test_activation_checkpointing_gives_the_same_gradients(layer_types):
    model = random_model(small(layer_types), 0)
    idx = random_tokens(model.config, 2, 9, 0)
    loss, grads = loss_and_grads(model, lambda: parallel_loss(model, idx, 3, 2))
    model.activation_checkpointing = True
    ck_loss, ck = loss_and_grads(model, lambda: parallel_loss(model, idx, 3, 2))
    assert torch.equal(loss, ck_loss)
    for name in grads:
        assert torch.allclose(ck[name], grads[name], rtol=1e-12, atol=1e-15), name


# -- adaptive prompt encoding stops where the KV change first falls within tol ---------------


@settings(max_examples=30)
@given(config=configs(families=("lckv", "study"), forward_passes=9, block_size=24),
       P=st.integers(2, 10), tol=st.sampled_from([1e-2, 1e-4, 1e-8]), seed=seeds)
def test_adaptive_stops_at_the_first_pass_within_tol(config, P, tol, seed):
    if len(config.iteration_groups) != 1:
        return
    model = random_model(config, seed, std=0.1)
    idx = random_tokens(config, 1, P, seed)
    snaps = list(kv_passes(model, idx, 11))
    changes = [max_kv_change(a, b) for a, b in zip(snaps[1:], snaps[2:])]  # pass p+2 vs p+1
    expected = next((p + 2 for p, c in enumerate(changes) if c <= tol), 11)
    _, passes = encode_prompt(model, idx, KVCache(config, 1, P, dtype=torch.float64),
                              "adaptive", tol)
    assert passes == expected
