"""Token Transforming (Zeng et al., 2025): training-free many-to-many token compression.

Pruning and merging are both a matrix W (T' x T) applied to the tokens: pruning keeps rows of the
identity, ToMe sends each removed token wholly into one partner. Transforming spreads each removed
token over its `neighbours` most similar kept tokens with weights softmax(cosine / `tau`), so no
slot has to absorb a whole dissimilar token and no removed token is attached to one partner only.
The removed tokens are the most redundant ones (ToMe's bipartite matching picks them); kept tokens
map to themselves. Slots are size-weighted mixtures, later blocks add log(mass) to the attention
logits (proportional attention), and recovery gives each original token its mixture of the slots.
`neighbours=1` is ToMe's merge (up to the choice of partner among all kept tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from . import TOKENS
from .base import Context, Plan, compact
from .merge import Merge, bipartite_soft_matching


@TOKENS.register("transform")
@dataclass
class Transform(Merge):
    tau: float = 0.05
    neighbours: int = 3

    encoder_only: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.tau > 0.0:
            raise ValueError(f"transform: tau={self.tau} must be > 0 (softmax temperature over cosine similarity)")
        if self.neighbours < 1:
            raise ValueError(f"transform: neighbours={self.neighbours} must be >= 1 (kept tokens a removed one spreads over)")

    def plan(self, ctx: Context, recover: bool) -> Plan:
        r = ctx.valid.sum(1) - ctx.target  # (B,) tokens removed per row (at most half, as in ToMe)
        feat = self.similarity_features(ctx)
        removed, _ = bipartite_soft_matching(feat, r, ctx.valid, ctx.protected, self.threshold)
        kept = ctx.valid & ~removed
        keep, slot_valid, slot_of = compact(kept, ctx.causal)
        B, T, C = feat.shape
        Tn = keep.shape[1]
        f = F.normalize(feat.float(), dim=-1)
        fk = f.gather(1, keep[..., None].expand(B, Tn, C))  # (B, T', C) kept tokens' features
        sim = (f @ fk.transpose(1, 2)).masked_fill(~slot_valid[:, None, :], float("-inf"))  # (B, T, T')
        n, n_new = ctx.valid.sum(1).double(), slot_valid.sum(1).double()  # real tokens before / after
        ctx.flops += float((2.0 * n * n_new * (C + ctx.x.shape[-1])).sum())  # similarity, mixing
        k = min(self.neighbours, Tn)
        top, idx = sim.topk(k, dim=-1)  # (B, T, k)
        share = (top / self.tau).softmax(-1).nan_to_num(0.0)  # (B, T, k)
        W = torch.zeros(B, T, Tn, device=f.device).scatter(2, idx, share)  # (B, T, T')
        own = F.one_hot(slot_of.clamp(min=0), Tn).float()  # (B, T, T') kept tokens stay themselves
        W = torch.where(kept[..., None], own, W).masked_fill(~ctx.valid[..., None], 0.0)
        dst = torch.where(ctx.valid, W.argmax(-1), -1)
        return Plan(keep, slot_valid, dst, merge=True, weights=W)
