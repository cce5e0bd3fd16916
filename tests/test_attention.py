"""The attention function against a plain softmax reference, and the zero-output rule."""

import math

import pytest
import torch
from conftest import random_model, random_tokens
from hypothesis import given
from hypothesis import strategies as st

from lckv_mini.config import LCKVConfig
from lckv_mini.model import attention


def reference_attention(q, k, v, q_start, mask_diagonal, window):
    """Softmax over the visible keys written out with loops; no SDPA, no masking tricks."""
    B, nh, Tq, hs = q.shape
    group = nh // k.size(1)
    out = torch.zeros_like(q)
    for t in range(Tq):
        p = q_start + t
        visible = [j for j in range(k.size(2)) if (j < p if mask_diagonal else j <= p)
                   and (window is None or p - j < window)]
        if not visible:
            continue  # sees no key: output stays zero
        for h in range(nh):
            keys, values = k[:, h // group, visible], v[:, h // group, visible]
            scores = (keys @ q[:, h, t, :, None]).squeeze(-1) / math.sqrt(hs)
            out[:, h, t] = (scores.softmax(-1)[:, None, :] @ values).squeeze(1)
    return out


@given(Tq=st.integers(1, 6), extra=st.integers(0, 4), q_start=st.integers(0, 6),
       mask_diagonal=st.booleans(), window=st.none() | st.integers(1, 4),
       n_kv=st.sampled_from([1, 2]), group=st.sampled_from([1, 3]), seed=st.integers(0, 999),
       aligned=st.booleans())
def test_attention_matches_reference(Tq, extra, q_start, mask_diagonal, window, n_kv, group,
                                     seed, aligned):
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
    got = attention(q, k, v, q_start=q_start, mask_diagonal=mask_diagonal, window=window)
    want = reference_attention(q, k, v, q_start, mask_diagonal, window)
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
    seen = {}
    model.model.layers[0].self_attn.o_proj.register_forward_hook(
        lambda mod, args, out: seen.setdefault("attn", args[0]))
    model(random_tokens(config, 2, 4, 0), mode=mode)
    assert (seen["attn"][:, 0] == 0).all()  # token 0's attention output, before o_proj
