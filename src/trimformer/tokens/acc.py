"""Attention context contribution with a latency target (Latency Adjustable Transformer, Kachuee & Lee 2022).

A token's score is the attention mass it contributes to the context of all real tokens (column sum
of the previous block's attention, mean over heads). With `speedup`, the keep schedule is solved
from latencies measured on this machine (`measure_tokens` x `measure_batch`): the geometric schedule
from `start` whose predicted time is dense time / speedup, where a pruned block costs its own time at
its token count plus the time of the decision before it (the attention map recomputed from the
captured queries and keys, the scores, the top-k and the recovery map), measured the same way. On
dinov2-s at batch 32 that decision costs ~30 % of a block: leaving it out made `speedup=1.667` run at
1.34x. Otherwise `keep` sets the schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..evaluate.speed import fastest
from . import TOKENS
from .base import Context, TokenPruner, topk_plan

_LATENCY: dict[tuple, list[float]] = {}  # (model id, block, tokens, batch) -> seconds per grid point
GRID = (1.0, 0.75, 0.5, 0.25, 0.1)


@TOKENS.register("acc")
@dataclass
class ACC(TokenPruner):
    speedup: float | None = None
    measure_tokens: int = 128
    measure_batch: int = 8
    solved: list[float] | None = field(default=None, repr=False)

    needs_attention: ClassVar[bool] = True
    encoder_only: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.speedup is not None and self.speedup < 1.0:
            raise ValueError(f"acc: speedup={self.speedup} must be >= 1 (a latency target of dense / speedup)")
        if self.measure_tokens < 8 or self.measure_batch < 1:
            raise ValueError("acc: measure_tokens must be >= 8 and measure_batch >= 1")

    def score(self, ctx: Context) -> torch.Tensor:
        return ctx.received()

    def fraction(self, block: int, num_blocks: int) -> float:
        if self.solved is not None:
            return self.solved[block]
        return super().fraction(block, num_blocks)

    def prepare(self, anatomy) -> None:
        """Solve the schedule for `speedup` from block latencies measured now (cached per model)."""
        if self.speedup is None or self.schedule is not None:
            return
        L = len(anatomy.blocks)
        t = measure_block(anatomy, self.measure_tokens, self.measure_batch)  # seconds at GRID shares
        s = measure_decision(anatomy, self.measure_tokens, self.measure_batch)  # on the tokens entering the cut

        def predicted(keep: float) -> float:
            shares = [1.0 if i < self.start else keep ** ((i - self.start + 1) / (L - self.start)) for i in range(L)]
            cuts = sum(_interp(s, shares[i - 1]) for i in range(max(1, self.start), L) if shares[i] < shares[i - 1])
            return sum(_interp(t, f) for f in shares) + cuts

        dense, goal = predicted(1.0), predicted(1.0) / self.speedup
        if predicted(GRID[-1]) > goal:
            best = dense / predicted(GRID[-1])
            raise ValueError(f"acc: speedup={self.speedup} is out of reach with start={self.start} "
                             f"(at most {best:.2f}x here); lower it or start pruning earlier")
        lo, hi = GRID[-1], 1.0
        for _ in range(30):  # bisection: predicted time grows with keep
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if predicted(mid) < goal else (lo, mid)
        keep = lo
        self.solved = [1.0 if i < self.start else keep ** ((i - self.start + 1) / (L - self.start)) for i in range(L)]


def _interp(t: list[float], f: float) -> float:
    """Linear interpolation of block time over the GRID shares (descending)."""
    pts = sorted(zip(GRID, t))
    for (f0, t0), (f1, t1) in zip(pts, pts[1:]):
        if f <= f1:
            return t0 + (t1 - t0) * (f - f0) / (f1 - f0) if f >= f0 else t0 * f / f0
    return pts[-1][1]


@torch.no_grad()
def measure_block(anatomy, tokens: int, batch: int, reps: int = 7) -> list[float]:
    """Seconds of block 1 at each GRID share of `tokens` (blocks share one shape): the minimum over
    round-robin repetitions, so that load from other processes hits every size alike."""
    block = anatomy.blocks[min(1, len(anatomy.blocks) - 1)].module
    key = (id(anatomy.model), tokens, batch)
    if key not in _LATENCY:
        p = next(anatomy.model.parameters())
        xs = [torch.randn(batch, max(2, round(tokens * f)), anatomy.hidden_size, device=p.device, dtype=p.dtype)
              for f in GRID]
        _LATENCY[key] = fastest([lambda x=x: block(x) for x in xs], reps)
    return _LATENCY[key]


@torch.no_grad()
def measure_decision(anatomy, tokens: int, batch: int, reps: int = 5) -> list[float]:
    """Seconds of one pruning decision on T = each GRID share of `tokens` (received attention from q/k,
    top-k of 80 % of them, recovery map), timed like `measure_block`."""
    a = anatomy.blocks[0].attention
    key = (id(anatomy.model), tokens, batch, "decision")
    if key not in _LATENCY:
        p = next(anatomy.model.parameters())
        ctxs = []
        for f in GRID:
            T = max(2, round(tokens * f))
            q, k = (torch.randn(batch, a.num_heads, T, a.head_dim, device=p.device, dtype=p.dtype) for _ in range(2))
            x = torch.randn(batch, T, anatomy.hidden_size, device=p.device, dtype=p.dtype)
            ones = torch.ones(batch, T, dtype=torch.bool, device=p.device)
            protected = torch.zeros_like(ones)
            protected[:, 0] = True
            target = torch.full((batch,), max(1, round(T * 0.8)), device=p.device)
            ctxs.append(Context(1, x, q, k, ones, protected, ones.float(), target, anatomy.causal))

        def decide(ctx: Context) -> None:
            topk_plan(ctx.received().float(), ctx, recover=True)

        _LATENCY[key] = fastest([lambda c=c: decide(c) for c in ctxs], reps)
    return _LATENCY[key]
