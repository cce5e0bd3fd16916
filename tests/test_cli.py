"""The command line refuses bad flags with one line naming the flag, before any work, leaving
nothing behind; and a resumed run's log equals an uninterrupted run's, line for line.

Every run here is the tiny `--smoke` model on a text file the test writes (character tokens), so
nothing touches the network or ../shared/data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PLAY

import lckv_mini.train as T
from lckv_mini.config import LAYOUTS
from lckv_mini.sample import main as sample_main

ROOT = Path(__file__).resolve().parent.parent


def flags(tmp_path, play, *extra):
    return ["--smoke", "--data", str(play), "--tokenizer", "char", "--no-progress",
            "--out-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), *extra]


def tree(folder: Path) -> dict:
    """Every file and folder under `folder`, with the bytes of each file."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def refused(argv, tmp_path, main=T.main, cache_made=False) -> str:
    """Run the command line; it must exit with one line and leave tmp_path as it was (but for
    the token cache, where the check needs the tokens)."""
    def files():
        return {k: v for k, v in tree(tmp_path).items()
                if not (cache_made and k.startswith("cache"))}

    before = files()
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert files() == before  # nothing created, nothing changed
    return message.removeprefix("error: ")


# -- the flags the issue lists ----------------------------------------------------------------


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "0", "--batch-size must be an integer >= 1, got 0"),
    ("--eval-interval", "0", "--eval-interval must be an integer >= 1, got 0"),
    ("--grad-accum", "0", "--grad-accum must be an integer >= 1, got 0"),
    ("--eval-iters", "0", "--eval-iters must be an integer >= 1, got 0"),
    ("--max-iters", "-5", "--max-iters must be an integer >= 0, got -5"),
    ("--layers-kind", "banana", f"unknown --layers-kind 'banana'; valid: {', '.join(LAYOUTS)}, "
     "or a layer_types string such as 0_6_6_6_6_6_6_7"),
])
def test_the_issues_bad_flags_get_one_line_and_leave_nothing(tmp_path, play, flag, value,
                                                            message):
    assert refused(flags(tmp_path, play, flag, value), tmp_path) == message


def test_a_bad_flag_is_one_line_on_stderr_from_the_script(tmp_path, play):
    done = subprocess.run([sys.executable, str(ROOT / "train_shakespeare.py"),
                           *flags(tmp_path, play, "--batch-size", "0")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == "error: --batch-size must be an integer >= 1, got 0\n"
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_an_out_dir_that_cannot_be_made_is_refused_before_any_work(tmp_path, play):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "out"
    argv = [*flags(tmp_path, play), "--out-dir", str(out)]
    assert refused(argv, tmp_path) == f"--out-dir {out} is not writable: Not a directory"


def test_a_read_only_out_dir_is_refused_and_left_as_it_was(tmp_path, play):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "keep.txt").write_text("mine")
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):  # root writes anywhere: permissions cannot make this case
            pytest.skip("this user can write into a read-only folder (root)")
        argv = [*flags(tmp_path, play), "--out-dir", str(ro)]
        assert refused(argv, tmp_path) == f"--out-dir {ro} is not writable: Permission denied"
    finally:
        ro.chmod(0o755)


def test_a_refused_out_dir_leaves_no_parent_made_for_the_probe(tmp_path, play, monkeypatch):
    made = []

    def mkstemp(*args, **kw):  # the folders exist by now; then the disk says no
        made.append(Path(kw["dir"]).is_dir())
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(T.tempfile, "mkstemp", mkstemp)
    out = tmp_path / "a" / "b" / "out"
    argv = [*flags(tmp_path, play), "--out-dir", str(out)]
    assert refused(argv, tmp_path) == f"--out-dir {out} is not writable: Read-only file system"
    assert made == [True] and not (tmp_path / "a").exists()


def test_activation_checkpointing_is_refused_in_sequential_mode(tmp_path, play):
    argv = flags(tmp_path, play, "--mode", "sequential", "--activation-checkpointing")
    assert refused(argv, tmp_path) == ("--activation-checkpointing applies to the parallel "
                                       "computation only; drop it or use --mode parallel")


# -- every other setting with a range -----------------------------------------------------------


