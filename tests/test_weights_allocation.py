"""Non-uniform allocation (OWL, global magnitude), per-layer overrides and recipes with clear errors."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny

import trimformer
from trimformer import Recipe
from trimformer.weights import WEIGHTS
from trimformer.weights.allocation import rebalance


def _weighted_mean(model, result: dict[str, float]) -> float:
    sizes = {n: model.get_submodule(n).weight.numel() for n in result}
    return sum(result[n] * sizes[n] for n in result) / sum(sizes.values())


@pytest.mark.parametrize(
    "spec",
    [
        ("owl", {"base": "wanda", "sparsity": 0.6, "lam": 0.1}),
        ("owl", {"base": "sparsegpt", "sparsity": 0.5, "settings": {"blocksize": 32}}),
        ("global", {"base": "magnitude", "sparsity": 0.5}),
        ("global", {"base": "wanda", "sparsity": 0.7, "targets": "mlp"}),
    ],
)
def test_allocation_averages_to_the_global_target(spec, calib):
    model = tiny("llama")
    trimformer.prune_(model, WEIGHTS.build(*spec), calibration=calib, progress=False)
    result = model.trimformer_history[-1]["result"]
    assert _weighted_mean(model, result) == pytest.approx(spec[1]["sparsity"], abs=2e-3)
    if spec[1].get("targets") == "mlp":
        assert all(".mlp." in n for n in result)


def test_owl_is_non_uniform_and_spreads_within_lam(calib):
    model = tiny("llama")
    trimformer.prune_(model, WEIGHTS.build("owl", {"base": "wanda", "sparsity": 0.5, "lam": 0.1}), calibration=calib,
                      progress=False)
    shares = model.trimformer_history[-1]["result"].values()
    # two blocks: one gets target - lam, the other target + lam (Wanda's per-row rounding aside)
    assert max(shares) - min(shares) == pytest.approx(0.2, abs=0.02)


def test_global_magnitude_equals_one_threshold_over_the_model():
    model = tiny("llama")
    projs = {n: p for n, p in trimformer.anatomy_of(model).projections()}
    before = torch.cat([p.weight.detach().abs().flatten() for p in projs.values()])
    t = before.kthvalue(round(0.5 * before.numel())).values
    kept_expected = {n: p.weight.detach().abs() > t for n, p in projs.items()}
    trimformer.prune_(model, WEIGHTS.build("global", {"base": "magnitude", "sparsity": 0.5}), progress=False)
    for n, p in projs.items():
        assert torch.equal(p.weight != 0, kept_expected[n])


def test_rebalance_hits_the_target_with_clipping():
    raw = {"a": 0.9, "b": 0.1, "c": 0.5}
    sizes = {"a": 100, "b": 300, "c": 600}
    out = rebalance(raw, sizes, 0.8)
    assert sum(out[k] * sizes[k] for k in raw) / 1000 == pytest.approx(0.8, abs=1e-6)
    assert max(out.values()) <= 0.99


def test_allocation_rejects_nm_and_nesting():
    with pytest.raises(ValueError, match="unstructured"):
        WEIGHTS.build("owl", {"base": "wanda", "settings": {"pattern": "2:4"}})
    with pytest.raises(ValueError, match="itself an allocation"):
        WEIGHTS.build("owl", {"base": "global"})
    with pytest.raises(KeyError, match="did you mean|Did you mean"):
        WEIGHTS.build("owl", {"base": "wandaa"})


def test_layer_overrides_win_and_zero_leaves_dense(calib):
    model = tiny("llama")
    method = WEIGHTS.build("wanda", {"sparsity": 0.5, "layers": {"mlp.down": 0.25, "model.layers.0.*": 0.0}})
    trimformer.prune_(model, method, calibration=calib, progress=False)
    result = model.trimformer_history[-1]["result"]
    assert not any(n.startswith("model.layers.0.") for n in result)
    assert model.model.layers[0].mlp.down_proj.weight.count_nonzero() == model.model.layers[0].mlp.down_proj.weight.numel()
    assert result["model.layers.1.mlp.down_proj"] == pytest.approx(0.25, abs=0.01)
    assert result["model.layers.1.mlp.up_proj"] == pytest.approx(0.5)


RECIPE = """
steps:
  - method: sparsegpt
    sparsity: 0.5
    blocksize: 32
    targets: mlp
    layers: {"model.layers.1.*": 0.7}
  - method: wanda
    sparsity: 0.4
    targets: attn
