"""From a pretrained Llama to LCKV: read a local Hugging Face folder, convert, save back.

A folder as `transformers` writes it (config.json, model.safetensors or sharded
model-*.safetensors with model.safetensors.index.json, tokenizer.json) is read without
`transformers`: the weights through the `safetensors` package, the tokenizer through
`tokenizers` (both optional: `pip install lckv-mini[pretrained]`).

Converting a standard Llama to a layout where some layers only read another layer's KVs drops
those layers' k/v projections. Each KV layer starts from the mean of the k/v weights of the
layers that read it (the MLKV initialisation, offered by the official LCKV code), or from its
own (`kv_init="own"`). Either way the converted model is a starting point: it needs continued
training before it is worth anything (see the README).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .config import LAYOUTS, LCKVConfig, make_layer_types
from .data import Tokenizer, atomic_write, atomic_write_bytes
from .model import LCKVModel

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
INSTALL_HINT = 'pip install "lckv-mini[pretrained]" (in a checkout: pip install -e ".[pretrained]")'
KV_INITS = ("mean", "own")

# Llama's config.json fields -> LCKVConfig fields. The first five must be present; the others
# fall back to LlamaConfig's defaults, as transformers does.
REQUIRED = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer",
            "num_attention_heads": "n_head", "intermediate_size": "intermediate_size",
            "vocab_size": "vocab_size"}
DEFAULTS = {"max_position_embeddings": ("block_size", 2048), "rms_norm_eps": ("norm_eps", 1e-6),
            "tie_word_embeddings": ("tie_embeddings", False)}


def require(module: str):
    """Import an optional dependency, or say how to install it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"Hugging Face model folders need the `{module.split('.')[0]}` "
                          f"package: {INSTALL_HINT}") from e


# ----------------------------------------------------------------------------------------------
# config.json


def read_hf_config(config: dict | str | os.PathLike) -> dict:
    """A config.json as a dict: given as a dict, a path to the file, or its folder."""
    if isinstance(config, dict):
        return config
    path = Path(config)
    path = path / CONFIG if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG} at {path}: not a Hugging Face model folder")
    return json.loads(path.read_text(encoding="utf-8"))


def check_representable(hf: dict) -> None:
    """Raise ValueError naming the first field of a config.json this model cannot compute.

    A Llama is accepted; a Mistral too when its `sliding_window` is null, since a Mistral without
    a window is a Llama (same block, same weight names). Anything that changes the computation
    and is not in LCKVConfig (RoPE scaling, biases, another activation, quantised weights) is
    refused rather than silently dropped.
    """
    kind = hf.get("model_type")
    if kind == "mistral":
        if hf.get("sliding_window", 4096) is not None:  # MistralConfig's default is 4096
            raise ValueError(f"sliding_window={hf.get('sliding_window', 4096)!r}: a Mistral with "
                             "a sliding window over every layer is not supported (only null)")
    elif kind != "llama":
        raise ValueError(f"model_type={kind!r}: only Llama-like models ('llama', or 'mistral' "
                         "with sliding_window null) can be loaded")
    for name in ("attention_bias", "mlp_bias"):
        if hf.get(name):
            raise ValueError(f"{name}={hf[name]!r}: this model has no bias terms")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r}: only 'silu' (SwiGLU) is supported")
    if hf.get("quantization_config") is not None:
        raise ValueError("quantization_config is set: quantised weights are not supported; "
                         "load a float16/bfloat16/float32 copy")
    scaling = hf.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind != "default":
        raise ValueError(f"rope_scaling={scaling!r}: RoPE scaling type {kind!r} is not "
                         "supported (only none or 'default')")
    params = hf.get("rope_parameters") or {}
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"rope_parameters={params!r}: rope_type {params['rope_type']!r} is not "
                         "supported (only 'default')")


def rope_theta(hf: dict) -> float:
    """RoPE's base, from `rope_parameters` (transformers >= 5) or `rope_theta` (older)."""
    new = (hf.get("rope_parameters") or {}).get("rope_theta")
    old = hf.get("rope_theta")
    if new is not None and old is not None and float(new) != float(old):
        raise ValueError(f"rope_theta={old!r} and rope_parameters.rope_theta={new!r} disagree")
    theta = new if new is not None else old
    return 10000.0 if theta is None else float(theta)


