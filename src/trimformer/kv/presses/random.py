"""Random eviction: the baseline every press must beat. Deterministic for a seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import PRESSES, Observation, Press


@PRESSES.register("random")
@dataclass
class Random(Press):
    seed: int = 0

    def score(self, obs: Observation) -> torch.Tensor:
        g = torch.Generator(device=obs.keys.device).manual_seed(self.seed + obs.layer)
        return torch.rand(obs.valid.shape, generator=g, device=obs.keys.device)
