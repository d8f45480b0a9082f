"""SparseGPT / OBS: the closed-form optimum, better reconstruction than magnitude, exact N:M, real models."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import VOCAB, tiny

import trimformer
from trimformer import calibrate as calibrate_mod
from trimformer.weights import WEIGHTS
from trimformer.weights import sequential as sequential_mod
from trimformer.weights.masks import sparsity_of
from trimformer.weights.obs import inverse_cholesky, obs_prune
from trimformer.weights.sparsegpt import SparseGPT


def test_obs_matches_the_hand_computed_optimum():
    # w = [1, 1], H = [[2, 1], [1, 2]]: H^-1 = [[2, -1], [-1, 2]] / 3, its upper Cholesky factor has
    # diagonal (sqrt(2/3), sqrt(1/2)), so the OBS errors are 1/(2/3) = 1.5 for w0 and 1/(1/2) = 2 for w1:
    # w0 goes, and w1 moves by -w0 * H01 / H11 ... = +0.5 (delta = -w0/[H^-1]_00 * H^-1[:, 0]).
    W = torch.tensor([[1.0, 1.0]])
    H = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    out = obs_prune(W, inverse_cholesky(H, percdamp=0.0), sparsity=0.5)
    assert torch.allclose(out, torch.tensor([[0.0, 1.5]]), atol=1e-6)
    d = out - W
    assert torch.isclose(d @ H @ d.T, torch.tensor([[1.5]]), atol=1e-6)  # the OBS error w0^2 / [H^-1]_00


def test_obs_equals_least_squares_when_pruned_columns_come_first():
    # Sequential OBS is exact when every pruned weight precedes every kept one: compare with lstsq.
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 6, generator=g, dtype=torch.float64)
    H = X.T @ X
    w = torch.tensor([[0.1, -0.2, 0.15, 3.0, -2.5, 2.0]], dtype=torch.float64)  # small ones first
    out = obs_prune(w, inverse_cholesky(H, 0.0), sparsity=0.5)
    assert (out[0, :3] == 0).all() and (out[0, 3:] != 0).all()
    # optimum of ||X w^T - X_kept v^T||^2 over the kept columns
    v = torch.linalg.lstsq(X[:, 3:], X @ w[0], rcond=None).solution
    assert torch.allclose(out[0, 3:].double(), v, atol=1e-4)


def _recon_error(W_new: torch.Tensor, W: torch.Tensor, X: torch.Tensor) -> float:
    return (X @ (W_new - W).T).square().sum().item()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_beats_magnitude_on_layer_reconstruction(pattern):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated inputs
    W = torch.randn(32, 64, generator=g)
    H = X.T @ X
    nm = (2, 4) if pattern == "2:4" else None
    obs = obs_prune(W, inverse_cholesky(H, 0.01), sparsity=0.5, nm=nm, blocksize=16)
    mag = W * WEIGHTS.build("magnitude", {"pattern": pattern}).mask(W, None, 0.5)
    assert sparsity_of(obs) == pytest.approx(0.5) and sparsity_of(mag) == pytest.approx(0.5)
    assert _recon_error(obs, W, X) < 0.7 * _recon_error(mag, W, X)


def test_nm_mask_is_exact_in_every_group():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 32, generator=g)
    W = torch.randn(8, 32, generator=g)
    out = obs_prune(W, inverse_cholesky(X.T @ X, 0.01), nm=(2, 4), blocksize=8)
    assert ((out.reshape(8, 8, 4) != 0).sum(-1) == 2).all()


def test_row_segments_keep_their_own_sparsity():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 32, generator=g)
    W = torch.randn(24, 32, generator=g)
    out = obs_prune(W, inverse_cholesky(X.T @ X, 0.01), sparsity=[(0, 8, 0.25), (8, 24, 0.75)], blocksize=16)
    assert sparsity_of(out[:8]) == pytest.approx(0.25)
    assert sparsity_of(out[8:]) == pytest.approx(0.75)


def test_singular_hessian_gets_more_damping_and_says_so(caplog):
    H = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # rank 1 (two identical inputs): no Cholesky without damping
    with caplog.at_level(logging.WARNING, logger="trimformer.weights"):
        U = inverse_cholesky(H, percdamp=0.0)
    assert torch.isfinite(U).all()
    assert "not positive definite" in caplog.text


def _damped(H: torch.Tensor, share: float) -> torch.Tensor:
    return H + share * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)


def test_one_factorisation_gives_the_same_inverse_factor_and_solves_the_refit():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(200, 16, generator=g, dtype=torch.float64)
    H, R0 = X.T @ X, torch.randn(5, 16, generator=g, dtype=torch.float64)
    R = R0.clone()
    U = inverse_cholesky(H, 0.01, refit=R)
    assert torch.equal(U, inverse_cholesky(H, 0.01))  # the refit's solve does not touch the factor
    assert torch.allclose(U.T @ U, torch.linalg.inv(_damped(H, 0.01)), atol=1e-12)
    assert torch.allclose(R, R0 @ torch.linalg.inv(_damped(H, 0.01)), atol=1e-12)


def test_refit_is_solved_with_the_damping_that_factorised_h(caplog):
    g = torch.Generator().manual_seed(4)
    Q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    eig = torch.linspace(1.0, 10.0, 12, dtype=torch.float64)
    eig[0] = -1e-6  # indefinite: no Cholesky undamped, one with 1e-4 of the mean diagonal (~5.5e-4)
    H, R0 = Q @ torch.diag(eig) @ Q.T, torch.randn(3, 12, generator=g, dtype=torch.float64)
    R = R0.clone()
    with caplog.at_level(logging.WARNING, logger="trimformer.weights"):
        U = inverse_cholesky(H, 0.0, refit=R)
    assert "retrying with 1e-04" in caplog.text
    assert torch.allclose(U.T @ U, torch.linalg.inv(_damped(H, 1e-4)), rtol=1e-8, atol=1e-10)
    assert torch.allclose(R, R0 @ torch.linalg.inv(_damped(H, 1e-4)), rtol=1e-8, atol=1e-10)


def test_inverse_factor_failing_alone_redoes_only_the_inverse(caplog, monkeypatch):
    g = torch.Generator().manual_seed(5)
    X = torch.randn(100, 10, generator=g, dtype=torch.float64)
    H, R0 = X.T @ X, torch.randn(4, 10, generator=g, dtype=torch.float64)
    real, calls = torch.linalg.cholesky_ex, []

    def first_upper_fails(A, *, upper=False, out=None, **kw):
        res = real(A, upper=upper, out=out, **kw)
        calls.append(upper)
        if upper and calls.count(True) == 1:
            out[1].fill_(1)  # as if (H + damp)^-1 had lost definiteness in rounding
        return res

    monkeypatch.setattr(torch.linalg, "cholesky_ex", first_upper_fails)
    R = R0.clone()
    with caplog.at_level(logging.WARNING, logger="trimformer.weights"):
        U = inverse_cholesky(H, 0.01, refit=R)
    assert calls == [False, True, False, True] and "inverse Hessian not positive definite" in caplog.text
    assert torch.allclose(U.T @ U, torch.linalg.inv(_damped(H, 0.1)), atol=1e-12)  # redone with 10x the damping
    assert torch.allclose(R, R0 @ torch.linalg.inv(_damped(H, 0.01)), atol=1e-12)  # the refit kept the first


def test_dead_inputs_do_not_break_the_solve():
    X = torch.randn(64, 8)
    X[:, 3] = 0  # an input channel that is always zero
    U = inverse_cholesky(X.T @ X, 0.01)
    assert torch.isfinite(U).all()


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "bert"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_on_models_reaches_the_target(family, pattern, calib):
    model = tiny(family)
    trimformer.prune_(model, WEIGHTS.build("sparsegpt", {"pattern": pattern, "blocksize": 32}), calibration=calib,
                      progress=False)
    result = model.trimformer_history[-1]["result"]
    assert result and all(s == pytest.approx(0.5, abs=1e-3) for s in result.values())


def test_true_sequential_and_one_pass_give_lower_output_error_than_wanda():
    g = torch.Generator().manual_seed(5)
    calib = torch.randint(3, 128, (16, 64), generator=g)  # 1024 tokens: Hessians of full rank
    x = torch.randint(3, 128, (2, 32), generator=g)  # held out
    dense = tiny("llama")
    ref = dense(input_ids=x).logits
    errs = {}
    for name, settings in [("wanda", {}), ("sparsegpt", {}), ("sparsegpt", {"true_sequential": False})]:
        m = tiny("llama")
        trimformer.prune_(m, WEIGHTS.build(name, {"sparsity": 0.5, **settings}), calibration=calib, progress=False)
        errs[f"{name}{settings}"] = (m(input_ids=x).logits - ref).square().mean().item()
    assert errs["sparsegpt{}"] < errs["wanda{}"]
    assert errs["sparsegpt{'true_sequential': False}"] < errs["wanda{}"]


def test_refit_to_dense_is_the_least_squares_fit_of_the_dense_outputs():
    from trimformer.weights.sparsegpt import refit_to_dense

    g = torch.Generator().manual_seed(0)
    X = torch.randn(400, 12, generator=g, dtype=torch.float64)  # the pruned model's inputs
    Xd = X + 0.3 * torch.randn(400, 12, generator=g, dtype=torch.float64)  # the dense model's inputs
    W = torch.randn(5, 12, generator=g, dtype=torch.float64)
    H, C = X.T @ X, Xd.T @ X
    V = refit_to_dense(W, H, C, percdamp=0.0)
    assert torch.allclose((Xd @ W.T - X @ V.T).T @ X, torch.zeros(5, 12, dtype=torch.float64), atol=1e-8)  # normal eqs
    assert torch.allclose(refit_to_dense(W, H, H, percdamp=0.01), W, atol=1e-12)  # same inputs: nothing to correct


def test_dense_stream_carries_the_dense_models_block_inputs(calib):
    from trimformer import calibrate

    dense = tiny("llama")
    with torch.no_grad():
        hidden = [dense(input_ids=w[None], output_hidden_states=True).hidden_states for w in calib]
    model = tiny("llama")
    anatomy = trimformer.anatomy_of(model)
    for i, bc in enumerate(calibrate.blocks(anatomy, calib, progress=False, dense_targets=True)):
        for b, x in enumerate(bc.dense_inputs):
            assert torch.allclose(x, hidden[b][i], atol=1e-5)
        assert i == 0 or not torch.allclose(bc.inputs[0], bc.dense_inputs[0])  # the pruned stream differs
        for _, p in bc.block.projections().items():
            p.weight.data.mul_(0.5)  # "prune" the block: its copy and the dense stream stay as they were


def test_asymmetric_sparsegpt_reaches_the_target_with_lower_error():
    g = torch.Generator().manual_seed(5)
    calib = torch.randint(3, 128, (16, 64), generator=g)
    x = torch.randint(3, 128, (2, 32), generator=g)  # held out
    ref = tiny("llama")(input_ids=x).logits
    errs = {}
    for asym in (False, True):
        m = tiny("llama")
        trimformer.prune_(m, WEIGHTS.build("sparsegpt", {"sparsity": 0.6, "asymmetric": asym}), calibration=calib,
                          progress=False)
        assert all(s == pytest.approx(0.6, abs=1e-3) for s in m.trimformer_history[-1]["result"].values())
        errs[asym] = (m(input_ids=x).logits - ref).square().mean().item()
    assert errs[True] < errs[False]


@pytest.mark.parametrize("refit, refit_damp", [(1.0, None), (0.5, None), (1.0, 0.5), (0.25, 0.1)])
def test_refit_strength_and_damping_give_exactly_the_ridge_refit(refit, refit_damp):
    # with nothing to prune, SparseGPT's solve returns the refitted weights: W + refit * W (C - H)(H + d)^-1,
    # d the refit's own damping (percdamp when None)
    from trimformer.models import Proj
    from trimformer.weights.sparsegpt import SparseGPT

    g = torch.Generator().manual_seed(6)
    X = torch.randn(300, 12, generator=g)
    Xd = X + 0.3 * torch.randn(300, 12, generator=g)
    lin = torch.nn.Linear(12, 20, bias=False)  # more outputs than inputs: the C path
    W = lin.weight.detach().clone()
    H, C = X.T @ X, Xd.T @ X
    sg = SparseGPT(sparsity=0.0, percdamp=0.01, refit=refit, refit_damp=refit_damp)
    sg.solve([Proj(lin, "q")], [H.clone(), C.clone(), None])
    d = 0.01 if refit_damp is None else refit_damp
    expected = W + refit * (W @ (C - H)) @ torch.linalg.inv(_damped(H, d))
    assert torch.allclose(lin.weight.detach(), expected, atol=1e-5)
    assert not torch.allclose(expected, W, atol=1e-3)  # the refit is not negligible here


def test_refit_zero_is_the_plain_sparsegpt(calib):
    out = {}
    for name, settings in {"plain": {"asymmetric": False}, "zero": {"refit": 0.0},
                           "half": {"refit": 0.5, "refit_min_tokens": 0}}.items():
        m = tiny("llama")
        trimformer.prune_(m, WEIGHTS.build("sparsegpt", {"sparsity": 0.5, **settings}), calibration=calib,
                          progress=False)
        out[name] = m.state_dict()
    assert all(torch.equal(out["plain"][k], out["zero"][k]) for k in out["plain"])  # and no dense stream is run
    assert not all(torch.equal(out["plain"][k], out["half"][k]) for k in out["plain"])


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="asymmetric needs true_sequential"):
        WEIGHTS.build("sparsegpt", {"asymmetric": True, "true_sequential": False})
    with pytest.raises(ValueError, match="percdamp"):
        WEIGHTS.build("sparsegpt", {"percdamp": -1})
    with pytest.raises(ValueError, match="refit is the refit's strength"):
        WEIGHTS.build("sparsegpt", {"refit": 1.5})
    with pytest.raises(ValueError, match="refit_damp"):
        WEIGHTS.build("sparsegpt", {"refit_damp": 0.0})
    with pytest.raises(ValueError, match="blocksize"):
        WEIGHTS.build("sparsegpt", {"pattern": "2:4", "blocksize": 6})


def test_refit_only_where_the_calibration_has_enough_tokens_per_input_column(monkeypatch):
    """1,280 tokens: 20 per column of the 64-wide inputs (q/k/v, o, gate/up: refitted at refit_min_tokens=16),
    10 per column of down_proj's 128 (not refitted, and its dense statistics never summed); with 4 x 32 tokens nothing qualifies: no dense stream at all,
    and the result is the plain SparseGPT's."""
    got = []
    real = SparseGPT.solve
    monkeypatch.setattr(SparseGPT, "solve", lambda self, projs, stats: got.append(
        (projs[0].name.split(".")[-1], stats[1] is not None or stats[2] is not None)) or real(self, projs, stats))
    residuals = []  # the shapes of the W (C - H) sums: o_proj's (64, 64), never down_proj's (64, 128)
    real_residual = sequential_mod._residual
    monkeypatch.setattr(sequential_mod, "_residual", lambda W, *a: residuals.append(tuple(W.shape)) or real_residual(W, *a))
    calib = torch.randint(3, VOCAB, (32, 40), generator=torch.Generator().manual_seed(2))
    filtered = tiny("llama")
    trimformer.prune_(filtered, WEIGHTS.build("sparsegpt", {"sparsity": 0.5}), calibration=calib, progress=False)
    assert dict(got[:4]) == {"q_proj": True, "o_proj": True, "gate_proj": True, "down_proj": False}
    assert set(residuals) == {(64, 64)}
    # summing down_proj's dense statistics and then dropping them (the block's token count unknown) changes nothing
    real_init = calibrate_mod.BlockCalib.__post_init__
    monkeypatch.setattr(calibrate_mod.BlockCalib, "__post_init__",
                        lambda self: (real_init(self), setattr(self, "tokens", None))[0])
    unfiltered = tiny("llama")
    trimformer.prune_(unfiltered, WEIGHTS.build("sparsegpt", {"sparsity": 0.5}), calibration=calib, progress=False)
    assert (64, 128) in residuals
    assert all(torch.equal(v, unfiltered.state_dict()[k]) for k, v in filtered.state_dict().items())
    monkeypatch.setattr(calibrate_mod.BlockCalib, "__post_init__", real_init)

    streams = []
    real_blocks = calibrate_mod.blocks
    monkeypatch.setattr(calibrate_mod, "blocks", lambda *a, **k: streams.append(k["dense_targets"]) or real_blocks(*a, **k))
    out = {}
    for name, settings in {"default": {}, "plain": {"asymmetric": False}}.items():
        m = tiny("llama")
        trimformer.prune_(m, WEIGHTS.build("sparsegpt", {"sparsity": 0.5, **settings}), calibration=calib[:4, :32],
                          progress=False)
        out[name] = m.state_dict()
    assert streams == [False, False]
    assert all(torch.equal(out["plain"][k], out["default"][k]) for k in out["plain"])
    with pytest.raises(ValueError, match="refit_min_tokens"):
        WEIGHTS.build("sparsegpt", {"refit_min_tokens": -1})


def test_refit_layers_outputs_refits_only_o_and_down(monkeypatch):
    """refit_layers='outputs': o_proj and down_proj get the dense statistics and the refit; q/k/v and gate/up are
    the plain SparseGPT's (no C summed for them); any other value is named."""
    got = []
    real = SparseGPT.solve
    monkeypatch.setattr(SparseGPT, "solve", lambda self, projs, stats: got.append(
        (projs[0].name.split(".")[-1], stats[1] is not None or stats[2] is not None)) or real(self, projs, stats))
    calib = torch.randint(3, VOCAB, (32, 40), generator=torch.Generator().manual_seed(2))
    model = tiny("llama")
    trimformer.prune_(model, WEIGHTS.build("sparsegpt", {"sparsity": 0.5, "refit_layers": "outputs",
                                                         "refit_min_tokens": 0}), calibration=calib, progress=False)
    assert dict(got[:4]) == {"q_proj": False, "o_proj": True, "gate_proj": False, "down_proj": True}
    assert sparsity_of(model.model.layers[0].self_attn.q_proj.weight) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="refit_layers is 'all' or 'outputs'"):
        WEIGHTS.build("sparsegpt", {"refit_layers": "mlp"})
