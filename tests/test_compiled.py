"""Compiled decoding (issue 18): the decode step torch.compile is given equals the eager one,
compiles without graph breaks, compiles once for every position, and falls back when it cannot
compile.

The exactness of that step (the position a tensor, the cache read up to the position behind
the causal mask (a symbolic size once compiled), the RoPE angle gathered by the position, stale
slots from an earlier generation) is checked uncompiled in float64 over random layouts;
torch.compile itself is checked with the tracing-only backend on every family and once with
inductor, on tiny models (compiling is slow here)."""

import importlib
import shutil
import warnings

import pytest
import torch
import torch._inductor.config
from conftest import configs, random_model, random_tokens, record, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

from lckv_mini.config import LCKVConfig, gemma_layers, make_layer_types
from lckv_mini.generate import (
    GREEDY,
    CompiledDecoder,
    CompileWarning,
    KVCache,
    compiled_capacity,
    generate,
    generate_stream,
)
from lckv_mini.model import LCKVModel
from lckv_mini.train import compile_for_training

gen = importlib.import_module("lckv_mini.generate")  # the module (the package exports the function)


def stream(model, prompts, n_new, decoder=None, **kw):
    """generate_stream's (token, logits) steps, each decode step made by `decoder` (default:
    the eager `decode_one_token`)."""
    with pytest.MonkeyPatch.context() as mp:
        if decoder is not None:
            mp.setattr(gen, "decode_one_token", decoder)
        return list(generate_stream(model, prompts, n_new, sampling=GREEDY, **kw))


@given(config=configs(block_size=40), P=st.integers(1, 8), n_new=st.integers(2, 10),
       how=st.sampled_from(["stale", "ragged", "streaming", "plain"]), seed=st.integers(0, 2**16))