def from_hf_config(config: dict | str | os.PathLike,
                   layer_types: str | Sequence[int | str] | None = None,
                   **overrides) -> LCKVConfig:
    """The LCKVConfig of a Llama config.json (a dict, or a path to the file or its folder).

    model_type must be "llama", or "mistral" with `sliding_window` null (then it is a Llama).
    layer_types: the layout to convert to (None: standard, i.e. the Llama as it is). overrides:
    further LCKVConfig fields (forward_passes, dropout, ...). Raises ValueError naming the field
    for anything the model cannot represent (see `check_representable`) or that is missing.
    """
    hf = read_hf_config(config)
    check_representable(hf)
    missing = [k for k in REQUIRED if hf.get(k) is None]
    if missing:
        raise ValueError(f"config.json lacks {missing}: not a complete Llama config")
    fields = {ours: hf[theirs] for theirs, ours in REQUIRED.items()}
    fields.update({ours: default if hf.get(theirs) is None else hf[theirs]
                   for theirs, (ours, default) in DEFAULTS.items()})
    fields["n_kv_head"] = hf.get("num_key_value_heads") or fields["n_head"]
    fields["head_dim"] = hf.get("head_dim")  # None: hidden_size // num_attention_heads
    fields["rope_theta"] = rope_theta(hf)
    return LCKVConfig(**{**fields, **overrides}, layer_types=layer_types)  # overrides win


def to_hf_config(config: LCKVConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json of a standard model, readable by transformers (old and new) and by
    `from_hf_config`. Layouts where layers share KVs have no Llama equivalent: ValueError."""
    if config.kv_sources != tuple(range(config.n_layer)) or any(config.sliding_layers):
        raise ValueError(f"layer_types {config.layer_types!r} is not a standard Llama (every "
                         "layer reading its own KVs, no sliding window): it cannot be saved in "
                         "the Llama format")
    dtype_name = str(dtype).removeprefix("torch.")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": config.n_embd, "num_hidden_layers": config.n_layer,
            "num_attention_heads": config.n_head, "num_key_value_heads": config.n_kv_head,
            "head_dim": config.head_dim, "intermediate_size": config.intermediate_size,
            "vocab_size": config.vocab_size, "max_position_embeddings": config.block_size,
            "rms_norm_eps": config.norm_eps, "hidden_act": "silu",
            "rope_theta": config.rope_theta,  # transformers < 5 reads this one
            "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
            "tie_word_embeddings": config.tie_embeddings, "attention_bias": False,
            "mlp_bias": False, "dtype": dtype_name, "torch_dtype": dtype_name}


# ----------------------------------------------------------------------------------------------
# Weights


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding a folder's weights: the single file or the index's shards."""
    single, index = folder / WEIGHTS, folder / WEIGHTS_INDEX
    if single.is_file() and index.is_file():
        raise ValueError(f"{folder} holds both {WEIGHTS} and {WEIGHTS_INDEX}; one of them is "
                         "stale: remove it so that it is clear which weights to load")
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        absent = [s.name for s in shards if not s.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} lists shards that are not there: {absent}")
        return shards
    others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in
                                                                   folder.glob("*.pth"))
    hint = (f" ({others} are pickled weights: re-save them with transformers' "
            "save_pretrained(folder, safe_serialization=True))") if others else ""
    raise FileNotFoundError(f"no {WEIGHTS} nor {WEIGHTS_INDEX} in {folder}{hint}")


def load_hf_state_dict(folder: str | os.PathLike, dtype: torch.dtype | None = None,
                       device=None) -> dict[str, Tensor]:
    """Every tensor of a folder's safetensors file(s), read straight onto `device` (default
    cpu) and cast to `dtype` tensor by tensor (None: as stored)."""
    safetensors = require("safetensors")
    sd = {}
    for path in weight_files(Path(folder)):
        with safetensors.safe_open(str(path), framework="pt", device=str(device or "cpu")) as f:
            for name in f.keys():
                sd[name] = f.get_tensor(name) if dtype is None else f.get_tensor(name).to(dtype)
    return sd


def readers(config: LCKVConfig, layer: int) -> list[int]:
    """The layers whose queries attend to `layer`'s KVs (itself included when it computes)."""
    return [i for i, s in enumerate(config.kv_sources) if s == layer]


