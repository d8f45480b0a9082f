"""Key-norm (Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache
Compression"): keys with a small L2 norm draw the most attention, so the largest norms are dropped."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import PRESSES, Observation, Press


@PRESSES.register("knorm")
@dataclass
class KeyNorm(Press):
    def score(self, obs: Observation) -> torch.Tensor:
        return -obs.keys.norm(dim=-1)  # (B, H, L)
