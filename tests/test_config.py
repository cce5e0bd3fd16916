"""Layer layouts and the clear errors for bad configurations."""

import dataclasses
import re

import pytest

from lckv_mini.config import LCKVConfig, can_serve_downward, gemma_layers, make_layer_types
from lckv_mini.model import LCKVModel

BASE = dict(vocab_size=10, n_layer=4, n_head=2, n_kv_head=1, n_embd=8, intermediate_size=8,
            block_size=8)


def test_layout_builders():
    assert make_layer_types("standard", 4) == "0_1_2_3"
    assert make_layer_types("lckv", 8, warmup=2) == "0_6_6_6_6_6_6_7"  # the paper's sandwich
    assert make_layer_types("lckv", 8, warmup=0) == "7_7_7_7_7_7_7_7"
    assert make_layer_types("lckv", 8, warmup=4) == "0_1_5_5_5_5_6_7"
    assert make_layer_types("lckv", 4, warmup=4) == "0_1_2_3"
    assert make_layer_types("cla", 5, group=2) == "0_0_2_2_4"
    assert make_layer_types("yoco", 6) == "0s_1s_2s_2_2_2"


def test_layer_types_forms_and_derived_fields():
    a = LCKVConfig(**BASE, layer_types="0_3_3_3s", sliding_window=2)
    b = LCKVConfig(**BASE, layer_types=[0, 3, 3, "3s"], sliding_window=2)
    assert a.layer_types == b.layer_types == "0_3_3_3s"
    assert a.kv_sources == (0, 3, 3, 3)
    assert a.sliding_layers == (False, False, False, True)
    assert a.kv_layers == (0, 3)
    assert a.iteration_groups == ((1, 3),)
    assert LCKVConfig(**BASE).layer_types == "0_1_2_3"
    assert LCKVConfig(**BASE).iteration_groups == ()
    assert LCKVConfig(**a.to_dict()) == a  # derived fields are not arguments


