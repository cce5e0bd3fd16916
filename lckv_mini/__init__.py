"""lckv-mini: a minimal, tested PyTorch reference implementation of Layer-Condensed KV Cache."""

from .model import (
                    LCKVConfig,
                    LCKVModel,
                    attention,
                    cla_layers,
                    kv_convergence,
                    kv_passes,
                    lckv_layers,
                    make_layer_types,
                    prefix_exactness,
                    standard_layers,
                    visible_keys,
                    yoco_layers,
)

__all__ = ["LCKVConfig", "LCKVModel", "attention", "cla_layers", "kv_convergence", "kv_passes",
           "lckv_layers", "make_layer_types", "prefix_exactness", "standard_layers", "visible_keys",
           "yoco_layers"]
