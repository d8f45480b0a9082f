"""TOVA (Oren et al., 2024, "Transformers are Multi-State RNNs"): keep the tokens the newest query
attends to most (averaged over a KV group's query heads)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import PRESSES, Observation, Press


@PRESSES.register("tova")
@dataclass
class TOVA(Press):
    def score(self, obs: Observation) -> torch.Tensor:
        return obs.attention(window=1)  # (B, H, L)
