"""Non-uniform sparsity across layers under one global target: variants that wrap any weight method.

Variants: `global` (one magnitude threshold), `owl` (outlier ratio), `adaptive` (block importance).
A variant decides each layer's share (parameter-weighted mean = `sparsity`), then the wrapped method
prunes every layer at its own share. Recipe: `{method: owl, base: sparsegpt, sparsity: 0.6}`,
with the base method's own fields in `settings`. The result is the realised sparsity per layer.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from .. import calibrate, parallel
from ..config import Config
from ..models import Anatomy, Proj
from ..models.offload import device_of, onload
from ..progress import bar
from ..steps import StepContext
from . import WEIGHTS
from .base import Target, WeightPruner
from .masks import check_sparsity, topk_mask


def rebalance(raw: dict[str, float], sizes: dict[str, int], target: float, hi: float = 0.99) -> dict[str, float]:
    """Shift per-layer shares by one constant (clipped to [0, hi]) so their parameter-weighted mean is `target`."""
    total = sum(sizes.values())

    def mean(shift: float) -> float:
        return sum(min(max(raw[k] + shift, 0.0), hi) * sizes[k] for k in raw) / total

    lo_s, hi_s = -1.0 - max(raw.values()), 1.0 - min(raw.values())
    for _ in range(60):  # bisection: mean() is monotone in the shift
        mid = (lo_s + hi_s) / 2
        lo_s, hi_s = (mid, hi_s) if mean(mid) < target else (lo_s, mid)
    shift = (lo_s + hi_s) / 2
    return {k: min(max(v + shift, 0.0), hi) for k, v in raw.items()}


@dataclass
class Allocation(Config):
    """Base of the allocation variants: a global `sparsity`, spread over layers, pruned by method `base`."""

    sparsity: float = 0.5
    base: str = "wanda"
    settings: dict[str, Any] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=lambda: ["all"])

    name: ClassVar[str] = "?"
    calibrated: ClassVar[bool] = True  # the allocation itself reads calibration data
    needs_dense: ClassVar[bool] = False
    streams: ClassVar[bool] = True  # every pass below goes block by block (models/offload.py)
    data_parallel: ClassVar[bool] = True  # and sums its statistics across processes

    def __post_init__(self) -> None:
        super().__post_init__()
        check_sparsity(self.sparsity)
        if self.base in WEIGHTS and issubclass(WEIGHTS.get(self.base), Allocation):
            raise ValueError(f"base {self.base!r} is itself an allocation; wrap a pruning method (wanda, sparsegpt, ...)")
        inner = WEIGHTS.build(self.base, {**self.settings, "sparsity": self.sparsity, "targets": self.targets})
        if inner.nm is not None:
            raise ValueError(f"{self.name}: pattern {inner.pattern!r} fixes every layer's share; "
                             "allocation spreads an unstructured budget (drop the pattern)")
        self._inner: WeightPruner = inner

    def allocate(self, anatomy: Anatomy, calibration: torch.Tensor | None, projs: dict[str, Proj],
                 batch_size: int, progress: bool) -> dict[str, float]:
        """Each layer's share of removed weights; parameter-weighted mean = self.sparsity."""
        raise NotImplementedError

    @property
    def needs_calibration(self) -> bool:
        return self.calibrated or self._inner.needs_calibration

    def apply_(self, anatomy: Anatomy, run: StepContext) -> dict[str, float]:
        inner = copy.copy(self._inner)
        projs = {n: p for b in anatomy.blocks for n, p in inner.selected(b.projections(), run.filter_fn).items()}
        inner._table = self.allocate(anatomy, run.calibration, projs, run.batch_size, run.progress)
        return inner.apply_(anatomy, run)


def _check_lam(lam: float) -> None:
    if not 0.0 <= lam < 0.5:
        raise ValueError(f"lam (the spread of block shares around the target) must be in [0, 0.5), got {lam!r}")


@WEIGHTS.register("global")
@dataclass
class GlobalMagnitude(Allocation):
    """One |W| threshold over every selected layer decides each layer's share (global magnitude pruning)."""

    calibrated = False

    def allocate(self, anatomy, calibration, projs, batch_size, progress):
        total = sum(p.weight.numel() for p in projs.values())
        k = round(self.sparsity * total)
        if k == 0:
            return dict.fromkeys(projs, 0.0)
        below, equal = kth_magnitude_counts(anatomy, projs, k, progress)  # t = the k-th smallest |W| of the model
        ties = k - sum(below.values())  # weights equal to t, shared out in layer order
        shares = {}
        for n, p in projs.items():
            extra = min(ties, equal[n])
            ties -= extra
            shares[n] = (below[n] + extra) / p.weight.numel()
        return shares