@pytest.mark.parametrize("extra, message", [
    (["--lr", "0"], "--lr must be > 0, got 0.0"),
    (["--lr", "nan"], "--lr must be > 0, got nan"),
    (["--lr", "inf"], "--lr must be > 0, got inf"),
    (["--min-lr=-1e-4"], "--min-lr must be >= 0, got -0.0001"),
    (["--lr", "1e-3", "--min-lr", "1e-2"],
     "--min-lr 0.01 exceeds --lr 0.001: the schedule decays from --lr down to --min-lr"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0, got -0.1"),
    (["--grad-clip", "-1"], "--grad-clip must be >= 0 (0: no clipping), got -1.0"),
    (["--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
    (["--temperature", "-0.5"], "--temperature must be >= 0 (0: greedy), got -0.5"),
    (["--top-k", "0"], "--top-k must be an integer >= 1, got 0"),
    (["--sample-tokens", "-1"], "--sample-tokens must be an integer >= 0, got -1"),
    (["--block-size", "0"], "--block-size must be an integer >= 1, got 0"),
    (["--n-layer", "0"], "--n-layer must be an integer >= 1, got 0"),
    (["--n-head", "0"], "--n-head must be an integer >= 1, got 0"),
    (["--n-embd", "-8"], "--n-embd must be an integer >= 1, got -8"),
    (["--lr-warmup-iters", "-1"], "--lr-warmup-iters must be an integer >= 0, got -1"),
    (["--lr-decay-iters", "0"], "--lr-decay-iters must be an integer >= 1, got 0"),
    (["--forward-passes", "-1"], "--forward-passes must be an integer >= 0, got -1"),
    (["--backward-passes", "0"], "--backward-passes must be an integer >= 1, got 0"),
    (["--warmup-layers", "-2"], "--warmup-layers must be an integer >= 0, got -2"),
    (["--cla-group", "0"], "--cla-group must be an integer >= 1, got 0"),
    (["--n-kv-layers", "0"], "--n-kv-layers must be an integer >= 1, got 0"),
    (["--sliding-window", "0"], "--sliding-window must be an integer >= 1, got 0"),
    (["--sample-tokens", "40"], "--sample-tokens 40 and the prompt do not fit the block of 32 "
     "tokens; ask for fewer, or leave it unset (the rest of the block)"),
    (["--prompt", ""], "--prompt is empty: the sample needs at least one character "
     "(or --sample-tokens 0: no sample)"),
    (["--device", "banana"], "--device 'banana' is not a device; valid: auto, cpu, cuda, "
     "cuda:N, mps"),
    (["--layers-kind", "0_1"], "layer_types '0_1' describes 2 layers but n_layer=4"),
    (["--layers-kind", "lckv", "--warmup-layers", "3"],
     "warmup w=3 must be even and in [0, n_layer=4]"),
    (["--resume"], "--resume: no checkpoint at {out}/ckpt.pt"),
])
def test_every_setting_out_of_range_gets_one_line_and_leaves_nothing(tmp_path, play, extra,
                                                                     message):
    message = message.format(out=tmp_path / "out")
    assert refused(flags(tmp_path, play, *extra), tmp_path) == message


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_an_absent_device_is_refused(tmp_path, play):
    assert refused(flags(tmp_path, play, "--device", "cuda"), tmp_path) == (
        f"--device cuda: this machine (torch {torch.__version__}) has no cuda device; use "
        "--device auto or cpu")


def test_a_prompt_that_does_not_encode_or_fit_is_refused_before_training(tmp_path, play):
    # Checked once the tokenizer is fitted and the data is long enough: the out dir is not made.
    argv = flags(tmp_path, play, "--prompt", "Zebra")
    assert refused(argv, tmp_path, cache_made=True) == (
        "--prompt 'Zebra': characters ['Z'] are not in the vocabulary")
    long = "ROMEO: " * 5  # 35 characters: no room in a block of 32
    assert refused(flags(tmp_path, play, "--prompt", long), tmp_path, cache_made=True) == (
        "--prompt is 35 tokens, which leaves no room in --block-size 32: shorten it "
        "(or --sample-tokens 0: no sample)")
    argv = flags(tmp_path, play, "--prompt", "ROMEO:", "--sample-tokens", "30")
    assert refused(argv, tmp_path, cache_made=True) == (
        "--sample-tokens 30 and the prompt's 6 tokens exceed --block-size 32: ask for at most "
        "26, or leave it unset (the rest of the block)")
    no_newline = tmp_path / "no-newline.txt"  # the default prompt is "\n"
    no_newline.write_text(PLAY.replace("\n", " "))
    argv = [*flags(tmp_path, play), "--data", str(no_newline)]
    assert refused(argv, tmp_path, cache_made=True) == (
        "--prompt '\\n': characters ['\\n'] are not in the vocabulary")


def test_the_unset_sample_fills_the_block(tmp_path, play):
    summary = T.main(flags(tmp_path, play, "--max-iters", "1", "--prompt", "ROMEO:"))
    assert summary["sample"].startswith("ROMEO:") and len(summary["sample"]) == 32


# -- resuming --------------------------------------------------------------------------------


def test_resuming_a_finished_run_is_refused_and_changes_nothing(tmp_path, play):
    T.main(flags(tmp_path, play, "--max-iters", "2", "--sample-tokens", "0"))
    ckpt = tmp_path / "out" / "ckpt.pt"
    assert refused(flags(tmp_path, play, "--max-iters", "2", "--resume"), tmp_path) == (
        f"{ckpt} is at step 2 and --max-iters is 2: nothing to train; raise --max-iters to "
        "continue")
    assert refused(flags(tmp_path, play, "--max-iters", "4"), tmp_path) == (
        f"{ckpt} exists: pass --resume to continue it, or choose another --out-dir (nothing was "
        "overwritten)")


TIMING = ("tokens_per_s", "seconds")


def log_without_timing(out: Path) -> list[dict]:
    lines = (out / "log.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def test_a_resumed_log_equals_the_uninterrupted_log_line_for_line(tmp_path, play, monkeypatch):
    common = ["--max-iters", "12", "--eval-interval", "4", "--dropout", "0.1",
              "--sample-tokens", "0"]
    T.main(flags(tmp_path / "a", play, *common))

    def killed_at_step_10(step, cfg, real=T.lr_at):  # after step 10 is logged, before a save
        if step == 10:
            raise KeyboardInterrupt("killed (planted)")
        return real(step, cfg)

    monkeypatch.setattr(T, "lr_at", killed_at_step_10)
    with pytest.raises(KeyboardInterrupt):
        T.main(flags(tmp_path / "b", play, *common))
    monkeypatch.undo()
    b = tmp_path / "b" / "out"
    assert [r["step"] for r in log_without_timing(b)[-2:]] == [9, 10]  # logged past the save
    with open(b / "log.jsonl", "a") as f:  # and the kill tore the line being written
        f.write('{"step": 11, "train_lo')
    T.main(flags(tmp_path / "b", play, *common, "--resume"))  # the same flags, and --resume
    a_log, b_log = log_without_timing(tmp_path / "a" / "out"), log_without_timing(b)
    assert len(b_log) == len(a_log) == 12 + 4  # 12 steps, evaluations at 0, 4, 8, 12
    assert b_log == a_log


# -- init-from --------------------------------------------------------------------------------


LLAMA = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48,
         "vocab_size": 50, "max_position_embeddings": 64, "tie_word_embeddings": True}


def test_init_from_names_another_model_type_first(tmp_path, play):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**LLAMA, "model_type": "gpt2"}))
    argv = flags(tmp_path, play, "--init-from", str(folder))  # no weights, no tokenizer.json
    assert refused(argv, tmp_path).startswith("model_type='gpt2': only Llama-like models")