def convert_kv(sd: dict[str, Tensor], config: LCKVConfig, kv_init: str) -> dict[str, Tensor]:
    """Give every KV layer of `config` its k/v weights from a dict that may have k/v in every
    layer (a standard Llama), and drop those of layers that only read.

    kv_init "mean": the mean over the layers that read it (MLKV); "own": the layer's own.
    """
    if kv_init not in KV_INITS:
        raise ValueError(f"kv_init={kv_init!r}; expected one of {KV_INITS}")
    sd = dict(sd)
    for j in config.kv_layers:
        layers = readers(config, j) if kv_init == "mean" else [j]
        for proj in ("k_proj", "v_proj"):
            names = [f"model.layers.{i}.self_attn.{proj}.weight" for i in layers]
            found = [sd[n] for n in names if n in sd]
            if not found:
                raise KeyError(f"state dict has no {proj} weights for layer {j} nor for any "
                               f"layer reading it ({readers(config, j)})")
            if len(found) > 1:  # average in at least float32, keep the weights' dtype
                wide = torch.promote_types(found[0].dtype, torch.float32)
                sd[f"model.layers.{j}.self_attn.{proj}.weight"] = (
                    torch.stack(found).to(wide).mean(0).to(found[0].dtype))
            else:
                sd[f"model.layers.{j}.self_attn.{proj}.weight"] = found[0]
    for i in range(config.n_layer):  # k/v of layers that only read are dropped
        if i not in config.kv_layers:
            for proj in ("k_proj", "v_proj"):
                sd.pop(f"model.layers.{i}.self_attn.{proj}.weight", None)
    return sd


def check_matches(sd: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    """Same names, same shapes and one dtype: else an error that names the difference."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise KeyError(f"state dict does not match the config: missing {missing[:5]}, "
                       f"unexpected {unexpected[:5]}")
    for name, tensor in sd.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} in the state dict, "
                             f"{tuple(expected[name].shape)} expected by the config")
    dtypes = {t.dtype for t in sd.values()}
    if len(dtypes) > 1:
        raise ValueError(f"the weights mix dtypes {sorted(map(str, dtypes))}: pass dtype= to "
                         "cast them to one")


def from_hf_state_dict(state_dict: dict[str, Tensor], config: LCKVConfig,
                       kv_init: str = "mean") -> LCKVModel:
    """Build a model from Llama-named weights, converting a standard Llama's to `config`'s
    layout (see `convert_kv` for kv_init).

    The model is built on the meta device and takes the dict's tensors as its parameters (no
    copy, no random init): it has their dtype and device. With tie_embeddings the head is the
    embedding, whether or not the dict holds a (possibly stale) lm_head.weight.
    """
    if "model.embed_tokens.weight" not in state_dict:
        raise KeyError("state dict has no model.embed_tokens.weight: not a Llama-named dict")
    sd = convert_kv(state_dict, config, kv_init)
    if config.tie_embeddings:  # one tensor under both names; tie_weights() makes it one Parameter
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    with torch.device("meta"):
        model = LCKVModel(config)
    check_matches(sd, model.state_dict())
    model.load_state_dict(sd, assign=True)
    model.tie_weights()
    return model


def hf_state_dict(model: LCKVModel) -> dict[str, Tensor]:
    """The weights under Hugging Face Llama names, as transformers saves them: k/v only for the
    layers that compute KVs, no lm_head.weight when it is the embedding."""
    sd = dict(model.state_dict())  # the modules carry Llama's names
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight")
    return sd


# ----------------------------------------------------------------------------------------------
# Folders


def load_folder(folder: str | os.PathLike, config: LCKVConfig, dtype: torch.dtype | None = None,
                device=None, kv_init: str = "mean") -> LCKVModel:
    """A folder's weights in `config` (which must have the folder's shapes), on `device`."""
    # Read straight onto `device`: nothing to move after, and RoPE tables are made lazily per
    # dtype and device, so nothing to rebuild either.
    return from_hf_state_dict(load_hf_state_dict(folder, dtype, device), config, kv_init)


def from_pretrained(folder: str | os.PathLike,
                    layer_types: str | Sequence[int | str] | None = None,
                    dtype: torch.dtype | None = None, device=None, kv_init: str = "mean",
                    **overrides) -> LCKVModel:
    """Load a local Hugging Face Llama folder, converted to `layer_types` (None: standard).

    dtype: cast every weight to it (None: as stored); device: where the weights go (None: cpu).
    kv_init: "mean" (MLKV) or "own", see `convert_kv`. overrides: LCKVConfig fields.
    Needs `safetensors`, not `transformers`.
    """
    config = from_hf_config(folder, layer_types, **overrides)
    return load_folder(folder, config, dtype, device, kv_init)


def load_tokenizer(folder: str | os.PathLike) -> Tokenizer:
    """The folder's tokenizer.json as a Tokenizer of kind "hf" (its text travels in checkpoints)."""
    path = Path(folder) / TOKENIZER
    if not path.is_file():
        raise FileNotFoundError(
            f"no {TOKENIZER} in {folder}. A folder with only a SentencePiece tokenizer.model can "
            "be converted once with transformers: AutoTokenizer.from_pretrained(folder)"
            ".save_pretrained(folder)")
    return Tokenizer("hf", hf_json=path.read_text(encoding="utf-8"))


