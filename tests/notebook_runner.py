"""The notebooks, run headless (LCKV_FAST=1) in one background process beside the rest of the
suite: the other tests use one thread, so the second core would otherwise sit idle for the minute
the notebooks take. conftest starts the run once collection shows a notebook test; each
test_notebook_runs[...] then waits for its notebook's verdict."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
TIKTOKEN_NAME = "0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4"  # sha1 of r50k_base's download URL


def missing() -> str | None:
    """Why the notebooks cannot run here, or None."""
    for module in ("nbclient", "nbformat", "matplotlib", "ipykernel"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e '.[notebooks]')"
    if not SHARED.is_dir():
        return f"{SHARED} (offline tiny Shakespeare and GPT-2 BPE) is not present"
    return None


class Run:
    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="lckv-notebooks-"))
        tiktoken, cache = self.dir / "tiktoken", self.dir / "cache"
        tiktoken.mkdir()
        cache.mkdir()
        shutil.copy(SHARED / "r50k_base.tiktoken", tiktoken / TIKTOKEN_NAME)
        shutil.copy(SHARED / "tinyshakespeare.txt", cache / "tinyshakespeare.txt")
        env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tiktoken), "LCKV_CACHE_DIR": str(cache),
               "LCKV_FAST": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
        self.status = self.dir / "status"
        self.log = self.dir / "log.txt"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "notebooks" / "run_all.py"), "--check",
                 "--status-dir", str(self.status), "--work-dir", str(self.dir / "work")],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.dir)

    def result(self, name: str, timeout: float = 900) -> dict:
        """The verdict on one notebook: {"ok", "error", "seconds"}."""
        path = self.status / f"{name}.json"
        deadline = time.monotonic() + timeout
        while not path.exists():
            if self.proc.poll() is not None and not path.exists():
                return {"ok": False, "error": "the notebook runner stopped early:\n"
                        + self.log.read_text()[-3000:]}
            if time.monotonic() > deadline:
                return {"ok": False, "error": f"no verdict after {timeout:.0f} s"}
            time.sleep(0.2)
        return json.loads(path.read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


RUN: Run | None = None


def start() -> Run | None:
    global RUN
    if RUN is None and missing() is None:
        RUN = Run()
    return RUN


def stop() -> None:
    if RUN is not None:
        RUN.stop()
