"""The attention function against a plain softmax reference, and the zero-output rule."""

import math

import pytest
import torch
from conftest import random_model, random_tokens
from hypothesis import example, given
from hypothesis import strategies as st

from lckv_mini.config import LCKVConfig
from lckv_mini.model import attention


def reference_attention(q, k, v, q_start, mask_diagonal, window, pad=None):
    """Softmax over the visible keys written out with loops; no SDPA, no masking tricks.
    pad: row b's first pad[b] keys are left padding, never visible."""
    B, nh, Tq, hs = q.shape
    group = nh // k.size(1)
    out = torch.zeros_like(q)
    for b in range(B):
        first = 0 if pad is None else int(pad[b])
        for t in range(Tq):
            p = q_start + t
            visible = [j for j in range(first, k.size(2)) if (j < p if mask_diagonal else j <= p)
                       and (window is None or p - j < window)]
            if not visible:
                continue  # sees no key: output stays zero
            for h in range(nh):
                keys, values = k[b, h // group, visible], v[b, h // group, visible]
                scores = keys @ q[b, h, t] / math.sqrt(hs)
                out[b, h, t] = scores.softmax(-1) @ values
    return out


@given(Tq=st.integers(1, 6), extra=st.integers(0, 4), q_start=st.integers(0, 6),
       mask_diagonal=st.booleans(), window=st.none() | st.integers(1, 4),
       n_kv=st.sampled_from([1, 2]), group=st.sampled_from([1, 3]), seed=st.integers(0, 999),
       aligned=st.booleans(), pad=st.none() | st.tuples(st.integers(0, 5), st.integers(0, 5)))
# decoding one token with the diagonal masked: the query at q_start sees keys 0..q_start-1
@example(Tq=1, extra=1, q_start=4, mask_diagonal=True, window=None, n_kv=1, group=3, seed=0,
         aligned=False, pad=None)
@example(Tq=1, extra=1, q_start=4, mask_diagonal=True, window=None, n_kv=1, group=3, seed=0,
         aligned=False, pad=(0, 2))
# ... and against a store that already holds its own token's key (a chunk written before it is
# read): the key at q_start must stay invisible
@example(Tq=1, extra=0, q_start=3, mask_diagonal=True, window=None, n_kv=2, group=1, seed=0,
         aligned=False, pad=None)
@example(Tq=5, extra=0, q_start=0, mask_diagonal=True, window=None, n_kv=2, group=1, seed=1,
         aligned=True, pad=(1, 3))  # a left-padded prompt through a layer reading from above
def test_attention_matches_reference(Tq, extra, q_start, mask_diagonal, window, n_kv, group,
                                     seed, aligned, pad):
    # aligned: the whole-sequence case (queries and keys both at 0..T-1) that takes the fast path
    if aligned:
        q_start, Tk = 0, Tq
    else:
        Tk = q_start + Tq - extra if mask_diagonal else q_start + Tq
        Tk = max(Tk, 0)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, n_kv * group, Tq, 4, generator=g, dtype=torch.float64)
    k = torch.randn(2, n_kv, Tk, 4, generator=g, dtype=torch.float64)
    v = torch.randn(2, n_kv, Tk, 4, generator=g, dtype=torch.float64)
    pad = None if pad is None else torch.tensor(pad)
    got = attention(q, k, v, q_start=q_start, mask_diagonal=mask_diagonal, window=window, pad=pad)
    want = reference_attention(q, k, v, q_start, mask_diagonal, window, pad)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


CASES = {  # every code path of `attention` in which query 0 sees no key
    "whole sequence, fast path": dict(q_start=0, Tq=5, Tk=5, window=None),
    "whole sequence, windowed mask": dict(q_start=0, Tq=5, Tk=5, window=2),
    "single query, no keys yet": dict(q_start=0, Tq=1, Tk=0, window=None),
    "chunk against a longer cache": dict(q_start=0, Tq=3, Tk=4, window=None),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_query_that_sees_no_key_outputs_exact_zero(case, dtype):
    c = CASES[case]
    q = torch.randn(2, 4, c["Tq"], 8, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 2, c["Tk"], 8, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 2, c["Tk"], 8, dtype=dtype, requires_grad=True)
    out = attention(q, k, v, q_start=c["q_start"], mask_diagonal=True, window=c["window"])
    assert torch.isfinite(out).all()
    assert (out[:, :, 0] == 0).all()
    if out.requires_grad:  # with no keys at all the zeros are a constant
        out.float().square().sum().backward()
    for t in (q, k, v):
        assert t.grad is None or torch.isfinite(t.grad).all()


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_model_first_token_of_a_layer_reading_above_gets_zero_attention(mode):
    config = LCKVConfig(vocab_size=11, n_layer=3, n_head=2, n_kv_head=1, n_embd=8,
                        intermediate_size=8, block_size=8, layer_types="2_2_2")
    model = random_model(config, 0)
    seen = []
    model.model.layers[0].self_attn.o_proj.register_forward_hook(
        lambda mod, args, out: seen.append(args[0]))
    model(random_tokens(config, 2, 4, 0), mode=mode, forward_passes=2, backward_passes=1)
    # Every call (each pass, each step) gives token 0 zero attention output, before o_proj. The
    # parallel path skips the first pass's attention (it reads zeros), so its calls are passes 2
    # and 3, where the KVs are not zero and only the mask can make token 0's output zero.
    if mode == "parallel":
        assert len(seen) == 2
        for attn in seen:
            assert (attn[:, 0] == 0).all() and (attn[:, 1:] != 0).any()
    else:  # one call per token
        assert len(seen) == 4 and (seen[0] == 0).all()
        assert all((attn != 0).any() for attn in seen[1:])
