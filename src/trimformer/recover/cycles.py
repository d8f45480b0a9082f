"""Iterative prune -> recover cycles (Adapt-Pruner, arXiv:2502.03460, in spirit): reach the final sparsity
in small cuts, healing after each, instead of one big cut."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .train import RecoverConfig, recover_


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
    """For each target in `sparsities` (increasing): prune `student` to it with `method`, then recover it.

    `settings`: other fields of the method; `calibration`: its windows (default: the first 8 of `data`).
    Each cycle's checkpoints go to `config.checkpoint_dir/cycle-<i>`. Both steps land in `trimformer_history`.
    """
    if not sparsities or any(b <= a for a, b in zip(sparsities, sparsities[1:])):
        raise ValueError(f"sparsities must be a non-empty increasing list (e.g. [0.2, 0.35, 0.5]), got {sparsities}")
    from ..api import prune_  # (here: trimformer.methods imports this package for its recipe step)
    from ..methods import build

    cfg = config or RecoverConfig()
    calib = data[:8] if calibration is None else calibration
    for i, s in enumerate(sparsities):
        prune_(student, build(method, {**(settings or {}), "sparsity": s}), calibration=calib, progress=progress)
        cycle_cfg = replace(cfg, checkpoint_dir=f"{cfg.checkpoint_dir}/cycle-{i}") if cfg.checkpoint_dir else cfg
        recover_(student, teacher, data, cycle_cfg, progress=progress)
    return student
