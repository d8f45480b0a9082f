"""`recover` as a recipe step: prune -> recover, interleaved cycles, from the API and `trimformer prune --recipe`."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from conftest import VOCAB, tiny
from test_recover import windows
from test_recover_cli import tiny_tokenizer

import trimformer
from trimformer import cli
from trimformer.methods import Recipe
from trimformer.steps import StepContext


def test_interleaved_prune_recover_recipe_heals_from_the_dense_model():
    model = tiny("llama")
    dense = copy.deepcopy(model)
    recipe = Recipe.from_obj([
        {"method": "wanda", "sparsity": 0.25},
        {"method": "recover", "steps": 2, "batch_size": 2, "lr": 1e-2, "warmup_steps": 0, "teacher": "dense"},
        {"method": "wanda", "sparsity": 0.5},
        {"method": "recover", "steps": 2, "batch_size": 2, "lr": 1e-2, "warmup_steps": 0},
    ])
    only_pruned = copy.deepcopy(model)
    trimformer.prune_(only_pruned, Recipe.from_obj([{"method": "wanda", "sparsity": 0.25}]), calibration=windows(),
                      progress=False)
    trimformer.prune_(model, recipe, calibration=windows(), progress=False)
    assert [h["method"] for h in model.trimformer_history] == ["wanda", "recover", "wanda", "recover"]
    first = model.trimformer_history[1]["result"]
    # its first loss is KL(dense || 25 %-pruned model): the teacher is the model before the recipe
    from trimformer.recover import RecoverConfig, recover_

    probe = copy.deepcopy(only_pruned)
    recover_(probe, dense, windows(), RecoverConfig(steps=1, batch_size=2, lr=1e-2, warmup_steps=0), progress=False)
    assert first["losses"][0] == pytest.approx(probe.trimformer_history[-1]["result"]["losses"][0], rel=1e-6)
    final = model.trimformer_history[3]["result"]["sparsity"]
    assert len(final) == 14 and all(abs(v - 0.5) < 1e-6 for v in final.values())
    assert all(torch.equal(a, b) for a, b in zip(dense.parameters(), tiny("llama").parameters()))


def test_recover_step_settings_are_checked_when_the_recipe_is_read():
    with pytest.raises(ValueError, match="lora_rank"):
        Recipe.from_obj([{"method": "recover", "lora_rank": -1}])
    with pytest.raises(ValueError, match="Did you mean 'teacher'"):
        Recipe.from_obj([{"method": "recover", "teachr": "dense"}])
    step = Recipe.from_obj([{"method": "recover", "teacher": "dense"}]).build()[0]
    with pytest.raises(ValueError, match="before the recipe"):
        step.apply_(trimformer.anatomy_of(tiny("llama")), StepContext(calibration=windows()))


def test_cli_prune_recipe_with_a_recover_step(tmp_path):
    tiny("llama").save_pretrained(tmp_path / "dense")
    tiny_tokenizer().save_pretrained(tmp_path / "dense")
    rng = random.Random(0)
    (tmp_path / "calib.txt").write_text(" ".join(f"w{rng.randrange(1, VOCAB)}" for _ in range(400)))
    (tmp_path / "r.yaml").write_text(
        "steps:\n"
        "  - {method: magnitude, sparsity: 0.5}\n"
        "  - {method: recover, steps: 2, batch_size: 2, lr: 0.01, warmup_steps: 0, teacher: dense}\n"
    )
    argv = ["-q", "prune", "--model", str(tmp_path / "dense"), "--recipe", str(tmp_path / "r.yaml"), "--calib",
            str(tmp_path / "calib.txt"), "--calib-windows", "4", "--calib-length", "16", "--no-eval",
            "--out", str(tmp_path / "healed")]
    assert cli.main(argv) == 0
    healed = trimformer.load(tmp_path / "healed")
    magnitude = trimformer.prune_(trimformer.load(tmp_path / "dense"), trimformer.build("magnitude", {"sparsity": 0.5}),
                                  progress=False)
    up = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(healed.get_parameter(up) == 0, magnitude.get_parameter(up) == 0)  # the cut is kept
    assert not torch.equal(healed.get_parameter(up), magnitude.get_parameter(up))  # and healed
    meta = json.loads((tmp_path / "healed" / "trimformer.json").read_text())
    assert [s["method"] for s in meta["recipe"]] == ["magnitude", "recover"]
    assert len(meta["history"][1]["result"]["losses"]) == 2
