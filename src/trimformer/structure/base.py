"""The structured-pruning family: the base width, depth, FinerCut and search share.

A method declares the budgets it takes (`budgets`: kinds of budget.py; `spellings`: older fields that also give
the budget, e.g. depth's remove=N), which modules `filter_fn` is asked about (`filter_on`), and implements one
hook:

    def prune(self, anatomy, run, scope) -> dict     # score what it offers, choose under self.budget, cut

The base parses and checks the budget, checks the calibration and the model, resolves `filter_fn` into a `Scope`
(per block, the parts the method may change), returns at once when the budget removes nothing, makes
`model.config` describe the new tensors, and writes the result record: params_before, params_after, kept,
flops_kept, uniform (vanilla transformers rebuilds it from its config), budget, spent (the budget's own measure
of what the cut used) and what the method returned.

What `filter_fn(module, name)` is asked about, by `filter_on`:
  'block': the block (depth removes only accepted blocks and fuses only into them);
  'attn', 'mlp': the attention and MLP sublayers (FinerCut and search remove, cut or re-fit only accepted
     sublayers; a whole-block move needs both);
  'attn.o', 'mlp.down': the output projections (width cuts a block's heads only if its o is accepted, its FFN
     only if its down is).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import nn

from ..config import Config
from ..models import Anatomy, anatomy_of, count_parameters
from ..steps import StepContext
from . import surgery
from .budget import Budget, syntax
from .costs import matmul_params

Precision = Literal["auto", "fp32", "bf16"]
Part = Literal["block", "attn", "mlp", "attn.o", "mlp.down"]


@dataclass(frozen=True)
class Scope:
    """What `filter_fn` lets a method change: per block, the accepted parts (of the method's `filter_on`)."""

    allowed: tuple[frozenset[str], ...]

    def __call__(self, block: int, part: Part) -> bool:
        return part in self.allowed[block]


def scope(anatomy: Anatomy, run: StepContext, parts: tuple[str, ...]) -> Scope:
    """Ask `run.filter_fn` about each block's `parts` (modules named as in `model.named_modules()`)."""
    names = {id(m): n for n, m in anatomy.model.named_modules()}
    rows = []
    for b in anatomy.blocks:
        a, m = b.attention, b.mlp
        modules: dict[str, nn.Module | None] = {
            "block": b.module, "attn": a.module if a else None, "mlp": m.module if m else None,
            "attn.o": a.o.module if a else None, "mlp.down": m.down.module if m else None}
        rows.append(frozenset(p for p in parts if modules[p] is not None
                              and run.accepts(modules[p], names.get(id(modules[p]), ""))))
    return Scope(tuple(rows))


@dataclass
class StructurePruner(Config):
    """Base config of every structured method. target: the budget as budget.py's text (e.g. 'params=0.8')."""

    target: Budget | None = None

    name: ClassVar[str] = "?"
    budgets: ClassVar[tuple[str, ...]] = ()  # the budget kinds the method takes
    spellings: ClassVar[tuple[tuple[str, str], ...]] = ()  # (field, budget kind): fields that also give the budget
    filter_on: ClassVar[tuple[Part, ...]] = ()
    decoders_only: ClassVar[bool] = False  # pre-norm causal LMs only (sublayer removal, next-token KL)
    needs_calibration: ClassVar[bool] = True
    needs_dense: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.budget = self._budget()

    def _budget(self) -> Budget:
        given = [(f, kind, getattr(self, f)) for f, kind in self.spellings if getattr(self, f)]
        shown = [f"{f}={v}" for f, _, v in given] + ([f"target={self.target}"] if self.target is not None else [])
        ways = f"target={syntax(self.budgets)}"
        if self.spellings:
            ways = f"{' or '.join(f for f, _ in self.spellings)} (or {ways})"
        if len(shown) > 1:
            raise ValueError(f"{self.name} takes one budget: {ways}; got {', '.join(shown)}")
        if not shown:
            raise ValueError(f"{self.name} needs a budget: set {ways}")
        if self.target is not None:
            return self.target.check(self.budgets, self.name)
        f, kind, v = given[0]
        try:
            return Budget(kind, v).check(self.budgets, self.name)
        except ValueError as e:
            raise ValueError(f"{f}={v!r}: {e}") from None

    # -- the one hook a method implements ------------------------------------------------------
    def prune(self, anatomy: Anatomy, run: StepContext, scope: Scope) -> dict[str, Any]:
        """Cut `anatomy` in place under `self.budget`, changing only what `scope` allows; returns the method's
        part of the result record (with 'spent' for a budget of latency, compute or remove)."""
        raise NotImplementedError

    # -- what the base does -------------------------------------------------------------------
    def apply_(self, anatomy: Anatomy, run: StepContext) -> dict[str, Any]:
        if self.needs_calibration:
            run.require_calibration(self.name)
        if self.decoders_only and not (anatomy.causal and all(b.pre_norm for b in anatomy.blocks)):
            raise ValueError(f"{self.name} changes sublayers of pre-norm decoders only (it scores by next-token KL)")
        model = anatomy.model
        before, flops = count_parameters(model), matmul_params(anatomy)
        b = self.budget
        if b.nothing:
            result: dict[str, Any] = {"spent": b.value}
        else:
            allowed = scope(anatomy, run, self.filter_on)
            if not any(allowed.allowed):
                raise ValueError(f"{self.name}: filter_fn rejects every module it could change "
                                 f"({', '.join(self.filter_on)} of each block); nothing can be cut")
            result = self.prune(anatomy, run, allowed)
        anatomy = anatomy_of(model)
        uniform = surgery.sync_config(anatomy)
        after = count_parameters(model)
        measured = {"params": after / before, "flops": matmul_params(anatomy) / flops}
        spent = result.pop("spent", measured.get(b.kind))
        return {"params_before": before, "params_after": after, "kept": after / before, "flops_kept": measured["flops"],
                "uniform": uniform, "budget": str(b), "spent": spent, **result}
