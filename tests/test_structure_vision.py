"""Width cuts, 2:4 weight cuts and feature distillation on a ViT calibrated with images (tiny random DINOv2)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import tiny

import trimformer
from trimformer.export import structured as export
from trimformer.models import anatomy_of, count_parameters
from trimformer.recover import FeatureDistillConfig, distill_features_
from trimformer.structure.width import Width


def _images(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))  # (n, 3, H, W)


@torch.no_grad()
def _features(model, px):
    return model(pixel_values=px).last_hidden_state


def _width(**over) -> Width:
    return trimformer.build("width", {"parts": ["ffn", "heads"], "importance": "fisher", "allocation": "global",
                                      "target": "params=0.75", **over})


_VANILLA = """
import sys, torch, transformers
m = transformers.AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
with torch.no_grad():
    torch.save(m(pixel_values=torch.load(sys.argv[2])).last_hidden_state, sys.argv[3])
assert not any(k.startswith("trimformer") for k in sys.modules), "trimformer was imported"
"""


def vanilla_features(model, px: torch.Tensor, tmp_path) -> torch.Tensor:
    """Export `model` to tmp_path/m and return its features on `px` from a process without trimformer."""
    export.save(model, tmp_path / "m")
    torch.save(px, tmp_path / "px.pt")
    env = {"PYTHONPATH": "", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", _VANILLA, str(tmp_path / "m"), str(tmp_path / "px.pt"),
                    str(tmp_path / "out.pt")], check=True, env=env, cwd=tmp_path)
    return torch.load(tmp_path / "out.pt")


def test_global_fisher_cut_is_smaller_and_reloads_in_vanilla_transformers(tmp_path):
    model = tiny("dinov2")
    before = count_parameters(model)
    trimformer.prune_(model, _width(), calibration=_images(), batch_size=4, progress=False)
    res = model.trimformer_history[-1]["result"]
    an = anatomy_of(model)
    assert count_parameters(model) <= 0.75 * before
    shapes = [(b.mlp.intermediate_size, b.attention.num_heads) for b in an.blocks]
    assert shapes == [(f, h) for f, h in zip(res["ffn"], res["head_units"])]
    assert any(f < 128 or h < 4 for f, h in shapes)
    assert an.blocks[0].attention.q.weight.shape[0] == 16 * an.blocks[0].attention.num_heads  # physically smaller
    px = _images(2, seed=5)
    want = _features(model, px)
    assert torch.equal(vanilla_features(model, px, tmp_path), want)
    assert torch.equal(_features(trimformer.load(tmp_path / "m"), px), want)  # and through trimformer


@torch.no_grad()
def _plant_dead(model, heads: dict[int, int], neurons: dict[int, list[int]]) -> None:
    """Zero one head's o_proj columns and some neurons' fc2 columns: they add nothing to the output."""
    an = anatomy_of(model)
    for i, h in heads.items():
        a = an.blocks[i].attention
        a.o.weight[:, h * a.head_dim:(h + 1) * a.head_dim] = 0
    for i, ns in neurons.items():
        an.blocks[i].mlp.down.weight[:, ns] = 0


def test_units_with_zero_importance_go_first_and_change_nothing():
    model = tiny("dinov2")
    dead = {0: list(range(0, 128, 4)), 1: list(range(1, 128, 4))}  # 32 neurons per block
    _plant_dead(model, {0: 2, 1: 1}, dead)
    px = _images(4, seed=7)
    want = _features(model, px)
    an = anatomy_of(model)
    cut = _width(compensate=False)
    st = cut._feature_gradient_statistics(an, _images(), 4, progress=False)
    sc = [cut._block_scores(b, s) for b, s in zip(an.blocks, st)]
    assert sc[0]["heads"][0, 2] == 0 and sc[1]["heads"][0, 1] == 0
    assert all(bool((sc[i]["ffn"][ns] == 0).all()) and bool(sc[i]["ffn"].sum() > 0) for i, ns in dead.items())
    # exactly the dead units' parameters: the plan removes them and nothing else
    target = (count_parameters(model) - 2 * 32 * (64 + 1 + 64) - 2 * 4 * 64 * 16) / count_parameters(model)
    trimformer.prune_(model, _width(compensate=False, target=f"params={target + 1e-6}"), calibration=_images(),
                      batch_size=4, progress=False)
    res = model.trimformer_history[-1]["result"]
    assert res["ffn"] == [96, 96] and res["head_units"] == [3, 3]
    torch.testing.assert_close(_features(model, px), want, atol=1e-5, rtol=1e-5)  # (layer scales folded: rounding)


def test_attention_flops_make_heads_dearer_and_report_the_share():
    model = tiny("dinov2")
    trimformer.prune_(model, _width(target="flops=0.7", attention_flops=True), calibration=_images(), batch_size=4,
                      progress=False)
    res = model.trimformer_history[-1]["result"]
    assert res["attention_tokens"] == 17  # 4 x 4 patches of 8 px + [CLS]
    assert 0.6 < res["spent"] <= 0.7 + 1e-9
    cut = _width(target="flops=0.7", attention_flops=True)
    cut._tokens = 17
    an = anatomy_of(tiny("dinov2"))
    _, _, slot = cut._costs(an)
    assert slot[0] == 4 * 64 * 16 + 2 * 17 * 16  # q, k, v rows and o columns + scores and weighted sum


def test_vision_width_errors_name_the_problem(calib):
    model = tiny("dinov2")
    with pytest.raises(ValueError, match="reads images"):
        trimformer.prune_(model, _width(), calibration=calib, progress=False)
    with pytest.raises(ValueError, match="zero mean gradient.*fisher"):
        trimformer.prune_(model, _width(importance="taylor"), calibration=_images(), progress=False)
    with pytest.raises(ValueError, match="attention_flops.*params=0.75"):
        _width(attention_flops=True)
    with pytest.raises(ValueError, match="calibration images.*llama"):
        trimformer.prune_(tiny("llama"), trimformer.build("wanda", {}), calibration=_images(), progress=False)
    with pytest.raises(ValueError, match="token windows.*or images"):
        trimformer.prune_(model, _width(), calibration=torch.randn(4, 32), progress=False)


@pytest.mark.parametrize("name", ["sparsegpt", "wanda"])
def test_two_four_on_a_vit_calibrated_with_images(name):
    model = tiny("dinov2")
    trimformer.prune_(model, trimformer.build(name, {"pattern": "2:4"}), calibration=_images(), batch_size=4,
                      progress=False)
    for _, p in anatomy_of(model).projections():
        groups = p.weight.reshape(p.weight.shape[0], -1, 4)  # (out, in / 4, 4)
        assert bool(((groups == 0).sum(-1) >= 2).all())
    assert torch.isfinite(_features(model, _images(2))).all()


def test_feature_distillation_recovers_a_cut_and_keeps_its_shapes():
    teacher = tiny("dinov2")
    student = tiny("dinov2")
    trimformer.prune_(student, _width(allocation="uniform", target="params=0.6", compensate=False),
                      calibration=_images(), batch_size=4, progress=False)
    shapes = {n: p.shape for n, p in student.named_parameters()}
    px = _images(16, seed=3)
    before = (_features(student, px) - _features(teacher, px)).pow(2).mean()
    distill_features_(student, teacher, px, FeatureDistillConfig(steps=30, batch_size=8, lr=1e-3, warmup_steps=0),
                      progress=False)
    after = (_features(student, px) - _features(teacher, px)).pow(2).mean()
    assert after < 0.7 * before
    assert {n: p.shape for n, p in student.named_parameters()} == shapes
    assert all(p.requires_grad for p in student.parameters()) and not student.training
    h = student.trimformer_history[-1]
    assert h["method"] == "distill-features" and h["result"]["steps_run"] == 30


def test_feature_distillation_under_a_token_method_leaves_no_hooks():
    model = tiny("dinov2")
    method = trimformer.tokens.build("merge", {"flops": 0.6})
    distill_features_(model, model, _images(8), FeatureDistillConfig(steps=2, batch_size=4, loss="cls+rank"),
                      method=method, progress=False)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert _features(model, _images(2)).shape == (2, 17, 64)  # full length: merging is off again


def test_feature_distillation_errors():
    model = tiny("dinov2")
    with pytest.raises(ValueError, match="pixel values"):
        distill_features_(model, tiny("dinov2"), torch.randint(0, 9, (8, 16)), progress=False)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        distill_features_(model, tiny("dinov2"), _images(4), FeatureDistillConfig(batch_size=8), progress=False)
    with pytest.raises(ValueError, match="nothing to learn"):
        distill_features_(model, model, _images(8), FeatureDistillConfig(batch_size=4), progress=False)
    with pytest.raises(ValueError, match="loss 'cls\\+kl'"):
        FeatureDistillConfig(loss="cls+kl")


def test_rounds_reach_the_budget_step_by_step():
    model = tiny("dinov2")
    before = count_parameters(model)
    trimformer.prune_(model, _width(rounds=3, target="params=0.7"), calibration=_images(), batch_size=4,
                      progress=False)
    res = model.trimformer_history[-1]["result"]
    assert res["rounds"] == 3 and 0.6 < count_parameters(model) / before <= 0.7
    with pytest.raises(ValueError, match="rounds=0"):
        _width(rounds=0)
