"""The weight-pruning family: a method gives a score (or an update) per layer; the base selects and applies."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch
from typing import ClassVar

import torch

from .. import calibrate
from ..calibrate import LayerStats
from ..models import Anatomy, Proj
from ..progress import bar
from ..steps import FilterFn, StepContext
from .masks import block_mask, check_sparsity, nm_mask, parse_block, parse_pattern, topk_mask

SHORT_NAMES = {"attn", "mlp", "attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o", "mlp.gate", "mlp.up", "mlp.down"}


@dataclass
class WeightPruner:
    """Base config of every weight method: how much, in what pattern, where.

    sparsity: share of weights removed per layer (ignored by N:M patterns, which fix it at 1 - N/M).
    pattern: 'unstructured', 'N:M' (N kept of every M consecutive inputs, e.g. '2:4'), or 'block:RxC'
      (whole blocks of R rows x C inputs, e.g. 'block:1x4', 'block:4x4', for block-sparse kernels).
    targets: which projections, by short name ('attn.q', 'mlp.down', ...; 'all' for every one).
    layers: per-layer overrides, {glob: sparsity}, the glob matched against the full module name
      ('model.layers.0.*') or the short name ('mlp.down'); the last matching entry wins. With an
      N:M pattern the only override is 0 (leave the layer dense).
    precision: dtype of the calibration forwards: 'auto' (bf16 where the hardware multiplies it natively:
      CPUs with AMX / AVX512-BF16, CUDA; else the model's dtype), 'bf16' or 'fp32'. Statistics (X^T X,
      sums of squares) are computed and weights updated in fp32 either way.
    """

    sparsity: float = 0.5
    pattern: str = "unstructured"
    targets: str = "all"
    layers: dict[str, float] | None = None
    precision: str = "auto"

    name: ClassVar[str] = "?"
    needs_calibration: ClassVar[bool] = True
    needs_hessian: ClassVar[bool] = False
    per_row: ClassVar[bool] = False  # compare scores within each output row (Wanda) or across the layer
    needs_dense: ClassVar[bool] = False  # (OfflineStep: no copy of the model before the recipe needed)
    dense_targets: ClassVar[bool] = False  # calibrate with the dense model's stream beside the pruned one

    def __post_init__(self) -> None:
        self.block = parse_block(self.pattern)
        self.nm = None if self.block else parse_pattern(self.pattern)
        if self.nm is None:
            check_sparsity(self.sparsity)
        else:
            self.sparsity = 1.0 - self.nm[0] / self.nm[1]
        self._targets = None if self.targets in ("all", "", None) else {t.strip() for t in self.targets.split(",")}
        unknown = (self._targets or set()) - SHORT_NAMES
        if unknown:
            raise ValueError(f"targets: unknown projection(s) {', '.join(sorted(unknown))}; "
                             f"use 'all' or a comma list of {', '.join(sorted(SHORT_NAMES))}")
        if self.layers is not None and not isinstance(self.layers, dict):
            raise ValueError(f"layers must map a layer glob to a sparsity, e.g. {{'mlp.down': 0.3}}, got {self.layers!r}")
        for glob, share in (self.layers or {}).items():
            try:
                check_sparsity(share)
            except ValueError as e:
                raise ValueError(f"layers[{glob!r}]: {e}") from None
            if self.nm is not None and share != 0:
                raise ValueError(f"layers[{glob!r}] = {share}: with pattern {self.pattern!r} a layer is either "
                                 "N:M or left dense (0)")
        calibrate.resolve_precision(self.precision)  # validates the name
        self._table: dict[str, float] = {}  # per-layer shares set by an allocation variant (allocation.py)
        self._short: dict[str, str] = {}  # full module name -> short name, filled by apply_

    # -- the one hook a method implements -----------------------------------------------------
    def score(self, W: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
        """Importance of each weight of W (out, in); higher is kept."""
        raise NotImplementedError

    # -- what the base does -------------------------------------------------------------------
    def mask(self, W: torch.Tensor, stats: LayerStats | None, sparsity: float) -> torch.Tensor:
        s = self.score(W, stats)
        if self.nm is not None:
            return nm_mask(s, *self.nm)
        if self.block is not None:
            return block_mask(s, sparsity, *self.block)
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
        """Per-layer target: a `layers` override, else the allocation's share, else `sparsity`."""
        share = self._table.get(name, self.sparsity)
        for glob, value in (self.layers or {}).items():
            if fnmatch(name, glob) or fnmatch(self._short.get(name, ""), glob):
                share = value
        return share

    def check_layers(self, anatomy: Anatomy) -> None:
        """Every `layers` glob must match some projection: a typo must not silently prune at full strength."""
        self._short = {p.name: short for b in anatomy.blocks for short, p in b.projections().items()}
        for glob in self.layers or {}:
            if not any(fnmatch(full, glob) or fnmatch(short, glob) for full, short in self._short.items()):
                examples = ", ".join(list(self._short)[:2] + sorted(set(self._short.values()))[:3])
                raise ValueError(f"layers: {glob!r} matches no projection of this model; globs match full names "
                                 f"or short names, e.g. {examples}")

    def selected(self, block_projs: dict[str, Proj], filter_fn: FilterFn | None) -> dict[str, Proj]:
        out = {}
        for short, p in block_projs.items():
            if self.layer_sparsity(p.name) == 0.0:
                continue  # left dense (a `layers` override or the allocation)
            if self._targets is not None and short not in self._targets and short.split(".")[0] not in self._targets:
                continue
            if filter_fn is not None and not filter_fn(p.module, p.name):
                continue
            out[p.name] = p
        return out

    def apply_(self, anatomy: Anatomy, run: StepContext) -> dict[str, float]:
        """Prune every selected projection; returns the realised sparsity per layer."""
        calibration, filter_fn, batch_size, progress = run.calibration, run.filter_fn, run.batch_size, run.progress
        self.check_layers(anatomy)
        if self.sparsity == 0.0 and self.nm is None and not self._table and not self.layers:
            return {}
        done: dict[str, float] = {}
        if not self.needs_calibration:
            for block in bar(anatomy.blocks, desc=f"{self.name}", unit="block", disable=not progress):
                for name, p in self.selected(block.projections(), filter_fn).items():
                    if self.layer_sparsity(name) == 0.0:
                        continue
                    self.prune_layer(p, None, self.layer_sparsity(name))
                    done[name] = _sparsity(p)
            return done
        if calibration is None:
            raise ValueError(f"method {self.name!r} needs calibration windows (token ids of shape (n, length))")
        for bc in calibrate.blocks(anatomy, calibration, batch_size=batch_size, progress=progress, desc=self.name,
                                   precision=self.precision, dense_targets=self.dense_targets):
            projs = self.selected(bc.block.projections(), filter_fn)
            if not projs:
                continue
            self.prune_block(bc, projs)
            done.update({name: _sparsity(p) for name, p in projs.items()})
        return done


def _sparsity(p: Proj) -> float:
    W = p.weight
    return 1.0 - W.count_nonzero().item() / W.numel()