def test_init_from_checks_its_folder_before_any_work(tmp_path, play):
    pytest.importorskip("safetensors")
    pytest.importorskip("tokenizers")
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA))
    argv = flags(tmp_path, play, "--init-from", str(folder))
    assert refused(argv, tmp_path) == f"no model.safetensors nor model.safetensors.index.json in "\
                                      f"{folder}"
    (folder / "model.safetensors").write_bytes(b"")  # only its presence is checked up front
    assert refused(argv, tmp_path).startswith(f"no tokenizer.json in {folder}.")
    (folder / "tokenizer.json").write_text("{}")
    assert refused([*argv, "--block-size", "128"], tmp_path) == (
        f"--block-size 128 exceeds the model's max_position_embeddings=64 ({folder})")


# -- the sampler ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def block32(tmp_path_factory):
    """A checkpoint of the smoke model (block 32, character tokens)."""
    tmp = tmp_path_factory.mktemp("block32")
    (tmp / "play.txt").write_text(PLAY)
    T.main(flags(tmp, tmp / "play.txt", "--max-iters", "2", "--sample-tokens", "0"))
    return tmp / "out" / "ckpt.pt"


def test_the_sampler_refuses_more_than_the_block_and_says_how_to_stream(block32, tmp_path,
                                                                       capsys):
    argv = ["--checkpoint", str(block32), "--prompt", "ROMEO:", "--max-new-tokens", "500"]
    assert refused(argv, tmp_path, sample_main) == (
        "--max-new-tokens 500 and the prompt's 6 tokens exceed the model's block_size=32: ask for "
        "at most 26, or stream past the block with --sink-size and --window-size (e.g. "
        "--sink-size 4 --window-size 28)")
    assert capsys.readouterr().out == ""  # not a shorter text: none
    text, = sample_main(["--checkpoint", str(block32), "--prompt", "ROMEO:"])
    assert text.startswith("ROMEO:") and len(text) == 32  # by default, the rest of the block
    text, = sample_main([*argv, "--sink-size", "4", "--window-size", "28"])
    assert text.startswith("ROMEO:") and len(text) == 506  # streamed past the block


@pytest.mark.parametrize("extra, message", [
    (["--num-samples", "0"], "--num-samples must be >= 1, got 0"),
    (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0, got -1"),
    (["--temperature", "-1"], "--temperature must be >= 0 (0: greedy), got -1.0"),
    (["--top-k", "0"], "--top-k must be >= 1, got 0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--prompt", ""], "--prompt is empty: give at least one character"),
    (["--prompt", "Zebra"], "--prompt 'Zebra': characters ['Z'] are not in the vocabulary"),
    (["--sink-size", "4"], "streaming needs both --sink-size and --window-size"),
    (["--sink-size", "4", "--window-size", "28"],
     "streaming has no block to fill: give --max-new-tokens"),
    (["--sink-size", "4", "--window-size", "60", "--max-new-tokens", "100"],
     "--sink-size 4 + --window-size 60 = 64 exceeds the model's block_size=32"),
    (["--device", "banana"], "--device 'banana' is not a device; valid: auto, cpu, cuda, cuda:N, "
     "mps"),
])
def test_the_samplers_bad_flags_get_one_line(block32, tmp_path, extra, message):
    assert refused(["--checkpoint", str(block32), *extra], tmp_path, sample_main) == message
