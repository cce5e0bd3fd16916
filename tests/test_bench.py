"""The benchmark code runs and writes what it promises (tiny shapes; no timing is asserted)."""

import json
from dataclasses import replace

import pytest
import torch

from lckv_mini.bench import (
    SHAPES,
    main,
    max_batch,
    param_count,
    prefill_flops,
    training_flops,
    variants,
)
from lckv_mini.generate import KVCache, cache_bytes
from lckv_mini.model import LCKVModel

TINY = ["--shape", "tiny", "--shapes", "tiny", "llama-7b", "--cpu-budget-gib", "0.0005",
        "--prompt-len", "4", "--gen-len", "6", "--reps", "1", "--prompt-lens", "4", "6",
        "--train-len", "8", "--seq-train-len", "3", "--windows", "4", "6", "--stream-len", "12",
        "--max-batch-cap", "4", "--layout-layers", "6", "--layout-kv", "3", "1",
        "--layout-prompt-len", "8", "--sliding-window", "3"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    plot = []
    try:
        import matplotlib  # noqa: F401
        plot = ["--plot"]
    except ImportError:
        pass
    return out, main(["all", *TINY, "--out", str(out), *plot]), bool(plot)


def test_every_benchmark_writes_json_with_its_fields(results):
    out, res, plotted = results
    for name in ("memory", "throughput", "prefill", "train", "streaming", "layouts"):
        data = json.loads((out / f"{name}.json").read_text())
        assert {"rows", "machine", "device", "args", "settings"} <= data.keys()
        assert data["machine"]["torch"] and data["rows"]
        if name != "memory":
            assert all(len(r["times_s"]) == 1 for r in data["rows"])
        if plotted:
            assert (out / f"{name}.png").stat().st_size > 1000
    summary = json.loads((out / "throughput.json").read_text())["summary"]
    assert {"best_tokens_per_s", "ratio_vs_standard", "traffic_model_ratio",
            "batch_ratio_bound"} <= summary[0].keys()
    passes = {r["mode"]: r["passes"] for r in res["prefill"]["rows"] if r["prompt_len"] == 6}
    assert passes["sequential"] == 6 and passes["parallel"] == 9 and passes["adaptive"] <= 9


def test_the_layouts_benchmark_sets_the_families_side_by_side(results):
    _, res, _ = results
    rows = res["layouts"]["rows"]
    for part in ("train", "prefill"):
        for k in (3, 1):
            got = {r["family"]: r for r in rows if r["part"] == part and r["kv_layers"] == k
                   or r["part"] == part and r["family"] == "standard"}
            assert set(got) == {"standard", *(f"{p}-{t}" for p in ("pizza", "sandwich", "lasagna")
                                              for t in ("bottom", "middle", "top"))}
            assert got["standard"]["time_ratio"] == got["standard"]["flop_ratio"] == 1.0
            assert got["pizza-top"]["flop_ratio"] > 1  # it iterates
    # 3 KV layers of 6 (a depth other than the tiny shape's 4): lasagna blocks of two, whose
    # middle is the top: one layout, timed once
    middle = next(r for r in rows if r["part"] == "train" and r["family"] == "lasagna-middle"
                  and r["kv_layers"] == 3)
    assert middle["layer_types"] == "1_1_3_3_5_5" and "lasagna-top" in middle["same_as"]
    fast = {r["family"]: r for r in rows if r["part"] == "fast prefill"}
    assert set(fast) == {"yoco", "gemma"}
    assert fast["yoco"]["skipped_share"] == 0.5 and fast["yoco"]["flop_ratio"] < 1
    assert all(len(r["full_times_s"]) == 1 for r in fast.values())


def test_memory_rows_follow_the_formula(results):
    _, res, _ = results
    for r in res["memory"]["rows"]:
        L = SHAPES[r["shape"]].n_layer
        assert r["kv_ratio"] == pytest.approx(r["kv_layers"] / L, rel=1e-12)  # (w+1)/L
    for c in res["memory"]["allocation_check"]:
        assert c["predicted_cache"] == c["allocated_cache"]
        assert c["predicted_params"] == c["real_params"]


@pytest.mark.parametrize("shape", ["tiny", "cpu"])
def test_predictors_match_real_allocations(shape):
    for config in variants(SHAPES[shape]).values():
        assert param_count(config) == LCKVModel(config).num_params()
        assert KVCache(config, 2, 7).nbytes == cache_bytes(config, 2, 7)


def test_max_batch_grows_by_about_L_over_w_plus_1_when_the_cache_dominates():
    shape = SHAPES["llama-7b"]
    std = max_batch(variants(shape)["standard"], 80 * 2**30, 16, 2048, torch.float16)
    for name, config in variants(shape).items():
        got = max_batch(config, 80 * 2**30, 16, 2048, torch.float16)
        assert got >= 0.9 * shape.n_layer / len(config.kv_layers) * std, name


def test_training_flops_count_the_iteration():
    config = variants(SHAPES["tiny"])["lckv w=2"]  # 4 layers, block = layers 1..2
    one = training_flops(config, 8, 0, 1)
    more = training_flops(config, 8, 7, 2)
    assert more > one
    std = variants(SHAPES["tiny"])["standard"]
    assert training_flops(std, 8, 7, 2) == training_flops(std, 8, 0, 1)  # no block: one pass


def test_training_flops_count_every_group():
    # lasagna-top "1_1_3_3": two groups, (0, 1) and (2, 3), each iterated m + b times by itself
    config = replace(SHAPES["tiny"], layer_types="1_1_3_3")
    assert config.iteration_groups == ((0, 1), (2, 3))
    C, I, V, T = config.n_embd, config.intermediate_size, config.vocab_size, 8
    hd, kvd = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    kv, attn, mlp = 2 * T * 2 * C * kvd, 2 * T * 2 * C * hd + 4 * T * T * hd, 2 * T * 3 * C * I
    first = mlp + kv  # the reader skips attention (zero KVs), the top only writes its KVs
    middle, last = (attn + mlp) + kv, (attn + mlp) + (kv + attn + mlp)
    group = first + 6 * middle + 3 * middle + 3 * last  # m = 7 (cost 1), b = 2 (cost 3)
    assert training_flops(config, T, 7, 2) == 2 * group + 3 * 2 * T * C * V
    # prompt encoding: the same passes, forward only, and the head on the last token
    assert prefill_flops(config, T, 7, 2) == 2 * (first + 7 * middle + last) + 2 * C * V


def test_prefill_flops_count_the_fast_prefill():
    config = replace(SHAPES["tiny"], layer_types="0s_1s_1_1", sliding_window=4)  # YOCO, 4 layers
    C, I, V, P = config.n_embd, config.intermediate_size, config.vocab_size, 16
    hd, kvd = config.n_head * config.head_dim, config.n_kv_head * config.head_dim

    def layer(Tq, own_kv):
        return ((2 * Tq * 2 * C * kvd if own_kv else 0) + 2 * Tq * 2 * C * hd
                + 4 * Tq * P * hd + 2 * Tq * 3 * C * I)

    head = 2 * C * V
    assert prefill_flops(config, P, 7, 2, fast_prefill=False) == 2 * layer(P, True) + 2 * layer(
        P, False) + head
    assert prefill_flops(config, P, 7, 2) == 2 * layer(P, True) + 2 * layer(1, False) + head


def test_training_flops_without_the_wasted_work():
    # 4 layers "0_2_2_3": one group (1, 2); layer 1 reads layer 2 from above, layer 2 is its top.
    config = variants(SHAPES["tiny"])["lckv w=2"]
    assert config.iteration_groups == ((1, 2),)
    C, I, V, T = config.n_embd, config.intermediate_size, config.vocab_size, 8
    hd = config.n_head * config.head_dim
    kvd = config.n_kv_head * config.head_dim
    kv, attn, mlp = 2 * T * 2 * C * kvd, 2 * T * 2 * C * hd + 4 * T * T * hd, 2 * T * 3 * C * I
    once = 3 * ((kv + attn + mlp) * 2) + 3 * 2 * T * C * V  # layers 0 and 3, and the head
    m, b = 7, 2
    full = once + (m + 3 * b) * ((attn + mlp) + (kv + attn + mlp))
    assert training_flops(config, T, m, b, skip_wasted=False) == full
    first = mlp + kv  # layer 1 skips attention (zero KVs), layer 2 only writes its KVs
    middle = (attn + mlp) + kv  # passes 2 .. m+b-1: layer 2 still only writes its KVs
    last = (attn + mlp) + (kv + attn + mlp)
    # passes 1..7 without gradient (cost 1), 8 and 9 with (cost 3); pass 9 is the last
    lean = once + first + 6 * middle + 3 * middle + 3 * last
    assert training_flops(config, T, m, b) == lean < full


def test_a_table_with_no_rows_prints_its_header(capsys):
    """`bench compiled --compiled-parts train` prints the parts it skipped as empty tables."""
    from lckv_mini.bench.common import table

    table([], ["model", "step_ms"], "Decode step")
    assert capsys.readouterr().out.split("\n")[1:3] == ["Decode step", "model  step_ms"]
