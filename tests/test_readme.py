"""The README is true: its Python blocks run as written, in order, in one namespace; its offline
set-up and its smoke commands run as written (with the copies in ../shared/data/)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.M | re.S)


def test_the_python_blocks_run_in_order_in_one_namespace(tmp_path, monkeypatch):
    code = blocks("python")
    assert len(code) >= 2
    monkeypatch.chdir(tmp_path)  # nothing they write lands in the checkout
    namespace = {"__name__": "readme"}
    for i, block in enumerate(code):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)


# The shell commands a newcomer runs first: the offline set-up, then the smoke run and a sample.
SETUP_START = "DATA=/path/to/the/copies"
SMOKE = ['python train_shakespeare.py --smoke',
         'python -m lckv_mini.sample --checkpoint out/smoke/ckpt.pt --prompt "ROMEO:"']


def test_the_offline_setup_and_the_smoke_commands_run_as_written(tmp_path, shared_data):
    setup = next(b for b in blocks("bash") if b.startswith(SETUP_START))
    smoke = next(b for b in blocks("bash") if b.startswith(SMOKE[0]))
    assert smoke.splitlines() == SMOKE
    bindir = tmp_path / "bin"  # `python` is this interpreter, `train_shakespeare.py` is here
    bindir.mkdir()
    (bindir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bindir / "python").chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(ROOT / "train_shakespeare.py", work)
    script = "\n".join(["set -euo pipefail",
                        setup.replace(SETUP_START, f"DATA={shared_data}", 1),
                        smoke])
    env = {k: v for k, v in os.environ.items()
           if k not in ("TIKTOKEN_CACHE_DIR", "LCKV_CACHE_DIR")}
    env.update(HOME=str(tmp_path / "home"), PATH=f"{bindir}{os.pathsep}{env['PATH']}",
               PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "home" / ".cache" / "tiktoken" /
            "0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4").is_file()
    assert "338,025 tokens (gpt2, vocab 11,706)" in done.stdout  # the corpus, offline
    assert (work / "out" / "smoke" / "ckpt.pt").is_file()
    assert done.stdout.rstrip().splitlines()[-1] != "" and "ROMEO:" in done.stdout


def test_the_readme_states_no_figure_without_its_command():
    assert "{{" not in README and "TODO" not in README
    for diary in ("that day", "reporter", "we had no network", "we could not"):
        assert diary not in README.lower()
