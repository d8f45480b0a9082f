"""Magnitude and Wanda: exact sparsity, exact N:M, no-op at 0, determinism, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import TEXT_FAMILIES, tiny

import trimformer
from trimformer.models import anatomy_of
from trimformer.weights.masks import nm_mask, parse_pattern, topk_mask


def _logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("family", TEXT_FAMILIES)
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_sparsity_is_exact_per_layer(family, method, calib):
    model = tiny(family)
    trimformer.prune_(model, trimformer.build(method, {"sparsity": 0.5}), calibration=calib, progress=False)
    for name, p in anatomy_of(model).projections():
        W = p.weight
        if method == "wanda":  # compared within each row: exactly half of every row
            assert (W == 0).sum(1).tolist() == [W.shape[1] // 2] * W.shape[0], name
        else:
            assert (W == 0).sum().item() == W.numel() // 2, name


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "bert"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_masks_are_exactly_nm(family, pattern, calib):
    n, m = parse_pattern(pattern)
    model = tiny(family)
    trimformer.prune_(model, trimformer.build("wanda", {"pattern": pattern}), calibration=calib, progress=False)
    for name, p in anatomy_of(model).projections():
        groups = (p.weight != 0).reshape(p.weight.shape[0], -1, m)  # (out, in/m, m)
        assert (groups.sum(-1) <= n).all(), name
        assert groups.sum().item() >= 0.99 * p.weight.numel() * n / m, name  # random weights are never exactly 0


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_sparsity_zero_changes_no_logit(family, method, calib, ids):
    model = tiny(family)
    before = _logits(model, ids)
    trimformer.prune_(model, trimformer.build(method, {"sparsity": 0.0}), calibration=calib, progress=False)
    assert torch.equal(before, _logits(model, ids))


def test_wanda_is_deterministic_and_uses_activations(calib):
    a, b = tiny("llama"), tiny("llama")
    trimformer.prune_(a, trimformer.build("wanda", {"sparsity": 0.5}), calibration=calib, progress=False)
    trimformer.prune_(b, trimformer.build("wanda", {"sparsity": 0.5}), calibration=calib, progress=False)
    for (_, pa), (_, pb) in zip(anatomy_of(a).projections(), anatomy_of(b).projections()):
        assert torch.equal(pa.weight, pb.weight)
    c = tiny("llama")
    trimformer.prune_(c, trimformer.build("magnitude", {"sparsity": 0.5}), progress=False)
    masks_differ = any(
        not torch.equal(pa.weight != 0, pc.weight != 0)
        for (_, pa), (_, pc) in zip(anatomy_of(a).projections(), anatomy_of(c).projections())
    )
    assert masks_differ


def test_wanda_matches_naive_reference():
    torch.manual_seed(0)
    W, X = torch.randn(6, 8), torch.randn(50, 8)
    score = W.abs() * X.norm(dim=0)[None]
    keep = torch.zeros_like(W, dtype=torch.bool)
    for r in range(6):  # naive: per row keep the 4 highest scores
        keep[r, score[r].argsort(descending=True)[:4]] = True
    assert torch.equal(topk_mask(score, 0.5, per_row=True), keep)


def test_nm_mask_keeps_the_largest_in_each_group():
    s = torch.tensor([[1.0, 4.0, 2.0, 3.0, 8.0, 5.0, 7.0, 6.0]])
    assert nm_mask(s, 2, 4).int().tolist() == [[0, 1, 0, 1, 1, 0, 1, 0]]


def test_targets_restrict_the_projections(calib):
    model = tiny("llama")
    trimformer.prune_(model, trimformer.build("magnitude", {"sparsity": 0.5, "targets": "mlp"}), progress=False)
    for name, p in anatomy_of(model).projections():
        assert ((p.weight == 0).float().mean().item() == 0.5) == (".mlp." in name), name


def test_filter_fn_excludes_layers(calib):
    model = tiny("llama")
    trimformer.prune_(model, trimformer.build("wanda", {"sparsity": 0.5}), calibration=calib, progress=False,
                      filter_fn=lambda mod, name: "layers.0." in name)
    a = anatomy_of(model)
    assert (a.blocks[0].mlp.up.weight == 0).any()
    assert not (a.blocks[1].mlp.up.weight == 0).any()


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "1.2"])
def test_bad_sparsity_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="sparsity must be in"):
        trimformer.build("wanda", {"sparsity": bad})


def test_non_numeric_setting_is_a_clear_error():
    with pytest.raises(ValueError, match="sparsity='half': expected a number"):
        trimformer.build("wanda", {"sparsity": "half"})


@pytest.mark.parametrize("pattern", ["4:4", "5:4", "0:4", "2-4", "2:"])
def test_bad_pattern_is_a_clear_error(pattern):
    with pytest.raises(ValueError, match="pattern"):
        trimformer.build("magnitude", {"pattern": pattern})


def test_unknown_method_suggests_close_names():
    with pytest.raises(KeyError, match="Did you mean 'wanda'"):
        trimformer.build("wandaa")


def test_unknown_setting_is_named():
    with pytest.raises(ValueError, match="no setting 'sparsty'.*Did you mean 'sparsity'"):
        trimformer.build("wanda", {"sparsty": 0.5})


def test_wanda_without_calibration_is_a_clear_error():
    with pytest.raises(ValueError, match="needs calibration windows"):
        trimformer.prune_(tiny("llama"), trimformer.build("wanda"), progress=False)
