"""The weight-pruning family: a method gives a score (or an update) per layer; the base selects and applies."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .. import calibrate
from ..calibrate import LayerStats
from ..models import Anatomy, Proj
from ..progress import bar
from .masks import check_sparsity, nm_mask, parse_pattern, topk_mask

FilterFn = Callable[[nn.Module, str], bool]


@dataclass
class WeightPruner:
    """Base config of every weight method: how much, in what pattern, where.

    sparsity: share of weights removed per layer (ignored by N:M patterns, which fix it at 1 - N/M).
    pattern: 'unstructured' or 'N:M' (N kept of every M consecutive inputs, e.g. '2:4').
    targets: which projections, by short name ('attn.q', 'mlp.down', ...; 'all' for every one).
    """

    sparsity: float = 0.5
    pattern: str = "unstructured"
    targets: str = "all"

    name: ClassVar[str] = "?"
    needs_calibration: ClassVar[bool] = True
    needs_hessian: ClassVar[bool] = False
    per_row: ClassVar[bool] = False  # compare scores within each output row (Wanda) or across the layer

    def __post_init__(self) -> None:
        self.nm = parse_pattern(self.pattern)
        if self.nm is None:
            check_sparsity(self.sparsity)
        else:
            self.sparsity = 1.0 - self.nm[0] / self.nm[1]
        self._targets = None if self.targets in ("all", "", None) else {t.strip() for t in self.targets.split(",")}

    # -- the one hook a method implements -----------------------------------------------------
    def score(self, W: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
        """Importance of each weight of W (out, in); higher is kept."""
        raise NotImplementedError

    # -- what the base does -------------------------------------------------------------------
    def mask(self, W: torch.Tensor, stats: LayerStats | None, sparsity: float) -> torch.Tensor:
        s = self.score(W, stats)
        if self.nm is not None:
            return nm_mask(s, *self.nm)
        return topk_mask(s, sparsity, per_row=self.per_row)

    @torch.no_grad()
    def prune_layer(self, proj: Proj, stats: LayerStats | None, sparsity: float) -> None:
        """Zero the pruned weights of one projection in place."""
        W = proj.weight
        W.mul_(self.mask(W.float(), stats, sparsity).to(W.dtype))

    def prune_block(self, bc: calibrate.BlockCalib, projs: dict[str, Proj]) -> None:
        """Prune the selected projections of one block; methods that update weights override this."""
        stats = bc.collect(projs, hessian=self.needs_hessian)
        for name, p in projs.items():
            self.prune_layer(p, stats[name], self.layer_sparsity(name))

    def layer_sparsity(self, name: str) -> float:
        """Per-layer target; allocation wrappers override it."""
        return self.sparsity

    def selected(self, block_projs: dict[str, Proj], filter_fn: FilterFn | None) -> dict[str, Proj]:
        out = {}
        for short, p in block_projs.items():
            if self._targets is not None and short not in self._targets and short.split(".")[0] not in self._targets:
                continue
            if filter_fn is not None and not filter_fn(p.module, p.name):
                continue
            out[p.name] = p
        return out

    def apply_(
        self,
        anatomy: Anatomy,
        calibration: torch.Tensor | None = None,
        *,
        filter_fn: FilterFn | None = None,
        batch_size: int = 1,
        progress: bool = True,
    ) -> dict[str, float]:
        """Prune every selected projection; returns the realised sparsity per layer."""
        if self.sparsity == 0.0 and self.nm is None:
            return {}
        done: dict[str, float] = {}
        if not self.needs_calibration:
            for block in bar(anatomy.blocks, desc=f"{self.name}", unit="block", disable=not progress):
                for name, p in self.selected(block.projections(), filter_fn).items():
                    self.prune_layer(p, None, self.layer_sparsity(name))
                    done[name] = _sparsity(p)
            return done
        if calibration is None:
            raise ValueError(f"method {self.name!r} needs calibration windows (token ids of shape (n, length))")
        for bc in calibrate.blocks(anatomy, calibration, batch_size=batch_size, progress=progress, desc=self.name):
            projs = self.selected(bc.block.projections(), filter_fn)
            if not projs:
                continue
            self.prune_block(bc, projs)
            done.update({name: _sparsity(p) for name, p in projs.items()})
        return done


def _sparsity(p: Proj) -> float:
    W = p.weight
    return 1.0 - W.count_nonzero().item() / W.numel()
