"""From a pretrained Llama to LCKV (lckv_mini.pretrained): local Hugging Face folders that
transformers itself writes are loaded without it and held against its logits; the conversion to
LCKV layouts, saving back, and continued training with --init-from."""

import json
import os
import sys

import pytest
import torch
from conftest import rel_err

from lckv_mini import data as D
from lckv_mini.checkpoint import load_checkpoint, load_model
from lckv_mini.config import make_layer_types
from lckv_mini.pretrained import (
    from_hf_config,
    from_pretrained,
    load_hf_state_dict,
    load_tokenizer,
    save_pretrained,
)
from lckv_mini.train import main, parse_args

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
tokenizers = pytest.importorskip("tokenizers")

TEXT = "".join(f"{name}:\nThou art {word}, and I am {other}; {word} be the {other} of night.\n\n"
               for name, word, other in [("ROMEO", "fair", "moon"), ("JULIET", "sweet", "star"),
                                         ("NURSE", "old", "sun"), ("TYBALT", "proud", "sword")]
               ) * 20
VOCAB = 300  # the tiny BPE below has fewer ids, as a real Llama's vocabulary is often padded


def llama_folder(path, *, tied=False, n_kv_head=2, theta=5e5, head_dim=None, n_layer=3,
                 shard=None, seed=0):
    """A random float64 LlamaForCausalLM saved by transformers itself. Weights are drawn at a
    scale where every layer visibly changes the logits (HF's 0.02 init leaves them near flat)."""
    kwargs = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24,
                  num_hidden_layers=n_layer, num_attention_heads=4, num_key_value_heads=n_kv_head,
                  max_position_embeddings=32, rms_norm_eps=1e-5, rope_theta=theta,
                  tie_word_embeddings=tied)
    if head_dim is not None:
        kwargs["head_dim"] = head_dim
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).double()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0.0, 0.3)
    hf.save_pretrained(path, safe_serialization=True,
                       **({"max_shard_size": shard} if shard else {}))
    return path


def hf_logits(folder, idx):
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager")
    with torch.no_grad():
        return hf.double().eval()(idx).logits


def tokens(T=9, seed=0):
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# Loading matches transformers


CASES = {  # tied, n_kv_head, rope theta, explicit head_dim
    "untied-gqa-theta5e5": dict(tied=False, n_kv_head=2, theta=5e5),
    "tied-mha-theta1e4": dict(tied=True, n_kv_head=4, theta=1e4),
    "untied-gqa-head_dim6": dict(tied=False, n_kv_head=1, theta=2e4, head_dim=6),
}


@pytest.mark.parametrize("case", CASES)
def test_from_pretrained_matches_transformers(tmp_path, case):
    folder = llama_folder(tmp_path, **CASES[case])
    model = from_pretrained(folder)
    assert model.config.head_dim == CASES[case].get("head_dim", 4)
    assert model.config.rope_theta == CASES[case]["theta"]
    assert not any(p.is_meta for p in model.parameters())
    idx = tokens()
    ours, _ = model(idx)
    assert ours.dtype == torch.float64
    # HF computes RMSNorm and RoPE tables in float32 even for a float64 model, hence 1e-5.
    assert rel_err(ours, hf_logits(folder, idx)) <= 1e-5


def test_sharded_folder_loads_as_the_single_file(tmp_path):
    single = llama_folder(tmp_path / "single", seed=1)
    sharded = llama_folder(tmp_path / "sharded", seed=1, shard="20KB")
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").is_file()
    assert not (sharded / "model.safetensors").exists()
    a, b = from_pretrained(sharded).state_dict(), from_pretrained(single).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_stale_single_file_beside_an_index_is_refused(tmp_path):
    folder = llama_folder(tmp_path, shard="20KB")
    llama_folder(tmp_path / "other")
    (tmp_path / "other" / "model.safetensors").rename(folder / "model.safetensors")
    with pytest.raises(ValueError, match="both model.safetensors and model.safetensors.index"):
        from_pretrained(folder)


def test_dtype_and_no_transformers_needed(tmp_path, monkeypatch):
    folder = llama_folder(tmp_path, tied=True)
    monkeypatch.setitem(sys.modules, "transformers", None)  # importing it would now fail
    model = from_pretrained(folder, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    stored = load_hf_state_dict(folder)
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight,
                       stored["model.layers.1.mlp.up_proj.weight"].to(torch.bfloat16))
    assert model(tokens())[0].dtype == torch.bfloat16


