"""Zero-TPrune (Wang et al., CVPR 2024): training-free token pruning from the attention graph.

I-stage: importance is the stationary distribution of a weighted PageRank over the previous block's
attention graph (a token matters when important tokens attend to it). S-stage: of the less important
half, prune the tokens most similar (key cosine) to the important half: they carry duplicate content.
`i_share`: the share of each block's cut made by importance alone; `iters`: PageRank iterations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from . import TOKENS
from .base import Context, TokenPruner


@TOKENS.register("zero-tprune")
@dataclass
class ZeroTPrune(TokenPruner):
    i_share: float = 0.5
    iters: int = 10

    needs_attention: ClassVar[bool] = True
    encoder_only: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.i_share <= 1.0:
            raise ValueError(f"zero-tprune: i_share={self.i_share} must be in [0, 1]")
        if self.iters < 1:
            raise ValueError(f"zero-tprune: iters={self.iters} must be >= 1")

    def score(self, ctx: Context) -> torch.Tensor:
        A = ctx.attention_graph()  # (B, T, T) head mean; padding queries give nothing
        B, T = ctx.valid.shape
        s = ctx.valid.float() / ctx.valid.sum(1, keepdim=True)  # (B, T) uniform start
        for _ in range(self.iters):  # s_j <- sum_i A_ij s_i
            s = (s[:, None, :] @ A)[:, 0]
            s = s / s.sum(1, keepdim=True).clamp(min=1e-12)
        ctx.flops += 2.0 * self.iters * B * T * T

        imp = s.masked_fill(~ctx.valid, float("-inf")).masked_fill(ctx.protected, float("inf"))
        rank = imp.argsort(dim=1, descending=True, stable=True).argsort(dim=1)  # (B, T) 0 = most important
        n = ctx.valid.sum(1, keepdim=True)  # (B, 1)
        d = n - ctx.target[:, None]  # tokens to cut
        d_i = torch.floor(d * self.i_share).long()
        m = n - d_i  # survivors of the I-stage
        group_a = rank < (m + 1) // 2  # the important half
        group_b = (rank >= (m + 1) // 2) & (rank < m)

        f = F.normalize(ctx.keys().float(), dim=-1)  # (B, T, C)
        sim = (f @ f.transpose(1, 2)).masked_fill(~group_a[:, None, :], float("-inf")).amax(-1)  # (B, T)
        ctx.flops += 2.0 * B * T * T * f.shape[-1]
        norm = s / s.amax(1, keepdim=True).clamp(min=1e-12)  # in [0, 1]
        # tiers: I-stage cuts < group B (least similar kept first) < group A (by importance)
        return torch.where(group_a, 4.0 + norm, torch.where(group_b, 2.0 - sim.clamp(-1, 1), norm))
