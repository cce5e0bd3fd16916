"""The training job: data, tokenizers, checkpoints, resume, multi-process, bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lckv_mini import data as D
from lckv_mini.checkpoint import load_checkpoint, load_model
from lckv_mini.sample import main as sample_main
from lckv_mini.train import SMOKE, TrainConfig, parse_args, train

ROOT = Path(__file__).resolve().parent.parent
PLAY = "".join(f"{name}:\nThou art {word}, and I am {other}; {word} be the {other} of night.\n\n"
               for name, word, other in [("ROMEO", "fair", "moon"), ("JULIET", "sweet", "star"),
                                         ("NURSE", "old", "sun"), ("TYBALT", "proud", "sword")]
               ) * 40


@pytest.fixture
def play(tmp_path):
    path = tmp_path / "play.txt"
    path.write_text(PLAY)
    return path


def smoke(tmp_path, data, **kw):
    values = {**SMOKE, "data": str(data), "tokenizer": "char", "out_dir": str(tmp_path / "out"),
              "cache_dir": str(tmp_path / "cache"), "progress": False, **kw}
    return TrainConfig(**values)


def steps(out_dir):
    return [json.loads(line) for line in open(Path(out_dir) / "log.jsonl")]


def test_smoke_run_learns_logs_saves_and_samples(tmp_path, play, capsys):
    cfg = smoke(tmp_path, play, max_iters=30, lr=1e-2)
    summary = train(cfg)
    log = steps(cfg.out_dir)
    evals = [r for r in log if "val_loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 30
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    assert summary["val_loss"] < summary["unigram_entropy"]
    train_steps = [r for r in log if "train_loss" in r]
    assert [r["step"] for r in train_steps] == list(range(1, 31))
    assert all({"lr", "tokens_per_s"} <= r.keys() for r in train_steps)
    assert summary["sample"].startswith("\n") and len(summary["sample"]) > 10
    model, tokenizer, ckpt = load_model(Path(cfg.out_dir) / "ckpt.pt")
    assert ckpt["step"] == 30 and tokenizer.kind == "char"
    assert model.config.layer_types == "0_2_2_3"
    texts = sample_main(["--checkpoint", str(Path(cfg.out_dir) / "ckpt.pt"), "--prompt", "ROMEO:",
                         "--max-new-tokens", "20", "--temperature", "0"])
    assert texts[0].startswith("ROMEO:") and texts[0] in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["standard", "cla", "yoco", "0_3_3_3"])
def test_other_layouts_and_sequential_mode_train(tmp_path, play, kind):
    summary = train(smoke(tmp_path, play, layers_kind=kind, max_iters=4, sample_tokens=5,
                          mode="sequential" if kind == "0_3_3_3" else "parallel", block_size=12))
    assert np.isfinite(summary["val_loss"])


def test_resume_gives_identical_losses(tmp_path, play):
    n = 12
    common = dict(max_iters=n, lr_decay_iters=n, eval_interval=n // 2, sample_tokens=0,
                  dropout=0.1)
    train(smoke(tmp_path / "a", play, **common))
    train(smoke(tmp_path / "b", play, **{**common, "max_iters": n // 2}))
    train(smoke(tmp_path / "b", play, **common, resume=True))
    a, b = steps(tmp_path / "a" / "out"), steps(tmp_path / "b" / "out")
    loss = lambda log: [(r["step"], r["train_loss"]) for r in log if "train_loss" in r]  # noqa
    assert loss(a) == loss(b) and len(loss(a)) == n
    wa = load_checkpoint(tmp_path / "a" / "out" / "ckpt.pt")["model"]
    wb = load_checkpoint(tmp_path / "b" / "out" / "ckpt.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_two_ranks_match_one_rank_with_the_same_global_batch(tmp_path, play):
    def run(nproc, batch, out):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29500 + nproc), str(ROOT / "train_shakespeare.py"), "--smoke",
               "--data", str(play), "--tokenizer", "char", "--batch-size", str(batch),
               "--max-iters", "5", "--sample-tokens", "0", "--no-progress",
               "--out-dir", str(out), "--cache-dir", str(tmp_path / "cache")]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return steps(out), load_checkpoint(out / "ckpt.pt")["model"]

    log1, w1 = run(1, 4, tmp_path / "one")
    log2, w2 = run(2, 2, tmp_path / "two")
    l1 = [r["train_loss"] for r in log1 if "train_loss" in r]
    l2 = [r["train_loss"] for r in log2 if "train_loss" in r]
    assert len(l1) == 5
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)


# -- data -----------------------------------------------------------------------------------


def test_download_is_atomic_and_checked(tmp_path, play):
    digest = D.sha256_of(play)
    dest = tmp_path / "dl" / "input.txt"
    assert D.download(play.as_uri(), dest, digest) == dest and dest.read_text() == PLAY
    other = tmp_path / "dl" / "other.txt"
    with pytest.raises(D.DataError, match="expected 0000"):
        D.download(play.as_uri(), other, "0000")
    assert not other.exists() and list(other.parent.glob("*.tmp")) == []
    with pytest.raises(D.DataError, match="--data PATH"):
        D.download((tmp_path / "nowhere.txt").as_uri(), other, digest)


def test_offline_without_a_cached_copy_says_how_to_supply_it(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "SHAKESPEARE_URL", (tmp_path / "unreachable.txt").as_uri())
    with pytest.raises(D.DataError, match="Offline.*tinyshakespeare.txt.*--data PATH"):
        D.shakespeare_path(tmp_path / "cache")


def test_shakespeare_from_the_cache_with_gpt2_compact_vocabulary(tmp_path, shared_data,
                                                                monkeypatch):
    tk = tmp_path / "tiktoken"
    tk.mkdir()
    shutil.copy(Path(shared_data) / "r50k_base.tiktoken",
                tk / "0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tk))
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(Path(shared_data) / "tinyshakespeare.txt", cache / "tinyshakespeare.txt")
    text = D.shakespeare_path(cache).read_text()  # found, hash checked, no network
    tok = D.Tokenizer.fit("gpt2", text)
    assert tok.vocab_size == 11706
    ids = D.tokenize_cached(text, tok, cache)
    assert len(ids) == 338025 and ids.max() < 11706
    again = D.tokenize_cached(text, tok, cache)  # second run: read from the memmap file
    assert np.array_equal(ids, again) and len(list((cache / "tokens").iterdir())) == 1
    assert tok.decode(ids[:12]) == text[:len(tok.decode(ids[:12]))]
    assert D.Tokenizer.from_dict(tok.to_dict()).encode("ROMEO:") == tok.encode("ROMEO:")
    train_ids, val_ids = D.split(ids)
    assert len(train_ids) == int(0.9 * len(ids)) and len(train_ids) + len(val_ids) == len(ids)


def test_char_tokenizer_round_trip():
    tok = D.Tokenizer.fit("char", PLAY)
    assert tok.decode(tok.encode("ROMEO:\nThou")) == "ROMEO:\nThou"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.encode("Zebra")


# -- bad input ------------------------------------------------------------------------------


def test_bad_input_gives_clear_errors_and_overwrites_nothing(tmp_path, play):
    with pytest.raises(D.DataError, match="does not exist"):
        train(smoke(tmp_path, tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(D.DataError, match="is empty"):
        train(smoke(tmp_path, empty))
    with pytest.raises(ValueError, match="unknown tokenizer"):
        train(smoke(tmp_path, play, tokenizer="bpe"))
    short = tmp_path / "short.txt"
    short.write_text("to be or not to be, that is the question " * 3)
    with pytest.raises(D.DataError, match="not more than block_size=32"):
        train(smoke(tmp_path, short))
    with pytest.raises(SystemExit):
        parse_args(["--tokenizer", "bpe"])

    cfg = smoke(tmp_path, play, max_iters=2, sample_tokens=0)
    train(cfg)
    ckpt = Path(cfg.out_dir) / "ckpt.pt"
    before = ckpt.read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg)
    with pytest.raises(ValueError, match="different model config \\(n_embd: checkpoint 32 vs "
                                         "requested 64"):
        train(smoke(tmp_path, play, max_iters=4, n_embd=64, resume=True))
    assert ckpt.read_bytes() == before
    ckpt.write_bytes(before[: len(before) // 2])  # a torn file
    with pytest.raises(ValueError, match="corrupt"):
        train(smoke(tmp_path, play, max_iters=4, resume=True))
    with pytest.raises(ValueError, match="corrupt"):
        load_model(ckpt)
    with pytest.raises(SystemExit, match="no checkpoint"):
        sample_main(["--checkpoint", str(tmp_path / "none.pt")])
