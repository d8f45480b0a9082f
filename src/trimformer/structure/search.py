"""Puzzle-style choice of one candidate per block under a budget, as a mixed-integer program.

Each block i has candidates j (keep, narrower FFN, fewer KV groups, attention removed, block removed,
...), each with an error e_ij (e.g. its one-block KL on calibration data) and a cost c_ij (measured
latency, memory or parameters). `choose` solves

    minimise sum_ij e_ij x_ij  s.t.  sum_j x_ij = 1 for every block,  sum_ij c_ij x_ij <= budget,  x binary

with `scipy.optimize.milp`. The candidate library and its scoring are not built yet (issue 6, part 5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Candidate:
    name: str
    error: float
    cost: float


class BudgetTooSmallError(ValueError):
    pass


def choose(library: list[list[Candidate]], budget: float) -> list[int]:
    """Index of the chosen candidate for every block; a clear error when no choice fits the budget."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    if not library or any(not c for c in library):
        raise ValueError("every block needs at least one candidate")
    cheapest = sum(min(c.cost for c in cands) for cands in library)
    if cheapest > budget + 1e-12:
        raise BudgetTooSmallError(
            f"budget {budget:g} is below the cheapest possible architecture ({cheapest:g}); raise the budget"
        )
    sizes = [len(c) for c in library]
    n = sum(sizes)
    err = np.array([c.error for cands in library for c in cands])
    cost = np.array([c.cost for cands in library for c in cands])
    one = np.zeros((len(library), n))  # (blocks, candidates): exactly one per block
    start = 0
    for i, k in enumerate(sizes):
        one[i, start:start + k] = 1
        start += k
    res = milp(
        c=err,
        constraints=[LinearConstraint(one, 1, 1), LinearConstraint(cost[None], -np.inf, budget)],
        integrality=np.ones(n),
        bounds=Bounds(0, 1),
    )
    if not res.success:
        raise BudgetTooSmallError(f"no architecture fits budget {budget:g}: {res.message}")
    x = np.round(res.x).astype(int)
    out, start = [], 0
    for k in sizes:
        out.append(int(np.argmax(x[start:start + k])))
        start += k
    return out
