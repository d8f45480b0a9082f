"""The MIP behind the Puzzle-style search: respects the budget and finds the known optimum."""

from __future__ import annotations

import itertools
import random

import pytest

from trimformer.structure.budget import BudgetError, Candidate, choose


def test_mip_finds_the_known_optimum_of_a_hand_made_case():
    # Three blocks, keeping everything costs 9. Budget 6: remove block 2 (error 0.1, cost 6).
    # Budget 5: also shrink block 0 (error 0.2), keep block 1: error 0.3 at cost 2 + 3 + 0 = 5.
    lib = [
        [Candidate("keep", 0.0, 3), Candidate("ffn/2", 0.2, 2)],
        [Candidate("keep", 0.0, 3), Candidate("ffn/2", 5.0, 2), Candidate("drop", 9.0, 0)],
        [Candidate("keep", 0.0, 3), Candidate("drop", 0.1, 0)],
    ]
    assert choose(lib, 6) == [0, 0, 1]
    assert choose(lib, 5) == [1, 0, 1]
    assert choose(lib, 9) == [0, 0, 0]


def test_mip_respects_a_budget_in_seconds_exactly():
    """Latency budgets are fractions of a millisecond: the solver's absolute tolerance (1e-6) must not let the
    summed cost overrun them (keeping both blocks costs 2e-4 s, the budget is 5e-7 s less)."""
    lib = [[Candidate("keep", 0.0, 1e-4), Candidate("drop", 1.0, 0.0)] for _ in range(2)]
    for budget in (2e-4 - 5e-7, 1e-4):
        pick = choose(lib, budget)
        assert sum(lib[i][j].cost for i, j in enumerate(pick)) <= budget and pick.count(0) == 1
    assert choose(lib, 2e-4) == [0, 0]


def test_mip_matches_brute_force_and_respects_budget():
    rng = random.Random(0)
    for _ in range(20):
        lib = [[Candidate(str(j), rng.random(), rng.randint(0, 5)) for j in range(rng.randint(1, 4))] for _ in range(4)]
        budget = rng.randint(sum(min(c.cost for c in b) for b in lib), 20)
        pick = choose(lib, budget)
        assert sum(lib[i][j].cost for i, j in enumerate(pick)) <= budget
        best = min(sum(lib[i][j].error for i, j in enumerate(p))
                   for p in itertools.product(*[range(len(b)) for b in lib])
                   if sum(lib[i][j].cost for i, j in enumerate(p)) <= budget)
        assert sum(lib[i][j].error for i, j in enumerate(pick)) == pytest.approx(best)


def test_budget_below_minimum_is_a_clear_error():
    lib = [[Candidate("keep", 0, 3), Candidate("drop", 1, 1)]] * 2
    with pytest.raises(BudgetError, match="below the cheapest possible architecture"):
        choose(lib, 1)
