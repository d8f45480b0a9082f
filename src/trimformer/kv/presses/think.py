"""ThinK (Xu et al., 2024, "ThinK: Thinner Key Cache by Query-Driven Pruning"): drop the key channels
that contribute least to q.k, scored per KV head by |Q[:, c]| * |K[:, c]| over the last `window`
queries (all the group's query heads). The dropped channels are removed from storage, not zeroed.
`ratio` is the share of key channels removed; tokens are all kept (compose with a token press)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import PRESSES, Observation, Press


@PRESSES.register("think")
@dataclass
class ThinK(Press):
    window: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1:
            raise ValueError(f"think: window must be >= 1, got {self.window}")

    def budget(self, obs: Observation, decode_budget: int | None) -> torch.Tensor | None:
        return Press(0.0).budget(obs, decode_budget)  # tokens: only the decode budget applies

    def channels(self, obs: Observation) -> torch.Tensor | None:
        if self.ratio == 0:
            return None
        q = obs.queries(self.window)  # (B, H_q, w, D)
        B, Hq, w, D = q.shape
        H = obs.keys.shape[1]
        q = q * obs.query_valid(self.window)[:, None, :, None]
        q_norm = q.reshape(B, H, obs.groups * w, D).norm(dim=2)  # (B, H, D)
        k_norm = (obs.keys * obs.valid[..., None]).norm(dim=2)  # (B, H, D)
        keep = D - round(self.ratio * D)
        idx = (q_norm * k_norm).topk(keep, dim=-1).indices  # (B, H, keep)
        return idx.sort(-1).values