"""


def test_yaml_recipe_with_steps_and_layer_overrides(tmp_path, calib):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    model = tiny("llama")
    trimformer.prune_(model, Recipe.from_file(path), calibration=calib, progress=False)
    first, second = (h["result"] for h in model.trimformer_history)
    assert first["model.layers.0.mlp.up_proj"] == pytest.approx(0.5, abs=1e-3)
    assert first["model.layers.1.mlp.up_proj"] == pytest.approx(0.7, abs=1e-3)
    assert all(".self_attn." in n for n in second) and all(v == pytest.approx(0.4, abs=0.02) for v in second.values())


@pytest.mark.parametrize(
    "steps, error, match",
    [
        ([{"method": "sparsgpt"}], KeyError, "Did you mean 'sparsegpt'"),
        ([{"method": "wanda", "sparsity": 1.5}], ValueError, r"sparsity must be in \[0, 1\)"),
        ([{"method": "wanda", "layers": {"mlp.down": -0.1}}], ValueError, r"layers\['mlp.down'\]"),
        ([{"method": "wanda", "targets": "mlp.dwn"}], ValueError, "Did you mean .mlp.down."),
        ([{"method": "wanda", "sparsty": 0.5}], ValueError, "Did you mean 'sparsity'"),
        ([{"method": "wanda", "pattern": "2:4", "layers": {"mlp.up": 0.3}}], ValueError, "N:M or left dense"),
    ],
)
def test_bad_recipes_give_clear_errors(steps, error, match):
    with pytest.raises(error, match=match):
        Recipe.from_obj({"steps": steps})


def test_unknown_layer_pattern_is_an_error_naming_it(calib):
    model = tiny("llama")
    recipe = Recipe.from_obj([{"method": "wanda", "layers": {"model.layer.0.*": 0.0}}])  # 'layer' for 'layers'
    with pytest.raises(ValueError, match=r"'model.layer.0.\*' matches no projection"):
        trimformer.prune_(model, recipe, calibration=calib, progress=False)
    assert all(p.weight.count_nonzero() == p.weight.numel() for _, p in trimformer.anatomy_of(model).projections())


@pytest.mark.parametrize("importance", ["cosine", "kl"])
def test_adaptive_prunes_the_more_important_block_less(importance, calib):
    from trimformer.weights.allocation import block_damage, block_importance

    model = tiny("llama")
    anatomy = trimformer.anatomy_of(model)
    projs = dict(anatomy.projections())
    before = {n: p.weight.detach().clone() for n, p in projs.items()}
    if importance == "cosine":
        imp = block_importance(anatomy, calib, 1, False)
    else:
        imp = block_damage(anatomy, calib, projs, 0.6, 2, False, precision="fp32")
        assert all(torch.equal(p.weight, before[n]) for n, p in projs.items())  # the probe restores every weight
    assert set(imp) == {0, 1} and all(v > 0 for v in imp.values())
    method = WEIGHTS.build("adaptive", {"base": "wanda", "sparsity": 0.5, "lam": 0.1, "importance": importance,
                                        "settings": {"precision": "fp32"}})
    trimformer.prune_(model, method, calibration=calib, progress=False)
    result = model.trimformer_history[-1]["result"]
    assert _weighted_mean(model, result) == pytest.approx(0.5, abs=2e-3)
    share = {b: [v for n, v in result.items() if f"layers.{b}." in n] for b in (0, 1)}
    hi, lo = max(imp, key=imp.get), min(imp, key=imp.get)
    assert max(share[hi]) < min(share[lo])  # the block that matters more keeps more weights
    assert sum(share[lo]) / len(share[lo]) - sum(share[hi]) / len(share[hi]) == pytest.approx(0.2, abs=0.03)


def test_adaptive_rejects_bad_settings():
    with pytest.raises(ValueError, match="importance=.entropy.: choose one of .cosine., .kl."):
        WEIGHTS.build("adaptive", {"importance": "entropy"})
    with pytest.raises(ValueError, match="lam"):
        WEIGHTS.build("adaptive", {"lam": 0.7})
    with pytest.raises(ValueError, match="precision=.fp16.: choose one of"):
        WEIGHTS.build("wanda", {"precision": "fp16"})


def test_adaptive_sublayer_units_rank_attention_and_mlp_on_their_own(calib):
    from trimformer.weights.allocation import block_damage

    model = tiny("llama")
    anatomy = trimformer.anatomy_of(model)
    projs = dict(anatomy.projections())
    imp = block_damage(anatomy, calib, projs, 0.6, 2, False, precision="fp32", unit="sublayer")
    assert set(imp) == {(b, part) for b in (0, 1) for part in ("attn", "mlp")} and all(v > 0 for v in imp.values())
    method = WEIGHTS.build("adaptive", {"base": "wanda", "sparsity": 0.5, "lam": 0.1, "importance": "kl",
                                        "unit": "sublayer", "settings": {"precision": "fp32"}})
    table = method.allocate(anatomy, calib, projs, 1, False)
    sizes = {n: p.weight.numel() for n, p in projs.items()}
    assert sum(table[n] * sizes[n] for n in projs) / sum(sizes.values()) == pytest.approx(0.5, abs=1e-6)
    share = {(b, part): {round(v, 9) for n, v in table.items()
                         if f"layers.{b}.{'self_attn' if part == 'attn' else 'mlp'}." in n} for b, part in imp}
    assert all(len(v) == 1 for v in share.values())  # one share per unit
    by_damage = [share[u].pop() for u in sorted(imp, key=imp.get)]
    assert by_damage == sorted(by_damage, reverse=True) and by_damage[0] - by_damage[-1] > 0.15  # less damage -> more pruned
    trimformer.prune_(model, method, calibration=calib, progress=False)
    assert _weighted_mean(model, model.trimformer_history[-1]["result"]) == pytest.approx(0.5, abs=5e-3)  # row rounding
    with pytest.raises(ValueError, match="needs importance='kl'"):
        WEIGHTS.build("adaptive", {"unit": "sublayer"})
    with pytest.raises(ValueError, match="unit=.head.: choose one of .block., .sublayer."):
        WEIGHTS.build("adaptive", {"unit": "head", "importance": "kl"})


def test_bf16_calibration_stays_close_to_fp32(calib):
    # the plain OBS path: how close bf16 forwards keep the Hessians (the asymmetric refit adds C - H on top)
    from trimformer.calibrate import resolve_precision

    assert resolve_precision("fp32") is None and resolve_precision("bf16") is torch.bfloat16
    results = {}
    for precision in ("fp32", "bf16"):
        model = tiny("llama")
        trimformer.prune_(model, WEIGHTS.build("sparsegpt", {"sparsity": 0.5, "blocksize": 32, "precision": precision,
                                                              "asymmetric": False}),
                          calibration=calib, progress=False)
        results[precision] = {n: p.weight.detach().clone() for n, p in trimformer.anatomy_of(model).projections()}
    for n, w32 in results["fp32"].items():
        w16 = results["bf16"][n]
        assert (w16 == 0).float().mean() == pytest.approx(0.5, abs=0.01)  # the exact share either way
        agree = ((w16 == 0) == (w32 == 0)).float().mean().item()
        assert agree > 0.9, f"{n}: bf16 calibration chose a different mask for {1 - agree:.0%} of weights"


def test_gram_accumulates_in_fp32_under_bf16_compute():
    """A bf16 X^T X would lose the small eigenvalues (one dominant direction): under bf16 compute the gram is the
    fp32-accumulated Gram matrix of the bf16-rounded inputs (positive semi-definite), and exact fp32 otherwise."""
    from trimformer.calibrate import BlockCalib

    g = torch.Generator().manual_seed(0)
    X = torch.randn(2048, 64, generator=g) * 1e-2 + 10.0 * torch.randn(64, generator=g)  # a massive common direction
    assert torch.equal(BlockCalib(block=None, inputs=[X], kwargs=[{}]).gram(X), X.t() @ X)
    bc = BlockCalib(block=None, inputs=[X], kwargs=[{}], compute_dtype=torch.bfloat16)
    with bc.compute():
        H = bc.gram(X)
    # the Gram matrix of the bf16-rounded inputs where oneDNN's bf16 fp32-matmul mode applies (Intel AMX here
    # before), of the inputs themselves where this CPU's oneDNN ignores it (an AMD EPYC with avx512_bf16): either
    # way accumulated in fp32, not a bf16 result (which would be ~0.5 % off at this scale)
    Xr = X.bfloat16().double()
    assert H.dtype == torch.float32
    assert any(torch.allclose(H.double(), Z.t() @ Z, rtol=1e-5, atol=1e-2) for Z in (Xr, X.double()))
    assert torch.linalg.eigvalsh(Xr.t() @ Xr).min() > -1e-6  # a true Gram matrix: no negative eigenvalue
    assert torch.linalg.cholesky_ex(H + 0.01 * torch.diag(H).mean() * torch.eye(64)).info == 0
    assert torch.backends.mkldnn.matmul.fp32_precision != "bf16"  # the global matmul mode is restored
