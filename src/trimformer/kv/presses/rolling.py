"""Rolling memory (after Yuan et al., 2026, "InfiniteVGGT"): an attention-free press, so the model keeps
its fused SDPA attention and no query is ever computed. Redundancy is judged in key space: a key close
(in cosine) to its head's mean key adds little that the others do not carry, so the most typical keys
go and the most diverse stay. An immutable anchor (the first `n_anchor` tokens, InfiniteVGGT's first
frame; attention sinks in a language model) and the newest `recent` tokens are always kept. With a
`decode_budget` the memory rolls: every step beyond the budget drops the most redundant held token."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..base import PRESSES, Observation, Press


@PRESSES.register("rolling")
@dataclass
class RollingMemory(Press):
    n_anchor: int = 4
    recent: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_anchor < 0 or self.recent < 0:
            raise ValueError(f"rolling: n_anchor and recent must be >= 0, got {self.n_anchor}, {self.recent}")

    def score(self, obs: Observation) -> torch.Tensor:
        k = F.normalize(obs.keys, dim=-1) * obs.valid[..., None]  # (B, H, L, D) unit keys, held only
        mean = k.sum(2, keepdim=True) / obs.valid.sum(-1)[..., None, None].clamp(min=1)  # (B, H, 1, D)
        score = -(k * F.normalize(mean, dim=-1)).sum(-1)  # (B, H, L): diversity = -cos(key, mean key)
        rank = obs.valid.long().cumsum(-1)  # 1-based position among each head's held tokens
        n = obs.valid.sum(-1, keepdim=True)  # (B, H, 1)
        keep = (rank <= self.n_anchor) | (rank > n - self.recent)
        return score.masked_fill(keep & obs.valid, float("inf"))
