"""Does the device compute what the CPU computes? The GPU check's first part: the parallel
computation against the sequential one (Theorem 1), cached and ragged decoding against the
sequential model, bfloat16 with the zero-output rule, and which SDPA backend serves each form."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..config import LCKVConfig, make_layer_types
from ..generate import GREEDY, generate_stream
from ..model import LCKVModel, PassKVs, attention
from .common import CheckSettings, Deadline, attempt, sync

# float32 tolerances, relative to the largest reference value: max |a - ref| / max |ref|
LOGITS_TOL = 1e-4
GRAD_TOL = 1e-3


def rel_err(a: Tensor, ref: Tensor) -> float:
    """max |a - ref| / max |ref|, in float64."""
    a, ref = a.double(), ref.double()
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def flat_grads(model: LCKVModel) -> Tensor:
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten()
                      for p in model.parameters()])


def layouts(shape: LCKVConfig, window: int) -> dict[str, LCKVConfig]:
    """The layouts the check covers: none, one and several iteration groups, sliding windows."""
    L = shape.n_layer
    kinds = {"standard": make_layer_types("standard", L),
             "lckv w=0": make_layer_types("lckv", L, warmup=0),
             "lckv w=2": make_layer_types("lckv", L, warmup=2),
             "cla": make_layer_types("cla", L),
             "lasagna-top": make_layer_types("lasagna-top", L, n_kv_layers=L // 2),
             "yoco": make_layer_types("yoco", L)}
    return {name: replace(shape, layer_types=lt, sliding_window=window if "s" in lt else None)
            for name, lt in kinds.items()}


def check_theorem1(model: LCKVModel, idx: Tensor) -> dict:
    """Sequential vs parallel with m + b >= T: the same logits (m = T-1, b = 1) and, with every
    pass under gradient (m = 0, b = T), the same gradients (Theorem 1)."""
    x, y = idx[:, :-1], idx[:, 1:]
    T = x.size(1)
    model.zero_grad(set_to_none=True)
    seq_logits, loss = model(x, y, mode="sequential")
    loss.backward()
    seq_grads = flat_grads(model)
    model.zero_grad(set_to_none=True)
    _, loss = model(x, y, forward_passes=0, backward_passes=T)
    loss.backward()
    par_grads = flat_grads(model)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        par_logits, _ = model(x, forward_passes=T - 1, backward_passes=1)
    out = {"logits_rel_err": rel_err(par_logits, seq_logits),
           "grad_rel_err": rel_err(par_grads, seq_grads)}
    out["passed"] = out["logits_rel_err"] <= LOGITS_TOL and out["grad_rel_err"] <= GRAD_TOL
    return out


def stream(model: LCKVModel, prompts, n: int) -> tuple[Tensor, Tensor]:
    """Greedy decoding with the cache: tokens (B, n) and the logits they came from (B, n, V)."""
    steps = list(generate_stream(model, prompts, n, sampling=GREEDY))
    return torch.cat([t for t, _ in steps], 1), torch.stack([lg for _, lg in steps], 1)


def check_decode(model: LCKVModel, prompt: Tensor, n: int) -> dict:
    """Cached greedy decoding against the sequential model run on the same tokens: the same
    logits, and each token its argmax (a different token only at a near tie of the top two)."""
    P = prompt.size(1)
    tokens, logits = stream(model, prompt, n)
    with torch.no_grad():
        ref = model(torch.cat([prompt, tokens], 1)[:, :-1], mode="sequential")[0][:, P - 1:]
    top2 = ref.topk(2, dim=-1).values
    near_tie = top2[..., 0] - top2[..., 1] <= LOGITS_TOL * ref.abs().max()
    differ = ref.argmax(-1) != tokens
    out = {"logits_rel_err": rel_err(logits, ref), "tokens": tokens.numel(),
           "tokens_not_argmax": int(differ.sum()), "near_ties": int((differ & near_tie).sum())}
    out["passed"] = out["logits_rel_err"] <= LOGITS_TOL and not bool((differ & ~near_tie).any())
    return out


def check_ragged(model: LCKVModel, prompts: list[Tensor], n: int) -> dict:
    """A left-padded batch of prompts of different lengths against each prompt alone."""
    tokens, logits = stream(model, prompts, n)
    errs, same = [], True
    for i, p in enumerate(prompts):
        alone_tokens, alone_logits = stream(model, [p], n)
        errs.append(rel_err(logits[i], alone_logits[0]))
        same &= bool((tokens[i] == alone_tokens[0]).all())
    out = {"lengths": [len(p) for p in prompts], "logits_rel_err": max(errs),
           "tokens_equal": same}
    out["passed"] = out["logits_rel_err"] <= LOGITS_TOL and same
    return out


def check_bf16(config: LCKVConfig, idx: Tensor) -> dict:
    """bfloat16: finite logits, and the zero-output rule held exactly by every attention module
    (token 0 of a layer reading from above, every left-padding position), with and without
    left padding (the parallel computation, as prompt encoding runs it)."""
    torch.manual_seed(0)
    model = LCKVModel(config).to(device=idx.device, dtype=torch.bfloat16).eval()
    seen = []
    hooks = [block.self_attn.register_forward_hook(lambda mod, args, out: seen.append((mod, out)))
             for block in model.model.layers]
    B, T = idx.shape
    pad = torch.arange(B, device=idx.device) * (T // (2 * max(1, B - 1)))  # 0 up to T/2
    m, b = config.forward_passes, config.backward_passes
    try:
        with torch.no_grad():
            logits, _ = model(idx)
            plain = seen[:]
            seen.clear()
            h, _ = model.forward_parallel(model.embed(idx), m, b, PassKVs(pad=pad))
            padded_logits = model.head(h)
    finally:
        for hook in hooks:
            hook.remove()
    first_zero = all(bool((out[:, 0] == 0).all()) for mod, out in plain if mod.mask_diagonal)
    pad_zero = True
    for mod, out in seen:
        for row, p in enumerate(pad.tolist()):
            pad_zero &= bool((out[row, :p + mod.mask_diagonal] == 0).all())
    out = {"layer_types": config.layer_types, "pad": pad.tolist(),
           "finite": bool(torch.isfinite(logits).all() and torch.isfinite(padded_logits).all()),
           "first_token_zero": first_zero, "padding_zero": pad_zero,
           "masked_layers": sum(block.self_attn.mask_diagonal for block in model.model.layers)}
    out["passed"] = out["finite"] and first_zero and pad_zero
    return out


SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def attention_forms(B: int, nh: int, nkv: int, T: int, hs: int, dtype, device) -> dict:
    """The calls `model.attention` makes to SDPA, one per form, on random q, k, v."""
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, nh, T, hs, generator=g, dtype=dtype, device=device)
    k = torch.randn(B, nkv, T, hs, generator=g, dtype=dtype, device=device)
    v = torch.randn(B, nkv, T, hs, generator=g, dtype=dtype, device=device)
    pad = torch.arange(B, device=device) * (T // 4)
    return {  # form: (call, {row: how many leading positions must be exactly zero})
        "causal": (lambda: attention(q, k, v, q_start=0, mask_diagonal=False), {}),
        "masked_diagonal": (lambda: attention(q, k, v, q_start=0, mask_diagonal=True),
                            dict.fromkeys(range(B), 1)),
        "padded": (lambda: attention(q, k, v, q_start=0, mask_diagonal=False, pad=pad),
                   dict(enumerate(pad.tolist()))),
        "decode": (lambda: attention(q[:, :, -1:], k, v, q_start=T - 1, mask_diagonal=False),
                   {}),
    }


def sdpa_kernels(calls: dict) -> dict[str, list[str]]:
    """The aten SDPA kernels each call dispatches to with every backend allowed (the default
    choice), read from the torch profiler's CPU-side record of one run of them all."""
    from torch.profiler import ProfilerActivity, profile, record_function
    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
        for key, call in calls.items():
            with record_function(key):
                call()

    def below(event):
        for child in event.cpu_children:
            yield child.name
            yield from below(child)

    return {e.name: sorted({n for n in below(e) if "attention" in n
                            and n != "aten::scaled_dot_product_attention"})
            for e in prof.events() if e.name in calls}


