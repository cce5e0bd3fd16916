"""The training loop, sampling and the data pipeline against hand computations: what the trainer
logs and saves is recomputed here by a plain loop, so a bug that only moves numbers around
(evaluating the wrong split, clipping after the step, decaying the norm gains) shows."""

import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_model
from test_pretrained import TEXT, bpe_tokenizer_json, init_from_args, llama_folder
from test_train import smoke, steps

from lckv_mini import data as D
from lckv_mini.checkpoint import load_checkpoint, load_model, save_checkpoint
from lckv_mini.config import LCKVConfig, make_layer_types
from lckv_mini.convergence import kv_convergence, kv_passes, prefix_exactness
from lckv_mini.generate import GREEDY, KVCache, encode_prompt, generate
from lckv_mini.model import LCKVModel
from lckv_mini.sample import main as sample_main
from lckv_mini.sample import sample_text
from lckv_mini.train import TrainConfig, estimate_loss, lr_at, main, model_config, train


def hand_split(text: str, tokenizer):
    ids = np.asarray(tokenizer.encode(text))
    n = int(len(ids) * 0.9)  # the README's split: first 90% trains, last 10% validates
    return ids[:n], ids[n:]


def hand_loss(model, ids, cfg) -> float:
    """Mean loss over eval_iters batches drawn with the evaluation's own seed."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    losses = []
    with torch.no_grad():
        for _ in range(cfg.eval_iters):
            x, y = D.get_batch(ids, cfg.batch_size, cfg.block_size, g)
            logits, _ = model(x)
            losses.append(F.cross_entropy(logits.flatten(0, 1), y.flatten()).item())
    return float(np.mean(losses))


def test_the_trainer_takes_the_steps_a_hand_written_loop_takes(tmp_path, play):
    # grad_clip small enough to clip every step, weight decay large enough to show on any
    # parameter it touches
    cfg = smoke(tmp_path, play, max_iters=4, eval_interval=4, eval_iters=3, sample_tokens=0,
                grad_clip=0.05, weight_decay=0.5)
    train(cfg)
    saved = load_checkpoint(tmp_path / "out" / "ckpt.pt")
    text = play.read_text()
    tokenizer = D.Tokenizer.fit("char", text)
    train_ids, val_ids = hand_split(text, tokenizer)

    # The same model and batches, stepped by hand: AdamW with decay on the matrices only (the
    # norm gains are 1-D), the gradient clipped to grad_clip *before* the step.
    torch.manual_seed(cfg.seed)
    model = LCKVModel(model_config(cfg, tokenizer.vocab_size))
    params = dict(model.named_parameters())
    matrices = [p for p in params.values() if p.dim() == 2]
    gains = [p for n, p in params.items() if n.endswith("norm.weight")]
    assert len(matrices) + len(gains) == len(params) and gains
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": cfg.weight_decay},
                             {"params": gains, "weight_decay": 0.0}], betas=(0.9, 0.95))
    data_gen = torch.Generator().manual_seed(cfg.seed)
    clipped = 0
    for step in range(cfg.max_iters):
        x, y = D.get_batch(train_ids, cfg.batch_size, cfg.block_size, data_gen)
        logits, _ = model(x)
        F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
        norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params.values()))
        clipped += norm > cfg.grad_clip
        for p in params.values():
            p.grad *= min(1.0, cfg.grad_clip / (norm.item() + 1e-6))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        opt.step()
        opt.zero_grad()
    assert clipped == cfg.max_iters
    for name, p in model.state_dict().items():
        torch.testing.assert_close(saved["model"][name], p, rtol=1e-5, atol=1e-7, msg=name)

    # What the log calls the validation loss is the loss on the last 10% of the text.
    model.eval()
    last = steps(tmp_path / "out")[-1]
    assert last["step"] == cfg.max_iters
    assert last["val_loss"] == pytest.approx(hand_loss(model, val_ids, cfg), rel=1e-5)
    assert last["eval_train_loss"] == pytest.approx(hand_loss(model, train_ids, cfg), rel=1e-5)
    # the two splits give losses far enough apart for the checks above to tell them apart
    assert last["val_loss"] != pytest.approx(last["eval_train_loss"], rel=1e-4)


def test_init_from_keeps_the_dropout_asked_for(tmp_path):
    folder = llama_folder(tmp_path / "llama", n_layer=4, tied=True)
    (folder / "tokenizer.json").write_text(bpe_tokenizer_json())
    (tmp_path / "text.txt").write_text(TEXT)
    main(init_from_args(folder, tmp_path / "text.txt", tmp_path / "out", tmp_path / "cache",
                        "--max-iters", "0", "--dropout", "0.25"))
    ckpt = load_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert ckpt["model_config"]["dropout"] == 0.25
    model, _, _ = load_model(tmp_path / "out" / "ckpt.pt")
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.25}


# -- every public call leaves the model's mode as it found it ----------------------------------


CHARS = "abcdefghijklmnopqrstuvwxyz .,\n"  # 30: the tiny model's vocabulary


def tiny_model():
    config = LCKVConfig(vocab_size=30, n_layer=4, n_head=2, n_kv_head=1, n_embd=16,
                        intermediate_size=24, block_size=32, dropout=0.1,
                        layer_types=make_layer_types("lckv", 4, warmup=2))
    return random_model(config, 0).float()


CALLS = {
    "generate": lambda m, idx: generate(m, idx, 4, sampling=GREEDY),
    "generate streaming": lambda m, idx: generate(m, idx, 4, sampling=GREEDY, sink_size=1,
                                                  window_size=4),
    "encode_prompt": lambda m, idx: encode_prompt(m, idx, KVCache(m.config, 1, 16)),
    "encode_prompt adaptive": lambda m, idx: encode_prompt(m, idx, KVCache(m.config, 1, 16),
                                                           mode="adaptive"),
    "sample_text": lambda m, idx: sample_text(m, D.Tokenizer("char", chars=CHARS), "abc",
                                              4),
    "kv_convergence": lambda m, idx: kv_convergence(m, idx, 3),
    "kv_passes": lambda m, idx: list(kv_passes(m, idx, 3)),
    "prefix_exactness": lambda m, idx: prefix_exactness(m, idx, 3),
    "estimate_loss": lambda m, idx: estimate_loss(
        m, {"val": np.arange(40) % 30}, smoke_config(), "cpu", torch.no_grad()),
}


def smoke_config():
    return TrainConfig(batch_size=2, block_size=8, eval_iters=1, seed=0)


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("training", [False, True])
def test_public_calls_leave_the_mode_as_they_found_it(call, training):
    model = tiny_model()
    model.train(training)
    CALLS[call](model, torch.tensor([[1, 2, 3, 4, 5]]))
    assert {m.training for m in model.modules()} == {training}


# -- sampling from the command line --------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path):
    """A random character model saved as the trainer saves it."""
    model = tiny_model()
    tok = D.Tokenizer("char", chars=CHARS)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"model": model.state_dict(), "model_config": model.config.to_dict(),
                           "tokenizer": tok.to_dict(), "step": 0})
    return path


def test_each_sample_draws_with_its_own_seed(checkpoint, capsys):
    args = ["--checkpoint", str(checkpoint), "--prompt", "ab", "--max-new-tokens", "20",
            "--temperature", "1.5", "--seed", "7", "--device", "cpu"]
    texts = sample_main([*args, "--num-samples", "3"])
    assert len(set(texts)) == 3  # not one seed for all
    assert sample_main(args) == texts[:1]  # the first sample is the single one with that seed


def test_top_p_reaches_the_sampler(checkpoint):
    args = ["--checkpoint", str(checkpoint), "--prompt", "ab", "--max-new-tokens", "20",
            "--temperature", "1.5", "--device", "cpu"]
    greedy = sample_main([*args, "--temperature", "0"])
    # a nucleus this small holds only the most likely token: sampling becomes greedy
    assert sample_main([*args, "--top-p", "1e-6"]) == greedy
    assert sample_main(args) != greedy  # and without it, this temperature does sample


def test_compile_reaches_the_decoder(checkpoint, monkeypatch):
    """`sample --compile` decodes through the compiled step (here the step torch.compile is
    given, uncompiled, counted: compiling itself is tested in test_compiled.py) and gives the
    eager text."""
    G = importlib.import_module("lckv_mini.generate")  # the module, not the function
    calls = []

    class Counted(G.CompiledDecoder):
        def __init__(self, backend):
            assert backend == "inductor"  # what --compile asks for
            super().__init__(None)

        def __call__(self, *args):
            calls.append(1)
            return super().__call__(*args)

    monkeypatch.setattr(G, "CompiledDecoder", Counted)
    args = ["--checkpoint", str(checkpoint), "--prompt", "ab", "--max-new-tokens", "12",
            "--temperature", "0", "--device", "cpu"]
    assert sample_main([*args, "--compile"]) == sample_main(args)
    assert len(calls) == 11  # every step after the prompt's


# -- the token cache -------------------------------------------------------------------------------


def test_an_edit_anywhere_in_the_text_gives_fresh_token_ids(tmp_path):
    text = "to be or not to be. " * 60000  # 1.2 MB: an edit past the first MiB
    tok = D.Tokenizer("char", chars="tobern.! ")
    first = np.array(D.tokenize_cached(text, tok, tmp_path))
    edited = text[:-2] + "!" + text[-1]
    second = np.array(D.tokenize_cached(edited, tok, tmp_path))
    assert tok.decode(second) == edited and not np.array_equal(first, second)


def test_ids_beyond_65535_survive_the_token_cache(tmp_path):
    class Wide(D.Tokenizer):  # a vocabulary as large as Llama 3's
        vocab_size = 128256

        def encode(self, text):
            return [65535, 65536, 128255, 7]

    ids = D.tokenize_cached("abcd", Wide("char", chars="abcd"), tmp_path)
    assert ids.tolist() == [65535, 65536, 128255, 7]


def test_an_explicit_cache_dir_wins_over_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(D.CACHE_ENV, str(tmp_path / "env"))
    assert D.cache_dir(tmp_path / "flag") == tmp_path / "flag"
    assert D.cache_dir() == tmp_path / "env"
    D.tokenize_cached("abc", D.Tokenizer("char", chars="abc"), tmp_path / "flag")
    assert (tmp_path / "flag" / "tokens").is_dir() and not (tmp_path / "env").exists()
