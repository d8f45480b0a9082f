"""The offline verb: `prune_(model, method_or_recipe, calibration=...)` mutates in place and returns the model."""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, is_dataclass
from typing import Any

import torch
from torch import nn

from .methods import Recipe
from .models import anatomy_of
from .weights.base import FilterFn


def prune_(
    model: nn.Module,
    method: Any,
    *,
    calibration: torch.Tensor | None = None,
    filter_fn: FilterFn | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> nn.Module:
    """Apply one method (a built config) or a Recipe to `model`, in place.

    `calibration`: token windows (n, length) for methods that need data.
    Each applied step is appended to `model.trimformer_history` (method, settings, seconds, per-layer result).
    """
    steps = method.build() if isinstance(method, Recipe) else [method]
    anatomy = anatomy_of(model)
    history = getattr(model, "trimformer_history", [])
    # a step that heals from the dense model (recipe step `recover`, teacher: dense) gets a copy made now
    dense = copy.deepcopy(model).eval() if any(getattr(s, "needs_dense", False) for s in steps) else None
    for step in steps:
        if getattr(step, "needs_dense", False):
            step.dense = dense
        t0 = time.perf_counter()
        result = step.apply_(anatomy, calibration, filter_fn=filter_fn, batch_size=batch_size, progress=progress)
        anatomy = anatomy_of(model)  # structure steps change shapes
        settings = {k: v for k, v in asdict(step).items() if not k.startswith("_")} if is_dataclass(step) else {}
        history.append(
            {"method": type(step).name, "settings": settings, "seconds": time.perf_counter() - t0, "result": result}
        )
    model.trimformer_history = history
    return model
