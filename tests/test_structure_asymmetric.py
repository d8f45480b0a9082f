"""Asymmetric width refit: fit each cut block to the dense model's outputs, carried in a dense stream."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny

import trimformer
from trimformer.structure import STRUCTURE
from trimformer.structure.importance import LS_DAMP, InputStats, least_squares


@torch.no_grad()
def test_asymmetric_refit_solves_the_dense_target_least_squares():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(500, 10, generator=g)  # the pruned model's inputs to `down`
    Xd = X + 0.3 * torch.randn(500, 10, generator=g)  # the dense model's inputs at the same tokens
    lin = torch.nn.Linear(10, 4, bias=True)
    p = trimformer.models.Proj(lin, "down")
    keep = torch.tensor([0, 2, 3, 5, 7, 9])
    st = InputStats()
    st.add(X, dense=Xd)
    W, b = least_squares(p, keep, st, bias=True)
    Y = Xd @ lin.weight.T + lin.bias  # (tokens, out): the dense model's output
    Xk1 = torch.cat([X[:, keep], torch.ones(500, 1)], 1).double()  # kept inputs and a constant
    ridge = LS_DAMP * (Xk1.T @ Xk1 / 500).diagonal().mean()  # the refit's ridge, relative to the kept input energy
    ref = torch.linalg.solve(Xk1.T @ Xk1 / 500 + ridge * torch.eye(7, dtype=torch.float64), Xk1.T @ Y.double() / 500).T
    assert torch.allclose(W.double(), ref[:, :-1], atol=1e-5) and torch.allclose(b.double(), ref[:, -1], atol=1e-5)
    same = InputStats()
    same.add(X, dense=X)
    ref = InputStats()
    ref.add(X)
    for a, c in zip(least_squares(p, keep, same, True), least_squares(p, keep, ref, True)):
        assert torch.allclose(a, c, atol=1e-5)  # dense inputs equal to the pruned ones: the plain refit


@torch.no_grad()
def test_asymmetric_width_lowers_the_error(calib):
    dense = tiny("llama")
    ref = dense(input_ids=calib).logits
    errs = {}
    for asym in (False, True):
        m = copy.deepcopy(dense)
        method = STRUCTURE.build("width", {"target": "params=0.7", "importance": "activation", "sequential": True,
                                           "asymmetric": asym})
        trimformer.prune_(m, method, calibration=calib, progress=False)
        errs[asym] = (m(input_ids=calib).logits - ref).pow(2).mean().item()
    assert errs[True] < errs[False]
    with pytest.raises(ValueError, match="set sequential=True"):
        STRUCTURE.build("width", {"asymmetric": True})
