"""Execute the notebooks in place, so their committed outputs come from the current code.

    python notebooks/run_all.py            # full size (a few minutes each on a laptop CPU)
    LCKV_FAST=1 python notebooks/run_all.py --check   # small, outputs discarded (what CI does)
    LCKV_FAST=1 python notebooks/run_all.py --check --status-dir S --work-dir W
        # each notebook runs in W/<name>/ and reports to S/<name>.json, failures included
        # (the test suite runs it so, in the background, beside its other tests)

Each executed notebook records a hash of its own code cells in its metadata; the test suite fails
when a cell was edited after the last run (outputs that no code produced). Whether the package
still does what the notebooks claim is checked by the notebooks' own asserts, which the test
suite runs headless (LCKV_FAST=1) on every change.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def code_hash(nb: dict) -> str:
    """A hash of the notebook's code cells (their source only, not outputs or metadata)."""
    h = hashlib.sha256()
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            src = cell["source"]
            h.update(("".join(src) if isinstance(src, list) else src).encode() + b"\0")
    return h.hexdigest()[:16]


def notebooks() -> list[Path]:
    return sorted(HERE.glob("[0-9][0-9]_*.ipynb"))


def execute(path: Path, timeout: int | None = None, cwd: Path | None = None):
    import nbformat
    from nbclient import NotebookClient

    if timeout is None:  # a cell that hangs fails; a full-size training cell can run 15+ minutes
        timeout = 900 if os.environ.get("LCKV_FAST") == "1" else 3600
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(cwd or path.parent)}}).execute()
    return nb


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--check", action="store_true", help="run without writing the outputs back")
    p.add_argument("--status-dir", type=Path, help="write <name>.json (ok, error, seconds) for "
                   "each notebook there and go on after a failure")
    p.add_argument("--work-dir", type=Path, help="run each notebook in <work-dir>/<name>/")
    p.add_argument("names", nargs="*", help="only these notebooks (default: all)")
    args = p.parse_args(argv)
    import nbformat

    failed = 0
    for path in notebooks():
        if args.names and not any(n in path.name for n in args.names):
            continue
        print(f"running {path.name} ...", flush=True)
        cwd = None
        if args.work_dir:
            cwd = args.work_dir / path.stem
            cwd.mkdir(parents=True, exist_ok=True)
        start, error = time.perf_counter(), None
        try:
            nb = execute(path, cwd=cwd)
        except Exception:
            if not args.status_dir:
                raise
            error, failed = traceback.format_exc(), failed + 1
        if args.status_dir:
            status = {"ok": error is None, "error": error,
                      "seconds": round(time.perf_counter() - start, 1)}
            args.status_dir.mkdir(parents=True, exist_ok=True)
            tmp = args.status_dir / f".{path.name}.json"
            tmp.write_text(json.dumps(status))
            os.replace(tmp, args.status_dir / f"{path.name}.json")  # the reader sees all or none
        if error is None and not args.check:
            nb.metadata["lckv_mini"] = {"code_hash": code_hash(nb)}
            nbformat.write(nb, path)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
