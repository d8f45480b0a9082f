"""FinerCut (Zhang et al. 2024): greedily remove the attention or MLP sublayer whose removal changes the
model's next-token distribution least (KL to the dense model on calibration windows), then refine by swaps.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Literal

from ..models import Anatomy
from ..progress import bar
from ..steps import StepContext
from . import STRUCTURE, surgery
from .base import Precision, Scope, StructurePruner
from .costs import sublayer_params
from .fuse import Unit, fuse_into_neighbours
from .probe import Probe, silence, silenced


@STRUCTURE.register("finercut")
@dataclass
class FinerCut(StructurePruner):
    """Greedy removal of attention / MLP sublayers by output KL, then swap refinement.

    remove: how many sublayers, or compute: the share of the blocks' matmul compute (parameters) to
    remove (or target='remove=N' / 'compute=S'); the search never removes more than that (an attention
    sublayer is the smallest step). parts: attn, mlp or both.
    windows/length: the calibration tokens the KL is measured on (the first windows, cut to length).
    shortlist: after the first step, re-score only this many candidates, the best of the previous
    step (lazy greedy; 0 = re-score every candidate at every step, as in the paper).
    precision: forwards of the search in bf16 autocast where native ('auto'), or 'fp32'.
    positions: the KL is averaged over this many evenly spaced positions per window (0 = all, exact).
    rank: 'kl' picks the removal of lowest KL (the paper); 'per-compute' the lowest KL increase per
    parameter removed. blocks: also offer removing a whole block (both sublayers) as one move.
    refine: rounds of swap refinement after the greedy (0 = the paper's plain greedy): each round scores
    restoring every removed sublayer and removing every kept one, then tries the `shortlist` most
    promising swaps of two sublayers of the same kind (same compute) and keeps the best if it lowers the KL.
    fuse: fold the removed sublayers into the kept neighbour before them (`fuse_into_neighbours`, on
    `fuse_windows` windows of `length` tokens), kept where it lowers the calibration KL.
    The hidden state entering every block is cached (probe.Probe), so scoring a sublayer of block i
    re-runs blocks i.. only; after each change the cache is refreshed from that block on.
    filter_fn is asked about each attention and MLP sublayer: only accepted ones are removed or fused into
    (a whole-block move needs both)."""

    remove: int = 0
    compute: float = 0.0
    parts: list[Literal["attn", "mlp"]] = field(default_factory=lambda: ["attn", "mlp"])
    windows: int = 16
    length: int = 256
    shortlist: int = 8
    precision: Precision = "auto"
    positions: int = 0
    rank: Literal["kl", "per-compute"] = "per-compute"
    blocks: bool = True
    refine: int = 0
    fuse: bool = False
    fuse_windows: int = 32

    budgets = ("compute", "remove")
    spellings = (("remove", "remove"), ("compute", "compute"))
    filter_on = ("attn", "mlp")
    decoders_only = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.parts:
            raise ValueError("parts: use 'attn', 'mlp' or 'attn,mlp'")
        if self.windows < 1 or self.length < 2 or self.shortlist < 0 or self.refine < 0 or self.fuse_windows < 1:
            raise ValueError(f"windows >= 1, length >= 2, shortlist >= 0, refine >= 0; got {self.windows}, "
                             f"{self.length}, {self.shortlist}, {self.refine}")

    def prune(self, anatomy: Anatomy, run: StepContext, scope: Scope) -> dict[str, Any]:
        calibration, batch_size, progress = run.calibration, run.batch_size, run.progress
        by_count = self.budget.kind == "remove"
        total = sum(sublayer_params(b, k) for b in anatomy.blocks for k in ("attn", "mlp"))
        units = [(b.index, k) for b in anatomy.blocks for k in sorted(set(self.parts))
                 if (b.attention if k == "attn" else b.mlp) is not None and scope(b.index, k)]
        if not units:
            raise ValueError(f"finercut: no {' or '.join(self.parts)} sublayer can go (filter_fn rejects them all)")
        budget = self.budget.count(len(units), "sublayers") if by_count else self.budget.value * total
        cands = list(units)
        if self.blocks and set(self.parts) == {"attn", "mlp"}:
            cands += [(b.index, "block") for b in anatomy.blocks if b.attention is not None and b.mlp is not None
                      and scope(b.index, "attn") and scope(b.index, "mlp")]

        def parts_of(k: str) -> list[str]:
            return ["attn", "mlp"] if k == "block" else [k]

        def cost(i: int, k: str) -> float:
            return float(len(parts_of(k))) if by_count else \
                float(sum(sublayer_params(anatomy.blocks[i], kk) for kk in parts_of(k)))
        probe = Probe(anatomy, calibration[: self.windows, : self.length], batch_size=batch_size,
                      precision=self.precision, positions=self.positions)
        hooks: dict[Unit, Any] = {}  # the removed sublayers, silenced by these hooks
        trace = []
        latest: dict[tuple[int, str], float] = {}  # each candidate's rank score when last scored
        gone, current = 0.0, 0.0
        steps = bar(range(len(cands)), desc="finercut", unit="step", disable=not progress)
        for _ in steps:
            fits = [c for c in cands if gone + cost(*c) <= budget + 1e-9]
            if not fits:
                break
            best = None
            pool = sorted(fits, key=latest.__getitem__)[: self.shortlist] if latest and self.shortlist else fits
            for i, k in pool:
                with contextlib.ExitStack() as trial:
                    for kk in parts_of(k):
                        trial.enter_context(silenced(anatomy.blocks[i], kk))
                    kl = probe.kl_from(i)
                score = kl if self.rank == "kl" else (kl - current) / cost(i, k)
                latest[(i, k)] = score
                if best is None or score < best[0]:
                    best = (score, kl, i, k)
            _, kl, i, k = best
            for kk in parts_of(k):
                hooks[(i, kk)] = silence(anatomy.blocks[i], kk)
            probe.refresh(i)
            gone += cost(i, k)
            current = kl
            for kk in parts_of(k):
                trace.append({"block": i, "sublayer": kk, "kl": kl})
            cands = [c for c in cands if c[0] != i or (c[1] not in parts_of(k) and c[1] != "block"
                                                         and k != "block")]
        greedy_kl = current
        swaps = []
        for _ in bar(range(self.refine), desc="finercut swaps", unit="round", disable=not progress):
            swap = self._best_swap(anatomy, probe, hooks, [u for u in units if u not in hooks], current)
            if swap is None:
                break
            (iu, ku), (iv, kv), current = swap
            hooks.pop((iu, ku)).remove()
            hooks[(iv, kv)] = silence(anatomy.blocks[iv], kv)
            probe.refresh(min(iu, iv))
            swaps.append({"restored": [iu, ku], "removed": [iv, kv], "kl": current})
        for h in hooks.values():
            h.remove()
        del probe
        removed = sorted(hooks)
        compute_removed = sum(sublayer_params(anatomy.blocks[i], k) for i, k in removed) / total  # before surgery
        fused = fuse_into_neighbours(anatomy, calibration, removed, windows=self.fuse_windows, length=self.length,
                                     batch_size=batch_size, precision=self.precision, progress=progress,
                                     may_change=scope) if self.fuse else None
        for i, k in removed:  # surgery last: silencing used hooks, so indices stayed valid
            if k == "attn":
                surgery.remove_attention(anatomy, anatomy.blocks[i])
            else:
                surgery.remove_mlp(anatomy.blocks[i])
        empty = [i for i, k in removed if k == "attn" and (i, "mlp") in hooks]
        if empty:  # both sublayers gone: the block is the identity, drop it
            surgery.remove_blocks(anatomy, empty)
        return {"removed": trace, "removed_blocks": empty, "swaps": swaps, "greedy_kl": greedy_kl, "fused": fused,
                "kl": current, "final": [list(u) for u in removed],
                "compute_removed": None if by_count else compute_removed,
                "spent": len(removed) if by_count else compute_removed}

    def _best_swap(self, anatomy: Anatomy, probe: Probe, hooks: dict[Unit, Any], kept: list[Unit],
                   current: float) -> tuple[Unit, Unit, float] | None:
        """One round: the best same-kind swap (restore u, remove v) among the shortlist of promising
        pairs, if it lowers the KL below `current`; None if no pair does."""
        restore: dict[Unit, float] = {}  # KL with u restored (lower: u mattered more)
        for u, h in list(hooks.items()):
            h.remove()
            restore[u] = probe.kl_from(u[0])
            hooks[u] = silence(anatomy.blocks[u[0]], u[1])
        add: dict[Unit, float] = {}  # KL with v removed too
        for v in kept:
            with silenced(anatomy.blocks[v[0]], v[1]):
                add[v] = probe.kl_from(v[0])
        pairs = sorted(((restore[u] - current) + (add[v] - current), u, v)
                       for u in restore for v in add if u[1] == v[1])
        best = None
        for _, u, v in pairs[: max(self.shortlist, 1)]:
            hooks[u].remove()
            with silenced(anatomy.blocks[v[0]], v[1]):
                kl = probe.kl_from(min(u[0], v[0]))
            hooks[u] = silence(anatomy.blocks[u[0]], u[1])
            if kl < current - 1e-9 and (best is None or kl < best[2]):
                best = (u, v, kl)
        return best
