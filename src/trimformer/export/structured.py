"""Save a structurally pruned model so that `transformers` reloads it with identical logits.

Uniform result (vanilla `type(model)(config)` rebuilds exactly these shapes and attributes) -> a plain
Hugging Face checkpoint. Otherwise (per-layer widths/heads, removed sublayers, a head_dim the family
cannot express) -> the same checkpoint plus, in config.json, the per-layer differences
(`trimformer_shapes`, `trimformer_attrs`, `trimformer_removed`) and `auto_map` to a small
`trimformer_modeling.py` that rebuilds them on top of the vanilla class; it imports only torch and
transformers, so `from_pretrained(..., trust_remote_code=True)` works without trimformer installed.
The per-layer shapes are also written as transformers' own `per_layer_config` (export/per_layer.py), when the
installed transformers accepts that config back.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models import anatomy_of
from ..models.modeling_file import MODELING_FILE, source
from ..models.offload import streamed
from ..structure.surgery import sync_config
from .hf import save_pretrained
from .per_layer import add_per_layer_config

_AUTO = (  # (auto class, mapping name in transformers.models.auto.modeling_auto)
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModel", "MODEL_MAPPING_NAMES"),
)

_SIMPLE = (int, float, bool)


def _attrs(m: nn.Module) -> dict[str, Any]:
    out = {}
    for k, v in vars(m).items():
        if k.startswith("_") or k == "training":
            continue
        if isinstance(v, _SIMPLE) or (isinstance(v, tuple) and all(isinstance(x, int) for x in v)):
            out[k] = list(v) if isinstance(v, tuple) else v
    return out


def _vanilla(model: nn.Module) -> type:
    """The transformers class under `model` (a model reloaded through our modeling file is a subclass of it)."""
    return next((c for c in type(model).__mro__ if c.__module__.startswith("transformers.")), type(model))


def differences(model: nn.Module) -> dict[str, Any]:
    """What `type(model)(model.config)` would build differently: parameter shapes, module attributes,
    removed sublayers. Empty dicts mean a plain checkpoint reloads this model exactly."""
    with torch.device("meta"):
        ref = _vanilla(model)(copy.deepcopy(model.config))
    ref_mods = dict(ref.named_modules())
    removed, attrs = {}, {}
    for name, m in model.named_modules():
        if getattr(m, "trimformer_removed", False):
            removed[name] = ["attention", m.layer_idx] if hasattr(m, "layer_idx") else ["mlp", None]
            continue
        r = ref_mods.get(name)
        if r is None:
            continue
        mine, theirs = _attrs(m), _attrs(r)
        diff = {k: v for k, v in mine.items() if k in theirs and theirs[k] != v}
        if diff:
            attrs[name] = diff
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    shapes = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if any(name.startswith(r + ".") for r in removed):
            continue
        if name not in ref_params or tuple(ref_params[name].shape) != tuple(p.shape):
            shapes[name] = list(p.shape)
    return {"trimformer_shapes": shapes, "trimformer_attrs": attrs, "trimformer_removed": removed}


def _auto_key(model: nn.Module) -> str:
    from transformers.models.auto import modeling_auto

    cls, mt = _vanilla(model).__name__, model.config.model_type
    for key, mapping in _AUTO:
        if getattr(modeling_auto, mapping).get(mt) == cls:
            return key
    raise ValueError(f"no Auto class maps model_type {mt!r} to {cls}; cannot write auto_map")


def _with_per_layer_config(model: nn.Module):
    """config.json dict -> the same with `per_layer_config`, if transformers' config class reads it back; else as is
    (transformers < 5.14 has no heterogeneous configs, and one that rejects the overrides must not break the save)."""
    def edit(config: dict[str, Any]) -> dict[str, Any]:
        new = add_per_layer_config(config, model)
        if new is config:
            return config
        try:
            type(model.config).from_dict(new)
        except Exception:  # noqa: BLE001 - any refusal: keep the checkpoint as our modeling file reads it
            return config
        return new
    return edit


def save(model: nn.Module, out: str | os.PathLike, *, tokenizer: Any = None, overwrite: bool = False,
         extra_files: dict[str, Any] | None = None) -> Path:
    """Write `model` to `out`: plain when vanilla transformers rebuilds it, else with trimformer_modeling.py.
    A model streamed from disk (models/offload.py) is written shard by shard (export/streamed.py)."""
    if streamed(model):
        from .streamed import save_streamed

        return save_streamed(model, out, tokenizer=tokenizer, extra_files=extra_files, overwrite=overwrite)
    sync_config(anatomy_of(model))
    cfg = model.config
    for key in ("trimformer_shapes", "trimformer_attrs", "trimformer_removed", "auto_map"):
        if hasattr(cfg, key):
            delattr(cfg, key)
    diff = differences(model)
    files = dict(extra_files or {})
    edit = None
    if any(diff.values()):
        edit = _with_per_layer_config(model)
        base = _vanilla(model).__name__
        for k, v in diff.items():
            setattr(cfg, k, v)
        cfg.auto_map = {_auto_key(model): f"trimformer_modeling.Trimmed{base}"}
        files[MODELING_FILE] = source(base)
    try:
        return save_pretrained(model, out, tokenizer=tokenizer, extra_files=files, overwrite=overwrite,
                               edit_config=edit, original_format=not any(diff.values()))
    finally:
        for key in ("trimformer_shapes", "trimformer_attrs", "trimformer_removed", "auto_map"):
            if hasattr(cfg, key):
                delattr(cfg, key)
