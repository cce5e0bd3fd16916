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
from conftest import PLAY

from lckv_mini import data as D
from lckv_mini.checkpoint import load_checkpoint, load_model, save_checkpoint
from lckv_mini.sample import main as sample_main
from lckv_mini.train import SMOKE, TrainConfig, lr_at, parse_args, train

ROOT = Path(__file__).resolve().parent.parent


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
    with open(tmp_path / "b" / "out" / "log.jsonl", "a") as f:  # logged, then a crash before
        f.write(json.dumps({"step": n // 2 + 1, "train_loss": 99.0}) + "\n")  # the next save
    train(smoke(tmp_path / "b", play, **common, resume=True))
    a, b = steps(tmp_path / "a" / "out"), steps(tmp_path / "b" / "out")
    loss = lambda log: [(r["step"], r["train_loss"]) for r in log if "train_loss" in r]  # noqa
    assert loss(a) == loss(b) and len(loss(a)) == n
    wa = load_checkpoint(tmp_path / "a" / "out" / "ckpt.pt")["model"]
    wb = load_checkpoint(tmp_path / "b" / "out" / "ckpt.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_two_ranks_match_one_rank_with_the_same_global_batch(tmp_path, play):
    def start(nproc, batch, out):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29500 + nproc), str(ROOT / "train_shakespeare.py"), "--smoke",
               "--data", str(play), "--tokenizer", "char", "--batch-size", str(batch),
               "--max-iters", "5", "--sample-tokens", "0", "--no-progress",
               "--out-dir", str(out), "--cache-dir", str(tmp_path / f"cache{nproc}")]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env)

    def result(proc, out):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        return steps(out), load_checkpoint(out / "ckpt.pt")["model"]

    # the two runs are independent: side by side, the test takes the time of the longer one
    one, two = start(1, 4, tmp_path / "one"), start(2, 2, tmp_path / "two")
    log1, w1 = result(one, tmp_path / "one")
    log2, w2 = result(two, tmp_path / "two")
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


# -- the parts of the loop ------------------------------------------------------------------


def test_learning_rate_schedule_end_points_and_shape():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, lr_warmup_iters=10, max_iters=200, lr_decay_iters=110)
    assert lr_at(0, cfg) == pytest.approx(1 / 11)  # warmup starts above zero
    assert lr_at(9, cfg) == pytest.approx(10 / 11)
    assert lr_at(10, cfg) == pytest.approx(1.0)  # the peak, right after warmup
    assert lr_at(60, cfg) == pytest.approx(0.55)  # cosine: half way down at half the horizon
    assert lr_at(110, cfg) == pytest.approx(0.1) and lr_at(199, cfg) == pytest.approx(0.1)
    rates = [lr_at(i, cfg) for i in range(200)]
    assert all(a < b for a, b in zip(rates[:10], rates[1:11]))  # rising during warmup
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))  # never rising after it
    assert lr_at(109, TrainConfig(lr=1.0, min_lr=0.1, lr_warmup_iters=10, max_iters=110)) > 0.1


def test_get_batch_targets_are_the_next_tokens():
    ids = np.arange(1000, dtype=np.uint16)
    x, y = D.get_batch(ids, 8, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)  # shifted by exactly one
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)  # contiguous windows
    assert len(set(x[:, 0].tolist())) > 1  # random starts


def failing_fsync(monkeypatch):
    def fsync(fd):
        raise OSError("disk full (planted)")
    monkeypatch.setattr(os, "fsync", fsync)


