"""The modeling file trimformer writes beside a heterogeneous checkpoint, and how a loader recognises it.

A structurally pruned model whose blocks differ (per-layer widths, removed sublayers) is saved as the vanilla
checkpoint plus its per-layer differences in config.json and this small file (`auto_map`), which rebuilds them
on top of the vanilla transformers class; it needs only torch and transformers. Loading a folder never runs
its code unless the user opts in, except a file byte-identical to what this version generates (`is_ours`).
"""

from __future__ import annotations

import hashlib
import re

MODELING_FILE = "trimformer_modeling.py"


def source(base: str) -> str:
    """The modeling file for a model whose vanilla class is `base` (e.g. 'LlamaForCausalLM')."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", base):
        raise ValueError(f"not a class name: {base!r}")
    return _TEMPLATE.replace("{BASE}", base)


def is_ours(text: str | bytes) -> bool:
    """True when `text` is exactly a modeling file this version writes (for any vanilla base class)."""
    data = text.encode() if isinstance(text, str) else text
    m = re.search(rb"^from transformers import ([A-Za-z_][A-Za-z0-9_]*) as _Base$", data, re.M)
    if m is None:
        return False
    want = source(m.group(1).decode()).encode()
    return hashlib.sha256(data).digest() == hashlib.sha256(want).digest()


_TEMPLATE = '''"""Rebuilds a model pruned by trimformer (per-layer shapes) on top of the vanilla transformers class.

Written by trimformer; needs only torch and transformers. Load with trust_remote_code=True.
"""

import torch
from torch import nn
from transformers import {BASE} as _Base


class RemovedAttention(nn.Module):
    """A removed attention sublayer: adds 0; records sequence length in the KV cache."""

    trimformer_removed = True

    def __init__(self, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and hasattr(cache, "update"):
            B, T = hidden_states.shape[:2]
            stub = hidden_states.new_zeros(B, 1, T, 1)
            cache.update(stub, stub, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class RemovedMLP(nn.Module):
    """A removed MLP sublayer: adds 0."""

    trimformer_removed = True

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states)


class Trimmed{BASE}(_Base):
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        for path, (kind, layer_idx) in getattr(config, "trimformer_removed", {}).items():
            parent, _, child = path.rpartition(".")
            stand_in = RemovedAttention(layer_idx) if kind == "attention" else RemovedMLP()
            setattr(self.get_submodule(parent) if parent else self, child, stand_in)
        for name, shape in getattr(config, "trimformer_shapes", {}).items():
            path, _, pname = name.rpartition(".")
            module = self.get_submodule(path) if path else self
            old = getattr(module, pname, None)
            like = old if old is not None else next(self.parameters())
            new = nn.Parameter(torch.empty(shape, dtype=like.dtype, device=like.device),
                               requires_grad=like.requires_grad)
            setattr(module, pname, new)
        for path, attrs in getattr(config, "trimformer_attrs", {}).items():
            module = self.get_submodule(path) if path else self
            for key, value in attrs.items():
                old = getattr(module, key, None)
                setattr(module, key, tuple(value) if isinstance(old, tuple) else value)
        if getattr(config, "tie_word_embeddings", False) and self.get_output_embeddings() is not None:
            self.get_output_embeddings().weight = self.get_input_embeddings().weight
'''
