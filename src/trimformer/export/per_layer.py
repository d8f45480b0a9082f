"""transformers' heterogeneous config (`per_layer_config`, transformers >= 5.14), written beside our own keys.

What transformers 5.25 defines (`integrations/heterogeneity/configuration_utils.py`, docs "Per-layer
configurations"): `per_layer_config` maps a layer index to the attributes that differ from the global config
(`intermediate_size`, `num_key_value_heads`, `num_attention_heads`, ...) and `skip: ["mlp" | "attention"]`. What it
reads: `config.per_layer_config[i]` resolves a layer's config; `get_head_shapes` (static caches, executorch export)
sizes each layer's KV cache from it. What it does not do yet: build the modules. LlamaModel still builds every layer
from the global config, and reading a per-layer attribute globally raises AmbiguousGlobalPerLayerAttributeError
unless the config sets `allow_global_per_layer_attribute_access`. So the keys are written together with that flag:
newer readers get the per-layer shapes, and our modeling file (built on the vanilla class, then reshaped from
`trimformer_shapes`) keeps loading the checkpoint; transformers < 5.14 keeps the dict as an unused attribute.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..models import anatomy_of


def per_layer_config(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per-layer overrides of `model.config` read from the tensors ('' when the model is uniform)."""
    an = anatomy_of(model)
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None)
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    ffn = getattr(cfg, "intermediate_size", None)
    out: dict[str, dict[str, Any]] = {}
    for b in an.blocks:
        layer: dict[str, Any] = {}
        skip = [name for name, part in (("attention", b.attention), ("mlp", b.mlp)) if part is None]
        if b.attention is not None:
            if b.attention.num_heads != heads:
                layer["num_attention_heads"] = b.attention.num_heads
            if b.attention.num_kv_heads != kv:
                layer["num_key_value_heads"] = b.attention.num_kv_heads
        if b.mlp is not None and b.mlp.intermediate_size != ffn:
            layer["intermediate_size"] = b.mlp.intermediate_size
        if skip:
            layer["skip"] = skip
        if layer:
            out[str(b.index)] = layer
    return out


def add_per_layer_config(config: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """`config` (a config.json dict) with `per_layer_config` added when the layers differ, and the flag that keeps
    transformers' global reads (and so our modeling file's vanilla base class) working."""
    layers = per_layer_config(model)
    if not layers:
        return config
    return {**config, "per_layer_config": layers, "allow_global_per_layer_attribute_access": True}
