"""Depth pruning: remove whole blocks (block influence, angular distance) or single sublayers (FinerCut).

- block-influence (ShortGPT, Men et al. 2024): BI_i = 1 - mean cos(x_in, x_out); remove the lowest.
- angular (Gromov et al. 2024): remove the n contiguous blocks l..l+n-1 whose input x_l and output
  x_{l+n} are closest in angle, arccos(cos(x_l, x_{l+n})) / pi averaged over tokens.
- finercut (Zhang et al. 2024): greedily remove the attention or MLP sublayer whose removal changes
  the model's next-token distribution least (KL to the dense model on calibration windows).
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .. import calibrate
from ..models import Anatomy, Block, anatomy_of
from ..progress import bar
from ..steps import StepContext
from . import STRUCTURE, surgery
from .probe import Probe


def _count(remove: int, share: float, n: int, what: str) -> int:
    k = remove if remove > 0 else round(share * n)
    if k < 1:
        raise ValueError(f"nothing to remove: set remove=N (number of {what}) or a share in (0, 1)")
    if k >= n:
        raise ValueError(f"cannot remove {k} of {n} {what}; at most {n - 1}")
    return k


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
class Depth:
    """Remove whole blocks. remove: how many (or share: the fraction of blocks).
    criterion: block-influence (lowest BI) | angular (the most similar contiguous interval).
    fuse: fold each removed run of blocks into the kept block before it (`fuse_into_neighbours`, on
    `fuse_windows` calibration windows of 256 tokens), kept where it lowers the calibration KL."""

    remove: int = 0
    share: float = 0.0
    criterion: str = "block-influence"
    fuse: bool = False
    fuse_windows: int = 32

    def __post_init__(self) -> None:
        if self.criterion not in ("block-influence", "angular"):
            raise ValueError(f"criterion {self.criterion!r}: choose 'block-influence' or 'angular'")
        if self.remove < 0 or not 0.0 <= self.share < 1.0:
            raise ValueError(f"remove must be >= 0 and share in [0, 1), got {self.remove}, {self.share}")
        if self.fuse_windows < 1:
            raise ValueError(f"fuse_windows must be >= 1, got {self.fuse_windows}")

    needs_calibration = True
    needs_dense = False

    def apply_(self, anatomy: Anatomy, run: StepContext) -> dict[str, Any]:
        calibration, batch_size, progress = run.calibration, run.batch_size, run.progress
        if calibration is None:
            raise ValueError(f"depth ({self.criterion}) needs calibration windows")
        L = len(anatomy.blocks)
        k = _count(self.remove, self.share, L, "blocks")
        if self.criterion == "block-influence":
            scores = block_influence(anatomy, calibration, progress)
            drop = sorted(sorted(range(L), key=lambda i: scores[i])[:k])
        else:
            scores = angular_distances(anatomy, calibration, k, progress)
            start = min(range(len(scores)), key=lambda i: scores[i])
            drop = list(range(start, start + k))
        fused = None
        if self.fuse:
            if not anatomy.causal or not all(b.pre_norm for b in anatomy.blocks):
                raise ValueError("fuse needs a pre-norm causal LM (it scores by next-token KL); set fuse=false")
            fused = fuse_into_neighbours(anatomy, calibration, [(i, k) for i in drop for k in ("attn", "mlp")],
                                         windows=self.fuse_windows, batch_size=batch_size, progress=progress)
        surgery.remove_blocks(anatomy, drop)
        return {"removed_blocks": drop, "scores": scores, "fused": fused}


# -- FinerCut -----------------------------------------------------------------------------------
def silence(block: Block, kind: str) -> torch.utils.hooks.RemovableHandle:
    """Make one sublayer add 0 to the residual stream (a forward hook; `.remove()` the handle to undo)."""
    if kind == "attn":
        return block.attention.module.register_forward_hook(lambda _m, _a, out: (torch.zeros_like(out[0]), *out[1:]))
    return block.mlp.down.module.register_forward_hook(lambda _m, _a, out: torch.zeros_like(out))


@contextlib.contextmanager
def silenced(block: Block, kind: str) -> Iterator[None]:
    """Make one sublayer add 0 to the residual stream while inside."""
    h = silence(block, kind)
    try:
        yield
    finally:
        h.remove()


def _sublayer_params(block: Block, kind: str) -> int:
    part = block.attention if kind == "attn" else block.mlp
    return sum(p.weight.numel() for p in part.projections.values()) if part is not None else 0


Unit = tuple[int, str]  # (block index, 'attn' | 'mlp')


@torch.no_grad()
def fuse_into_neighbours(anatomy: Anatomy, calibration: torch.Tensor, removed: list[Unit], *, windows: int = 32,
                         length: int = 256, batch_size: int = 1, precision: str = "auto",
                         progress: bool = True) -> list[dict[str, Any]]:
    """Fold what the removed sublayers did into the kept neighbour before them (FuseGPT's idea, training-free).

    Call on the model with nothing removed yet. For every block p that keeps a sublayer and is followed by a gap
    (its own removed sublayer, or whole blocks removed after it), the last kept output projection of p (down_proj
    if its MLP stays, else o_proj) is re-fitted by least squares so that p's output matches the *dense* model's
    hidden state at the end of the gap, given p's inputs in the pruned model. A fusion is kept only when it lowers
    the KL to the dense model on the calibration windows; the weights change in place, the sublayers are not
    removed here. Returns one record per block tried: {'block', 'proj', 'kl_before', 'kl_after', 'kept'}."""
    from .importance import InputStats, least_squares
    from .width import assign, sublayer_post_norm

    gone = set(removed)
    L = len(anatomy.blocks)
    whole = {i for i in range(L) if {(i, "attn"), (i, "mlp")} <= gone or
             all((i, k) in gone or getattr(anatomy.blocks[i], "attention" if k == "attn" else "mlp") is None
                 for k in ("attn", "mlp"))}
    probe = Probe(anatomy, calibration[:windows, :length], batch_size=batch_size, precision=precision)
    dense = list(probe.states)  # dense[i]: the dense model's input of block i; dense[L]: after the last block
    hooks = [silence(anatomy.blocks[i], k) for i, k in sorted(gone)]
    log: list[dict[str, Any]] = []
    try:
        probe.refresh(0)
        current = probe.kl_from(0)
        plan = []
        for p in range(L):
            if p in whole:
                continue
            q = p + 1
            while q < L and q in whole:
                q += 1
            b = anatomy.blocks[p]
            if q == p + 1 and not any(u[0] == p for u in gone):
                continue  # nothing removed right after p
            proj = b.mlp.down if b.mlp is not None and (p, "mlp") not in gone else b.attention.o
            plan.append((p, q, proj))
        for p, q, proj in bar(plan, desc="fusing removed sublayers", unit="block", disable=not progress):
            st, seen = InputStats(), []
            h = proj.module.register_forward_hook(lambda _m, a, o, seen=seen: seen.append((a[0], o)))
            post = sublayer_post_norm(anatomy.blocks[p], proj)
            try:
                ys = probe._run(anatomy.blocks[p], probe.block_inputs(p))
            finally:
                h.remove()
            for (x, yp), y, t in zip(seen, ys, dense[q]):
                error = t.float() - y.float()  # residual stream; behind a post-norm, as a change of proj's output
                st.add(x, error if post is None else post.pull_back(yp, error))
            old = (proj.weight.detach().clone(), proj.bias.detach().clone() if proj.bias is not None else None)
            assign(proj, least_squares(proj, torch.arange(proj.in_features), st, bias=proj.bias is not None))
            kl = probe.kl_from(p)
            kept = kl < current
            log.append({"block": p, "proj": "down" if proj is getattr(anatomy.blocks[p].mlp, "down", None) else "o",
                        "target_block": q, "kl_before": current, "kl_after": kl, "kept": kept})
            if kept:
                current = kl
                probe.refresh(p)
            else:
                assign(proj, old)
    finally:
        for h in hooks:
            h.remove()
    return log


@STRUCTURE.register("finercut")
@dataclass
class FinerCut:
    """Greedy removal of attention / MLP sublayers by output KL, then swap refinement.

    remove: how many sublayers, or compute: the share of the blocks' matmul compute (parameters) to
    remove; the search never removes more than that (an attention sublayer is the smallest step).
    parts: 'attn', 'mlp' or 'attn,mlp'.
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
    re-runs blocks i.. only; after each change the cache is refreshed from that block on."""

    remove: int = 0
    compute: float = 0.0
    parts: str = "attn,mlp"
    windows: int = 16
    length: int = 256
    shortlist: int = 8
    precision: str = "auto"
    positions: int = 0
    rank: str = "per-compute"
    blocks: bool = True
    refine: int = 0
    fuse: bool = False
    fuse_windows: int = 32

    def __post_init__(self) -> None:
        self._parts = {p.strip() for p in self.parts.split(",") if p.strip()}
        if not self._parts or not self._parts <= {"attn", "mlp"}:
            raise ValueError(f"parts {self.parts!r}: use 'attn', 'mlp' or 'attn,mlp'")
        if (self.remove > 0) == (self.compute > 0) or not 0.0 <= self.compute < 1.0:
            raise ValueError("set exactly one of remove=N (sublayers) or compute=S (share of blocks' compute, 0<S<1)")
        if self.windows < 1 or self.length < 2 or self.shortlist < 0 or self.refine < 0 or self.fuse_windows < 1:
            raise ValueError(f"windows >= 1, length >= 2, shortlist >= 0, refine >= 0; got {self.windows}, "
                             f"{self.length}, {self.shortlist}, {self.refine}")
        if self.rank not in ("kl", "per-compute"):
            raise ValueError(f"rank {self.rank!r}: choose 'kl' or 'per-compute'")
        calibrate.resolve_precision(self.precision)

    needs_calibration = True
    needs_dense = False

    def apply_(self, anatomy: Anatomy, run: StepContext) -> dict[str, Any]:
        calibration, batch_size, progress = run.calibration, run.batch_size, run.progress
        if calibration is None:
            raise ValueError("finercut needs calibration windows")
        if not all(b.pre_norm for b in anatomy.blocks) or not anatomy.causal:
            raise ValueError("finercut removes sublayers of pre-norm decoders only")
        model = anatomy.model
        total = sum(_sublayer_params(b, k) for b in anatomy.blocks for k in ("attn", "mlp"))
        units = [(b.index, k) for b in anatomy.blocks for k in sorted(self._parts)
                 if (b.attention if k == "attn" else b.mlp) is not None]
        if self.remove >= len(units):
            raise ValueError(f"cannot remove {self.remove} sublayers; only {len(units)} can go")
        budget = self.remove if self.remove > 0 else self.compute * total
        cands = list(units)
        if self.blocks and self._parts == {"attn", "mlp"}:
            cands += [(b.index, "block") for b in anatomy.blocks if b.attention is not None and b.mlp is not None]

        def parts_of(k: str) -> list[str]:
            return ["attn", "mlp"] if k == "block" else [k]

        def cost(i: int, k: str) -> float:
            return float(len(parts_of(k))) if self.remove > 0 else \
                float(sum(_sublayer_params(anatomy.blocks[i], kk) for kk in parts_of(k)))
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
        fused = fuse_into_neighbours(anatomy, calibration, removed, windows=self.fuse_windows, length=self.length,
                                     batch_size=batch_size, precision=self.precision, progress=progress) \
            if self.fuse else None
        for i, k in removed:  # surgery last: silencing used hooks, so indices stayed valid
            if k == "attn":
                surgery.remove_attention(anatomy, anatomy.blocks[i])
            else:
                surgery.remove_mlp(anatomy.blocks[i])
        empty = [i for i, k in removed if k == "attn" and (i, "mlp") in hooks]
        if empty:  # both sublayers gone: the block is the identity, drop it
            surgery.remove_blocks(anatomy, empty)
        surgery.sync_config(anatomy_of(model))
        return {"removed": trace, "removed_blocks": empty, "swaps": swaps, "greedy_kl": greedy_kl, "fused": fused,
                "kl": current, "final": [list(u) for u in removed],
                "compute_removed": sum(cost(*u) for u in removed) / total if self.compute else None}

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
