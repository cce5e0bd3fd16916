"""The decoder: cached decoding equals the sequential model, prefill modes, cache size,
streaming, sampling, and bad inputs."""

import dataclasses

import pytest
import torch
from conftest import UPWARD_FAMILIES, configs, random_model, random_tokens, record, rel_err
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lckv_mini.config import LCKVConfig, make_layer_types
from lckv_mini.generate import (
    GREEDY,
    KVCache,
    Sampling,
    cache_bytes,
    encode_prompt,
    generate,
    generate_stream,
    last_token_layers,
    logits_to_probs,
    sample,
)
from lckv_mini.model import LCKVModel, apply_rope

seeds = st.integers(0, 2**16)
# every family, the ones that read from above (masked diagonal) drawn most
MOSTLY_UPWARD = ("random", "lckv", "groups", "study", "random", "standard", "cla", "yoco",
                 "gemma")


@given(config=configs(families=MOSTLY_UPWARD, forward_passes=8, block_size=24), P=st.integers(1, 8),
       n_new=st.integers(1, 8), prefill=st.sampled_from(["parallel", "sequential", "adaptive"]),
       seed=seeds)
def test_cached_greedy_decoding_equals_the_sequential_model(config, P, n_new, prefill, seed):
    record("cached_greedy", config, P, prefill=prefill)
    model = random_model(config, seed)
    idx = random_tokens(config, 2, P, seed)
    steps = list(generate_stream(model, idx, n_new, sampling=GREEDY, prefill=prefill, tol=1e-13))
    out = torch.cat([idx] + [t for t, _ in steps], dim=1)
    full, _ = model(out, mode="sequential")  # the reference recomputes everything each time
    for i, (token, logits) in enumerate(steps):
        ref = full[:, P - 1 + i]
        assert rel_err(logits, ref) <= (1e-10 if prefill != "adaptive" else 1e-8)
        assert torch.equal(token[:, 0], ref.argmax(-1))
    again = generate(model, idx, n_new, sampling=GREEDY, prefill=prefill, tol=1e-13)
    assert torch.equal(again, out)


@given(config=configs(block_size=24), P=st.integers(1, 10), seed=seeds, data=st.data())
def test_parallel_and_adaptive_prefill_equal_sequential(config, P, seed, data):
    m = data.draw(st.integers(max(0, P - config.backward_passes), P + 1), label="m")
    config = dataclasses.replace(config, forward_passes=m)  # m + b >= P
    model = random_model(config, seed)
    idx = random_tokens(config, 2, P, seed)

    def encode(mode, tol=1e-5):
        cache = KVCache(config, 2, P, dtype=torch.float64)
        logits, passes = encode_prompt(model, idx, cache, mode, tol)
        return logits, cache, passes

    seq_logits, seq, _ = encode("sequential")
    par_logits, par, passes = encode("parallel")
    assert rel_err(par_logits, seq_logits) <= 1e-10
    for j in config.kv_layers:
        for a, b in zip(par.read(j), seq.read(j)):
            assert a.shape == b.shape and rel_err(a, b) <= 1e-10
    # Adaptive stops once a pass changes no KV by more than tol. Where it stops it is exact or,
    # in float64 with tol 1e-12, within a few tol of the sequential KVs (the iteration is
    # exact after P passes, and a change within tol means the remaining ones are that small on
    # these contracting-enough random models; measured worst case below 1e-9).
    ada_logits, ada, ada_passes = encode("adaptive", tol=1e-12)
    assert 1 <= ada_passes <= passes
    for j in config.kv_layers:
        for a, b in zip(ada.read(j), seq.read(j)):
            assert (a - b).abs().max() <= 1e-8


def test_adaptive_prefill_stops_early_on_a_contracting_model():
    # A freshly initialised model (std 0.02) contracts fast: far fewer passes than P are needed.
    config = LCKVConfig(vocab_size=50, n_layer=6, n_head=2, n_kv_head=1, n_embd=16,
                        intermediate_size=32, block_size=64, forward_passes=60,
                        layer_types=make_layer_types("lckv", 6, warmup=2))
    torch.manual_seed(0)
    model = LCKVModel(config).double().eval()
    idx = random_tokens(config, 1, 40, 0)
    cache = KVCache(config, 1, 40, dtype=torch.float64)
    _, passes = encode_prompt(model, idx, cache, "adaptive", tol=1e-10)
    assert passes < 40