def atomic_save_file(tensors: dict[str, Tensor], dest: Path) -> None:
    """A safetensors file written through `data.atomic_write` (temporary file, fsync, rename)."""
    safetensors_torch = require("safetensors.torch")
    data = safetensors_torch.save(tensors, metadata={"format": "pt"})
    atomic_write(dest, lambda f: f.write(data))


def save_pretrained(model: LCKVModel, folder: str | os.PathLike,
                    tokenizer: Tokenizer | None = None) -> None:
    """Write config.json and model.safetensors (and tokenizer.json for an "hf" tokenizer) that
    transformers' LlamaForCausalLM.from_pretrained reads. Standard layouts only: a Llama has
    no shared KVs. Each file is written to a temporary name and renamed: a crash never leaves
    a half-written file."""
    folder = Path(folder)
    dtype = model.model.embed_tokens.weight.dtype
    hf_config = to_hf_config(model.config, dtype)  # refuses non-standard layouts before writing
    if (folder / WEIGHTS_INDEX).exists():
        raise FileExistsError(f"{folder} holds a sharded model ({WEIGHTS_INDEX}); save into "
                              "another folder, or remove it first")
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in hf_state_dict(model).items()}
    atomic_save_file(tensors, folder / WEIGHTS)
    if tokenizer is not None and tokenizer.kind == "hf":
        atomic_write_bytes(folder / TOKENIZER, tokenizer.hf_json.encode("utf-8"))
    # config.json last: a folder with a config describes weights that are complete
    atomic_write_bytes(folder / CONFIG, (json.dumps(hf_config, indent=2) + "\n").encode())


# ----------------------------------------------------------------------------------------------
# Continued training (train.py --init-from)


def check_init_folder(folder: str | os.PathLike) -> None:
    """What continued training needs of a folder, checked before any work, in this order: a
    config.json of a model this package computes (so another model type is named as such, not
    as a missing file), its weights, its tokenizer.json, and the packages that read them."""
    from_hf_config(folder)
    weight_files(Path(folder))
    if not (Path(folder) / TOKENIZER).is_file():
        load_tokenizer(folder)  # raises, with the hint for SentencePiece-only folders
    require("safetensors.torch")
    require("tokenizers")


def init_config(folder: str | os.PathLike, layers_kind: str = "lckv", *, warmup: int = 2,
                group: int = 2, n_kv_layers: int | None = None, **overrides) -> LCKVConfig:
    """The folder's model in a layout named as train.py names them: one of config.LAYOUTS
    (with warmup w, CLA group, n_kv_layers, for the folder's number of layers) or a raw
    layer_types string. overrides: further LCKVConfig fields."""
    n_layer = from_hf_config(folder).n_layer
    layer_types = (make_layer_types(layers_kind, n_layer, warmup=warmup, group=group,
                                    n_kv_layers=n_kv_layers)
                   if layers_kind in LAYOUTS else layers_kind)
    return from_hf_config(folder, layer_types, **overrides)


def init_model(folder: str | os.PathLike, config: LCKVConfig, device=None,
               kv_init: str = "mean") -> LCKVModel:
    """The folder's weights converted to `config` (from `init_config`), in float32 for training:
    AdamW's small updates at a continued-training learning rate vanish in bfloat16 weights."""
    return load_folder(folder, config, torch.float32, device, kv_init)
