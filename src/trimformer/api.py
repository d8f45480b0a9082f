"""The offline verb: `prune_(model, method_or_recipe, calibration=...)` mutates in place and returns the model."""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from . import parallel
from .config import settings
from .methods import Recipe
from .models import anatomy_of
from .models.offload import streamed
from .steps import FilterFn, OfflineStep, StepContext, check_step, check_supported


def prune_(
    model: nn.Module,
    method: OfflineStep | Recipe,
    *,
    calibration: torch.Tensor | None = None,
    filter_fn: FilterFn | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> nn.Module:
    """Apply one method (a built config) or a Recipe to `model`, in place.

    `calibration`: token windows (n, length) for methods that need data. `filter_fn(module, name) -> bool`:
    only the modules it accepts are cut (for weight methods a projection; see each family's docs).
    Each applied step is appended to `model.trimformer_history` (method, settings, seconds, per-layer result).
    """
    steps = method.build() if isinstance(method, Recipe) else [check_step(method)]
    check_supported(steps, streamed=streamed(model), processes=parallel.size())
    for step in steps:
        if step.needs_calibration and calibration is None:
            raise ValueError(f"method {type(step).name!r} needs calibration windows: pass calibration=, e.g. "
                             "trimformer.data.calibration_windows(tokenizer, n=64, length=512)")
    anatomy = anatomy_of(model)
    history = getattr(model, "trimformer_history", [])
    # a step that heals from the dense model (recipe step `recover`, teacher: dense) gets a copy made now
    dense = copy.deepcopy(model).eval() if any(s.needs_dense for s in steps) else None
    run = StepContext(calibration=calibration, filter_fn=filter_fn, batch_size=batch_size, progress=progress,
                      dense=dense)
    for step in steps:
        t0 = time.perf_counter()
        result = step.apply_(anatomy, run)
        anatomy = anatomy_of(model)  # structure steps change shapes
        history.append({"method": type(step).name, "settings": settings(step),
                        "seconds": time.perf_counter() - t0, "result": result})
    model.trimformer_history = history
    return model