@settings(max_examples=30)
@given(config=configs(), B=st.integers(1, 3), T=st.integers(1, 12),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_cache_bytes_equal_what_a_forward_produces(config, B, T, dtype):
    # Independent of the formula: the KVs the sequential computation actually stores for T
    # tokens, counted from its tensors, and the bytes a KVCache actually allocates.
    model = LCKVModel(config).to(dtype).eval()
    with torch.no_grad():
        _, store = model.forward_sequential(random_tokens(config, B, T, 0))
    produced = sum(t.numel() * t.element_size() for pair in store.kv.values() for t in pair)
    assert cache_bytes(config, B, T, dtype) == produced
    assert KVCache(config, B, T, dtype=dtype).nbytes == produced


@pytest.mark.parametrize("n_layer, w", [(12, 2), (12, 10), (8, 0), (6, 4)])
def test_lckv_cache_is_w_plus_1_over_L_of_standard(n_layer, w):
    base = dict(vocab_size=10, n_layer=n_layer, n_head=4, n_kv_head=2, n_embd=32,
                intermediate_size=8, block_size=8)
    std = cache_bytes(LCKVConfig(**base), 4, 2048)
    lckv = cache_bytes(LCKVConfig(**base, layer_types=make_layer_types("lckv", n_layer,
                                                                       warmup=w)), 4, 2048)
    assert lckv * n_layer == std * (w + 1)


# -- fast prefill -----------------------------------------------------------------------------


def small(layer_types, n_layer=6, **kw):
    fields = dict(vocab_size=23, n_layer=n_layer, n_head=4, n_kv_head=2, n_embd=16,
                  intermediate_size=12, block_size=24, layer_types=layer_types, sliding_window=3)
    return LCKVConfig(**{**fields, **kw})


def layer_inputs(model):
    """Hooks recording how many tokens each layer runs on, in order: [(layer, T), ...]."""
    seen = []
    for i, block in enumerate(model.model.layers):
        block.register_forward_pre_hook(lambda _, args, i=i: seen.append((i, args[0].size(1))))
    return seen


# Every family draws: those whose top layers read below them (gemma, yoco, cla, random, some
# study layouts) skip work, the others (lckv, the top of every upward family) skip nothing.
@settings(max_examples=60)
@given(config=configs(families=("gemma", "yoco", "random", "cla", "gemma", "random", "study",
                                "lckv"), block_size=24),
       P=st.integers(1, 10).map(lambda k: 13 - k), mode=st.sampled_from(["parallel", "adaptive"]),
       ragged=st.booleans(), seed=seeds)
@example(config=small(make_layer_types("gemma", 6)), P=12, mode="parallel", ragged=False, seed=0)
@example(config=small(make_layer_types("yoco", 6)), P=12, mode="adaptive", ragged=True, seed=1)
@example(config=small("0_1_1s_3_3_3s"), P=9, mode="parallel", ragged=True, seed=2)
def test_fast_prefill_equals_the_full_encoding(config, P, mode, ragged, seed):
    skipped = last_token_layers(config)
    record("fast_prefill", config, P, skipped=len(skipped))
    model = random_model(config, seed)
    idx = random_tokens(config, 2, P, seed)
    pad = torch.tensor([0, P // 2]) if ragged else None  # row 1 left-padded by P // 2 tokens

    def encode(fast):
        cache = KVCache(config, 2, P, dtype=torch.float64, pad=pad)
        logits, _ = encode_prompt(model, idx, cache, mode, tol=1e-12, fast_prefill=fast)
        return logits, cache

    seen = layer_inputs(model)
    fast, fast_cache = encode(True)
    assert all(T == (1 if i in skipped else P) for i, T in seen)
    full, full_cache = encode(False)
    for j in config.kv_layers:  # the cache is the same computation: bit-identical
        assert torch.equal(fast_cache.read(j)[0], full_cache.read(j)[0])
        assert torch.equal(fast_cache.read(j)[1], full_cache.read(j)[1])
    # The logits differ only in float64 rounding: BLAS sums one row of a (1, C) @ (C, N) product
    # in another order than the same row of a (P, C) @ (C, N) one (measured: a few 1e-16).
    if skipped:
        torch.testing.assert_close(fast, full, rtol=1e-12, atol=1e-12)
    else:
        assert torch.equal(fast, full)


@pytest.mark.parametrize("kind, kw", [("lckv", dict(warmup=0)), ("lckv", dict(warmup=2)),
                                      ("lckv", dict(warmup=4)), ("sandwich-top", {}),
                                      ("pizza-top", {}), ("lasagna-top", {}),
                                      ("standard", {})])
def test_fast_prefill_is_a_no_op_where_the_top_layer_computes_kvs(kind, kw):
    config = small(make_layer_types(kind, 6, **kw))
    assert list(last_token_layers(config)) == []  # LCKV's top KV layer is the top
    model = random_model(config, 0)
    seen = layer_inputs(model)
    logits = [encode_prompt(model, random_tokens(config, 1, 9, 0),
                            KVCache(config, 1, 9, dtype=torch.float64), fast_prefill=fast)[0]
              for fast in (True, False)]
    assert torch.equal(*logits)
    assert {T for _, T in seen} == {9}  # every layer ran on every token, both times


def test_a_stop_inside_an_iteration_group_is_refused():
    model = random_model(small(make_layer_types("lckv", 6)), 0)  # group (1, 4)
    with pytest.raises(ValueError, match="stop=4 cuts the iteration group \\(1, 4\\)"):
        model.forward_parallel(model.embed(random_tokens(model.config, 1, 3, 0)), 1, 1, stop=4)


def test_fast_prefill_skips_the_layers_above_the_last_kv_layer():
    assert list(last_token_layers(small(make_layer_types("yoco", 6)))) == [3, 4, 5]
    assert list(last_token_layers(small(make_layer_types("gemma", 6)))) == [5]
    assert list(last_token_layers(small(make_layer_types("cla", 6, group=3)))) == [4, 5]
    config = small(make_layer_types("gemma", 30, n_kv_layers=20), n_layer=30)
    assert list(last_token_layers(config)) == list(range(20, 30))  # Gemma 3n: a third skipped


# -- streaming ------------------------------------------------------------------------------


@settings(max_examples=25)
@given(config=configs(families=UPWARD_FAMILIES, block_size=16, max_layers=4),
       sink=st.integers(0, 3), window=st.integers(2, 8), seed=seeds)
def test_streaming_memory_is_flat_over_ten_windows(config, sink, window, seed):
    record("streaming", config, 2)
    model = random_model(config, seed)
    idx = random_tokens(config, 2, 2, seed)
    n_new = 10 * (sink + window)  # runs far past block_size=16: positions are cache slots
    cache = KVCache(config, 2, sink + window, dtype=torch.float64, sink_size=sink)
    pointers = tuple(t.data_ptr() for t in cache.k.values())
    sizes, lengths = [], []
    for _token, logits in generate_stream(model, idx, n_new, sampling=GREEDY, sink_size=sink,
                                          window_size=window, cache=cache):
        assert torch.isfinite(logits).all()
        sizes.append(cache.nbytes)
        lengths.append(cache.seq_len)
    assert len(sizes) == n_new and len(set(sizes)) == 1
    assert tuple(t.data_ptr() for t in cache.k.values()) == pointers  # same buffers throughout
    assert max(lengths) == sink + window  # full, and never more
    with pytest.raises(ValueError, match="does not fit"):
        next(generate_stream(model, idx, 3, sink_size=sink + 1, window_size=window, cache=cache))


@given(config=configs(block_size=24), P=st.integers(1, 5), n_new=st.integers(1, 6),
       extra=st.integers(0, 4), seed=seeds)
def test_streaming_shorter_than_the_cache_equals_plain_decoding(config, P, n_new, extra, seed):
    model = random_model(config, seed)
    idx = random_tokens(config, 2, P, seed)
    plain = generate(model, idx, n_new, sampling=GREEDY)
    capacity = P + n_new + extra
    streamed = generate(model, idx, n_new, sampling=GREEDY, sink_size=1, window_size=capacity - 1)
    assert torch.equal(plain, streamed)


@settings(max_examples=20)
@given(layer_types=st.sampled_from(["0", "0_0", "0_0_0"]), sink=st.integers(0, 3),
       window=st.integers(2, 6), P=st.integers(1, 4), seed=seeds)
@example(layer_types="0_0", sink=2, window=3, P=3, seed=0)
def test_streamed_logits_equal_the_model_on_sinks_and_recent_tokens(layer_types, sink, window, P,
                                                                    seed):
    # Every layer reads layer 0, whose KVs depend on their own token only, so after eviction
    # the output depends on nothing but the kept tokens: streaming must then give exactly what
    # the model computes on (sinks + most recent tokens) from scratch. A wrong re-rotation of
    # the kept keys, or keeping the wrong tokens, shows here.
    n_layer = layer_types.count("_") + 1
    config = LCKVConfig(vocab_size=30, n_layer=n_layer, n_head=2, n_kv_head=1, n_embd=8,
                        intermediate_size=8, block_size=16, layer_types=layer_types)
    model = random_model(config, seed)
    P = min(P, sink + window)
    idx = random_tokens(config, 1, P, seed)
    n_new = 3 * (sink + window)  # evicts many times
    steps = list(generate_stream(model, idx, n_new, sampling=GREEDY, sink_size=sink,
                                 window_size=window))
    seq = idx[0].tolist() + [int(t) for t, _ in steps]
    for i, (_, logits) in enumerate(steps[1:], start=1):
        n = P + i  # tokens in the text when these logits were computed
        kept = seq[:n] if n <= sink + window else seq[:sink] + seq[n - window:n]
        ref, _ = model(torch.tensor([kept]), mode="sequential")
        assert rel_err(logits, ref[:, -1]) <= 1e-10, i


@given(sink=st.integers(0, 3), n=st.integers(1, 3), length=st.integers(4, 9), seed=seeds)
def test_eviction_rotates_keys_by_their_new_slot(sink, n, length, seed):
    config = LCKVConfig(vocab_size=5, n_layer=2, n_head=2, n_kv_head=1, n_embd=8,
                        intermediate_size=4, block_size=16)
    model = LCKVModel(config).double()
    cos, sin = model.rope(0, model.config.block_size, torch.float64, "cpu")
    g = torch.Generator().manual_seed(seed)
    raw_k = torch.randn(1, 1, length, 4, generator=g, dtype=torch.float64)
    v = torch.randn(1, 1, length, 4, generator=g, dtype=torch.float64)
    if length - n < sink:
        return
    cache = KVCache(config, 1, length, dtype=torch.float64, sink_size=sink)
    for j in cache.layers:
        cache.write(j, apply_rope(raw_k, cos[:length], sin[:length]), v)  # rotated at slots
    cache.evict(n, cos[n], sin[n])
    keep = list(range(sink)) + list(range(sink + n, length))
    want_k = apply_rope(raw_k[:, :, keep], cos[:len(keep)], sin[:len(keep)])
    for j in cache.layers:
        k, vv = cache.read(j)
        # the model's RoPE tables are float32, so composing rotations is float32-accurate
        torch.testing.assert_close(k, want_k, rtol=1e-6, atol=1e-6)
        assert torch.equal(vv, v[:, :, keep])


# -- sampling -------------------------------------------------------------------------------


def tiny_model():
    config = LCKVConfig(vocab_size=40, n_layer=4, n_head=2, n_kv_head=1, n_embd=16,
                        intermediate_size=16, block_size=32,
                        layer_types=make_layer_types("lckv", 4, warmup=2))
    return random_model(config, 0, std=0.5).float()


def test_seeded_sampling_is_reproducible():
    model, idx = tiny_model(), torch.tensor([[1, 2, 3], [4, 5, 6]])

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return generate(model, idx, 12, sampling=Sampling(1.0, 10, 0.9), generator=g)

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_top_k_1_equals_greedy():
    model, idx = tiny_model(), torch.tensor([[1, 2, 3]])
    g = torch.Generator().manual_seed(0)
    assert torch.equal(generate(model, idx, 10, sampling=Sampling(0.8, top_k=1), generator=g),
                       generate(model, idx, 10, sampling=GREEDY))


@given(probs=st.lists(st.floats(0.01, 1.0), min_size=2, max_size=12), p=st.floats(0.05, 1.0))
def test_top_p_keeps_the_smallest_set_reaching_p(probs, p):
    logits = torch.tensor(probs, dtype=torch.float64).log()[None]
    full = logits_to_probs(logits)[0]
    kept = logits_to_probs(logits, Sampling(top_p=p))[0] > 0
    order = full.argsort(descending=True)
    n = int(kept.sum())
    assert kept[order[:n]].all()  # the kept tokens are the n most likely
    assert full[order[:n]].sum() >= p - 1e-6  # they reach p
    assert n == 1 or full[order[:n - 1]].sum() < p + 1e-6  # and one fewer would not
    assert abs(logits_to_probs(logits, Sampling(top_p=p))[0].sum().item() - 1) < 1e-5  # float32 sum


def test_temperature_zero_is_argmax_and_stop_tokens_end_rows():
    logits = torch.tensor([[0.1, 3.0, 0.2], [2.0, 0.0, 1.0]])
    assert sample(logits, GREEDY).tolist() == [[1], [0]]
    model, idx = tiny_model(), torch.tensor([[1, 2, 3], [7, 8, 9]])
    greedy = generate(model, idx, 10, sampling=GREEDY)
    stop = int(greedy[0, 5])
    out = generate(model, idx, 10, sampling=GREEDY, stop_tokens=[stop])
    row = out[0, 3:].tolist()
    first = row.index(stop)
    assert all(t == stop for t in row[first:])
    assert row[:first + 1] == greedy[0, 3:3 + first + 1].tolist()
    # the other row did not stop: it goes on, exactly as plain greedy decoding
    if stop not in greedy[1, 3:].tolist():
        assert out.size(1) == greedy.size(1)
        assert torch.equal(out[1], greedy[1])


def test_generation_ends_only_when_every_row_has_stopped():
    model, idx = tiny_model(), torch.tensor([[1, 2, 3], [7, 8, 9]])
    greedy = generate(model, idx, 12, sampling=GREEDY)
    stop = next(t for t in greedy[0, 3:].tolist() if t not in greedy[1, 3:].tolist())
    out = generate(model, idx, 12, sampling=GREEDY, stop_tokens=[stop])
    assert out.shape == greedy.shape  # row 1 never emits `stop`, so all 12 steps run
    assert torch.equal(out[1], greedy[1])
    k = greedy[0, 3:].tolist().index(stop)
    assert out[0, 3 + k:].eq(stop).all() and torch.equal(out[0, :4 + k], greedy[0, :4 + k])


def test_sample_draws_from_softmax_of_logits_over_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    n, g = 40000, torch.Generator().manual_seed(0)
    for temperature in (0.5, 1.0, 2.0):
        want = torch.softmax(logits[0] / temperature, -1)
        draws = sample(logits.expand(n, -1), Sampling(temperature), g)[:, 0]
        freq = torch.bincount(draws, minlength=4).double() / n
        # 5 standard errors of a binomial proportion: fails for temperature applied twice
        assert ((freq - want).abs() <= 5 * (want * (1 - want) / n).sqrt() + 1e-4).all(), \
            temperature


def test_generate_in_train_mode_decodes_as_in_eval_and_restores_the_mode():
    config = LCKVConfig(vocab_size=40, n_layer=4, n_head=2, n_kv_head=1, n_embd=16,
                        intermediate_size=32, block_size=32, dropout=0.5,
                        layer_types=make_layer_types("lckv", 4, warmup=2))
    model = random_model(config, 0, std=0.5).float()
    idx = torch.tensor([[1, 2, 3]])
    expected = generate(model.eval(), idx, 10, sampling=GREEDY)
    model.train()
    assert torch.equal(generate(model, idx, 10, sampling=GREEDY), expected)
    assert model.training


def test_a_reused_cache_gives_the_same_generation():
    model, idx = tiny_model(), torch.tensor([[1, 2, 3], [4, 5, 6]])
    cache = KVCache(model.config, 2, 16)
    first = generate(model, idx, 10, sampling=GREEDY, cache=cache)
    second = generate(model, idx, 10, sampling=GREEDY, cache=cache)
    assert torch.equal(first, second)
    assert torch.equal(first, generate(model, idx, 10, sampling=GREEDY))


# -- bad inputs -----------------------------------------------------------------------------


@pytest.mark.parametrize("idx, kwargs, message", [
    (torch.zeros(1, 0, dtype=torch.long), {}, "prompt is empty"),
    (torch.tensor([[1, 40]]), {}, "token id 40 is out of range"),
    (torch.zeros(1, 33, dtype=torch.long), {}, "exceeds block_size=32"),
    (torch.zeros(1, 30, dtype=torch.long), {}, "max_new_tokens \\(5\\) = 35 exceeds block_size"),
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([[1, 2], [[3]]], {}, "prompt 1 has shape"),
    ([], {}, "no prompts"),
    ([[1, 2], [3]], dict(sink_size=2, window_size=4), "cannot stream"),
    (torch.zeros(1, 3, dtype=torch.long), dict(prefill="magic"), "prefill must be"),
    (torch.zeros(1, 3, dtype=torch.long), dict(sink_size=2), "both sink_size"),
    (torch.zeros(1, 9, dtype=torch.long), dict(sink_size=2, window_size=4), "does not fit"),
])
def test_bad_generation_input_raises_clear_error(idx, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(tiny_model(), idx, 5, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1), "temperature"), (dict(top_k=0), "top_k"), (dict(top_p=1.5), "top_p"),
])
def test_bad_sampling_options_raise_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs)