def test_config_is_frozen():
    config = LCKVConfig(**BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.forward_passes = 3


@pytest.mark.parametrize("layer_types, groups", [
    ("0_1_2_3_4_5", ()),
    ("5_5_5_5_5_5", ((0, 5),)),
    ("0_4_4_4_4_5", ((1, 4),)),
    ("1_1_3_3_5_5", ((0, 1), (2, 3), (4, 5))),  # lasagna-top: three groups
    ("2_2_2_5_5_5", ((0, 2), (3, 5))),
    ("0_2_2_4_4_5", ((1, 2), (3, 4))),
    ("0_3_0_3_5_5", ((1, 3), (4, 5))),  # layer 2 reads below the group: still inside it
    ("0_3_5_3_5_5", ((1, 5),)),  # layer 2 reads beyond the top 3 that layer 1 set: one group
    ("1_1_1_3_3_5", ((0, 1),)),  # layers reading themselves or below open no group
])
def test_iteration_groups(layer_types, groups):
    assert LCKVConfig(**{**BASE, "n_layer": 6}, layer_types=layer_types).iteration_groups == groups


def test_study_families_match_the_official_examples():
    # arXiv 2410.14442 as the official README writes its examples (22 layers, github.com/whyNLP/
    # LCKV, README "we also support this"): a middle block of 20 layers reads its lower middle
    assert make_layer_types("sandwich-middle", 22, n_kv_layers=3) == "_".join(
        ["0"] + ["10"] * 20 + ["21"])
    # The authors' training times of the 110M (12-layer) models with 6 KV layers (whyNLP/LCKV
    # issue #10): lasagna-middle costs what lasagna-top costs (166,054 s against 174,526 s), not
    # what lasagna-bottom costs (55,141 s), so each block of two reads its top: the very layout
    # of lasagna-top, which the builder names instead of building it twice.
    with pytest.raises(ValueError, match="is the layout lasagna-top gives .*ask for lasagna-top"):
        make_layer_types("lasagna-middle", 12, n_kv_layers=6)
    assert make_layer_types("lasagna-top", 12, n_kv_layers=6) == "1_1_3_3_5_5_7_7_9_9_11_11"
    assert make_layer_types("sandwich-top", 22, n_kv_layers=3) == "_".join(
        ["0"] + ["20"] * 20 + ["21"])  # LCKV w=2
    assert make_layer_types("lasagna-bottom", 22, n_kv_layers=11) == make_layer_types(
        "cla", 22, group=2)
    for w in (0, 2, 4):  # LCKV is sandwich-top with w + 1 KV layers
        assert make_layer_types("sandwich-top", 8, n_kv_layers=w + 1) == make_layer_types(
            "lckv", 8, warmup=w)
    assert make_layer_types("pizza-bottom", 6, n_kv_layers=3) == "0_1_2_2_2_2"
    assert make_layer_types("pizza-top", 6, n_kv_layers=1) == "5_5_5_5_5_5"
    assert make_layer_types("sandwich-bottom", 6, n_kv_layers=3) == "0_1_1_1_1_5"
    assert make_layer_types("sandwich-middle", 7, n_kv_layers=2) == "0_3_3_3_3_3_3"
    assert make_layer_types("lasagna-top", 6, n_kv_layers=3) == "1_1_3_3_5_5"
    assert make_layer_types("lasagna-middle", 7, n_kv_layers=2) == "1_1_1_1_5_5_5"
    assert make_layer_types("lasagna-top", 7, n_kv_layers=2) == "3_3_3_3_6_6_6"


@pytest.mark.parametrize("kind, n_layer, k, top", [
    ("lasagna-middle", 4, 2, "1_1_3_3"),
    ("pizza-middle", 4, 3, "0_1_3_3"),  # the shared block holds layers 2 and 3
    ("sandwich-middle", 3, 2, "0_2_2"),
])
def test_a_middle_that_is_the_top_is_refused_by_name(kind, n_layer, k, top):
    partition = kind.split("-")[0]
    assert make_layer_types(f"{partition}-top", n_layer, n_kv_layers=k) == top
    with pytest.raises(ValueError, match=f"{kind} with {k} KV layers of {n_layer} is the layout "
                                         f"{partition}-top gives \\({top}\\)"):
        make_layer_types(kind, n_layer, n_kv_layers=k)


def test_the_middle_is_the_lower_middle_never_the_bottom():
    # blocks of 3, 2 and 2 (the larger at the bottom): 1 is the middle of 0..2; 3..4 and 5..6 hold
    # two layers each, whose middle is the top. The layout is neither lasagna-top nor -bottom.
    assert make_layer_types("lasagna-middle", 7, n_kv_layers=3) == "1_1_1_4_4_6_6"
    assert make_layer_types("lasagna-top", 7, n_kv_layers=3) == "2_2_2_4_4_6_6"
    assert make_layer_types("lasagna-bottom", 7, n_kv_layers=3) == "0_0_0_3_3_5_5"
    assert make_layer_types("lasagna-middle", 12, n_kv_layers=3) == "1_1_1_1_5_5_5_5_9_9_9_9"
    assert make_layer_types("pizza-middle", 12, n_kv_layers=6) == "0_1_2_3_4_8_8_8_8_8_8_8"


def test_gemma_layout_is_gemma_3n():
    # Gemma 3n E2B: 30 layers, 4 sliding : 1 full, the last 10 shared; in Hugging Face's
    # Gemma3n a shared sliding layer reads the layer 2 below the first shared one (18), a full one
    # the layer just below it (19), the last of each type before sharing starts
    layout = gemma_layers(30, 10, period=5)
    config = LCKVConfig(**{**BASE, "n_layer": 30}, layer_types=layout, sliding_window=512)
    assert config.kv_layers == tuple(range(20))
    assert config.sliding_layers == tuple((i + 1) % 5 != 0 for i in range(30))
    assert config.kv_sources[20:] == (18, 18, 18, 18, 19) * 2
    assert config.iteration_groups == ()
    assert make_layer_types("gemma", 30, n_kv_layers=20) == layout
    assert make_layer_types("gemma", 12) == "0s_1s_2s_3s_4_5s_6s_7s_7s_4_7s_7s"  # 4 of 12 shared
    assert make_layer_types("gemma", 6) == "0s_1s_2s_3s_4_3s"  # 2 would share the only full one
    assert gemma_layers(4, 2, period=2) == "0s_1_0s_1"
    assert gemma_layers(3, 0) == "0s_1s_2s"


@pytest.mark.parametrize("args, message", [
    ((5, 1), "shared layer 4 is full, but no layer below the 1 shared ones is"),
    ((6, 6), "n_shared must be in \\[0, n_layer - 1 = 5\\], got 6"),
    ((6, -1), "n_shared must be in"),
    ((6, 1, 0), "period must be >= 1"),
])
def test_bad_gemma_layout_raises(args, message):
    with pytest.raises(ValueError, match=message):
        gemma_layers(*args)


@pytest.mark.parametrize("layout, ok, layer, reason", [
    (make_layer_types("standard", 12), True, None, "every layer reads itself or a layer below"),
    (make_layer_types("cla", 12), True, None, ""),
    (make_layer_types("yoco", 12), True, None, ""),  # sliding target, full readers: one type
    (make_layer_types("gemma", 12), True, None, ""),
    (gemma_layers(30, 10), True, None, ""),
    (make_layer_types("lckv", 12), False, 1, "layer 1 reads layer 10, above it"),
    (make_layer_types("sandwich-top", 12), False, 3, "layer 3 reads layer 9, above it"),
    (make_layer_types("lasagna-top", 12), False, 0, "layer 0 reads layer 1, above it"),
    (make_layer_types("pizza-middle", 12), False, 5, "layer 5 reads layer 8, above it: layer "
     "8's KVs of a token are computed after layer 5 runs on it"),
    ("0s_0_0s_3", False, 2, "layer 2 \\(sliding attention\\) reads layer 0, which layer 1 "
     "\\(full attention\\) reads too"),
    ("0_1_1s_1_4", False, 3, "layer 3 \\(full attention\\) reads layer 1, which layer 2 "
     "\\(sliding"),  # the first reader sets the type; the target's own is not counted
])
def test_who_can_serve_downward_sharing(layout, ok, layer, reason):
    for spec in (layout, layout.split("_"), LCKVConfig(**{**BASE, "n_layer": len(layout.split(
            "_"))}, layer_types=layout, sliding_window=2)):
        verdict = can_serve_downward(spec)
        assert (verdict.ok, verdict.layer) == (ok, layer)
        assert re.search(reason, verdict.reason), verdict.reason


def test_mixattention_pattern_parses():
    mix = "0_1s_1s_3s_3s_3s_0_7s_7s_9s_9s_9s_12_13s_13s_15s_15s_15s_12_19s_19s_19s"
    config = LCKVConfig(**{**BASE, "n_layer": 22}, layer_types=mix, sliding_window=4)
    assert config.kv_layers == (0, 1, 3, 7, 9, 12, 13, 15, 19)
    assert config.iteration_groups == ()  # every layer reads itself or below


def test_reading_layers_have_no_kv_weights():
    model = LCKVModel(LCKVConfig(**BASE, layer_types="0_3_3_3"))
    names = {n for n, _ in model.named_parameters()}
    for i, has_kv in enumerate([True, False, False, True]):
        assert (f"model.layers.{i}.self_attn.k_proj.weight" in names) == has_kv
        assert (f"model.layers.{i}.self_attn.v_proj.weight" in names) == has_kv


@pytest.mark.parametrize("changes, message", [
    (dict(layer_types="0_1_2"), "describes 3 layers but n_layer=4"),
    (dict(layer_types="0_1_2_4"), "out of range"),
    (dict(layer_types="0_x_2_3"), "expected a layer index"),
    (dict(layer_types="0_1_2_-1"), "expected a layer index"),
    (dict(layer_types="0__2_3"), "expected a layer index"),
    (dict(layer_types="2_3_3_3"), "layer 2 computes no KVs"),
    (dict(layer_types="0_1_2_3s"), "sliding_window"),
    (dict(n_head=3, n_kv_head=1, n_embd=9), "even integer for RoPE"),
    (dict(head_dim=3), "even integer for RoPE"),
    (dict(n_head=3, n_kv_head=2, n_embd=12), "not divisible by n_kv_head"),
    (dict(n_embd=9), "not divisible by n_head"),
    (dict(n_layer=0), "n_layer must be a positive integer"),
    (dict(vocab_size=-1), "vocab_size must be a positive integer"),
    (dict(block_size=0), "block_size must be a positive integer"),
    (dict(forward_passes=-1), "forward_passes"),
    (dict(backward_passes=0), "backward_passes"),
    (dict(dropout=1.0), "dropout"),
])
def test_bad_config_raises_clear_error(changes, message):
    with pytest.raises(ValueError, match=message):
        LCKVConfig(**{**BASE, **changes})


@pytest.mark.parametrize("kind, kw, message", [
    ("lckv", dict(warmup=3), "must be even"),
    ("lckv", dict(warmup=6), "must be even and in"),
    ("cla", dict(group=0), "group size"),
    ("sandwich-top", dict(n_kv_layers=4), "n_kv_layers <= n_layer - 1 = 3"),
    ("pizza-middle", dict(n_kv_layers=0), "1 <= n_kv_layers"),
    ("lasagna-top", dict(n_kv_layers=3), "n_kv_layers <= n_layer // 2 = 2"),
    ("lasagna-up", {}, "unknown layer layout"),
    ("mla", {}, "unknown layer layout"),
])
def test_bad_layout_request_raises(kind, kw, message):
    with pytest.raises(ValueError, match=message):
        make_layer_types(kind, 4, **kw)


def test_bad_model_input_raises_clear_error():
    import torch
    model = LCKVModel(LCKVConfig(**BASE))
    with pytest.raises(ValueError, match="exceeds block_size=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="token id 10 is out of range for vocab_size=10"):
        model(torch.tensor([[1, 10]]))
    with pytest.raises(ValueError, match="token id -1 is out of range"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="shape \\(batch, time\\)"):
        model(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="mode must be"):
        model(torch.tensor([[1, 2]]), mode="fast")
