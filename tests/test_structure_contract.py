"""The contract every registered structured method meets (iterates the STRUCTURE registry: a new method is in).

On tiny llama and qwen2 models: it meets each budget it takes, a budget that removes nothing is a no-op, it is
deterministic, the model still runs and reloads with the same logits through the export path, and filter_fn is
asked about the modules the method declares and honoured (a rejected block stays as it was).
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import tiny

import trimformer
from trimformer.export import save
from trimformer.models import anatomy_of, count_parameters
from trimformer.structure import STRUCTURE
from trimformer.structure.costs import matmul_params

METHODS = STRUCTURE.names()
FAMILIES = ["llama", "qwen2"]
BUDGETS = {"params": "params=0.85", "flops": "flops=0.85", "compute": "compute=0.3", "remove": "remove=1"}
NOTHING = {"params": "params=1.0", "flops": "flops=1.0", "compute": "compute=0", "remove": "remove=0",
           "latency": "latency=1.0"}
MODULE_NAMES = {"block": r"model\.layers\.\d+", "attn": r"model\.layers\.\d+\.self_attn",
                "mlp": r"model\.layers\.\d+\.mlp", "attn.o": r".*\.o_proj", "mlp.down": r".*\.down_proj"}


def _kinds(name: str) -> list[str]:
    return [k for k in STRUCTURE.get(name).budgets if k != "latency"]  # latency is measured: not deterministic


def _run(model, name, calib, target, filter_fn=None):
    method = trimformer.build(name, {"target": target})
    return trimformer.prune_(model, method, calibration=calib[:2], filter_fn=filter_fn,  # 2 windows: fast
                             progress=False).trimformer_history[-1]["result"]


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids).logits


def _check_budget(kind: str, res: dict, model, n0: int, f0: float) -> None:
    value = float(BUDGETS[kind].split("=")[1])
    assert res["budget"] == BUDGETS[kind]
    if kind == "params":
        assert count_parameters(model) / n0 == res["spent"] <= value + 1e-9
    elif kind == "flops":
        assert matmul_params(anatomy_of(model)) / f0 == pytest.approx(res["spent"]) and res["spent"] <= value + 1e-9
    elif kind == "compute":
        assert 0 < res["spent"] <= value + 1e-9
    else:
        assert res["spent"] == value
    assert count_parameters(model) < n0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", METHODS)
def test_meets_its_budget_deterministically_runs_and_reloads(name, family, calib, tmp_path):
    dense = tiny(family)
    n0, f0 = count_parameters(dense), matmul_params(anatomy_of(dense))
    kind = _kinds(name)[0]
    (a, ra), (b, rb) = [(m, _run(m, name, calib, BUDGETS[kind])) for m in (copy.deepcopy(dense), copy.deepcopy(dense))]
    _check_budget(kind, ra, a, n0, f0)
    assert ra == rb  # deterministic: the same record and the same weights
    assert [(k, v.shape) for k, v in a.state_dict().items()] == [(k, v.shape) for k, v in b.state_dict().items()]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.isfinite(_logits(a, calib)).all()
    assert a.generate(calib[:1, :8], max_new_tokens=3, do_sample=False).shape == (1, 11)
    save(a, tmp_path / "m")
    again = trimformer.load(str(tmp_path / "m"))
    torch.testing.assert_close(_logits(again, calib), _logits(a, calib), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name,kind", [(n, k) for n in METHODS for k in _kinds(n)[1:]])
def test_meets_every_other_budget_it_takes(name, kind, family, calib):
    model = tiny(family)
    n0, f0 = count_parameters(model), matmul_params(anatomy_of(model))
    _check_budget(kind, _run(model, name, calib, BUDGETS[kind]), model, n0, f0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", METHODS)
def test_a_budget_that_removes_nothing_is_a_no_op(name, family, calib):
    model = tiny(family)
    dense = copy.deepcopy(model)
    for kind in STRUCTURE.get(name).budgets:
        res = _run(model, name, calib, NOTHING[kind])
        assert res["kept"] == 1.0
        assert torch.equal(_logits(model, calib), _logits(dense, calib))
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), dense.state_dict().values()))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", METHODS)
def test_filter_fn_is_asked_about_its_modules_and_honoured(name, family, calib):
    cls = STRUCTURE.get(name)
    dense = tiny(family)
    model = copy.deepcopy(dense)
    asked = []

    def spare_block_0(module, mname):  # reject everything of block 0
        asked.append(mname)
        return not mname.startswith("model.layers.0")

    res = _run(model, name, calib, BUDGETS[_kinds(name)[0]], filter_fn=spare_block_0)
    expected = "|".join(MODULE_NAMES[p] for p in cls.filter_on)
    assert asked and all(re.fullmatch(expected, n) for n in asked), (cls.filter_on, sorted(set(asked)))
    assert count_parameters(model) < count_parameters(dense)  # the budget was met elsewhere
    assert res["spent"] is not None
    kept0 = model.model.layers[0].state_dict()
    assert kept0.keys() == dense.model.layers[0].state_dict().keys()
    assert all(torch.equal(v, dense.model.layers[0].state_dict()[k]) for k, v in kept0.items())
    with pytest.raises(ValueError, match="filter_fn rejects every module"):
        _run(copy.deepcopy(dense), name, calib, BUDGETS[_kinds(name)[0]], filter_fn=lambda _m, _n: False)


@pytest.mark.parametrize("name", METHODS)
def test_settings_round_trip_through_a_recipe(name):
    from trimformer.methods import Recipe

    target = BUDGETS[_kinds(name)[0]]
    recipe = Recipe.one(name, target=target)
    rows = recipe.to_list()
    assert rows[0]["target"] == target  # the budget serialises as its text
    again = Recipe.from_obj(rows)
    assert again.to_list() == rows and again.build()[0].budget == recipe.build()[0].budget


@pytest.mark.parametrize("name", METHODS)
def test_a_budget_of_the_wrong_kind_names_the_kinds_it_takes(name):
    cls = STRUCTURE.get(name)
    other = next(k for k in NOTHING if k not in cls.budgets)
    with pytest.raises(ValueError) as e:
        trimformer.build(name, {"target": NOTHING[other]})
    from trimformer.structure.budget import SYNTAX

    assert name in str(e.value) and all(SYNTAX[k] in str(e.value) for k in cls.budgets)