@WEIGHTS.register("owl")
@dataclass
class OWL(Allocation):
    """OWL, outlier-weighted layer sparsity (Yin et al. 2023, arXiv:2310.05175): blocks with more outliers
    (Wanda scores |W|*||X|| above M times their mean) keep more weights; shares span target +- lam."""

    lam: float = 0.08
    M: float = 5.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_lam(self.lam)
        if self.M <= 0:
            raise ValueError(f"M (outlier = score above M x the block mean) must be positive, got {self.M!r}")

    def allocate(self, anatomy, calibration, projs, batch_size, progress):
        if calibration is None:
            raise ValueError("owl needs calibration windows (it measures activation outliers)")
        outliers: dict[int, list[float]] = {}  # block -> [outlier count, weight count]
        for bc in calibrate.blocks(anatomy, calibration, batch_size=batch_size, progress=progress, desc="outliers",
                                   save=False):
            mine = {p.name: p for p in bc.block.projections().values() if p.name in projs}
            acc = outliers.setdefault(bc.block.index, [0.0, 0.0])
            for n, st in bc.collect(mine).items():
                score = mine[n].weight.detach().abs().float() * st.norm[None, :]  # (out, in) Wanda score
                acc[0] += (score > self.M * score.mean()).sum().item()
                acc[1] += score.numel()
        block_of = {p.name: b.index for b in anatomy.blocks for p in b.projections().values()}
        ratio = {b: c / t for b, (c, t) in outliers.items() if t}
        lo, hi = min(ratio.values()), max(ratio.values())
        spread = {b: (r - lo) / (hi - lo) * 2 * self.lam if hi > lo else 0.0 for b, r in ratio.items()}
        raw = {n: self.sparsity - spread[block_of[n]] for n in projs}  # more outliers -> fewer pruned
        return rebalance(raw, {n: p.weight.numel() for n, p in projs.items()}, self.sparsity)


@WEIGHTS.register("adaptive")
@dataclass
class Adaptive(Allocation):
    """Adapt-Pruner-style adaptive sparsity (Pan et al. 2025, arXiv:2502.03460) from each block's sensitivity.

    importance 'cosine': how much the block changes the residual stream, 1 - cos(input, output), averaged
    over calibration tokens (one dense forward). 'kl': the measured damage, KL(dense || model) on a few
    calibration windows when that block alone is pruned at `probe` sparsity with Wanda scores (one forward
    per block). Blocks are ranked on log importance: the most important gets `target - lam`, the least
    `target + lam`, linearly in between (`power` bends it), then one shift restores the weighted mean.
    unit 'sublayer' (with importance 'kl'): probe and rank the attention and the MLP of every block on their
    own, so the two parts of one block can get different shares.
    """

    lam: float = 0.1
    power: float = 1.0
    importance: Literal["cosine", "kl"] = "cosine"
    probe: float = 0.6
    probe_windows: int = 2
    unit: Literal["block", "sublayer"] = "block"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_lam(self.lam)
        if self.power <= 0:
            raise ValueError(f"power must be positive, got {self.power!r}")
        check_sparsity(self.probe)
        if self.probe_windows < 1:
            raise ValueError(f"probe_windows must be >= 1, got {self.probe_windows!r}")
        if self.unit == "sublayer" and self.importance != "kl":
            raise ValueError("unit='sublayer' needs importance='kl' (cosine importance is measured per block)")

    def allocate(self, anatomy, calibration, projs, batch_size, progress):
        if calibration is None:
            raise ValueError("adaptive needs calibration windows (it measures each block's importance)")
        if self.importance == "cosine":
            imp = block_importance(anatomy, calibration, batch_size, progress)
        else:
            imp = block_damage(anatomy, calibration, projs, self.probe, self.probe_windows, progress,
                               precision=self._inner.precision, unit=self.unit)
        logs = {u: math.log(max(v, 1e-12)) for u, v in imp.items()}
        lo, hi = min(logs.values()), max(logs.values())
        z = {u: ((v - lo) / (hi - lo)) ** self.power if hi > lo else 0.5 for u, v in logs.items()}  # 0..1
        unit_of = unit_names(anatomy, self.unit)
        raw = {n: self.sparsity + self.lam * (1 - 2 * z[unit_of[n]]) for n in projs}  # important -> fewer pruned
        self.block_importance = imp
        return rebalance(raw, {n: p.weight.numel() for n, p in projs.items()}, self.sparsity)


@torch.no_grad()
def block_importance(anatomy: Anatomy, calibration: torch.Tensor, batch_size: int, progress: bool) -> dict[int, float]:
    """1 - cos(block input, block output) per block, averaged over every calibration token (the dense model,
    block by block)."""
    sums: dict[int, float] = {}
    for bc in calibrate.blocks(anatomy, calibration, batch_size=batch_size, progress=progress,
                               desc="block importance", save=False):
        total = 0.0
        for x, y in zip(bc.inputs, bc.run()):
            total += (1 - torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)).sum().item()  # (B, T)
        sums[bc.block.index] = total
    sums = parallel.reduce_sum(sums)
    return {b: v / calibration.numel() for b, v in sums.items()}  # (one hidden state per token)


def unit_names(anatomy: Anatomy, unit: str = "block") -> dict[str, int | tuple[int, str]]:
    """Projection name -> its unit: the block index, or (block index, 'attn' | 'mlp') for unit 'sublayer'."""
    return {p.name: b.index if unit == "block" else (b.index, short.split(".")[0])
            for b in anatomy.blocks for short, p in b.projections().items()}


