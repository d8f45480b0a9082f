"""Magnitude pruning: |W|, compared across the whole layer. No calibration."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calibrate import LayerStats
from . import WEIGHTS
from .base import WeightPruner


@WEIGHTS.register("magnitude")
@dataclass
class Magnitude(WeightPruner):
    needs_calibration = False

    def score(self, W: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
        return W.abs()