def backend_of(kernels: list[str]) -> str:
    for name in ("flash", "efficient", "cudnn", "math"):
        if any(name in k for k in kernels):
            return name
    return "math" if not kernels else kernels[0]  # math may run as plain matmuls and a softmax


def check_sdpa(device, settings: CheckSettings) -> dict:
    """Each of sdpa_kernel's backends alone on each attention form (MHA and GQA, bfloat16 and
    float32): does it run, how far from the math backend, does the zero-output rule hold; and
    which kernel runs with every backend allowed (the default choice)."""
    B, nh, T, hs = settings.sdpa_shape
    rows, calls = [], {}
    for dtype in (torch.bfloat16, torch.float32):
        for heads, nkv in (("mha", nh), ("gqa", nh // 4)):
            for form, (call, zeros) in attention_forms(B, nh, nkv, T, hs, dtype, device).items():
                calls[f"{str(dtype)[6:]} {heads} {form}"] = call
                with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
                    ref = call()
                for name in SDPA_BACKENDS:
                    row = {"dtype": str(dtype)[6:], "heads": heads, "form": form,
                           "backend": name.split("_")[0].lower()}
                    try:
                        with torch.no_grad(), sdpa_kernel(getattr(SDPBackend, name)):
                            out = call()
                        sync(device)
                        row.update(ok=True, max_abs_err_vs_math=(out - ref).abs().max().item(),
                                   zero_rule=all(bool((out[r, :, :n] == 0).all())
                                                 for r, n in zeros.items()))
                    except Exception as e:
                        row.update(ok=False, error=f"{type(e).__name__}: "
                                                   f"{str(e).splitlines()[0][:200]}")
                    rows.append(row)
    try:
        kernels = sdpa_kernels(calls)
        default = {key: backend_of(k) for key, k in kernels.items()}
    except Exception as e:  # the profiler is a convenience, not the check
        kernels, default = {}, {key: f"unknown ({type(e).__name__})" for key in calls}
    return {"rows": rows, "default": default, "default_kernels": kernels}


def part_correctness(device, settings: CheckSettings, deadline: Deadline) -> dict:
    T = settings.check_len
    shape = replace(settings.check_shape, forward_passes=T - 1, backward_passes=1)
    rows = []
    for name, config in layouts(shape, settings.check_window).items():
        torch.manual_seed(0)
        model = LCKVModel(config).to(device).eval()
        g = torch.Generator(device=device).manual_seed(0)
        idx = torch.randint(config.vocab_size, (2, T + 1), generator=g, device=device)
        P, n = T // 2, T - T // 2
        prompts = [idx[0, :P], idx[1, :P - 2], idx[0, 3:3 + max(1, P - 5)]]
        rows += [attempt({"check": "theorem1", "layout": name}, deadline,
                         lambda: check_theorem1(model, idx)),
                 attempt({"check": "decode", "layout": name}, deadline,
                         lambda: check_decode(model, idx[:, :P], n)),
                 attempt({"check": "ragged", "layout": name}, deadline,
                         lambda: check_ragged(model, prompts, n))]
        if name in ("lckv w=0", "yoco"):
            rows.append(attempt({"check": "bf16", "layout": name}, deadline,
                                lambda: check_bf16(config, idx[:, :T])))
    sdpa = attempt({}, deadline, lambda: check_sdpa(device, settings))
    done = [r for r in rows if "passed" in r]
    worst = {f"worst_{c}_rel_err": max((r[k] for r in done if r["check"] == c and k in r),
                                       default=None)
             for c, k in (("theorem1", "logits_rel_err"), ("decode", "logits_rel_err"),
                          ("ragged", "logits_rel_err"))}
    worst["worst_grad_rel_err"] = max((r["grad_rel_err"] for r in done if "grad_rel_err" in r),
                                      default=None)
    summary = {"checks": len(rows), "passed": sum(bool(r.get("passed")) for r in rows),
               "checks_skipped": sum("skipped" in r for r in rows), **worst}
    summary["all_passed"] = summary["passed"] == summary["checks"]
    if sdpa.get("default"):
        summary["sdpa_default_bf16_mha"] = {k.split()[-1]: v for k, v in sdpa["default"].items()
                                            if k.startswith("bfloat16 mha")}
        summary["sdpa_backends_ok_bf16_mha"] = {
            form: [r["backend"] for r in sdpa["rows"] if r["ok"] and r["form"] == form
                   and r["dtype"] == "bfloat16" and r["heads"] == "mha"]
            for form in ("causal", "masked_diagonal", "padded", "decode")}
    return {"dtype": "float32 (bf16 check: bfloat16)", "rows": rows, "sdpa": sdpa,
            "summary": summary,
            "config": {"shape": shape.to_dict(), "T": T, "sliding_window": settings.check_window,
                       "layouts": {k: c.layer_types for k, c in layouts(shape, 1).items()},
                       "logits_tol": LOGITS_TOL, "grad_tol": GRAD_TOL,
                       "sdpa_shape": settings.sdpa_shape}}
