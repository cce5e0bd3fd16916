"""The package against independent references (tests/reference.py): what both the sequential and
the parallel path share - a layer's window, RoPE, the layout string, the iteration groups - is
checked here against code that computes it another way."""

import pytest
import torch
from conftest import configs, random_model, random_tokens, record
from hypothesis import example, given, settings
from hypothesis import strategies as st
from reference import brute_force_groups, every_layer_types, parse, reference_logits

from lckv_mini.config import LCKVConfig, gemma_layers, iteration_groups, make_layer_types
from lckv_mini.model import LCKVModel


def small(layer_types, n_layer=6, **kw):
    fields = dict(vocab_size=19, n_layer=n_layer, n_head=4, n_kv_head=2, n_embd=16,
                  intermediate_size=12, block_size=16, layer_types=layer_types, sliding_window=3)
    return LCKVConfig(**{**fields, **kw})


def reference_batch(model, idx):
    return torch.stack([reference_logits(model, row.tolist()) for row in idx])


def windows_that_matter(config, T):
    """Does some layer's own window flag differ from its source's, with T beyond the window? Only
    then does reading the window from the wrong layer change anything."""
    sources, windowed = parse(config.layer_types)
    return T > config.sliding_window and any(windowed[i] != windowed[s]
                                             for i, s in enumerate(sources))


