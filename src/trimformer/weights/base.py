"""The weight-pruning family: a method gives a score (or an update) per layer; the base selects and applies."""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatch
from typing import ClassVar, Literal, get_args

import torch

from .. import calibrate
from ..calibrate import LayerStats
from ..config import Config
from ..models import Anatomy, Proj
from ..models.offload import onload
from ..progress import bar
from ..steps import FilterFn, StepContext
from .masks import block_mask, check_sparsity, nm_mask, parse_block, parse_pattern, topk_mask

Target = Literal["all", "attn", "mlp", "attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o", "mlp.gate", "mlp.up",
                 "mlp.down"]
SHORT_NAMES = set(get_args(Target)) - {"all"}
Precision = Literal["auto", "bf16", "fp32"]


@dataclass
class WeightPruner(Config):
    """Base config of every weight method: how much, in what pattern, where.

    sparsity: share of weights removed per layer (default 0.5); an N:M pattern fixes it at 1 - N/M (giving
      another value beside it is an error).
    pattern: 'unstructured', 'N:M' (N kept of every M consecutive inputs, e.g. '2:4'), or 'block:RxC'
      (whole blocks of R rows x C inputs, e.g. 'block:1x4', 'block:4x4', for block-sparse kernels).
    targets: which projections, by short name ('attn.q', 'mlp.down', ...; 'all' for every one); a list, or
      comma-separated on the command line.
    layers: per-layer overrides, {glob: sparsity}, the glob matched against the full module name
      ('model.layers.0.*') or the short name ('mlp.down'); the last matching entry wins. With an
      N:M pattern the only override is 0 (leave the layer dense).
    precision: dtype of the calibration forwards: 'auto' (bf16 where the hardware multiplies it natively:
      CPUs with AMX / AVX512-BF16, CUDA; else the model's dtype), 'bf16' or 'fp32'. Statistics (X^T X,
      sums of squares) are computed and weights updated in fp32 either way.
    """

    sparsity: float | None = None
    pattern: str = "unstructured"
    targets: list[Target] = field(default_factory=lambda: ["all"])
    layers: dict[str, float] | None = None
    precision: Precision = "auto"

    name: ClassVar[str] = "?"
    needs_calibration: ClassVar[bool] = True
    needs_hessian: ClassVar[bool] = False
    per_row: ClassVar[bool] = False  # compare scores within each output row (Wanda) or across the layer
    needs_dense: ClassVar[bool] = False  # (OfflineStep: no copy of the model before the recipe needed)
    streams: ClassVar[bool] = True  # (OfflineStep: runs on a model streamed from disk, block by block)
    data_parallel: ClassVar[bool] = True  # (OfflineStep: its statistics are summed across processes)
    dense_targets: ClassVar[bool] = False  # calibrate with the dense model's stream beside the pruned one

    def dense_stream(self, anatomy, calibration) -> bool:
        """Whether this run carries the dense stream (`dense_targets`; a method may decide from the calibration)."""
        return self.dense_targets

    def __post_init__(self) -> None:
        super().__post_init__()
        self.block = parse_block(self.pattern)
        self.nm = None if self.block else parse_pattern(self.pattern)
        if self.nm is None:
            self.sparsity = 0.5 if self.sparsity is None else self.sparsity
            check_sparsity(self.sparsity)
        else:
            fixed = 1.0 - self.nm[0] / self.nm[1]
            if self.sparsity is not None and abs(self.sparsity - fixed) > 1e-9:
                raise ValueError(f"pattern {self.pattern!r} fixes the sparsity at {fixed:g}, but sparsity={self.sparsity:g} "
                                 "was given too: drop the sparsity, or use an unstructured pattern")
            self.sparsity = fixed
        self._targets = None if "all" in self.targets or not self.targets else set(self.targets)
        for glob, share in (self.layers or {}).items():
            try:
                check_sparsity(share)
            except ValueError as e:
                raise ValueError(f"layers[{glob!r}]: {e}") from None
            if self.nm is not None and share != 0:
                raise ValueError(f"layers[{glob!r}] = {share}: with pattern {self.pattern!r} a layer is either "
                                 "N:M or left dense (0)")
        self._table: dict[str, float] = {}  # per-layer shares set by an allocation variant (allocation.py)
        self._short: dict[str, str] = {}  # full module name -> short name, filled by apply_

    def fixed_fields(self) -> set[str]:
        """Fields the other settings determine: an N:M pattern fixes the sparsity (a recipe-wide `--set
        sparsity=` leaves such a step alone)."""
        return {"sparsity"} if self.nm is not None else set()

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
                projs = self.selected(block.projections(), filter_fn)
                if not projs:
                    continue
                with onload(block.module, save=True):  # (a streamed block: read, pruned, written, freed)
                    for name, p in projs.items():
                        self.prune_layer(p, None, self.layer_sparsity(name))
                        done[name] = _sparsity(p)
            return done
        if calibration is None:
            raise ValueError(f"method {self.name!r} needs calibration windows (token ids of shape (n, length))")
        for bc in calibrate.blocks(anatomy, calibration, batch_size=batch_size, progress=progress, desc=self.name,
                                   precision=self.precision, dense_targets=self.dense_stream(anatomy, calibration)):
            projs = self.selected(bc.block.projections(), filter_fn)
            if not projs:
                continue
            self.prune_block(bc, projs)
            done.update({name: _sparsity(p) for name, p in projs.items()})
        return done


def _sparsity(p: Proj) -> float:
    W = p.weight
    return 1.0 - W.count_nonzero().item() / W.numel()
