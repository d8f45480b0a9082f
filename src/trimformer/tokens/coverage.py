"""Content-based progressive pruning: each row keeps the tokens that carry most of the attention.

The issue's "content-based progressive pruning (EET)" names a paper we could not identify; this is the
idea as stated there, training-free. At the input of every block from `start`, each row's tokens are
ranked by the attention they received in the previous block (mean over heads and real queries, as `acc`),
and the row keeps the fewest tokens whose share of that attention reaches `mass`. How many survive depends
on the text: a row whose attention is spread over many tokens keeps more than one whose attention is
peaked, and the cut repeats block after block (progressive). `keep` / `schedule` / `flops` set a floor
(the row never keeps fewer than the schedule's count); the default floor is nearly nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from . import TOKENS
from .base import Context, Plan, TokenPruner, topk_plan


@TOKENS.register("coverage")
@dataclass
class Coverage(TokenPruner):
    mass: float = 0.9
    keep: float = 0.02

    needs_attention: ClassVar[bool] = True
    encoder_only: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.mass <= 1.0:
            raise ValueError(f"coverage: mass={self.mass} must be in (0, 1] (the share of attention the kept tokens carry)")

    def score(self, ctx: Context) -> torch.Tensor:
        return ctx.received()

    def plan(self, ctx: Context, recover: bool) -> Plan:
        s = self.score(ctx).float().masked_fill(~ctx.valid, 0.0)
        share = s / s.sum(1, keepdim=True).clamp(min=1e-12)
        # protected tokens are kept whatever their share; the rest join by share until `mass` is reached
        carried = (share * ctx.protected).sum(1, keepdim=True) + \
            share.masked_fill(ctx.protected, 0.0).sort(1, descending=True).values.cumsum(1)  # (B, T)
        free = (ctx.valid & ~ctx.protected).sum(1)
        need = ctx.protected.sum(1) + torch.minimum((carried < self.mass - 1e-6).sum(1) + 1, free)
        ctx.target = torch.minimum(torch.maximum(ctx.target, need), ctx.valid.sum(1))
        return topk_plan(s, ctx, recover)
