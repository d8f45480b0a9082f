"""Plain Hugging Face checkpoints (safetensors), written atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ..io import atomic_dir, write_files


def add_legacy_fields(config_path: Path) -> None:
    """Also write the rope settings the way transformers 4.x and serving engines built on it read them.

    transformers 5 keeps them under `rope_parameters`; older readers look for top-level `rope_theta` (and
    `rope_scaling`) and would silently fall back to a default base, changing every logit.
    """
    cfg = json.loads(config_path.read_text())
    rope = cfg.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope or "rope_theta" in cfg:
        return
    cfg["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default" and "rope_scaling" not in cfg:
        cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    config_path.write_text(json.dumps(cfg, indent=2))


def save_pretrained(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    tokenizer: Any = None,
    extra_files: dict[str, Any] | None = None,
    overwrite: bool = False,
    edit_config: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    original_format: bool = True,
) -> Path:
    """Save `model` as safetensors + config that vanilla `transformers` reloads.

    `extra_files`: name -> dict (written as JSON) or str (written as text), e.g. the report
    and the recipe that produced the model. `edit_config` maps the written config.json dict to the
    one to keep, inside the same atomic write. `original_format`: tensors under the family's checkpoint names
    (transformers renames some on load, e.g. DINOv2's attention.attention.query -> attention.q_proj); False keeps
    the module names, which a model class from custom code (auto_map) needs: transformers converts no names for it.
    """
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, save_original_format=original_format)
        add_legacy_fields(tmp / "config.json")
        if edit_config is not None:
            path = tmp / "config.json"
            path.write_text(json.dumps(edit_config(json.loads(path.read_text())), indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_files(tmp, extra_files)
    return Path(out)
