"""Execute the notebooks in place, so their committed outputs come from the current code.

    python notebooks/run_all.py            # full size (a few minutes each on a laptop CPU)
    LCKV_FAST=1 python notebooks/run_all.py --check   # small, outputs discarded (what CI does)

Each executed notebook records a hash of the package source in its metadata; the test suite
fails when the package has changed since the notebooks were last run (stale outputs).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parent / "lckv_mini"


def source_hash() -> str:
    h = hashlib.sha256()
    for path in sorted(PACKAGE.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def notebooks() -> list[Path]:
    return sorted(HERE.glob("[0-9][0-9]_*.ipynb"))


def execute(path: Path, timeout: int = 900, cwd: Path | None = None):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(cwd or path.parent)}}).execute()
    return nb


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--check", action="store_true", help="run without writing the outputs back")
    p.add_argument("names", nargs="*", help="only these notebooks (default: all)")
    args = p.parse_args(argv)
    import nbformat

    for path in notebooks():
        if args.names and not any(n in path.name for n in args.names):
            continue
        print(f"running {path.name} ...", flush=True)
        nb = execute(path)
        if not args.check:
            nb.metadata["lckv_mini"] = {"source_hash": source_hash()}
            nbformat.write(nb, path)
    sys.exit(0)


if __name__ == "__main__":
    main()
