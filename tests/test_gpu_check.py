"""The GPU check runs every part and writes what docs/gpu.md promises: tiny sizes on the CPU (no
timing is asserted), a part that raises recorded with its traceback while the others run, and
the paths a CPU cannot reach (out of memory, a failing measurement) driven by hand."""

import json

import pytest
import torch

from lckv_mini.bench import common, correctness, gpu_check, main, throughput, training
from lckv_mini.model import LCKVModel

# What a README table reads from every part's JSON
FIELDS = {"part", "ok", "seconds", "time_limit_s", "device", "device_name", "machine", "torch",
          "dtype", "config", "summary", "rows"}
# The only reason a measurement may be skipped in a tiny run: the feature does not exist.
MISSING = {"generate has no cuda_graph option (CUDA graphs are not offered)"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    return out, main(["gpu-check", "--device", "cpu", "--tiny", "--out", str(out)])


def skipped_reasons(data):
    if isinstance(data, dict):
        yield from ([data["skipped"]] if "skipped" in data else [])
        for v in data.values():
            yield from skipped_reasons(v)
    elif isinstance(data, list):
        for v in data:
            yield from skipped_reasons(v)


def test_every_part_runs_and_writes_its_json_and_the_summary(run):
    out, results = run
    assert list(results) == list(gpu_check.PARTS)
    for name in gpu_check.PARTS:
        data = json.loads((out / f"{name}.json").read_text())
        assert data["ok"] is True, data.get("traceback")
        assert FIELDS <= data.keys(), name
        assert data["machine"]["torch"] == torch.__version__ and data["config"] and data["rows"]
        assert not any("error" in r for r in data["rows"]), name
        assert set(skipped_reasons(data)) <= MISSING, name
    summary = (out / "summary.md").read_text()
    for name in gpu_check.PARTS:
        assert f"| {name} | True |" in summary


def test_correctness_checks_every_layout_and_every_sdpa_form(run):
    c = run[1]["correctness"]
    s = c["summary"]
    assert s["all_passed"] and s["checks"] == s["passed"] == 6 * 3 + 2
    assert {r["layout"] for r in c["rows"]} == {"standard", "lckv w=0", "lckv w=2", "cla",
                                                 "lasagna-top", "yoco"}
    assert s["worst_theorem1_rel_err"] <= correctness.LOGITS_TOL
    assert s["worst_grad_rel_err"] <= correctness.GRAD_TOL
    bf16 = [r for r in c["rows"] if r["check"] == "bf16"]
    assert any(r["masked_layers"] for r in bf16) and all(r["first_token_zero"] for r in bf16)
    sdpa = c["sdpa"]
    assert len(sdpa["default"]) == 2 * 2 * 4  # dtypes x (MHA, GQA) x forms
    math = [r for r in sdpa["rows"] if r["backend"] == "math"]
    assert len(math) == 16 and all(r["ok"] and r["zero_rule"] for r in math)
    assert {"causal", "masked_diagonal", "padded", "decode"} == set(s["sdpa_default_bf16_mha"])


def test_training_and_decoding_report_ratios(run):
    t, d = run[1]["training"], run[1]["decoding"]
    eager = {r["model"]: r for r in t["rows"] if not r["compiled"]}
    assert eager["standard"]["time_ratio"] == 1.0 and eager["lckv w=2"]["flop_ratio"] > 0
    assert all(r["tokens_per_s"] > 0 and r["mfu_vs_matmul"] > 0 for r in t["rows"])
    assert any(r["compiled"] for r in t["rows"])
    assert [r["activation_checkpointing"] for r in t["memory"]] == [False, True] * 2
    assert all(r["peak_bytes"] is None for r in t["memory"])  # measured on CUDA only
    assert {e["model"] for e in d["models"]} == {"standard", "lckv w=2"}
    for e in d["models"]:
        assert e["stopped"] == "batch cap 4" and e["best_tokens_per_s"] > 0
        assert e["ratio_vs_standard"] > 0
        assert e["compiled"]["tokens_per_s"] > 0  # generate(compile=<backend>) ran
    assert [r["batch"] for r in d["rows"] if r["model"] == "standard"] == [1, 2, 4]


def test_a_part_that_raises_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    def broken(device, settings, deadline):
        raise RuntimeError("planted failure")

    monkeypatch.setitem(gpu_check.PARTS, "training", broken)
    results = main(["gpu-check", "--device", "cpu", "--tiny", "--out", str(tmp_path)])
    failed = json.loads((tmp_path / "training.json").read_text())
    assert failed["ok"] is False and failed["error"] == "RuntimeError: planted failure"
    assert "broken" in failed["traceback"] and "planted failure" in failed["traceback"]
    assert results["correctness"]["ok"] and results["decoding"]["ok"]
    summary = (tmp_path / "summary.md").read_text()
    assert "| training | False |" in summary and "| decoding | True |" in summary


def test_a_measurement_that_raises_or_runs_out_of_time_is_recorded():
    def fails():
        raise ValueError("bad")

    row = common.attempt({"model": "x"}, common.Deadline(60), fails)
    assert row["model"] == "x" and row["error"] == "ValueError: bad" and "fails" in row["traceback"]
    late = common.attempt({"model": "x"}, common.Deadline(0), lambda: {"never": 1})
    assert "never" not in late and "time limit" in late["skipped"]


def test_the_batch_sweep_stops_at_out_of_memory_and_passes_other_errors_on(monkeypatch):
    model = LCKVModel(gpu_check.TINY.decode_shape).eval()

    def generate(model, idx, n, **kw):
        if idx.size(0) >= 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return idx

    monkeypatch.setattr(throughput, "generate", generate)
    settings = gpu_check.TINY
    out = throughput.sweep(model, "cpu", settings, common.Deadline(60), start=1)
    assert [r["batch"] for r in out["rows"]] == [1, 2]
    assert out["stopped"] == "out of memory at batch 4"

    def broken(model, idx, n, **kw):
        raise RuntimeError("an illegal memory access was encountered")

    monkeypatch.setattr(throughput, "generate", broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        throughput.sweep(model, "cpu", settings, common.Deadline(60), start=1)


def test_decoding_speedups_run_where_generate_offers_them(monkeypatch):
    assert throughput.decode_options("eager") == {
        "compiled": {"compile": "eager"},
        "cuda_graph": {"skipped": "generate has no cuda_graph option (CUDA graphs are not "
                                  "offered)"}}

    def generate(model, prompts, max_new_tokens, *, cuda_graph=False):
        return prompts

    monkeypatch.setattr(throughput, "generate", generate)
    assert throughput.decode_options() == {"compiled": {"skipped": "generate has no compile "
                                                                   "option"},
                                          "cuda_graph": {"cuda_graph": True}}


def test_the_sweep_starts_near_an_eighth_of_the_predicted_largest_batch():
    s = gpu_check.FULL
    assert throughput.first_batch(s, None) == s.first_batch
    assert throughput.first_batch(s, 455) == 32 and throughput.first_batch(s, 80) == 16


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA GH200 480GB", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L4", 121e12),
    ("NVIDIA L40S", 362e12), ("cpu", None)])
def test_peak_flops_by_device_name(name, peak):
    assert training.peak_flops(name) == peak
