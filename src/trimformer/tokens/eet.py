"""EET-style content-based token pruning, stage by stage (after "Rethinking Vision Transformer for Large-Scale
Fine-Grained Image Retrieval", 2025): background and low-discriminative patches are dropped at a few stage
boundaries, judged by their feature response and by the self-attention the [CLS] token pays them.

At the input of each block in `stages` (default: at 1/4, 1/2 and 3/4 of the depth, blocks 3, 6, 9 of 12), a patch scores its share of the [CLS] token's attention in the previous
block (mean over heads) plus `response` times its share of the feature response (the L2 norm of its hidden state
entering the block: a foreground patch responds strongly). Between boundaries the count stays. `keep` / `flops`:
the share reaching the last stage, each stage keeping the same share of the one before. The paper's second half,
discriminative knowledge transfer from a dense teacher, is training (recover.features.distill_features_ with
this method). `start` is not used: the first stage starts pruning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from . import TOKENS
from .base import Context, TokenPruner, bisect_keep


@TOKENS.register("eet")
@dataclass
class EET(TokenPruner):
    stages: list[int] | None = None
    response: float = 1.0

    needs_attention: ClassVar[bool] = True
    encoder_only: ClassVar[bool] = True

    def __post_init__(self) -> None:
        s = self.stages
        if s is not None and (not s or any(b <= a for a, b in zip(s, s[1:])) or s[0] < 1):
            raise ValueError(f"eet: stages={s} must be increasing block indices >= 1 (e.g. 3,6,9)")
        if self.response < 0:
            raise ValueError(f"eet: response={self.response} must be >= 0 (the weight of the feature response)")
        super().__post_init__()

    def boundaries(self, num_blocks: int) -> list[int]:
        """The blocks at whose input a stage prunes."""
        if self.stages is not None:
            return self.stages
        return sorted({max(1, round(num_blocks * f)) for f in (0.25, 0.5, 0.75)})

    def check(self, num_blocks: int) -> None:
        if self.boundaries(num_blocks)[-1] >= num_blocks:
            raise ValueError(f"eet: stages={self.stages} must be blocks of the model (1..{num_blocks - 1})")
        self.start = self.boundaries(num_blocks)[0]
        super().check(num_blocks)

    def fraction(self, block: int, num_blocks: int) -> float:
        if self.schedule is not None:
            return self.schedule[block]
        stages = self.boundaries(num_blocks)
        return self.keep ** (sum(1 for s in stages if s <= block) / len(stages))

    def solve_keep(self, flops: float, num_blocks: int) -> float:
        """The `keep` whose stage shares average `flops` over the blocks (bisection; full length after recovery)."""
        end = num_blocks if self.recover is None else self.recover
        kept = self.keep

        def mean_share(keep: float) -> float:
            self.keep = keep
            return sum(self.fraction(i, num_blocks) if i < end else 1.0 for i in range(num_blocks)) / num_blocks

        try:
            if flops >= 1.0:
                return 1.0
            if mean_share(1e-3) > flops:
                raise ValueError(f"eet: flops={flops} is out of reach with stages={self.boundaries(num_blocks)} on {num_blocks} "
                                 f"blocks (at least {mean_share(1e-3):.2f}); start the stages earlier")
            return bisect_keep(mean_share, flops)
        finally:
            self.keep = kept

    def score(self, ctx: Context) -> torch.Tensor:
        cls = torch.zeros(1, dtype=torch.long, device=ctx.x.device)
        a = ctx.attention(cls).mean(1)[:, 0] * ctx.valid  # (B, T) [CLS] attention, mean over heads
        r = ctx.x.float().norm(dim=-1) * ctx.valid  # (B, T) feature response
        B, T, H = ctx.x.shape
        ctx.flops += 2.0 * B * T * H  # the [CLS] row of the attention and the norms

        def share(v: torch.Tensor) -> torch.Tensor:
            return v / v.sum(1, keepdim=True).clamp(min=1e-12)

        return share(a.float()) + self.response * share(r)
