"""lckv-mini: a minimal, tested PyTorch reference implementation of Layer-Condensed KV Cache.

Files and what they import (no cycles; tests/test_structure.py checks it):
    config.py       LCKVConfig, layout builders, iteration groups       (nothing of the package)
    model.py        attention, the model, parallel and sequential paths  (config)
    convergence.py  Fig. 3 and Theorem 1 measurements                    (model)
    generate.py     KV cache, sampling, prompt encoding, decoding        (config, model,
                                                                          convergence)
    data.py         downloads, tokenizers, token caches, batches         (nothing)
    checkpoint.py   save/load training checkpoints                       (config, model, data)
    train.py        the training loop and its command line               (config, model, data,
                                                                          checkpoint, generate,
                                                                          sample)
    sample.py       text from a checkpoint                               (checkpoint, generate,
                                                                          data, model)
    pretrained.py   Hugging Face folders in and out                      (config, model, data)
    bench/          benchmarks and the GPU check, a file per question    (config, model,
                    (common, memory, throughput, training, gpu_check,     generate)
                    plots, cli); python -m lckv_mini.bench <name>
"""

from .config import (
    LAYOUTS,
    LCKVConfig,
    can_serve_downward,
    cla_layers,
    gemma_layers,
    lckv_layers,
    make_layer_types,
    shared_layers,
    standard_layers,
    yoco_layers,
)
from .convergence import kv_convergence, kv_passes, max_kv_change, prefix_exactness
from .generate import GREEDY, KVCache, Sampling, cache_bytes, encode_prompt, generate
from .model import LCKVModel, attention, visible_keys
from .pretrained import from_hf_config, from_hf_state_dict, from_pretrained, save_pretrained

__all__ = ["GREEDY", "KVCache", "LAYOUTS", "LCKVConfig", "LCKVModel", "Sampling", "attention",
           "cache_bytes", "can_serve_downward", "cla_layers", "encode_prompt", "from_hf_config",
           "from_hf_state_dict", "from_pretrained", "gemma_layers", "generate", "kv_convergence",
           "max_kv_change", "save_pretrained",
           "kv_passes", "lckv_layers", "make_layer_types", "prefix_exactness", "shared_layers",
           "standard_layers", "visible_keys", "yoco_layers"]
