"""Hold the model against Hugging Face's LlamaForCausalLM, a reference this project did not
write, and check the weight exchange (including the MLKV initialisation)."""

import pytest
import torch
from conftest import configs, random_model, random_tokens, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

from lckv_mini.config import LCKVConfig, make_layer_types
from lckv_mini.model import LCKVModel
from lckv_mini.pretrained import from_hf_state_dict, hf_state_dict

transformers = pytest.importorskip("transformers")


def hf_llama(config: LCKVConfig, state_dict):
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.n_embd,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head, num_key_value_heads=config.n_kv_head,
        max_position_embeddings=config.block_size, rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_embeddings, attention_bias=False, mlp_bias=False)
    hf_config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(hf_config).double().eval()
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model


@settings(max_examples=10)
@given(config=configs(families=("standard",), max_layers=3), T=st.integers(1, 12),
       seed=st.integers(0, 999))
def test_standard_config_matches_hf_llama(config, T, seed):
    model = random_model(config, seed)
    hf = hf_llama(config, hf_state_dict(model))
    idx = random_tokens(config, 2, T, seed)
    ours, _ = model(idx)
    with torch.no_grad():
        theirs = hf(idx).logits
    # HF computes RMSNorm and RoPE tables in float32 even for a float64 model, hence 1e-5; a
    # wrong mask, RoPE convention or norm placement is off by order one.
    assert rel_err(ours, theirs) <= 1e-5


@given(config=configs(max_layers=4), seed=st.integers(0, 999))
def test_hf_state_dict_round_trip(config, seed):
    model = random_model(config, seed)
    sd = hf_state_dict(model)
    kv_names = {n for n in sd if ".k_proj." in n or ".v_proj." in n}
    assert kv_names == {f"model.layers.{i}.self_attn.{p}_proj.weight"
                        for i in config.kv_layers for p in "kv"}
    # as transformers saves it: no lm_head.weight when the head is the embedding
    assert ("lm_head.weight" in sd) == (not config.tie_embeddings) and "model.norm.weight" in sd
    loaded = from_hf_state_dict(sd, config)
    idx = random_tokens(config, 1, 5, seed)
    assert torch.equal(loaded(idx)[0], model(idx)[0])


def test_mlkv_initialisation_averages_the_readers_kv_weights():
    std = LCKVConfig(vocab_size=13, n_layer=6, n_head=2, n_kv_head=1, n_embd=8,
                     intermediate_size=8, block_size=8)
    sd = hf_state_dict(random_model(std, 0))
    lckv = LCKVConfig(**{**std.to_dict(), "layer_types": make_layer_types("lckv", 6, warmup=2)})
    model = from_hf_state_dict(sd, lckv)  # layers 1..4 read layer 4
    for p in "kv":
        got = model.model.layers[4].self_attn.get_submodule(f"{p}_proj").weight
        want = torch.stack([sd[f"model.layers.{i}.self_attn.{p}_proj.weight"]
                            for i in range(1, 5)]).mean(0)
        torch.testing.assert_close(got, want)
        w0 = model.model.layers[0].self_attn.get_submodule(f"{p}_proj").weight
        assert torch.equal(w0, sd[f"model.layers.0.self_attn.{p}_proj.weight"])
    assert not hasattr(model.model.layers[2].self_attn, "k_proj")


def test_mismatched_state_dict_raises_clear_error():
    config = LCKVConfig(vocab_size=13, n_layer=2, n_head=2, n_kv_head=1, n_embd=8,
                        intermediate_size=8, block_size=8)
    sd = hf_state_dict(LCKVModel(config))
    bigger = LCKVConfig(**{**config.to_dict(), "intermediate_size": 12})
    with pytest.raises(ValueError, match="mlp.gate_proj.weight: shape"):
        from_hf_state_dict(sd, bigger)
    deeper = LCKVConfig(**{**config.to_dict(), "n_layer": 3, "layer_types": None})
    with pytest.raises(KeyError, match="no k_proj weights for layer 2"):
        from_hf_state_dict(sd, deeper)
    sd.pop("model.norm.weight")
    with pytest.raises(KeyError, match="missing \\['model.norm.weight'\\]"):
        from_hf_state_dict(sd, config)