@settings(max_examples=40)
def test_the_static_step_equals_the_eager_step(config, P, n_new, how, seed):
    """Float64, uncompiled: what the compiler is given computes what the eager decoder does."""
    record("static_step", config, P + n_new, how=how)
    model = random_model(config, seed)
    prompts = random_tokens(config, 2, P, seed)
    kw = {}
    if how == "stale":  # a reused cache whose slots past the position hold an older generation
        kw["cache"] = KVCache(config, 2, 40, dtype=torch.float64)
        stream(model, random_tokens(config, 2, 30, seed + 1), 10, cache=kw["cache"])
    elif how == "ragged":
        prompts = [prompts[0, :P].tolist(), prompts[1, :max(1, P // 2)].tolist()]
    elif how == "streaming":  # the cache fills, then evicts one token a step
        kw.update(sink_size=1, window_size=max(P, 3))
    eager = stream(model, prompts, n_new, **kw)
    static = stream(model, prompts, n_new, CompiledDecoder(backend=None), **kw)
    for (t1, l1), (t2, l2) in zip(eager, static, strict=True):
        assert rel_err(l2, l1) <= 1e-12
        assert torch.equal(t1, t2)


def family_models():
    """One seeded float32 model of every layout family, 4 layers, GQA, a window of 4."""
    shape = dict(vocab_size=48, n_layer=4, n_head=4, n_kv_head=2, n_embd=32,
                 intermediate_size=48, block_size=64, sliding_window=4)
    layouts = {"lckv w=2": make_layer_types("lckv", 4, warmup=2),  # upward reads, one group
               "standard": make_layer_types("standard", 4),
               "cla": make_layer_types("cla", 4, group=2),
               "yoco": make_layer_types("yoco", 4),  # windowed, then downward reads
               "gemma": gemma_layers(4, 2, 2),  # sliding and full, each shared downward
               "lasagna-top": make_layer_types("lasagna-top", 4, n_kv_layers=2),  # two groups
               "sandwich-middle": make_layer_types("sandwich-middle", 4, n_kv_layers=2)}
    for name, lt in layouts.items():
        torch.manual_seed(len(name))
        yield name, LCKVModel(LCKVConfig(**shape, layer_types=lt)).eval()


@pytest.mark.filterwarnings("error::lckv_mini.generate.CompileWarning")  # no hidden fallback
def test_compiled_decoding_gives_the_eager_tokens_on_every_family():
    """torch.compile (tracing backend, fullgraph: a graph break would raise) gives the eager
    greedy tokens for each family, and for LCKV ragged and streaming too; after the first
    generation no position or prompt recompiles."""
    idx = torch.randint(48, (2, 5), generator=torch.Generator().manual_seed(0))
    ragged = [idx[0].tolist(), idx[1, 2:].tolist()]
    for name, model in family_models():
        torch.compiler.reset()  # dynamo keeps at most 8 graphs per function: one family each
        cases = [(idx, {})]
        if name == "lckv w=2":
            cases += [(ragged, {}), (idx, dict(sink_size=2, window_size=8))]
        for prompts, kw in cases:
            eager = generate(model, prompts, 27, sampling=GREEDY, **kw)
            # One decode step compiles the graph (at position 5); every later position must
            # reuse it: a recompile raises, and the raise would surface as a CompileWarning.
            # Streaming has a second graph, for the steps that read the whole (full) cache:
            # its warm-up runs until the cache is full.
            C = kw["sink_size"] + kw["window_size"] if kw else 32
            cache = KVCache(model.config, 2, C, sink_size=kw.get("sink_size"))
            warm_up = C - idx.size(1) + 2 if kw else 2
            generate(model, prompts, warm_up, sampling=GREEDY, compile="aot_eager", cache=cache,
                     **kw)
            with torch.compiler.set_stance("fail_on_recompile"):
                compiled = generate(model, prompts, 27, sampling=GREEDY, compile="aot_eager",
                                    cache=cache, **kw)
            same = (torch.equal(eager, compiled) if isinstance(eager, torch.Tensor)
                    else all(torch.equal(a, b) for a, b in zip(eager, compiled, strict=True)))
            assert same, f"{name} {kw or type(prompts).__name__}: compiled tokens differ"


@pytest.mark.filterwarnings("error::lckv_mini.generate.CompileWarning")
def test_models_that_differ_only_in_structure_each_get_their_own_graph():
    """After its first step a generation skips dynamo's guards (only those that told graphs
    apart before run), which is safe only because the first step of every generation checks
    them all. Two layouts with the same KV layers, hence the same parameters and cache, differ
    only in which cached layer layer 2 reads (a Python int): each, run again after the other,
    must still get its own graph and its eager tokens."""
    torch.compiler.reset()
    idx = torch.randint(32, (1, 4), generator=torch.Generator().manual_seed(0))
    models = []
    for layer_types in ("0_1_3_3", "0_1_1_3"):
        torch.manual_seed(0)  # the same weights: only the structure tells them apart
        config = LCKVConfig(vocab_size=32, n_layer=4, n_head=2, n_kv_head=1, n_embd=16,
                            intermediate_size=32, block_size=32, layer_types=layer_types)
        models.append(LCKVModel(config).eval())
    def logits(model, **kw):
        return torch.stack([lg for _, lg in generate_stream(model, idx, 12, sampling=GREEDY,
                                                             **kw)])

    eager = [logits(m) for m in models]
    assert (eager[0] - eager[1]).abs().max() > 1e-2  # the structures compute different things
    for m, want in [*zip(models, eager), *zip(models, eager)]:  # A, B, then A, B again
        torch.testing.assert_close(logits(m, compile="aot_eager"), want, rtol=1e-5, atol=1e-6)


def tiny_model_and_prompt(seed: int):
    """A 2-layer model (GQA) and a 4-token prompt: what inductor compiles in the suite."""
    torch.compiler.reset()
    torch.manual_seed(seed)
    config = LCKVConfig(vocab_size=32, n_layer=2, n_head=2, n_kv_head=1, n_embd=16,
                        intermediate_size=32, block_size=32, layer_types="1_1")
    return LCKVModel(config).eval(), torch.randint(32, (1, 4))


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="inductor needs a C++ compiler on a CPU; none is on PATH")
def test_inductor_compiles_the_decode_step():
    """The real path, once: inductor's kernels give the eager greedy tokens, without a warning,
    and its one-row matmuls become its own loops instead of BLAS calls (the batch-1 speed-up;
    counted with inductor's cache off, since a cached graph skips the passes)."""
    model, idx = tiny_model_and_prompt(0)
    counters.clear()
    with warnings.catch_warnings(), torch._inductor.config.patch(fx_graph_cache=False):
        warnings.simplefilter("error", CompileWarning)
        compiled = generate(model, idx, 10, sampling=GREEDY, compile=True)
    assert torch.equal(compiled, generate(model, idx, 10, sampling=GREEDY))
    # every one-row product of a step: q, o, gate, up, down in each layer, k and v in the
    # layers that compute KVs (one here: both layers read layer 1), and the head
    assert counters["inductor"]["decompose_mm"] == 2 * 5 + 2 * len(model.config.kv_layers) + 1


# inductor's settings as a platform without a C++ compiler has them (and no cached kernels)
NO_CXX = {"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}


def test_without_a_cxx_compiler_decoding_falls_back_with_one_warning():
    model, idx = tiny_model_and_prompt(1)
    with torch._inductor.config.patch(NO_CXX), \
            pytest.warns(CompileWarning, match="decoding eagerly") as caught:
        compiled = generate(model, idx, 6, sampling=GREEDY, compile=True)
    assert len([w for w in caught if "decoding eagerly" in str(w.message)]) == 1
    assert torch.equal(compiled, generate(model, idx, 6, sampling=GREEDY))
    torch.compiler.reset()


def test_past_dynamos_graph_limit_decoding_falls_back_saying_so():
    """Each batch size is a graph of the one compiled step; once dynamo's limit is reached the
    next batch decodes eagerly, with the eager tokens and a warning that names the limit and
    the way out (not "could not build")."""
    model, idx = tiny_model_and_prompt(2)
    with torch._dynamo.config.patch(recompile_limit=1):  # the limit lowered: one graph
        with warnings.catch_warnings():
            warnings.simplefilter("error", CompileWarning)
            generate(model, idx, 3, sampling=GREEDY, compile="aot_eager")
        with pytest.warns(CompileWarning, match=r"recompile_limit.*torch\.compiler\.reset"):
            compiled = generate(model, idx.repeat(2, 1), 3, sampling=GREEDY, compile="aot_eager")
    assert torch.equal(compiled, generate(model, idx.repeat(2, 1), 3, sampling=GREEDY))
    torch.compiler.reset()


def test_compiled_capacity_rounds_up_to_a_power_of_two_within_the_block():
    assert [compiled_capacity(n, 100) for n in (1, 2, 3, 8, 9, 64, 65, 100)] == \
        [1, 2, 4, 8, 16, 64, 100, 100]


# -- training ----------------------------------------------------------------------------------


def test_compiled_training_step_equals_eager():
    """The iterated parallel forward and its backward under torch.compile (tracing backend,
    fullgraph: no graph break in the passes, the RoPE table cache or the input checks) give the
    eager loss and gradients, for a layout with two iteration groups."""
    torch.compiler.reset()
    torch.manual_seed(0)
    config = LCKVConfig(vocab_size=32, n_layer=4, n_head=2, n_kv_head=1, n_embd=16,
                        intermediate_size=32, block_size=16,
                        layer_types=make_layer_types("lasagna-top", 4, n_kv_layers=2))
    assert len(config.iteration_groups) == 2
    model = LCKVModel(config).train()
    x, y = torch.randint(32, (2, 16)), torch.randint(32, (2, 16))
    grads = []
    compiled = compile_for_training(model, "aot_eager", fullgraph=True)
    # compiled first: an eager call first would build the RoPE table and hide a second compile
    for run in (compiled, model):
        model.zero_grad(set_to_none=True)
        loss = run(x, y)[1]
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (l1, g1), (l2, g2) = grads
    assert torch.allclose(l1, l2, rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(g1, g2, strict=True))
    with torch.compiler.set_stance("fail_on_recompile"):  # the model compiled once, not twice
        compiled(x.flip(0), y)[1].backward()


def test_train_compile_without_a_cxx_compiler_warns_and_trains_eagerly(tmp_path, play):
    from lckv_mini.train import SMOKE, TrainConfig, train

    cfg = TrainConfig(**{**SMOKE, "data": str(play), "tokenizer": "char", "progress": False,
                         "out_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"),
                         "max_iters": 2, "sample_tokens": 0, "compile": True})
    with torch._inductor.config.patch(NO_CXX), \
            pytest.warns(CompileWarning, match="training eagerly"):
        summary = train(cfg)
    assert summary["val_loss"] > 0


# -- the benchmark -----------------------------------------------------------------------------


def test_the_compiled_benchmark_reports_against_the_limits(tmp_path):
    from lckv_mini.bench import main

    res = main(["compiled", "--shape", "tiny", "--train-len", "8", "--train-batch", "2",
                "--compile-steps", "3", "--prompt-len", "4", "--decode-len", "6", "--reps", "1",
                "--cpu-budget-gib", "0.0005", "--compile-backend", "eager",
                "--out", str(tmp_path)])["compiled"]
    assert res["limits"]["matmul_flops"] > 0 and res["limits"]["read_bytes_per_s"] > 0
    train = {(r["model"], r["kind"]): r for r in res["training"]}
    assert set(train) == {(m, k) for m in ("standard", "lckv w=2") for k in ("eager", "compiled")}
    for m in ("standard", "lckv w=2"):
        c = train[m, "compiled"]
        assert len(c["losses"]) == 3 and c["max_loss_diff"] < 1e-4  # the same loss curve
        assert c["of_matmul"] > 0 and "compile_s" in c and "pays_after_steps" in c
    assert train["lckv w=2", "compiled"]["flop_ratio"] > 1
    assert all(r["same_tokens"] for r in res["decoding"] if r["kind"] == "compiled")
    assert all(r["of_bound"] > 0 and r["bound_ms"] > 0 for r in res["decoding"])
    assert res["transformers"] == {"skipped": "no --model folder given"}
    assert (tmp_path / "compiled.json").exists()
