"""Every tensor the package makes is made on its inputs' device (STYLE: device handled in one
place). The CPU cannot show a GPU mismatch, so the default device is set to "meta" while the model
and its inputs stay on the CPU: a tensor made without device= lands on meta, and the first
operation that mixes it with a CPU tensor fails."""

import pytest
import torch

from lckv_mini.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from lckv_mini.config import LCKVConfig, make_layer_types
from lckv_mini.convergence import kv_convergence, prefix_exactness
from lckv_mini.generate import GREEDY, Sampling, generate
from lckv_mini.model import LCKVModel

BASE = dict(vocab_size=64, n_layer=6, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64,
            block_size=64)
LAYOUTS = {"lckv": make_layer_types("lckv", 6, warmup=2),
           "lasagna-top": make_layer_types("lasagna-top", 6, n_kv_layers=3),
           "yoco": make_layer_types("yoco", 6)}


def everything(model: LCKVModel, idx: torch.Tensor) -> list:
    """Every public path: training (parallel, sequential, checkpointed) with gradients, decoding
    (tensor and ragged prompts, each prefill, sampling, stop tokens, streaming), the measurements
    of the iteration."""
    out = []
    for mode, ckpt in (("parallel", False), ("parallel", True), ("sequential", False)):
        model.zero_grad(set_to_none=True)
        model.activation_checkpointing = ckpt
        logits, loss = model(idx[:, :-1], idx[:, 1:], mode=mode)
        loss.backward()
        out += [logits, model.lm_head.weight.grad]
    model.activation_checkpointing = False
    out.append(generate(model, idx[:, :5], 4, sampling=GREEDY))
    for prefill in ("parallel", "sequential", "adaptive"):
        out += generate(model, [idx[0, :5], idx[1, :2]], 4, sampling=GREEDY, prefill=prefill,
                        stop_tokens=[3])
    g = torch.Generator(device=idx.device).manual_seed(0)
    out.append(generate(model, idx[:, :5], 4, sampling=Sampling(top_k=8, top_p=0.9), generator=g))
    out.append(generate(model, idx[:1, :3], 12, sampling=GREEDY, sink_size=2, window_size=5))
    if model.config.iteration_groups:
        out += [kv_convergence(model, idx, 3), prefix_exactness(model.double(), idx, 3)]
        model.float()
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_nothing_is_made_on_the_default_device(layout):
    config = LCKVConfig(**BASE, layer_types=LAYOUTS[layout], sliding_window=3)
    idx = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    expected = everything(LCKVModel(config), idx)
    torch.manual_seed(0)
    model = LCKVModel(config)  # a fresh one: nothing cached (RoPE tables) from a run outside
    with torch.device("meta"):  # anything made without device= goes here, not to the CPU
        got = everything(model, idx)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        if isinstance(a, list):  # the measurements: plain numbers
            assert a == b
            continue
        assert a.device.type == "cpu"
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_meta_default_device_catches_a_tensor_made_without_device():
    x = torch.ones(3)
    with torch.device("meta"), pytest.raises(RuntimeError, match="device"):
        x + torch.arange(3)  # made on meta: the bug the test above looks for


class OnDevice:
    """A generator state as torch.load(map_location="cuda") returns it: usable only after
    .cpu() (a generator takes nothing but a CPU byte tensor). This machine has no such device."""

    def __init__(self, state: torch.Tensor):
        self.state = state

    def cpu(self) -> torch.Tensor:
        return self.state


def test_a_checkpoint_loaded_onto_another_device_restores_the_random_streams(tmp_path,
                                                                             monkeypatch):
    data = torch.Generator().manual_seed(7)
    save_checkpoint(tmp_path / "ckpt.pt", {
        "model": {}, "model_config": {}, "tokenizer": {}, "step": 0,
        "rng": {**rng_state(), "cuda": [torch.get_rng_state()], "data": data.get_state()}})
    real_load = torch.load

    def load_onto_the_device(f, map_location, **kwargs):
        ckpt = real_load(f, map_location="cpu", **kwargs)  # then "moved" to map_location
        ckpt["rng"] = {k: [OnDevice(s) for s in v] if isinstance(v, list) else OnDevice(v)
                       for k, v in ckpt["rng"].items()}
        return ckpt

    monkeypatch.setattr(torch, "load", load_onto_the_device)
    ckpt = load_checkpoint(tmp_path / "ckpt.pt", device="cuda")
    set_rng_state(ckpt["rng"])  # what train.py does on --resume, then the data generator:
    torch.Generator().set_state(ckpt["rng"]["data"])
    assert torch.equal(ckpt["rng"]["data"], data.get_state())
    assert all(s.device.type == "cpu" for s in ckpt["rng"]["cuda"])
