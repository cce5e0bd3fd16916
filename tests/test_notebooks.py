"""Every notebook runs top to bottom (small and fast), and the committed outputs are fresh."""

import importlib.util
import json
from pathlib import Path

import notebook_runner
import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("run_all", ROOT / "notebooks" / "run_all.py")
run_all = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_all)
NOTEBOOKS = run_all.notebooks()


def test_there_are_six_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_outputs_are_fresh(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c.get("execution_count") for c in code), "a code cell was never run"
    assert not any(o.get("output_type") == "error" for c in code for o in c.get("outputs", []))
    assert any(o.get("data", {}).get("image/png") for c in code for o in c.get("outputs", [])), \
        "no plot in the committed outputs"
    stamp = nb["metadata"].get("lckv_mini", {}).get("code_hash")
    assert stamp == run_all.code_hash(nb), (
        f"{path.name} has code cells edited since its outputs were made: run "
        "`python notebooks/run_all.py`")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
    """Headless in fast mode, every assert in it holding (run in the background beside the other
    tests: see notebook_runner.py)."""
    why = notebook_runner.missing()
    if why:
        pytest.skip(why)
    result = notebook_runner.start().result(path.name)
    assert result["ok"], f"{path.name} failed:\n{result['error']}"
