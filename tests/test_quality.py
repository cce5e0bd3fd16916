"""The quality benchmark (`python -m lckv_mini.bench quality`): every family and seed trained
once, resumable run by run, shared by processes started side by side, its noise rule by hand."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lckv_mini.bench import quality as Q

TINY = ["--layers", "4", "--kv", "2", "--n-embd", "8", "--n-head", "1", "--seq-len", "8",
        "--batch", "2", "--steps", "2", "--warmup", "1", "--windows", "2", "--seeds", "1", "2"]


def tiny(out, play, *extra):
    return ["--out", str(out), "--data", str(play), *TINY, *extra]


def test_every_family_and_seed_is_trained_once_and_a_rerun_trains_nothing(tmp_path, play,
                                                                           monkeypatch):
    calls = []
    real = Q.train_and_score

    def counting(recipe, spec, seed, *args):
        calls.append((spec, seed))
        return real(recipe, spec, seed, *args)

    monkeypatch.setattr(Q, "train_and_score", counting)
    result = Q.main(tiny(tmp_path, play))
    distinct = set(Q.layouts(4, [2]).values())
    assert sorted(calls) == sorted((s, seed) for s in distinct for seed in (1, 2))
    assert len(distinct) == 6  # standard, pizza = sandwich at 2 of 4 (3), lasagna bottom and top
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert saved["rows"] == result["rows"] and len(saved["runs"]) == 12
    assert {r["family"] for r in saved["rows"]} == {"standard", *(
        f for f, k in Q.layouts(4, [2]) if f != "standard")}
    assert not list((tmp_path / "quality_runs").glob("*.lock"))  # every claim released

    calls.clear()  # a rerun finds every run done ...
    assert Q.main(tiny(tmp_path, play))["rows"] == result["rows"] and calls == []
    victim = next((tmp_path / "quality_runs").glob("*.json"))  # ... and redoes only what is lost
    lost = json.loads(victim.read_text())
    victim.unlink()
    Q.main(tiny(tmp_path, play))
    assert calls == [(lost["layer_types"], lost["seed"])]


def test_another_recipe_trains_again_and_keeps_its_runs_apart(tmp_path, play, monkeypatch):
    Q.main(tiny(tmp_path, play))
    result = Q.main(tiny(tmp_path, play, "--steps", "3"))
    assert len(result["runs"]) == 12 and len(list((tmp_path / "quality_runs").glob("*.json"))) == 24
    assert {json.loads(p.read_text())["recipe"]["steps"]
            for p in (tmp_path / "quality_runs").glob("*.json")} == {2, 3}
    assert result["recipe"]["steps"] == 3


def test_a_run_held_by_a_live_process_is_skipped_and_a_dead_ones_lock_is_taken(tmp_path):
    lock = tmp_path / "run.lock"
    lock.write_text(str(os.getpid()))  # this process is alive
    assert not Q.claim(lock)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    lock.write_text(dead)  # that process has ended: its run is resumed here
    assert Q.claim(lock) and lock.read_text() == str(os.getpid())
    lock.unlink()
    assert Q.claim(lock)  # no lock at all


def test_two_processes_side_by_side_share_the_runs(tmp_path, play):
    cmd = [sys.executable, "-m", "lckv_mini.bench", "quality", *tiny(tmp_path, play)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    trained = [line for out in outs for line in out.splitlines() if line.startswith("[")]
    assert len(trained) == 12  # each of the 6 layouts x 2 seeds trained by one of the two


def test_the_noise_rule_by_hand():
    runs = [{"layer_types": "a", "exact": v} for v in (1.0, 2.0, 3.0)] + [
        {"layer_types": "b", "exact": v} for v in (2.0, 2.0, 2.0)]
    sd, threshold = Q.noise(runs)
    assert sd == pytest.approx(np.sqrt(0.5))  # variances 1 and 0, pooled
    assert threshold == pytest.approx(2 * np.sqrt(0.5) * np.sqrt(2 / 3))  # 2 SE of a difference
    recipe = {"layers": 4}
    std = Q.layouts(4, [2])["standard", 4]
    top = Q.layouts(4, [2])["pizza-top", 2]
    runs = [{"layer_types": std, "exact": v} for v in (2.0, 2.1, 1.9)] + [
        {"layer_types": top, "exact": v} for v in (2.5, 2.6, 2.4)]
    rows = {r["family"]: r for r in Q.summarise(recipe, runs, [2])["rows"]}
    assert rows["pizza-top"]["delta"] == pytest.approx(0.5)
    assert rows["pizza-top"]["verdict"] == "higher"  # 0.5 > 2 * 0.1 * sqrt(2/3)
    assert rows["sandwich-top"]["same_as"] == "pizza-top"  # at 2 of 4 layers they coincide
    assert rows["standard"]["verdict"] == "standard"


@pytest.mark.parametrize("flags, message", [(["--kv", "5"], "--kv must lie between 1 and"),
                                            (["--steps", "0"], "--steps must be at least 1")])
def test_bad_flags_are_refused_before_any_work(tmp_path, play, flags, message, capsys):
    with pytest.raises(SystemExit):
        Q.main(tiny(tmp_path / "out", play, *flags))
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
