"""PQ Index: hand-computable values, monotone under pruning, model aggregate, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny

import trimformer
from trimformer.cli import main
from trimformer.export.hf import save_pretrained
from trimformer.weights import WEIGHTS
from trimformer.weights.metrics import analyze, pq_index


def test_pq_index_hand_values():
    d = 16
    assert pq_index(torch.full((d,), 3.0)) == pytest.approx(0.0, abs=1e-12)  # equal magnitudes
    one_hot = torch.zeros(d)
    one_hot[5] = -2.0
    assert pq_index(one_hot) == pytest.approx(1 - 1 / d)  # p=0.5, q=1: 1 - d^(1-2) * |a| / |a|
    half = torch.tensor([1.0, 1.0, 0.0, 0.0])  # ||.||_0.5 = 4, ||.||_1 = 2: 1 - 4^-1 * 4 / 2 = 0.5
    assert pq_index(half) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="0 < p < q"):
        pq_index(half, p=1.0, q=0.5)


def test_pruning_raises_pq_index_and_model_value_aggregates():
    model = tiny("llama")
    before = analyze(model)
    trimformer.prune_(model, WEIGHTS.build("magnitude", {"sparsity": 0.7}), progress=False)
    after = analyze(model)
    assert after["model"]["pq_index"] > before["model"]["pq_index"]
    assert all(a["pq_index"] > b["pq_index"] for a, b in zip(after["layers"], before["layers"]))
    assert after["model"]["sparsity"] == pytest.approx(0.7, abs=1e-3)
    W = torch.cat([p.weight.flatten() for _, p in trimformer.anatomy_of(model).projections()])
    assert after["model"]["pq_index"] == pytest.approx(pq_index(W), rel=1e-9)


def test_cli_analyze_json(tmp_path, capsys):
    model = tiny("llama")
    save_pretrained(model, tmp_path / "m")
    assert main(["--quiet", "analyze", str(tmp_path / "m"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert len(r["layers"]) == 14 and 0 <= r["model"]["pq_index"] < 1
