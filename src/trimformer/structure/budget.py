"""The budget of a structured cut, and the choice of one candidate per block under it.

A budget is one text, parsed here and nowhere else:

    params=R    keep the share R of the model's parameters
    flops=R     keep the share R of the matmul FLOPs per token (2x the weights multiplied per token)
    latency=R   keep the share R of the prefill latency measured on this machine
    compute=S   remove the share S of the blocks' matmul compute (their parameters)
    remove=N    remove N units (a method's unit: blocks, sublayers); 0 < N < 1: that share of them

Each method declares the kinds it takes. `choose` picks one candidate per block under a budget (a mixed-integer
program, as in Puzzle); a scored library of candidates is keyed by everything it depends on and can be kept in
a file (`library=FILE`), so a later cut of the same model at another budget loads it instead of scoring again.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..models import Anatomy

SYNTAX = {"params": "params=R", "flops": "flops=R", "latency": "latency=R", "compute": "compute=S", "remove": "remove=N"}
KEEP = ("params", "flops", "latency")  # R: the share kept
MEANING = {"params": "R: the share of parameters to keep", "flops": "R: the share of FLOPs/token to keep",
           "latency": "R: the share of the measured prefill latency to keep",
           "compute": "S: the share of the blocks' compute to remove", "remove": "N: how many to remove"}


class BudgetError(ValueError):
    """No choice the method offers meets the budget."""


@dataclass(frozen=True)
class Budget:
    """kind: params | flops | latency | compute | remove; value: R, S or N (see the module docstring)."""

    kind: str
    value: float

    def __post_init__(self) -> None:
        k, v = self.kind, self.value
        if k not in SYNTAX:
            raise ValueError(f"budget kind {k!r}: choose one of {', '.join(SYNTAX)}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"budget {k}={v!r}: the value must be a finite number")
        if k in KEEP and not 0.0 < v <= 1.0:
            raise ValueError(f"budget {k}={v}: the share to keep must be in (0, 1], e.g. {k}=0.8")
        if k == "compute" and not 0.0 <= v < 1.0:
            raise ValueError(f"budget compute={v}: the share of compute to remove must be in [0, 1), e.g. compute=0.2")
        if k == "remove":
            if v < 0 or (v >= 1 and not float(v).is_integer()):
                raise ValueError(f"budget remove={v}: a count (0, 1, 2, ...) or a share in (0, 1), e.g. remove=6")
            if v >= 1 or v == 0:
                object.__setattr__(self, "value", int(v))

    @classmethod
    def parse(cls, text: str) -> Budget:
        """'params=0.8' -> Budget('params', 0.8)."""
        kind, eq, value = str(text).partition("=")
        kind = kind.strip()
        if not eq or kind not in SYNTAX:
            raise ValueError(f"budget {text!r}: write KIND=VALUE, KIND one of {', '.join(SYNTAX.values())} "
                             "(e.g. params=0.8)")
        try:
            v = float(value)
        except ValueError:
            raise ValueError(f"budget {text!r}: {value.strip()!r} is not a number") from None
        return cls(kind, v)

    def __str__(self) -> str:
        return f"{self.kind}={self.value!r}"

    @property
    def nothing(self) -> bool:
        """True when the budget removes nothing (a share of 1 kept, or 0 removed)."""
        return self.value == (1 if self.kind in KEEP else 0)

    @property
    def keep(self) -> float:
        """The share kept (params, flops, latency)."""
        if self.kind not in KEEP:
            raise ValueError(f"budget {self}: not a share to keep")
        return float(self.value)

    def count(self, n: int, what: str) -> int:
        """remove=N of `n` units: N, or round(N * n) for a share; a clear error when all would go."""
        if self.kind != "remove":
            raise ValueError(f"budget {self}: not a count")
        k = int(self.value) if self.value >= 1 or self.value == 0 else round(self.value * n)
        if k < 1 and self.value > 0:
            raise ValueError(f"budget {self}: a share of {n} {what} that rounds to none; remove at least one")
        if k >= n:
            raise ValueError(f"cannot remove {k} of {n} {what}; at most {n - 1}")
        return k

    def check(self, kinds: tuple[str, ...], method: str) -> Budget:
        """This budget if `method` takes its kind, else an error naming the kinds it takes."""
        if self.kind not in kinds:
            takes = " or ".join(SYNTAX[k] for k in kinds)
            raise ValueError(f"{method} takes a budget {takes} ({'; '.join(MEANING[k] for k in kinds)}), got {self}")
        return self


def syntax(kinds: tuple[str, ...]) -> str:
    return " or ".join(SYNTAX[k] for k in kinds)


# -- the choice under a budget ------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    name: str
    error: float
    cost: float


def choose(library: list[list[Candidate]], budget: float) -> list[int]:
    """Index of the chosen candidate for every block, minimising the summed error with the summed cost
    <= budget; a clear error when no choice fits.

        minimise sum_ij e_ij x_ij  s.t.  sum_j x_ij = 1 for every block,  sum_ij c_ij x_ij <= budget,  x binary
    """
    from scipy.optimize import Bounds, LinearConstraint, milp  # scipy loads in ~0.3 s; only a choice needs it

    if not library or any(not c for c in library):
        raise ValueError("every block needs at least one candidate")
    cheapest = sum(min(c.cost for c in cands) for cands in library)
    if cheapest > budget + 1e-12:
        raise BudgetError(f"budget {budget:g} is below the cheapest possible architecture ({cheapest:g}); raise the budget")
    sizes = [len(c) for c in library]
    n = sum(sizes)
    err = np.array([c.error for cands in library for c in cands])
    cost = np.array([c.cost for cands in library for c in cands])
    one = np.zeros((len(library), n))  # (blocks, candidates): exactly one per block
    start = 0
    for i, k in enumerate(sizes):
        one[i, start:start + k] = 1
        start += k
    # HiGHS accepts a constraint violated by up to 1e-6 in absolute terms: a latency budget in seconds would be
    # overrun by a visible share. Solve in units of the budget, and tighten by the overrun if there still is one.
    scale = abs(budget) or 1.0
    bound = budget / scale
    for _ in range(4):
        res = milp(c=err, constraints=[LinearConstraint(one, 1, 1), LinearConstraint(cost[None] / scale, -np.inf, bound)],
                   integrality=np.ones(n), bounds=Bounds(0, 1))
        if not res.success:
            raise BudgetError(f"no architecture fits budget {budget:g}: {res.message}")
        x = np.round(res.x).astype(int)
        out, start = [], 0
        for k in sizes:
            out.append(int(np.argmax(x[start:start + k])))
            start += k
        spent = sum(library[i][j].cost for i, j in enumerate(out))
        if spent <= budget:
            return out
        bound -= 2 * (spent - budget) / scale
    raise BudgetError(f"no architecture found within budget {budget:g} (the solver's tolerance); raise the budget")


# -- the scored library, keyed and kept in a file -----------------------------------------------
def library_key(anatomy: Anatomy, windows: torch.Tensor, settings: tuple) -> str:
    """A fingerprint of what a scored library depends on: the weights, the calibration windows, the settings."""
    h = hashlib.sha256(repr(settings).encode())
    h.update(windows.cpu().numpy().tobytes())
    for name, p in anatomy.model.state_dict().items():  # exact sums in fp64: any changed weight shows
        d = p.double()  # one fp64 copy per tensor, read twice
        h.update(f"{name}{tuple(p.shape)}{d.sum().item():.17g}{d.abs().sum().item():.17g}".encode())
    return h.hexdigest()


def cached_library(path: str, key: str, score: Callable[[], tuple[list, list]]) -> tuple[list, list]:
    """(errors, cuts) from the file at `path` when it holds the library of `key`, else `score()`, saved there.
    The file is written to a temporary name first, then renamed: an interrupted save leaves no half-written
    library; a file of another key (other weights, windows or settings) is scored again and replaced."""
    if path and os.path.exists(path):
        saved: dict[str, Any] = torch.load(path, weights_only=False)
        if saved.get("key") == key:
            return saved["errors"], saved["cuts"]
    errors, cuts = score()
    if path:
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save({"key": key, "errors": errors, "cuts": cuts}, tmp)
        os.replace(tmp, path)
    return errors, cuts