def test_a_write_that_fails_half_way_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"old")

    def write(f):
        f.write(b"new, but only half")
        raise OSError("interrupted (planted)")

    with pytest.raises(OSError, match="interrupted"):
        D.atomic_write(dest, write)
    assert dest.read_bytes() == b"old" and list(tmp_path.iterdir()) == [dest]
    failing_fsync(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        D.atomic_write_bytes(dest, b"new")
    assert dest.read_bytes() == b"old" and list(tmp_path.iterdir()) == [dest]


def test_checkpoint_and_token_cache_writes_are_atomic(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt.pt"
    state = {"model": {}, "model_config": {}, "tokenizer": {}, "step": 1}
    save_checkpoint(ckpt, state)
    before = ckpt.read_bytes()
    tok = D.Tokenizer.fit("char", PLAY)
    failing_fsync(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(ckpt, {**state, "step": 2})
    assert ckpt.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt.pt"]
    with pytest.raises(OSError, match="disk full"):
        D.tokenize_cached(PLAY, tok, tmp_path / "cache")
    assert list((tmp_path / "cache" / "tokens").iterdir()) == []  # nothing half-written


def test_a_corrupt_cached_download_is_fetched_again(tmp_path, play, monkeypatch):
    digest = D.sha256_of(play)
    dest = tmp_path / "dl" / "input.txt"
    dest.parent.mkdir()
    dest.write_text(PLAY[:100])  # a torn copy from an earlier run
    assert D.download(play.as_uri(), dest, digest) == dest and dest.read_text() == PLAY
    dest.write_text(PLAY[:100])
    failing_fsync(monkeypatch)  # and a fetch whose write fails keeps the old bytes, no temp
    with pytest.raises(OSError, match="disk full"):
        D.download(play.as_uri(), dest, digest)
    assert dest.read_text() == PLAY[:100] and list(dest.parent.iterdir()) == [dest]


def test_the_token_cache_is_keyed_by_the_tokenizer(tmp_path):
    text = "to be or not to be"
    a = D.Tokenizer.fit("char", text)
    b = D.Tokenizer("char", chars="z" + "".join(sorted(set(text))))
    ids_a = D.tokenize_cached(text, a, tmp_path)
    ids_b = D.tokenize_cached(text, b, tmp_path)
    assert a.decode(ids_a) == text and b.decode(ids_b) == text
    assert not np.array_equal(ids_a, ids_b)
    assert len(list((tmp_path / "tokens").iterdir())) == 2


def spy_on_clipping(monkeypatch):
    """Record the gradient norm before and after every clip_grad_norm_ call of the trainer."""
    seen = []
    real = torch.nn.utils.clip_grad_norm_

    def clip(parameters, max_norm, *args, **kw):
        parameters = list(parameters)
        before = real(parameters, float("inf"))
        out = real(parameters, max_norm, *args, **kw)
        after = torch.norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None]))
        seen.append((max_norm, before.item(), after.item()))
        return out

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    return seen


def test_gradients_are_clipped_every_step(tmp_path, play, monkeypatch):
    seen = spy_on_clipping(monkeypatch)
    train(smoke(tmp_path, play, max_iters=3, sample_tokens=0, grad_clip=0.01))
    assert len(seen) == 3
    for max_norm, before, after in seen:
        assert max_norm == 0.01 and before > 0.01 and after == pytest.approx(0.01, rel=1e-4)


def test_gradient_accumulation_equals_one_big_batch(tmp_path, play, monkeypatch):
    seen = spy_on_clipping(monkeypatch)
    common = dict(max_iters=3, sample_tokens=0, dropout=0.0, grad_clip=1e9)
    train(smoke(tmp_path / "big", play, batch_size=8, grad_accum=1, **common))
    big, seen[:] = list(seen), []
    train(smoke(tmp_path / "acc", play, batch_size=4, grad_accum=2, **common))
    # Same rows (two draws of 4 are one draw of 8), the same mean loss and the same gradient.
    for (_, a, _), (_, b, _) in zip(big, seen):
        assert b == pytest.approx(a, rel=1e-5)
    la = [r["train_loss"] for r in steps(tmp_path / "big" / "out") if "train_loss" in r]
    lb = [r["train_loss"] for r in steps(tmp_path / "acc" / "out") if "train_loss" in r]
    np.testing.assert_allclose(lb, la, rtol=1e-5)
    wa = load_checkpoint(tmp_path / "big" / "out" / "ckpt.pt")["model"]
    wb = load_checkpoint(tmp_path / "acc" / "out" / "ckpt.pt")["model"]
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6)


MIX = "0_1s_1s_3s_3s_3s_0_7s_7s_9s_9s_9s_12_13s_13s_15s_15s_15s_12_19s_19s_19s"


@pytest.mark.parametrize("flags, layer_types", [
    (["--layers-kind", "sandwich-middle", "--n-kv-layers", "3", "--n-layer", "6"], "0_2_2_2_2_5"),
    (["--layers-kind", "lasagna-top", "--n-kv-layers", "3", "--n-layer", "6"], "1_1_3_3_5_5"),
    (["--layers-kind", "pizza-bottom", "--n-layer", "4"], "0_1_1_1"),
    (["--layers-kind", MIX, "--n-layer", "22", "--sliding-window", "4"], MIX),  # MixAttention
])
def test_the_study_layouts_and_mixattention_train_from_the_command_line(tmp_path, play, flags,
                                                                         layer_types):
    summary = train(parse_args(["--smoke", "--data", str(play), "--tokenizer", "char",
                                "--max-iters", "3", "--sample-tokens", "5", "--no-progress",
                                "--out-dir", str(tmp_path / "out"),
                                "--cache-dir", str(tmp_path / "cache"), *flags]))
    assert np.isfinite(summary["val_loss"]) and summary["layer_types"] == layer_types