def test_missing_safetensors_package_says_how_to_install(tmp_path, monkeypatch):
    folder = llama_folder(tmp_path)
    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(ImportError, match=r"pip install \"lckv-mini\[pretrained\]\""):
        from_pretrained(folder)
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match=r"lckv-mini\[pretrained\]"):
        D.Tokenizer("hf", hf_json="{}")


# ----------------------------------------------------------------------------------------------
# config.json


BASE = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48,
        "vocab_size": 50, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5e5},
        "tie_word_embeddings": True, "head_dim": 16, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "rope_scaling": None}


def test_from_hf_config_reads_every_field(tmp_path):
    c = from_hf_config(BASE)
    assert (c.n_embd, c.n_layer, c.n_head, c.n_kv_head, c.intermediate_size, c.vocab_size,
            c.block_size, c.norm_eps, c.rope_theta, c.tie_embeddings, c.head_dim) == (
        32, 3, 4, 2, 48, 50, 64, 1e-5, 5e5, True, 16)
    old_style = {**BASE, "rope_parameters": None, "rope_theta": 2e5}
    assert from_hf_config(old_style).rope_theta == 2e5
    defaults = {k: v for k, v in BASE.items() if k not in (
        "num_key_value_heads", "head_dim", "rope_parameters", "tie_word_embeddings")}
    c = from_hf_config(defaults)
    assert (c.n_kv_head, c.head_dim, c.rope_theta, c.tie_embeddings) == (4, 8, 1e4, False)
    mistral = {**BASE, "model_type": "mistral", "sliding_window": None}
    assert from_hf_config(mistral).n_layer == 3
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    assert from_hf_config(tmp_path) == from_hf_config(tmp_path / "config.json") == from_hf_config(
        BASE)
    lckv = from_hf_config(BASE, "0_2_2", forward_passes=3)
    assert lckv.layer_types == "0_2_2" and lckv.forward_passes == 3


UNSUPPORTED = [
    ({"model_type": "gpt2"}, "model_type='gpt2'"),
    ({"model_type": None}, "model_type=None"),
    ({"model_type": "mistral", "sliding_window": 4096}, "sliding_window=4096"),
    ({"model_type": "mistral"}, "sliding_window=4096"),  # absent: MistralConfig's default
    ({"attention_bias": True}, "attention_bias=True"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling=.*'llama3'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling=.*'linear'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_parameters=.*'yarn'"),
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization_config"),
    ({"rope_theta": 1e4}, "rope_theta=10000.0 and rope_parameters.rope_theta=500000.0"),
    ({"hidden_size": None}, "lacks \\['hidden_size'\\]"),
]


@pytest.mark.parametrize("change,message", UNSUPPORTED, ids=[m for _, m in UNSUPPORTED])
def test_unrepresentable_config_is_refused_naming_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        from_hf_config({**BASE, **change})


# ----------------------------------------------------------------------------------------------
# Tied heads


def test_tied_folder_has_no_lm_head_and_the_head_is_the_embedding(tmp_path):
    folder = llama_folder(tmp_path, tied=True)
    assert "lm_head.weight" not in load_hf_state_dict(folder)  # as transformers writes it
    model = from_pretrained(folder)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert rel_err(model(tokens())[0], hf_logits(folder, tokens())) <= 1e-5


def test_a_stale_lm_head_is_ignored_when_tied(tmp_path):
    from safetensors.torch import save_file
    folder = llama_folder(tmp_path, tied=True)
    sd = load_hf_state_dict(folder)
    clean = from_pretrained(folder)(tokens())[0]
    sd["lm_head.weight"] = torch.randn_like(sd["model.embed_tokens.weight"])
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model = from_pretrained(folder)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, sd["model.embed_tokens.weight"])
    # not bit-equal: the same weights at other offsets in the file take other SIMD paths
    assert rel_err(model(tokens())[0], clean) <= 1e-12


# ----------------------------------------------------------------------------------------------
# Conversion to LCKV layouts (k/v averaging)


