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
def test_asymmetric_refit_fits_the_output_plus_the_block_error():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(500, 10, generator=g)  # inputs to `down`
    err = 0.3 * torch.randn(500, 4, generator=g)  # dense block output - this block's output, per token
    lin = torch.nn.Linear(10, 4, bias=True)
    p = trimformer.models.Proj(lin, "down")
    keep = torch.tensor([0, 2, 3, 5, 7, 9])
    st = InputStats()
    st.add(X, error=err)
    W, b = least_squares(p, keep, st, bias=True)
    Y = X @ lin.weight.T + lin.bias + err  # (tokens, out): the output that would close the block's error
    Xk1 = torch.cat([X[:, keep], torch.ones(500, 1)], 1).double()  # kept inputs and a constant
    ridge = LS_DAMP * (Xk1.T @ Xk1 / 500).diagonal().mean()  # the refit's ridge, relative to the kept input energy
    ref = torch.linalg.solve(Xk1.T @ Xk1 / 500 + ridge * torch.eye(7, dtype=torch.float64), Xk1.T @ Y.double() / 500).T
    assert torch.allclose(W.double(), ref[:, :-1], atol=1e-5) and torch.allclose(b.double(), ref[:, -1], atol=1e-5)
    zero, plain = InputStats(), InputStats()
    zero.add(X, error=torch.zeros(500, 4))
    plain.add(X)
    for a, c in zip(least_squares(p, keep, zero, True), least_squares(p, keep, plain, True)):
        assert torch.allclose(a, c, atol=1e-6)  # no error to close: the plain refit


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
