"""What cannot run on a CPU-only machine, or cannot be seen without a crash, tested through seams:
stubs and spies on the functions the code calls, so that a regression fails here anyway."""

import os
from pathlib import Path

import pytest
import torch
from test_pretrained import llama_folder

from lckv_mini import checkpoint as C
from lckv_mini import data as D
from lckv_mini.pretrained import from_pretrained, save_pretrained

# -- the CUDA (and MPS) random state travels with a checkpoint ----------------------------------


class FakeDevice:
    """Stands in for torch.cuda / torch.mps: a random state that get returns and set records."""

    def __init__(self, state):
        self.state, self.restored = state, []

    def get(self):
        return self.state

    def set(self, state):
        self.restored.append(state)


def test_cuda_and_mps_random_states_are_saved_and_restored(monkeypatch):
    cuda = FakeDevice([torch.tensor([1, 2, 3], dtype=torch.uint8)])
    mps = FakeDevice(torch.tensor([4, 5], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", cuda.get)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", cuda.set)
    monkeypatch.setattr(C, "has_mps", lambda: True)
    monkeypatch.setattr(torch.mps, "get_rng_state", mps.get)
    monkeypatch.setattr(torch.mps, "set_rng_state", mps.set)
    state = C.rng_state()
    assert state["cuda"] is cuda.state and state["mps"] is mps.state
    C.set_rng_state(state)
    assert cuda.restored == [cuda.state] and mps.restored == [mps.state]


def test_the_trainer_restores_the_saved_random_state_on_resume(tmp_path, monkeypatch):
    from conftest import PLAY
    from test_train import smoke

    from lckv_mini import train as T
    (tmp_path / "play.txt").write_text(PLAY)
    cfg = smoke(tmp_path, tmp_path / "play.txt", max_iters=2, eval_interval=2, sample_tokens=0)
    T.train(cfg)
    saved = C.load_checkpoint(tmp_path / "out" / "ckpt.pt")["rng"]
    restored = []
    monkeypatch.setattr(T, "set_rng_state", restored.append)
    T.train(smoke(tmp_path, tmp_path / "play.txt", max_iters=3, eval_interval=2,
                  sample_tokens=0, resume=True))
    assert len(restored) == 1 and torch.equal(restored[0]["torch"], saved["torch"])


# -- atomic writes: the order of the system calls --------------------------------------------------


def spy_on_the_disk(monkeypatch):
    """Record os.replace (a file appears under its name) and os.fsync (of a file or a folder)."""
    events, folders = [], {}
    real_open, real_replace, real_fsync = os.open, os.replace, os.fsync

    def spy_open(path, flags, *args, **kw):
        fd = real_open(path, flags, *args, **kw)
        if os.path.isdir(path):
            folders[fd] = Path(path)
        return fd

    def spy_replace(src, dst, *args, **kw):
        real_replace(src, dst, *args, **kw)
        events.append(("replace", Path(dst).name))

    def spy_fsync(fd):
        real_fsync(fd)
        events.append(("fsync folder", folders[fd]) if fd in folders else ("fsync file", None))

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "replace", spy_replace)
    monkeypatch.setattr(os, "fsync", spy_fsync)
    return events


def test_a_rename_is_made_durable_by_syncing_the_folder_after_it(tmp_path, monkeypatch):
    events = spy_on_the_disk(monkeypatch)
    D.atomic_write_bytes(tmp_path / "a.bin", b"data")
    # file contents on disk, then the rename, then the folder entry on disk
    assert events == [("fsync file", None), ("replace", "a.bin"), ("fsync folder", tmp_path)]


def test_save_pretrained_writes_the_weights_before_the_config(tmp_path, monkeypatch):
    model = from_pretrained(llama_folder(tmp_path / "in"))
    events = spy_on_the_disk(monkeypatch)
    save_pretrained(model, tmp_path / "out")
    appeared = [name for what, name in events if what == "replace"]
    # a crash between the two leaves weights without a config (ignored), never a config that
    # points at missing or stale weights
    assert appeared == ["model.safetensors", "config.json"]
    assert events[-1] == ("fsync folder", tmp_path / "out")


@pytest.mark.parametrize("where", ["checkpoint", "token cache"])
def test_every_file_the_package_writes_goes_through_the_atomic_rename(tmp_path, monkeypatch, where):
    events = spy_on_the_disk(monkeypatch)
    if where == "checkpoint":
        C.save_checkpoint(tmp_path / "ckpt.pt", {"model": {}, "model_config": {},
                                                 "tokenizer": {}, "step": 0})
    else:
        D.tokenize_cached("abc", D.Tokenizer("char", chars="abc"), tmp_path)
    assert [e[0] for e in events] == ["fsync file", "replace", "fsync folder"]


def test_an_atomic_write_gets_the_permissions_a_plain_write_gets(tmp_path):
    (tmp_path / "plain").write_bytes(b"x")
    D.atomic_write_bytes(tmp_path / "atomic", b"x")
    mode = lambda name: (tmp_path / name).stat().st_mode & 0o777  # noqa: E731
    assert mode("atomic") == mode("plain")
