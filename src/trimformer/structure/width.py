"""Width pruning: remove FFN neurons, attention heads and hidden channels under a parameter or FLOPs budget.

Block by block on calibration data: score each group (importance.py), remove the least important,
then re-fit the output projection (`attn.o`, `mlp.down`) by least squares on the calibration inputs
so the block's output changes as little as possible (with bias compensation where a bias exists).
`allocation="global"` first scores every block on the dense model and spends the budget where the
error per removed parameter is smallest; `"uniform"` removes the same share everywhere. Hidden channels
(parts=hidden, NViT's embedding dimension) are scored and cut for the whole model at once (channels.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .. import calibrate
from ..calibrate import BlockCalib
from ..models import Anatomy, Block, Proj, anatomy_of, count_parameters
from ..models.dinov2 import fold_layer_scale_
from ..progress import bar
from ..steps import StepContext
from . import STRUCTURE, channels, latency, surgery
from .base import Precision, Scope, StructurePruner
from .budget import Budget, BudgetError, Candidate, choose
from .costs import block_widths, head_slot_params, head_slots, head_unit, matmul_params, neuron_params
from .importance import (
    NEEDS_DATA,
    NEEDS_GRAD,
    Criterion,
    InputStats,
    activation_gradients,
    feature_loss,
    least_squares,
    output_error_stats,
    scores,
)
from .options import keep_n, score_library
from .probe import Probe


@dataclass
class Plan:
    """Per block: FFN neurons to keep, and head units to keep (a unit is one query head of every KV
    group under GQA, so KV groups all stay and stay even; one head under plain multi-head attention)."""

    ffn: list[int]
    head_units: list[int]
    hidden: int | None = None  # hidden channels to keep (parts=hidden)


@STRUCTURE.register("width")
@dataclass
class Width(StructurePruner):
    """target: 'params=R', 'flops=R' (share kept; FLOPs/token of the matmuls, attention scores not counted) or
      'latency=R' (share of the whole model's time kept, measured on this machine at `latency_batch` inputs of the
      calibration's length: every unit costs the seconds it saves, latency.py; NViT's latency-aware allocation).
    parts: ffn, heads, hidden, or several (hidden: residual-stream channels of the whole model, channels.py; scored by
      importance fisher, or taylor on a causal LM, they compete with the heads and neurons in the one budget). importance: a criterion of importance.py (hessian, activation, flap, ...).
    allocation: uniform | global (raw error per parameter across blocks; on smollm2-135m it over-cuts
    some blocks, KL 5.4 vs 0.52 uniform at params=0.8: keep uniform until scores are normalised) |
    measured (FFN only: every block's FFN cut alone to each share of `shares`, with the re-fit, scored by
    the model's KL to dense on probe_windows x probe_length calibration tokens; a MIP picks one width
    per block under the target, as `search` does). multiple_of: kept FFN widths are rounded up to a multiple of it.
    attention_flops: with target flops=R, also count the attention scores and their weighted sum (2 T head_dim
      multiply-adds per head and token, T the calibration inputs' length) in the total and in each head's cost;
      off, flops are the projections' only. For a ViT (T = 257 at 224 px) a head then costs a third more.
    rounds: cut in this many steps, 1 - (1 - R) r / rounds of the original kept after step r, the importance measured
      again on the model as cut so far (NViT prunes step by step: a one-shot score misses that a unit matters more
      once its neighbours are gone, and a global allocation then over-cuts some blocks).
    compensate: re-fit the output projections by least squares after removal.
    sequential: re-measure each block's inputs after cutting the blocks before it (one more pass; slower).
    asymmetric: with sequential, re-fit so that each block's output matches the *dense* model's block output (carried
      in a dense stream beside the pruned one): the refit also corrects the error of the blocks cut before.
    filter_fn is asked about each block's mlp.down (its FFN is cut only if accepted) and attn.o (its heads).
    """

    target: Budget = Budget("params", 0.8)
    parts: list[Literal["ffn", "heads", "hidden"]] = field(default_factory=lambda: ["ffn"])
    importance: Criterion = "hessian"
    allocation: Literal["uniform", "global", "measured"] = "uniform"
    multiple_of: int = 1
    attention_flops: bool = False
    rounds: int = 1
    compensate: bool = True
    sequential: bool = False
    asymmetric: bool = False
    min_ffn: int = 0
    shares: list[float] = field(default_factory=lambda: [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    probe_windows: int = 8
    probe_length: int = 256
    probe_positions: int = 64
    precision: Precision = "fp32"
    latency_batch: int = 1
    latency_runs: int = 5

    budgets = ("params", "flops", "latency")
    _latency: latency.UnitLatency | None = None  # the measured cost of each unit (target latency=R; set by prune)
    _tokens = 0  # tokens per calibration input, when attention_flops counts attention (set by prune)
    filter_on = ("attn.o", "mlp.down")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.parts:
            raise ValueError("parts: use 'ffn', 'heads', 'hidden' or several, e.g. 'ffn,heads'")
        if "hidden" in self.parts and self.importance not in ("fisher", "taylor"):
            raise ValueError(f"parts=hidden scores channels by their mask gradient: set importance=fisher, not "
                             f"{self.importance!r}")
        if self.allocation == "measured" and set(self.parts) != {"ffn"}:
            raise ValueError("allocation='measured' chooses FFN widths only: set parts=ffn")
        if self.allocation == "measured" and (not self.shares or not all(0 < x < 1 for x in self.shares)):
            raise ValueError(f"shares {self.shares}: FFN shares in (0, 1), e.g. 0.75,0.5")
        if self.multiple_of < 1:
            raise ValueError(f"multiple_of must be >= 1, got {self.multiple_of}")
        if self.asymmetric and not (self.sequential and self.compensate):
            raise ValueError("asymmetric re-fits to the dense outputs block by block: set sequential=True and compensate=True")
        if self.rounds < 1 or (self.rounds > 1 and self.allocation == "measured"):
            raise ValueError(f"rounds={self.rounds}: a count >= 1, and 1 with allocation='measured'")
        if self.attention_flops and self.target is not None and self.target.kind != "flops":
            raise ValueError(f"attention_flops counts attention in a FLOPs budget; the target is {self.target}")
        if self.latency_batch < 1 or self.latency_runs < 1:
            raise ValueError(f"latency_batch={self.latency_batch}, latency_runs={self.latency_runs}: both must be >= 1")
        if self.importance in NEEDS_GRAD and self.sequential:
            raise ValueError(f"importance {self.importance!r} is collected in one dense pass: set sequential=False")

    @property
    def needs_calibration(self) -> bool:
        return self.importance in NEEDS_DATA or self.compensate

    # -- budget --------------------------------------------------------------------------------
    def _costs(self, anatomy: Anatomy) -> tuple[float, list[float], list[float]]:
        """(amount to remove, cost per FFN neuron per block, cost per head slot per block)."""
        if self.budget.kind == "latency":  # seconds saved per unit, measured on the model before the cut
            lat = self._measured_latency()
            return lat.model(anatomy) * (1.0 - self.budget.keep), lat.neuron_s, lat.slot_s
        neuron = [neuron_params(b.mlp) if b.mlp else 0.0 for b in anatomy.blocks]
        slot = [head_slot_params(b.attention) if b.attention else 0.0 for b in anatomy.blocks]
        total = count_parameters(anatomy.model) if self.budget.kind == "params" else matmul_params(anatomy)
        if self.attention_flops:
            per_head = [attention_per_head(b, self._tokens) for b in anatomy.blocks]  # (multiply-adds per token)
            slot = [c + h * head_unit(b.attention) if b.attention else c
                    for c, h, b in zip(slot, per_head, anatomy.blocks)]
            total += sum(h * b.attention.num_heads for h, b in zip(per_head, anatomy.blocks) if b.attention)
        return total * (1.0 - self.budget.keep), neuron, slot

    def _measured_latency(self) -> latency.UnitLatency:
        if self._latency is None:
            raise RuntimeError("target latency=R: the units' latency is measured by prune() before planning")
        return self._latency

    def flops_share(self, anatomy: Anatomy, before: float) -> float:
        """The FLOPs kept, attention counted as the allocation counts it (after a cut; `before`: total before)."""
        return self._flops(anatomy) / before

    def _flops(self, anatomy: Anatomy) -> float:
        return matmul_params(anatomy) + sum(attention_per_head(b, self._tokens) * b.attention.num_heads
                                            for b in anatomy.blocks if b.attention)

    def plan(self, anatomy: Anatomy, block_scores: list[dict[str, torch.Tensor]] | None = None,
             scope: Scope | None = None, hidden_scores: torch.Tensor | None = None) -> Plan:
        """FFN neurons and head units to keep per block, hidden channels for the model; blocks `scope` rejects keep
        their full width. `hidden_scores` (d,): channels' importance (global allocation with parts=hidden)."""
        need, neuron, slot = self._costs(anatomy)
        d0 = anatomy.hidden_size
        chan = 0.0 if "hidden" not in self.parts else self._measured_latency().channel_s \
            if self.budget.kind == "latency" else channels.channel_cost(anatomy, self.budget.kind)
        hid = (d0, min(d0, self.multiple_of) if chan else d0, chan)  # (channels, floor, cost of one)
        ffn0, slots0 = block_widths(anatomy)
        may = scope or (lambda _i, _part: True)
        use_ffn = [("ffn" in self.parts) and may(i, "mlp.down") for i in range(len(ffn0))]
        use_heads = [("heads" in self.parts) and may(i, "attn.o") for i in range(len(slots0))]
        floor_ffn = [min(f, max(self.min_ffn, self.multiple_of)) if u else f for f, u in zip(ffn0, use_ffn)]
        floor_slots = [min(s, 1) if u else s for s, u in zip(slots0, use_heads)]
        most = sum((f - lo) * c for f, lo, c in zip(ffn0, floor_ffn, neuron)) + sum(
            (s - lo) * c for s, lo, c in zip(slots0, floor_slots, slot)) + (hid[0] - hid[1]) * chan
        if need > most + 1e-6:
            parts = set(self.parts)
            what = "FFN neurons" if parts == {"ffn"} else "heads" if parts == {"heads"} else "FFN neurons and heads"
            keep = self.budget.keep
            raise BudgetError(
                f"target {self.target} is below what removing {what} can reach: at most "
                f"{most / (need / (1 - keep)):.1%} of the {self.budget.kind} can go (keep >= "
                f"{1 - most / (need / (1 - keep)):.3f}); add parts=ffn,heads or use depth pruning"
                + ("" if all(use_ffn + use_heads) else " (filter_fn leaves some blocks whole)")
            )
        if need <= 0:
            return Plan(ffn0, slots0, d0)
        if self.allocation == "uniform" or block_scores is None:
            return self._uniform(need, ffn0, slots0, floor_ffn, floor_slots, neuron, slot, hid)
        return self._global(need, ffn0, slots0, floor_ffn, floor_slots, neuron, slot, block_scores, hid, hidden_scores)

    def _round(self, keep: int, full: int, floor: int) -> int:
        return max(floor, min(full, math.ceil(keep / self.multiple_of) * self.multiple_of))

    def _uniform(self, need, ffn0, slots0, floor_ffn, floor_slots, neuron, slot, hid) -> Plan:
        d0, floor_h, chan = hid

        def at(f: float) -> tuple[Plan, float]:
            ffn = [self._round(round(n * (1 - f)), n, lo) if "ffn" in self.parts else n for n, lo in zip(ffn0, floor_ffn)]
            heads = [max(lo, round(s * (1 - f))) if "heads" in self.parts else s for s, lo in zip(slots0, floor_slots)]
            h = self._round(round(d0 * (1 - f)), d0, floor_h) if chan else d0
            gone = sum((a - b) * c for a, b, c in zip(ffn0, ffn, neuron)) + sum((a - b) * c for a, b, c in zip(slots0, heads, slot))
            return Plan(ffn, heads, h), gone + (d0 - h) * chan

        lo, hi = 0.0, 1.0
        for _ in range(40):  # bisection on the shared removal ratio
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if at(mid)[1] < need else (lo, mid)
        return at(hi)[0]

    def _global(self, need, ffn0, slots0, floor_ffn, floor_slots, neuron, slot, block_scores, hid, hidden_scores) -> Plan:
        d0, floor_h, chan = hid
        units = []  # (error per removed unit of cost, block, kind)
        if chan and hidden_scores is not None:  # the costs of one channel are those at the current widths (first order)
            units += [(v / chan, -1, "hidden") for v in hidden_scores.sort().values[: d0 - floor_h].tolist()]
        for i, sc in enumerate(block_scores):
            if "ffn" in self.parts and "ffn" in sc:
                s = sc["ffn"].sort().values[: ffn0[i] - floor_ffn[i]]
                units += [(v / neuron[i], i, "ffn") for v in s.tolist()]
            if "heads" in self.parts and "heads" in sc:
                per_slot = sc["heads"].sort(dim=1).values.sum(0)[: slots0[i] - floor_slots[i]]  # (slots,)
                units += [(v / slot[i], i, "heads") for v in per_slot.tolist()]
        units.sort(key=lambda u: u[0])
        ffn, heads, h = list(ffn0), list(slots0), d0
        gone, taken = 0.0, []
        for _, i, kind in units:
            if gone >= need:
                break
            taken.append((i, kind))
            if kind == "ffn":
                ffn[i] -= 1
                gone += neuron[i]
            elif kind == "hidden":
                h -= 1
                gone += chan
            else:
                heads[i] -= 1
                gone += slot[i]
        for i, kind in reversed(taken):  # a big last head unit overshoots: give back the dearest neurons
            if kind == "ffn" and gone - neuron[i] >= need:
                ffn[i] += 1
                gone -= neuron[i]
        ffn = [self._round(k, n, lo) for k, n, lo in zip(ffn, ffn0, floor_ffn)]
        return Plan(ffn, heads, self._round(h, d0, floor_h))

    def _measured(self, anatomy: Anatomy, calibration: torch.Tensor, batch_size: int, progress: bool,
                  scope: Scope) -> Plan:
        """FFN widths per block from each block's measured KL at every share, chosen by the MIP under the target."""
        need, neuron, _ = self._costs(anatomy)
        shares = sorted(set(self.shares))
        probe = Probe(anatomy, calibration[: self.probe_windows, : self.probe_length], batch_size=batch_size,
                      precision=self.precision, positions=self.probe_positions)
        errors, _ = score_library(anatomy, probe, shares, attention=False, importance=self.importance,
                                  multiple_of=self.multiple_of, progress=progress)
        del probe
        widths = [[b.mlp.intermediate_size, *(keep_n(b, f, self.multiple_of) for f in shares)] for b in anatomy.blocks]
        lib = [[Candidate(str(w), e.get(f, 0.0), (ws[0] - w) * -c) for w, f in zip(ws, [1.0, *shares])]
               for ws, e, c in zip(widths, errors, neuron)]  # cost: minus the parameters removed
        lib = [cands if scope(i, "mlp.down") else cands[:1] for i, cands in enumerate(lib)]  # rejected: full width
        try:
            pick = choose(lib, -need)
        except ValueError as err:
            raise BudgetError(f"target {self.target}: the offered shares {self.shares} cannot remove enough; "
                              f"add smaller shares ({err})") from None
        return Plan([ws[j] for ws, j in zip(widths, pick)], block_widths(anatomy)[1])

    # -- scoring and removal, one block at a time -----------------------------------------------
    def _outputs(self, block: Block) -> dict[str, Proj]:
        """The output projections whose input columns are the groups: attn.o (heads), mlp.down (neurons)."""
        out = {}
        if "heads" in self.parts and block.attention is not None:
            out["heads"] = block.attention.o
        if "ffn" in self.parts and block.mlp is not None and block.mlp.intermediate_size > 0:
            out["ffn"] = block.mlp.down
        return out

    def _block_scores(self, block: Block, stats: dict[str, InputStats | None]) -> dict[str, torch.Tensor]:
        out = {}
        for kind, p in self._outputs(block).items():
            if kind == "heads":
                a = block.attention
                out[kind] = scores(self.importance, p, stats.get(kind), _head_groups(a.num_heads, a.head_dim)).view(head_unit(a), -1)
            else:
                out[kind] = scores(self.importance, p, stats.get(kind), _neuron_groups(block.mlp.intermediate_size))
        return out

    def _cut_heads(self, block: Block, units: int, st: InputStats | None) -> None:
        a = block.attention
        if a is None or units >= head_slots(a):
            return
        u = head_unit(a)
        slots = a.num_heads // u
        sc = scores(self.importance, a.o, st, _head_groups(a.num_heads, a.head_dim)).view(u, slots)  # (unit, slots)
        top = sc.topk(units, dim=1).indices.sort(dim=1).values  # (unit, units) heads kept in each KV group
        keep = (top + torch.arange(u)[:, None] * slots).flatten()
        cols = torch.cat([torch.arange(h * a.head_dim, (h + 1) * a.head_dim) for h in keep.tolist()])
        new = least_squares(a.o, cols, st, bias=a.o.bias is not None) if (self.compensate and st is not None) else None
        surgery.prune_heads(block, keep)
        surgery.assign(a.o, new)

    def _cut_ffn(self, block: Block, n: int, st: InputStats | None) -> None:
        m = block.mlp
        if m is None or n >= m.intermediate_size:
            return
        keep = scores(self.importance, m.down, st, _neuron_groups(m.intermediate_size)).topk(n).indices.sort().values
        new = least_squares(m.down, keep, st, bias=m.down.bias is not None) if (self.compensate and st is not None) else None
        surgery.prune_neurons(block, keep)
        surgery.assign(m.down, new)

    @torch.no_grad()
    def _statistics(self, anatomy: Anatomy, calibration: torch.Tensor, batch_size: int, progress: bool) -> list[dict]:
        """One pass over the dense model: input statistics of every block's output projections."""
        inputs, kwargs = calibrate.capture_inputs(anatomy, calibration, batch_size)
        dtype = calibrate.resolve_precision(self.precision, inputs[0].device)
        out = []
        for block in bar(anatomy.blocks, desc="width: statistics", unit="block", disable=not progress):
            stats = {k: InputStats() for k in self._outputs(block)}
            hooks = [p.module.register_forward_hook(lambda _m, a, _o, st=stats[k]: st.add(a[0]))
                     for k, p in self._outputs(block).items()]
            try:
                inputs = BlockCalib(block, inputs, kwargs, dtype).run()
            finally:
                for h in hooks:
                    h.remove()
            out.append(stats)
        return out

    def _gradient_statistics(self, anatomy: Anatomy, calibration: torch.Tensor, batch_size: int,
                             progress: bool) -> list[dict]:
        """Like _statistics, plus the gradient of a block-local loss at each output projection's input.

        The loss of block i: next-token cross-entropy of its output read through the final norm and the
        head (the logit lens); the backward goes through that block and the head only, never the model."""
        an = anatomy
        if not an.causal:
            return self._feature_gradient_statistics(an, calibration, batch_size, progress)
        if an.head is None:
            raise ValueError(f"importance {self.importance!r} needs a causal LM with a head (its block-local loss)")
        inputs, kwargs = calibrate.capture_inputs(an, calibration, batch_size)
        labels = [calibration[i: i + batch_size] for i in range(0, calibration.shape[0], batch_size)]
        params = [p for p in an.model.parameters() if p.requires_grad]
        out = []
        try:
            for p in params:  # activations' gradients only
                p.requires_grad_(False)
            for block in bar(an.blocks, desc="width: gradient statistics", unit="block", disable=not progress):
                stats = {k: InputStats() for k in self._outputs(block)}
                seen: dict[str, torch.Tensor] = {}

                def keep(_m, a, _o, k, seen=seen):
                    a[0].retain_grad()
                    seen[k] = a[0]

                hooks = [p.module.register_forward_hook(lambda m, a, o, k=k: keep(m, a, o, k))
                         for k, p in self._outputs(block).items()]
                nxt = []
                try:
                    for x, kw, ids in zip(inputs, kwargs, labels):
                        with torch.enable_grad():
                            xg = x.detach().requires_grad_(True)
                            y = block.module(xg, **calibrate.for_block(kw, block))
                            y = y[0] if isinstance(y, tuple) else y  # (B, T, d)
                            h = an.final_norm(y) if an.final_norm is not None else y
                            logits = an.head(h)[:, :-1].float()  # (B, T-1, V)
                            loss = torch.nn.functional.cross_entropy(
                                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1).to(logits.device),
                                reduction="sum")
                            loss.backward()
                        for k, a in seen.items():
                            stats[k].add(a.detach())
                            stats[k].add_grad(a.detach(), a.grad)
                        nxt.append(y.detach())
                finally:
                    for hk in hooks:
                        hk.remove()
                inputs = nxt
                out.append(stats)
        finally:
            for p in params:
                p.requires_grad_(True)
        return out

    def _feature_gradient_statistics(self, anatomy: Anatomy, calibration: torch.Tensor, batch_size: int,
                                     progress: bool) -> list[dict]:
        """Encoders (no next token to predict): NViT-style global importance from the model's output features.

        The loss is r . f(x), f the final-norm output of every token and r ~ N(0, I) drawn anew for each
        input (seeded). A group's mask gradient m_g = sum over tokens of x_g . dL/dx_g (one per input) then has
        E_r[m_g^2] = ||J_g||^2, J_g the change of f when the group is removed (to first order): `fisher` sums
        m_g^2 over inputs, the Gauss-Newton estimate of the squared feature error, in one unit for every head
        and neuron of every block (whole-model backward: an encoder's features depend on all of it). `taylor`
        has no signal here (E_r[m_g] = 0) and is refused."""
        if self.importance != "fisher":
            raise ValueError(f"importance {self.importance!r} on an encoder: its loss (a random projection of the "
                             "output features) has a zero mean gradient; use importance=fisher (or hessian)")
        an = anatomy
        outs = [self._outputs(b) for b in an.blocks]
        stats = [{k: InputStats() for k in o} for o in outs]
        seen: dict[tuple[int, str], torch.Tensor] = {}

        def keep(i: int, k: str, _m, a, _o) -> None:
            a[0].retain_grad()
            seen[i, k] = a[0]

        hooks = [p.module.register_forward_hook(lambda m, a, o, i=i, k=k: keep(i, k, m, a, o))
                 for i, o in enumerate(outs) for k, p in o.items()]
        hooks.append(an.embed.register_forward_hook(lambda _m, _a, o: o.requires_grad_()))  # (weights are frozen)
        g = torch.Generator().manual_seed(0)
        device = next(an.model.parameters()).device
        with activation_gradients(an.model, hooks):
            for i in bar(range(0, calibration.shape[0], batch_size), desc="width: feature gradients", unit="batch",
                         disable=not progress):
                with torch.enable_grad():
                    feature_loss(an, calibration[i: i + batch_size].to(device), g).backward()
                for (b, k), a in seen.items():
                    X = a.detach()  # (B, T, in)
                    stats[b][k].add(X)
                    stats[b][k].add_grad(X, a.grad, per_input=True)
                seen.clear()
        return stats

    def _total(self, anatomy: Anatomy) -> float:
        if self.budget.kind == "latency":
            return self._measured_latency().model(anatomy)
        if self.budget.kind == "params":
            return count_parameters(anatomy.model)
        return self._flops(anatomy) if self.attention_flops else matmul_params(anatomy)

    def _in_rounds(self, anatomy: Anatomy, run: StepContext, scope: Scope) -> dict[str, Any]:
        """`rounds` cuts, each to its share of the original under the same budget kind, scored afresh."""
        model, kind, keep = anatomy.model, self.budget.kind, self.budget.keep
        first = self._total(anatomy)
        out: dict[str, Any] = {}
        for r in range(1, self.rounds + 1):
            an = anatomy_of(model)
            share = (1 - (1 - keep) * r / self.rounds) * first / self._total(an)
            step = dataclasses.replace(self, target=Budget(kind, min(1.0, share)), rounds=1)
            step._latency = self._latency  # one measurement of the dense model prices every round
            out = step.prune(an, run, scope)
        if self.attention_flops:
            out["spent"] = self._total(anatomy_of(model)) / first
        return {**out, "rounds": self.rounds}

    def prune(self, anatomy: Anatomy, run: StepContext, scope: Scope) -> dict[str, Any]:
        if any(b.scales for b in anatomy.blocks):  # layer scales into o / down (exact): refits and scores then
            fold_layer_scale_(anatomy)              # see the residual branch itself
        if self.attention_flops:  # the attention's share of a head's cost depends on the sequence length
            self._tokens = calibrate.tokens_per_input(anatomy, run.require_calibration(self.name))
        timing = self.budget.kind == "latency" and self._latency is None  # this call prices the units
        if timing:
            sample = run.require_calibration(self.name)[:1]
            self._latency = latency.measure(anatomy, sample, list(self.parts), batch=self.latency_batch,
                                            runs=self.latency_runs, progress=run.progress)
        try:
            out = self._in_rounds(anatomy, run, scope) if self.rounds > 1 else self._once(anatomy, run, scope)
            if timing:
                lat, cut = self._latency, anatomy_of(anatomy.model)
                out.update(spent=latency.measured_share(cut, sample, lat, self.latency_runs),
                           latency_modelled=lat.model(cut) / lat.dense_s, latency=lat.record())
        finally:
            if timing:
                self._latency = None  # the prices were this model's: the next prune measures its own
        return out

    def _once(self, anatomy: Anatomy, run: StepContext, scope: Scope) -> dict[str, Any]:
        calibration, batch_size, progress = run.calibration, run.batch_size, run.progress
        if self.attention_flops:  # (prune set self._tokens)
            before = self._flops(anatomy)
        data = self.needs_calibration
        collect = self._gradient_statistics if self.importance in NEEDS_GRAD else self._statistics
        stats = collect(anatomy, calibration, batch_size, progress) if data else [{} for _ in anatomy.blocks]
        block_scores = [self._block_scores(b, st) for b, st in zip(anatomy.blocks, stats)] if self.allocation == "global" else None
        hidden_scores = self._hidden_scores(anatomy, run, scope)
        plan = self._measured(anatomy, calibration, batch_size, progress, scope) if self.allocation == "measured" \
            else self.plan(anatomy, block_scores, scope, hidden_scores)
        if self.sequential and data:  # re-measure each block's inputs after the blocks before it were cut
            del stats
            for bc in calibrate.blocks(anatomy, calibration, batch_size=batch_size, progress=progress, desc="width: pruning",
                                       dense_targets=self.asymmetric):
                b = bc.block
                if plan.head_units[b.index] < head_slots(b.attention):
                    self._cut_heads(b, plan.head_units[b.index], output_error_stats(bc, b.attention.o))
                if b.mlp is not None and plan.ffn[b.index] < b.mlp.intermediate_size:
                    self._cut_ffn(b, plan.ffn[b.index], output_error_stats(bc, b.mlp.down))
        else:
            for b, st in bar(list(zip(anatomy.blocks, stats)), desc="width: pruning", unit="block", disable=not progress):
                self._cut_heads(b, plan.head_units[b.index], st.get("heads"))
                self._cut_ffn(b, plan.ffn[b.index], st.get("ffn"))
        if hidden_scores is not None and plan.hidden < anatomy.hidden_size:  # last: the re-fits above read all channels
            channels.prune_channels(anatomy, hidden_scores.topk(plan.hidden).indices)
        out: dict[str, Any] = {"ffn": plan.ffn, "head_units": plan.head_units}
        if hidden_scores is not None:
            out["hidden"] = plan.hidden
        if self.attention_flops:
            out.update(spent=self.flops_share(anatomy, before), attention_tokens=self._tokens)
        return out


    def _hidden_scores(self, anatomy: Anatomy, run: StepContext, scope: Scope) -> torch.Tensor | None:
        if "hidden" not in self.parts:
            return None
        if not all(scope(i, part) for i in range(len(anatomy.blocks)) for part in self.filter_on):
            raise ValueError("parts=hidden cuts the channels of every block; a filter_fn that leaves blocks whole "
                             "cannot hold: drop 'hidden' from parts or the filter")
        return channels.channel_scores(anatomy, run.calibration, run.batch_size, self.importance, run.progress)


def attention_per_head(block: Block, tokens: int) -> float:
    """Multiply-adds per token of one head's scores and weighted sum over `tokens` keys: 2 T head_dim."""
    return 2.0 * tokens * block.attention.head_dim if block.attention is not None else 0.0


def _neuron_groups(n: int) -> list[torch.Tensor]:
    return list(torch.arange(n)[:, None])


def _head_groups(H: int, D: int) -> list[torch.Tensor]:
    return [torch.arange(h * D, (h + 1) * D) for h in range(H)]