def test_lckv_conversion_averages_the_readers_kv_weights(tmp_path):
    folder = llama_folder(tmp_path, n_layer=6)
    stored = load_hf_state_dict(folder)
    layout = make_layer_types("lckv", 6, warmup=2)  # 0_4_4_4_4_5: layers 1..4 read layer 4
    mean = from_pretrained(folder, layout)
    own = from_pretrained(folder, layout, kv_init="own")
    name = "model.layers.{}.self_attn.{}_proj.weight"
    for p in "kv":
        want = torch.stack([stored[name.format(i, p)] for i in range(1, 5)]).mean(0)
        torch.testing.assert_close(mean.state_dict()[name.format(4, p)], want, rtol=0, atol=1e-15)
        assert torch.equal(own.state_dict()[name.format(4, p)], stored[name.format(4, p)])
        for i in (0, 5):  # warmup layers keep their own
            assert torch.equal(mean.state_dict()[name.format(i, p)], stored[name.format(i, p)])
    assert not any(name.format(i, "k") in mean.state_dict() for i in (1, 2, 3))
    assert torch.equal(mean.model.layers[2].self_attn.q_proj.weight,
                       stored["model.layers.2.self_attn.q_proj.weight"])
    with pytest.raises(ValueError, match="kv_init='median'"):
        from_pretrained(folder, layout, kv_init="median")


def test_cla_conversion_averages_each_pair(tmp_path):
    folder = llama_folder(tmp_path, n_layer=4)
    stored = load_hf_state_dict(folder)
    model = from_pretrained(folder, make_layer_types("cla", 4, group=2))  # 0_0_2_2
    for j in (0, 2):
        got = model.model.layers[j].self_attn.v_proj.weight
        want = (stored[f"model.layers.{j}.self_attn.v_proj.weight"]
                + stored[f"model.layers.{j + 1}.self_attn.v_proj.weight"]) / 2
        torch.testing.assert_close(got, want, rtol=0, atol=1e-15)


# ----------------------------------------------------------------------------------------------
# Saving back


@pytest.mark.parametrize("tied", [False, True])
def test_save_pretrained_round_trips_into_transformers(tmp_path, tied):
    model = from_pretrained(llama_folder(tmp_path / "in", tied=tied, head_dim=6))
    save_pretrained(model, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json",
                                                                     "model.safetensors"]
    idx = tokens()
    ours = model(idx)[0]
    assert rel_err(ours, hf_logits(tmp_path / "out", idx)) <= 1e-5
    assert torch.equal(from_pretrained(tmp_path / "out")(idx)[0], ours)
    assert ("lm_head.weight" in load_hf_state_dict(tmp_path / "out")) == (not tied)


def test_save_pretrained_refuses_shared_layouts_and_writes_atomically(tmp_path, monkeypatch):
    folder = llama_folder(tmp_path / "in")
    with pytest.raises(ValueError, match="layer_types '0_2_2'.*not a standard Llama"):
        save_pretrained(from_pretrained(folder, "0_2_2"), tmp_path / "lckv")
    assert not (tmp_path / "lckv").exists()
    model = from_pretrained(folder)
    save_pretrained(model, tmp_path / "out")
    before = (tmp_path / "out" / "model.safetensors").read_bytes()

    def crash(fd):  # the weights' bytes are written, then the disk fails before they are safe
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json",
                                                                     "model.safetensors"]


# ----------------------------------------------------------------------------------------------
# Continued training: train.py --init-from