def test_cache_rejects_wrong_shapes_and_overflow():
    config = tiny_model().config
    cache = KVCache(config, 2, 4)
    k = torch.zeros(2, 1, 3, 8)
    with pytest.raises(ValueError, match="cache holds"):
        cache.write(3, k[:1], k[:1])
    cache.write(3, k, k)
    with pytest.raises(ValueError, match="overflows the cache capacity 4"):
        cache.write(3, k, k)


# -- prompts of different lengths in one batch ------------------------------------------------


@settings(max_examples=20)
@given(config=configs(block_size=24), lengths=st.lists(st.integers(1, 7), min_size=2, max_size=3),
       n_new=st.integers(1, 5), prefill=st.sampled_from(["parallel", "sequential", "adaptive"]),
       seed=seeds)
@example(config=LCKVConfig(vocab_size=20, n_layer=6, n_head=2, n_kv_head=1, n_embd=8,
                           intermediate_size=8, block_size=24, layer_types="1_1_3_3_5_5"),
         lengths=[2, 7, 4], n_new=4, prefill="parallel", seed=0)
def test_each_row_of_a_ragged_batch_is_what_it_would_be_alone(config, lengths, n_new, prefill,
                                                              seed):
    config = dataclasses.replace(config, forward_passes=8)  # m + b >= every length: exact
    model = random_model(config, seed)
    prompts = [random_tokens(config, 1, n, seed + i)[0].tolist() for i, n in enumerate(lengths)]
    batch = generate(model, prompts, n_new, sampling=GREEDY, prefill=prefill, tol=1e-13)
    for prompt, row in zip(prompts, batch):
        alone = generate(model, torch.tensor([prompt]), n_new, sampling=GREEDY, prefill=prefill,
                         tol=1e-13)[0]
        assert torch.equal(row, alone)
    # and the logits, not only the argmax: the padding must be invisible to every layer
    steps = list(generate_stream(model, prompts, n_new, sampling=GREEDY, prefill=prefill,
                                 tol=1e-13))
    for i, prompt in enumerate(prompts):
        ref = list(generate_stream(model, torch.tensor([prompt]), n_new, sampling=GREEDY,
                                   prefill=prefill, tol=1e-13))
        for (_, got), (_, want) in zip(steps, ref):
            assert rel_err(got[i:i + 1], want) <= (1e-10 if prefill != "adaptive" else 1e-7)
