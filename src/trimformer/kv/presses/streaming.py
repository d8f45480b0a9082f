"""StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with Attention Sinks"):
keep the first `n_sink` tokens and the most recent ones."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import PRESSES, Observation, Press


@PRESSES.register("streaming")
@dataclass
class Streaming(Press):
    n_sink: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_sink < 0:
            raise ValueError(f"streaming: n_sink must be >= 0, got {self.n_sink}")

    def score(self, obs: Observation) -> torch.Tensor:
        # Rank of each token among its head's held tokens: sinks first, then newest to oldest.
        idx = obs.valid.long().cumsum(-1) - 1  # (B, H, L) position among held tokens
        recency = idx.to(obs.keys.dtype)
        return torch.where(idx < self.n_sink, torch.full_like(recency, float("inf")), recency)