# T counted down from 12: the window (1-4) and the reads from above bite on long sequences
@settings(max_examples=40)
@given(config=configs(), T=st.integers(0, 10).map(lambda k: 12 - k), seed=st.integers(0, 2**16))
@example(config=small(make_layer_types("yoco", 6)), T=8, seed=0)  # readers of a windowed layer
@example(config=small("0s_3_3s_3_4_5s"), T=9, seed=1)  # windowed readers of an unwindowed layer
@example(config=small(make_layer_types("lckv", 6, warmup=2), n_kv_head=1), T=10, seed=2)
@example(config=small("2_4_2_5_4_5"), T=7, seed=3)  # a chain of reads from above: one group
@example(config=small("1_1_3_3_5_5", tie_embeddings=True), T=6, seed=4)  # three groups
def test_the_model_equals_the_independent_reference(config, T, seed):
    record("reference", config, T, window=windows_that_matter(config, T))
    model = random_model(config, seed)
    idx = random_tokens(config, 2, T, seed)
    expected = reference_batch(model, idx)
    with torch.no_grad():
        sequential, _ = model(idx, mode="sequential")
        # Theorem 1: with m + b >= T passes the parallel computation is the sequential one
        parallel, _ = model(idx, forward_passes=T, backward_passes=1)
    torch.testing.assert_close(sequential, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(parallel, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("layer_types", [
    gemma_layers(6, 2, period=2),  # 0s_1_2s_3_2s_3: a shared sliding layer and a shared full one
    make_layer_types("gemma", 6),  # 0s_1s_2s_3s_4_3s
    gemma_layers(5, 3, period=1),  # every layer full: 0_1_1_1_1
])
def test_gemma_layouts_equal_the_independent_reference(layer_types):
    # the property test above draws the gemma family too; these fix the shapes it must cover
    config = small(layer_types, n_layer=len(layer_types.split("_")))
    model = random_model(config, 0)
    idx = random_tokens(config, 2, 9, 0)
    with torch.no_grad():
        sequential, _ = model(idx, mode="sequential")
        parallel, _ = model(idx)
    expected = reference_batch(model, idx)
    torch.testing.assert_close(sequential, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(parallel, expected, rtol=1e-9, atol=1e-9)


def test_a_model_used_in_float32_then_made_float64_is_exact():
    model = LCKVModel(small(make_layer_types("lckv", 6, warmup=2)))
    idx = random_tokens(model.config, 1, 12, 0)
    with torch.no_grad():
        model(idx)  # float32 use: RoPE tables are made for float32
        for p in model.parameters():
            p.normal_(0.0, 0.3)
        model.double()
        logits, _ = model(idx, mode="sequential")
    torch.testing.assert_close(logits, reference_batch(model, idx), rtol=1e-10, atol=1e-10)


def test_rope_tables_follow_the_device_and_dtype_asked_for():
    model = LCKVModel(small(None))
    model.rope(0, 4, torch.float32, "cpu")
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for device in ("cpu", "meta"):
            cos, sin = model.rope(0, 4, dtype, device)
            assert cos.dtype == sin.dtype == dtype
            assert cos.device.type == sin.device.type == device


# -- iteration groups ------------------------------------------------------------------------


@pytest.mark.parametrize("n_layer", range(1, 7))
def test_iteration_groups_equal_the_brute_force_rule_on_every_layout(n_layer):
    count = 0
    for layer_types in every_layer_types(n_layer):
        sources, _ = parse(layer_types)
        assert list(iteration_groups(sources)) == brute_force_groups(layer_types), layer_types
        assert list(LCKVConfig(n_layer=n_layer, n_head=1, n_kv_head=1, n_embd=2,
                               layer_types=layer_types).iteration_groups
                    ) == brute_force_groups(layer_types)
        count += 1
    assert count == {1: 1, 2: 3, 3: 10, 4: 41, 5: 196, 6: 1057}[n_layer]


def test_a_chain_of_reads_from_above_is_one_group():
    # 0 reads 2, 1 reads 4, 3 reads 5: each read reaches past the one before, so all six layers
    # must be iterated together (a scan that stops at the first target splits it wrongly).
    assert brute_force_groups("2_4_2_5_4_5") == [(0, 5)]
    assert iteration_groups(parse("2_4_2_5_4_5")[0]) == ((0, 5),)
    assert brute_force_groups("2_1_2_4_4") == [(0, 2), (3, 4)]  # layer 3 reads 4: a second group
    assert brute_force_groups("1_1_3_3") == [(0, 1), (2, 3)]  # touching groups stay apart
    assert brute_force_groups("2_3_2_3") == [(0, 3)]  # overlapping reads merge


# -- defaults pinned -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind, n_layer, layer_types", [
    ("standard", 4, "0_1_2_3"),
    ("lckv", 6, "0_4_4_4_4_5"),  # w = 2 by default: one standard layer at each end
    ("lckv", 2, "0_1"),
    ("cla", 5, "0_0_2_2_4"),  # groups of 2 by default
    ("yoco", 5, "0s_1s_1_1_1"),  # the bottom half (rounded down) is windowed
    ("pizza-bottom", 5, "0_1_1_1_1"),  # n_kv_layers = n_layer // 2 = 2 (rounded down)
    ("pizza-top", 7, "0_1_6_6_6_6_6"),  # 3 KV layers
    ("sandwich-top", 5, "0_4_4_4_4"),  # 1 standard layer: the bottom one
    ("sandwich-middle", 7, "0_3_3_3_3_3_6"),  # 3 KV layers: 2 standard, one at each end
    ("lasagna-bottom", 5, "0_0_0_3_3"),  # 2 blocks: the larger one at the bottom
    ("lasagna-top", 7, "2_2_2_4_4_6_6"),
    ("lasagna-middle", 7, "1_1_1_4_4_6_6"),  # blocks 0-2, 3-4, 5-6: a block of two reads its top
    ("gemma", 6, "0s_1s_2s_3s_4_3s"),  # layer 4 is full; 1 shared (2 would leave no full below)
])
def test_layout_builders_defaults(kind, n_layer, layer_types):
    assert make_layer_types(kind, n_layer) == layer_types


def test_the_default_lasagna_middle_of_an_even_depth_is_refused():
    # n_kv_layers = n_layer // 2: blocks of two, whose middle is the top
    with pytest.raises(ValueError, match="ask for lasagna-top"):
        make_layer_types("lasagna-middle", 6)