@torch.no_grad()
def block_damage(anatomy: Anatomy, calibration: torch.Tensor, projs: dict[str, Proj], probe: float, windows: int,
                 progress: bool, precision: str = "fp32", unit: str = "block") -> dict[int | tuple[int, str], float]:
    """KL(dense || model with only one unit pruned at `probe`, Wanda scores) per unit, on `windows` windows.

    A unit is a block, or with unit 'sublayer' the attention or the MLP of a block (keys (index, part)).
    The probe forwards run under bf16 autocast where `precision` resolves to it (only the ranking matters).
    Each probe is a whole-model forward (a streamed model reads every block for it)."""
    device = device_of(anatomy.model)
    sq = input_sq(anatomy, calibration[:windows], projs, 1, progress=False)
    ids = calibration[:windows][parallel.share(min(windows, calibration.shape[0]))].to(device)
    tokens = parallel.reduce_sum(ids.numel())
    kw = {"use_cache": False} if anatomy.causal else {}
    dtype = calibrate.resolve_precision(precision, device)

    def logp() -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = anatomy.model(input_ids=ids, **kw)
        logits = out.logits if hasattr(out, "logits") else out.last_hidden_state
        return torch.log_softmax(logits.float(), -1)

    ref = logp()
    damage = {}
    members: dict[int | tuple[int, str], dict[str, Proj]] = {}
    for n, u in unit_names(anatomy, unit).items():
        if n in projs:
            members.setdefault(u, {})[n] = projs[n]
    block_of = {p.name: b for b in anatomy.blocks for p in b.projections().values()}
    for u, mine in bar(members.items(), desc=f"{unit} damage", unit=unit, disable=not progress):
        with onload(block_of[next(iter(mine))].module):  # (streamed: this block stays in memory, unsaved)
            saved = {n: p.weight.detach().clone() for n, p in mine.items()}
            try:
                for n, p in mine.items():
                    score = p.weight.abs().float() * sq[n].sqrt()[None, :]  # (out, in) Wanda score
                    p.weight.mul_(topk_mask(score, probe, per_row=True).to(p.weight.dtype))
                q = logp()
                kl = torch.nn.functional.kl_div(q, ref, log_target=True, reduction="sum").item()
            finally:
                for n, p in mine.items():
                    p.weight.copy_(saved[n])
        damage[u] = parallel.reduce_sum(kl) / tokens
    return damage


@torch.no_grad()
def input_sq(anatomy: Anatomy, calibration: torch.Tensor, projs: dict[str, Proj], batch_size: int,
             progress: bool) -> dict[str, torch.Tensor]:
    """Per-input-channel sum of x^2 of each projection on the dense model (block by block; summed over processes)."""
    sq: dict[str, torch.Tensor] = {}
    for bc in calibrate.blocks(anatomy, calibration, batch_size=batch_size, progress=progress, desc="outliers",
                               save=False):
        mine = {p.name: p for p in bc.block.projections().values() if p.name in projs}
        sq.update({n: st.sq for n, st in bc.collect(mine).items()})
    return sq


@torch.no_grad()
def kth_magnitude_counts(anatomy: Anatomy, projs: dict[str, Proj], k: int,
                         progress: bool) -> tuple[dict[str, int], dict[str, int]]:
    """With t the k-th smallest |W| over every projection in `projs`: per projection, how many |W| < t and how
    many == t. Exact, in two passes over the weights and a few MB (a radix select on the float32 bits of |W|,
    which order like the values), so a model streamed from disk needs one block at a time."""
    def bits(p: Proj) -> torch.Tensor:
        return p.weight.detach().abs().float().flatten().view(torch.int32)  # >= 0: int order = float order

    def passes(fn) -> None:
        for b in bar(anatomy.blocks, desc="global magnitude", unit="block", disable=not progress):
            mine = [p for p in b.projections().values() if p.name in projs]
            if mine:
                with onload(b.module):
                    for p in mine:
                        fn(p.name, bits(p))

    hi: dict[str, torch.Tensor] = {}  # per layer: histogram of the high 15 bits
    passes(lambda n, x: hi.__setitem__(n, torch.bincount(x >> 16, minlength=1 << 15).cpu()))
    cum = torch.stack(list(hi.values())).sum(0).cumsum(0)
    top = int(torch.searchsorted(cum, k))  # the high bits of t
    lo: dict[str, torch.Tensor] = {}  # per layer: histogram of the low 16 bits among |W| with those high bits
    passes(lambda n, x: lo.__setitem__(n, torch.bincount(x[(x >> 16) == top] & 0xFFFF, minlength=1 << 16).cpu()))
    rest = k - (int(cum[top - 1]) if top else 0)
    low = int(torch.searchsorted(torch.stack(list(lo.values())).sum(0).cumsum(0), rest))
    below = {n: int(hi[n][:top].sum()) + int(lo[n][:low].sum()) for n in projs}
    equal = {n: int(lo[n][low]) for n in projs}
    return below, equal
