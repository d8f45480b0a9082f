"""SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation"): the last
`window` queries vote (attention summed over them and over a KV group's query heads), votes are
max-pooled over `kernel` neighbours so kept tokens come with their context; the window is always kept."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..base import PRESSES, Observation, Press


@PRESSES.register("snapkv")
@dataclass
class SnapKV(Press):
    window: int = 64
    kernel: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1 or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"snapkv: window must be >= 1 and kernel odd >= 1, got {self.window}, {self.kernel}")

    def score(self, obs: Observation) -> torch.Tensor:
        votes = obs.attention(self.window)  # (B, H, L)
        B, H, L = votes.shape
        votes = F.max_pool1d(votes.view(B * H, 1, L), self.kernel, stride=1, padding=self.kernel // 2)
        votes = votes.view(B, H, L)
        w = min(self.window, obs.new)
        votes[..., L - w:] = float("inf")  # the observation window itself stays
        return votes
