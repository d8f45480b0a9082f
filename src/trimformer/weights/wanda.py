"""Wanda: |W_ij| * ||X_j||_2, compared within each output row (Sun et al., 2023, arXiv:2306.11695)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calibrate import LayerStats
from . import WEIGHTS
from .base import WeightPruner


@WEIGHTS.register("wanda")
@dataclass
class Wanda(WeightPruner):
    per_row = True

    def score(self, W: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
        return W.abs() * stats.norm.to(W.device)[None, :]  # (out, in) * (1, in)
