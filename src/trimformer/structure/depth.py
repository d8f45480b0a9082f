"""Depth pruning: remove whole blocks, by block influence or angular distance.

- block-influence (ShortGPT, Men et al. 2024): BI_i = 1 - mean cos(x_in, x_out); remove the lowest.
- angular (Gromov et al. 2024): remove the n contiguous blocks l..l+n-1 whose input x_l and output
  x_{l+n} are closest in angle, arccos(cos(x_l, x_{l+n})) / pi averaged over tokens.
Single sublayers go with FinerCut (finercut.py).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from .. import calibrate
from ..models import Anatomy
from ..steps import StepContext
from . import STRUCTURE, surgery
from .base import Scope, StructurePruner
from .fuse import fuse_into_neighbours


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.double().reshape(-1, a.shape[-1]), b.double().reshape(-1, b.shape[-1]), dim=-1)


@torch.no_grad()
def block_influence(anatomy: Anatomy, calibration: torch.Tensor, progress: bool = True) -> list[float]:
    """1 - mean cos(input, output) per block on the dense model."""
    out = []
    for bc in calibrate.blocks(anatomy, calibration, progress=progress, desc="block influence"):
        ys = bc.run()
        c = torch.cat([_cos(x, y) for x, y in zip(bc.inputs, ys)])
        out.append(1.0 - c.mean().item())
    return out


@torch.no_grad()
def angular_distances(anatomy: Anatomy, calibration: torch.Tensor, n: int, progress: bool = True) -> list[float]:
    """d(l, n) = mean arccos(cos(x_l, x_{l+n})) / pi for every start l (x_l: input of block l)."""
    window: deque[list[torch.Tensor]] = deque(maxlen=n + 1)
    out = []
    L = len(anatomy.blocks)
    def push(states: list[torch.Tensor]) -> None:
        window.append(states)
        if len(window) == n + 1:
            c = torch.cat([_cos(a, b) for a, b in zip(window[0], window[-1])]).clamp(-1, 1)
            out.append((torch.arccos(c) / math.pi).mean().item())
            window.popleft()

    for bc in calibrate.blocks(anatomy, calibration, progress=progress, desc="angular distance"):
        push(bc.inputs)
        if bc.block.index == L - 1:
            push(bc.run())
    return out  # len L - n + 1


@STRUCTURE.register("depth")
@dataclass
class Depth(StructurePruner):
    """Remove whole blocks. remove: how many (or share: the fraction of blocks; or target='remove=N').
    criterion: block-influence (lowest BI) | angular (the most similar contiguous interval).
    fuse: fold each removed run of blocks into the kept block before it (`fuse_into_neighbours`, on
    `fuse_windows` calibration windows of 256 tokens), kept where it lowers the calibration KL.
    filter_fn is asked about each block: only accepted blocks are removed or fused into."""

    remove: int = 0
    share: float = 0.0
    criterion: Literal["block-influence", "angular"] = "block-influence"
    fuse: bool = False
    fuse_windows: int = 32

    budgets = ("remove",)
    spellings = (("remove", "remove"), ("share", "remove"))
    filter_on = ("block",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.remove < 0 or not 0.0 <= self.share < 1.0:
            raise ValueError(f"remove must be >= 0 and share in [0, 1), got {self.remove}, {self.share}")
        if self.fuse_windows < 1:
            raise ValueError(f"fuse_windows must be >= 1, got {self.fuse_windows}")

    def prune(self, anatomy: Anatomy, run: StepContext, scope: Scope) -> dict[str, Any]:
        calibration, batch_size, progress = run.calibration, run.batch_size, run.progress
        L = len(anatomy.blocks)
        k = self.budget.count(L, "blocks")
        free = [i for i in range(L) if scope(i, "block")]
        if len(free) < k:
            raise ValueError(f"cannot remove {k} blocks: filter_fn accepts only {len(free)} of {L}")
        if self.criterion == "block-influence":
            scores = block_influence(anatomy, calibration, progress)
            drop = sorted(sorted(free, key=lambda i: scores[i])[:k])
        else:
            scores = angular_distances(anatomy, calibration, k, progress)
            starts = [s for s in range(len(scores)) if all(scope(i, "block") for i in range(s, s + k))]
            if not starts:
                raise ValueError(f"angular removes {k} contiguous blocks: filter_fn leaves no such run")
            start = min(starts, key=lambda i: scores[i])
            drop = list(range(start, start + k))
        fused = None
        if self.fuse:
            if not anatomy.causal or not all(b.pre_norm for b in anatomy.blocks):
                raise ValueError("fuse needs a pre-norm causal LM (it scores by next-token KL); set fuse=false")
            fused = fuse_into_neighbours(anatomy, calibration, [(i, k) for i in drop for k in ("attn", "mlp")],
                                         windows=self.fuse_windows, batch_size=batch_size, progress=progress,
                                         may_change=lambda p, _kind: scope(p, "block"))
        surgery.remove_blocks(anatomy, drop)
        return {"removed_blocks": drop, "scores": scores, "fused": fused, "spent": len(drop)}