def bpe_tokenizer_json() -> str:
    """A tiny byte-level BPE, as Llama 3 and SmolLM use, trained on TEXT."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<s>"], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    return tok.to_str()


@pytest.fixture
def pretrained(tmp_path):
    """A Llama folder with its tokenizer.json, and a text file to continue training on."""
    folder = llama_folder(tmp_path / "llama", n_layer=4, tied=True)
    (folder / "tokenizer.json").write_text(bpe_tokenizer_json())
    (tmp_path / "text.txt").write_text(TEXT)
    return folder, tmp_path / "text.txt"


def test_hf_tokenizer_round_trips_through_checkpoint_dicts(pretrained):
    folder, _ = pretrained
    tok = load_tokenizer(folder)
    ids = tok.encode("ROMEO:\nThou art fair")
    assert tok.kind == "hf" and 256 < tok.vocab_size <= 280 and max(ids) < tok.vocab_size
    again = D.Tokenizer.from_dict(tok.to_dict())
    assert again.encode("ROMEO:\nThou art fair") == ids
    assert again.decode(ids) == "ROMEO:\nThou art fair"
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(folder.parent)


def init_from_args(folder, text, out, cache, *extra):
    return ["--init-from", str(folder), "--data", str(text), "--out-dir", str(out),
            "--cache-dir", str(cache), "--block-size", "16", "--batch-size", "2",
            "--eval-iters", "1", "--sample-tokens", "0", "--no-progress", "--device", "cpu",
            "--lr-preset", "continue", *extra]


def test_init_from_starts_at_the_converted_weights(pretrained, tmp_path):
    folder, text = pretrained
    main(init_from_args(folder, text, tmp_path / "out", tmp_path / "cache", "--max-iters", "0"))
    ckpt = load_checkpoint(tmp_path / "out" / "ckpt.pt")
    layout = make_layer_types("lckv", 4, warmup=2)
    assert ckpt["model_config"]["layer_types"] == layout == "0_2_2_3"
    assert ckpt["model_config"]["n_embd"] == 16 and ckpt["model_config"]["vocab_size"] == VOCAB
    assert ckpt["tokenizer"]["kind"] == "hf"
    want = from_pretrained(folder, layout, dtype=torch.float32).state_dict()
    assert ckpt["model"].keys() == want.keys()
    assert all(torch.equal(ckpt["model"][k], want[k]) for k in want)


def test_init_from_trains_and_resumes_exactly(pretrained, tmp_path):
    folder, text = pretrained
    run = lambda out, *extra: main(init_from_args(  # noqa: E731
        folder, text, tmp_path / out, tmp_path / "cache", "--eval-interval", "2", *extra))
    straight = run("a", "--max-iters", "4")
    run("b", "--max-iters", "2")
    resumed = run("b", "--max-iters", "4", "--resume")
    assert straight["step"] == resumed["step"] == 4
    wa = load_checkpoint(tmp_path / "a" / "ckpt.pt")["model"]
    wb = load_checkpoint(tmp_path / "b" / "ckpt.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    start = from_pretrained(folder, "0_2_2_3", dtype=torch.float32).state_dict()
    assert not torch.equal(wa["model.norm.weight"], start["model.norm.weight"])  # it trained
    model, tok, _ = load_model(tmp_path / "b" / "ckpt.pt")  # the checkpoint alone suffices
    assert tok.kind == "hf" and model.lm_head.weight is model.model.embed_tokens.weight


def test_lr_presets_and_explicit_values():
    cfg = parse_args(["--lr-preset", "continue"])
    assert (cfg.lr, cfg.min_lr, cfg.lr_warmup_iters) == (3e-5, 3e-6, 10)
    cfg = parse_args(["--lr-preset", "continue", "--lr", "1e-4", "--init-from", "x"])
    assert (cfg.lr, cfg.min_lr, cfg.init_from) == (1e-4, 3e-6, "x")
    cfg = parse_args(["--init-from", "x"])  # a pretrained start gets the gentle schedule
    assert (cfg.lr, cfg.min_lr, cfg.lr_warmup_iters) == (3e-5, 3e-6, 10)
    assert parse_args(["--init-from", "x", "--lr-preset", "scratch"]).lr == 2e-3
    assert parse_args([]).lr == 2e-3


def test_an_override_of_a_field_the_folder_sets_wins(tmp_path):
    folder = llama_folder(tmp_path / "llama")
    assert from_hf_config(folder).block_size != 16
    model = from_pretrained(folder, block_size=16, dropout=0.1)
    assert model.config.block_size == 16 and model.config.dropout == 0.1


def test_the_compiled_benchmark_sets_transformers_generate_beside_ours(tmp_path):
    """bench compiled --model: the same greedy tokens from transformers' generate and ours
    (eager and compiled; the tracing backend here, inductor in the benchmark)."""
    from lckv_mini.bench.compiled import bench_transformers

    res = bench_transformers(str(llama_folder(tmp_path)), "cpu", G=6, batches=(1, 2), reps=1,
                             backend="aot_eager")
    assert [r["batch"] for r in res["rows"]] == [1, 2]
    for r in res["rows"]:
        assert r["eager_same_tokens"] and r["compiled_same_tokens"]
        assert r["transformers_tokens_per_s"] > 0 and r["compiled_vs_transformers"] > 0
