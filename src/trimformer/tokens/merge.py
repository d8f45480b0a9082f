"""Token merging (ToMe, Bolya et al., ICLR 2023): bipartite soft matching, size-weighted.

Alternate tokens form sets A and B; every A token finds its most similar B token (cosine of the
previous block's keys, heads concatenated); the r best-matched A tokens are averaged into their
match, weighted by how many original tokens each stands for. Later blocks add log(size) to the
attention logits (proportional attention), and recovery copies a merged token back to its sources.
`r`: tokens merged per block from `start` on (ToMe's setting; overrides `keep`). `features`: what
similarity is measured on, "keys" (ToMe) or "hidden" (the block's input states; better on MiniLM).
`threshold`: merge only pairs at least this similar (cosine); the schedule then caps the merges, so
with a low `keep` each row merges as much as its content allows (FLOPs vary with the text).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from . import TOKENS
from .base import Context, Plan, TokenPruner, compact


def bipartite_soft_matching(
    feat: torch.Tensor, r: torch.Tensor, valid: torch.Tensor, protected: torch.Tensor, threshold: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which tokens merge, and into which.

    feat (B, T, C) similarity features; r (B,) merges per row (at most); valid / protected (B, T)
    bool; threshold: only pairs with cosine >= threshold merge.
    Returns merged (B, T) bool (A tokens that disappear) and into (B, T) long (their B partner).
    """
    B, T, _ = feat.shape
    f = F.normalize(feat.float(), dim=-1)
    a, b = f[:, ::2], f[:, 1::2]  # (B, Ta, C), (B, Tb, C)
    scores = a @ b.transpose(1, 2)  # (B, Ta, Tb)
    scores = scores.masked_fill(~valid[:, 1::2, None].transpose(1, 2), float("-inf"))
    node_max, node_idx = scores.max(-1)  # (B, Ta) best partner of each A token
    can = valid[:, ::2] & ~protected[:, ::2] & torch.isfinite(node_max)
    if threshold is not None:
        can &= node_max >= threshold
    node_max = node_max.masked_fill(~can, float("-inf"))
    rank = node_max.argsort(dim=1, descending=True, stable=True).argsort(dim=1)  # (B, Ta) 0 = best match
    merged_a = (rank < r[:, None]) & can
    merged = torch.zeros(B, T, dtype=torch.bool, device=feat.device)
    merged[:, ::2] = merged_a
    into = torch.full((B, T), -1, dtype=torch.long, device=feat.device)
    into[:, ::2] = torch.where(merged_a, node_idx * 2 + 1, -1)  # B-set index -> position
    return merged, into


@TOKENS.register("merge")
@dataclass
class Merge(TokenPruner):
    r: int | None = None
    features: Literal["keys", "hidden"] = "keys"
    threshold: float | None = None

    encoder_only: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        name = getattr(self, "name", "merge")
        if self.r is not None and self.r < 0:
            raise ValueError(f"{name}: r={self.r} must be >= 0 (tokens merged per block)")
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"{name}: threshold={self.threshold} must be a cosine in [-1, 1]")

    def similarity_features(self, ctx: Context) -> torch.Tensor:
        """(B, T, C): the previous block's keys (heads concatenated), or the hidden states."""
        feat = ctx.x if self.features == "hidden" else ctx.keys()
        n = ctx.valid.sum(1).double()  # (B,) real tokens: padding is not counted, as in the blocks
        ctx.flops += float((2.0 * (n // 2) * ((n + 1) // 2) * feat.shape[-1]).sum())  # bipartite similarities
        return feat

    def targets(self, block: int, num_blocks: int, n: torch.Tensor) -> torch.Tensor:
        if self.r is None:
            return super().targets(block, num_blocks, n)
        steps = max(0, block - self.start + 1)
        return (n - self.r * steps).clamp(min=1)

    def reduces(self, num_blocks: int) -> bool:
        return bool(self.r) if self.r is not None else super().reduces(num_blocks)

    def plan(self, ctx: Context, recover: bool) -> Plan:
        r = ctx.valid.sum(1) - ctx.target  # (B,) at most half a row per block, as in ToMe
        feat = self.similarity_features(ctx)
        merged, into = bipartite_soft_matching(feat, r, ctx.valid, ctx.protected, self.threshold)
        kept = ctx.valid & ~merged
        keep, slot_valid, slot_of = compact(kept, ctx.causal)
        dst = torch.where(merged, slot_of.gather(1, into.clamp(min=0)), slot_of)
        return Plan(keep, slot_valid, dst.masked_fill(~ctx.valid, -1), merge=True)
