"""Iterative prune -> recover cycles (Adapt-Pruner, arXiv:2502.03460, in spirit): reach the final sparsity
in small cuts, healing after each, instead of one big cut."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..config import settings as settings_of
from ..models import anatomy_of
from ..steps import StepContext
from ..weights import WEIGHTS
from .config import RecoverConfig
from .train import recover_


def prune_recover_cycles_(
    student: nn.Module,
    teacher: nn.Module,
    data: torch.Tensor,
    method: str,
    sparsities: list[float],
    config: RecoverConfig | None = None,
    *,
    settings: dict[str, Any] | None = None,
    calibration: torch.Tensor | None = None,
    progress: bool = True,
) -> nn.Module:
    """For each target in `sparsities` (increasing): prune `student` to it with weight method `method`, then
    recover it.

    `settings`: other fields of the method; `calibration`: its windows (default: the first 8 of `data`).
    Each cycle's checkpoints go to `config.checkpoint_dir/cycle-<i>`. Both steps land in `trimformer_history`.
    """
    if not sparsities or any(b <= a for a, b in zip(sparsities, sparsities[1:])):
        raise ValueError(f"sparsities must be a non-empty increasing list (e.g. [0.2, 0.35, 0.5]), got {sparsities}")
    cfg = config or RecoverConfig()
    steps = [WEIGHTS.build(method, {**(settings or {}), "sparsity": s}) for s in sparsities]  # all checked first
    run = StepContext(calibration=data[:8] if calibration is None else calibration, progress=progress)
    for i, step in enumerate(steps):
        t0 = time.perf_counter()
        result = step.apply_(anatomy_of(student), run)
        history = getattr(student, "trimformer_history", [])  # (the entry trimformer.prune_ would write)
        history.append({"method": type(step).name, "settings": settings_of(step), "seconds": time.perf_counter() - t0,
                        "result": result})
        student.trimformer_history = history
        folder = cfg.checkpoint.dir
        cycle = replace(cfg, checkpoint=replace(cfg.checkpoint, dir=f"{folder}/cycle-{i}")) if folder else cfg
        recover_(student, teacher, data, cycle, progress=progress)
    return student
