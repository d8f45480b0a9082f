"""Width and depth methods on tiny models: targets reached, errors clear, criteria find planted structure."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny

import trimformer
from trimformer.models import anatomy_of, count_parameters
from trimformer.structure.budget import BudgetError


def _prune(model, name, calib, **settings):
    return trimformer.prune_(model, trimformer.build(name, settings), calibration=calib, progress=False)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "bert"])
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_width_reaches_param_target(family, allocation, calib):
    model = tiny(family)
    n0 = count_parameters(model)
    _prune(model, "width", calib, target="params=0.85", allocation=allocation)
    kept = count_parameters(model) / n0
    assert 0.83 <= kept <= 0.851
    out = model(input_ids=calib)
    assert torch.isfinite(out[0]).all()


def test_width_heads_keep_gqa_even_and_multiple_of(calib):
    model = tiny("llama")
    _prune(model, "width", calib, target="params=0.8", parts="ffn,heads", allocation="uniform", multiple_of=8)
    for b in anatomy_of(model).blocks:
        a = b.attention
        assert a.num_heads % a.num_kv_heads == 0 and a.num_kv_heads == 2
        assert b.mlp.intermediate_size % 8 == 0


def test_width_target_one_is_a_no_op(calib):
    model = tiny("llama")
    ref = copy.deepcopy(model)
    _prune(model, "width", calib, target="params=1.0")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


def test_impossible_targets_give_clear_errors(calib):
    with pytest.raises(BudgetError, match="below what removing FFN neurons can reach"):
        _prune(tiny("llama"), "width", calib, target="params=0.3")
    with pytest.raises(ValueError, match="params=R or flops=R or latency=R"):
        trimformer.build("width", {"target": "compute=0.5"})
    with pytest.raises(ValueError, match="parts"):
        trimformer.build("width", {"parts": "ffn,experts"})
    with pytest.raises(ValueError, match="cannot remove 2 of 2 blocks"):
        _prune(tiny("llama"), "depth", calib, remove=2)


@torch.no_grad()
def test_least_squares_compensation_lowers_the_error(calib):
    dense = tiny("llama")
    errs = {}
    for comp in (False, True):
        m = copy.deepcopy(dense)
        _prune(m, "width", calib, target="params=0.8", importance="activation", compensate=comp, allocation="uniform")
        errs[comp] = (m(input_ids=calib).logits - dense(input_ids=calib).logits).pow(2).mean().item()
    assert errs[True] < errs[False]


@torch.no_grad()
def test_hessian_score_is_the_least_squares_residual(calib):
    from trimformer.structure.importance import InputStats, hessian, least_squares

    torch.manual_seed(0)
    X = torch.randn(400, 12) @ torch.randn(12, 12)  # correlated inputs (tokens, in)
    lin = torch.nn.Linear(12, 5, bias=False)
    from trimformer.models import Proj

    p = Proj(lin, "x")
    st = InputStats()
    st.add(X)
    g = torch.tensor([3])
    keep = torch.tensor([i for i in range(12) if i != 3])
    W2, _ = least_squares(p, keep, st, bias=False)
    resid = ((X @ lin.weight.t() - X[:, keep] @ W2.t()) ** 2).sum(1).mean()
    score = hessian(lin.weight, st, [g])[0]
    assert score.item() == pytest.approx(resid.item(), rel=0.05)


@torch.no_grad()
def test_hessian_scores_groups_of_mixed_sizes_in_their_order():
    """Groups are scored batched by size: every score, in the caller's order, is the OBS formula of its group."""
    from trimformer.structure.importance import InputStats, damped, hessian

    torch.manual_seed(0)
    st = InputStats()
    st.add(torch.randn(300, 10) @ torch.randn(10, 10))
    W = torch.randn(4, 10)
    groups = [torch.tensor([7]), torch.tensor([0, 1]), torch.tensor([2]), torch.tensor([3, 4, 5]), torch.tensor([9, 8])]
    Hinv = torch.linalg.inv(damped(st.second))
    want = [torch.trace(W.double()[:, g] @ torch.linalg.inv(Hinv[g][:, g]) @ W.double()[:, g].t()) for g in groups]
    assert torch.allclose(hessian(W, st, groups), torch.stack(want), rtol=1e-10)


def _identity_block(model, i):
    b = anatomy_of(model).blocks[i]
    with torch.no_grad():
        b.attention.o.weight.zero_()
        b.mlp.down.weight.zero_()


def _deep_llama(n=4):
    from test_structure_surgery import _deeper

    return _deeper(tiny("llama"), n)


@pytest.mark.parametrize("criterion", ["block-influence", "angular"])
def test_depth_removes_a_planted_identity_block(criterion, calib):
    model = _deep_llama(4)
    _identity_block(model, 2)
    res = _prune(model, "depth", calib, remove=1, criterion=criterion).trimformer_history[-1]["result"]
    assert res["removed_blocks"] == [2]
    assert len(anatomy_of(model).blocks) == 3 and model.config.num_hidden_layers == 3


def test_finercut_removes_planted_dead_sublayers(calib):
    model = _deep_llama(4)
    an = anatomy_of(model)
    with torch.no_grad():
        an.blocks[1].mlp.down.weight.zero_()
        an.blocks[3].attention.o.weight.zero_()
    res = _prune(model, "finercut", calib, remove=2, windows=2, length=16).trimformer_history[-1]["result"]
    assert {(r["block"], r["sublayer"]) for r in res["removed"]} == {(1, "mlp"), (3, "attn")}
    an = anatomy_of(model)
    assert an.blocks[1].mlp is None and an.blocks[3].attention is None
    with pytest.raises(ValueError, match="pre-norm decoders"):
        _prune(tiny("bert"), "finercut", calib, remove=1)


def test_sensitivity_finds_planted_dead_sublayer_and_plots(calib, tmp_path):
    from trimformer.structure.sensitivity import plot, sensitivity

    model = _deep_llama(4)
    with torch.no_grad():
        anatomy_of(model).blocks[2].mlp.down.weight.zero_()
    res = sensitivity(model, calib, windows=2, length=16, progress=False)
    assert len(res["block_influence"]) == 4
    assert res["mlp_kl"][2] == pytest.approx(0.0, abs=1e-9)
    assert min(res["mlp_kl"][i] for i in (0, 1, 3)) > 0
    plot(res, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_finercut_whole_block_moves_ranked_per_compute(calib):
    model = _deep_llama(4)
    _identity_block(model, 2)
    res = _prune(model, "finercut", calib, remove=2, windows=2, length=16, blocks=True,
                 rank="per-compute").trimformer_history[-1]["result"]
    assert res["removed_blocks"] == [2] and len(res["removed"]) == 2
    assert len(anatomy_of(model).blocks) == 3
    with pytest.raises(ValueError, match="rank"):
        trimformer.build("finercut", {"remove": 1, "rank": "entropy"})


@torch.no_grad()
def test_finercut_refine_never_worsens_and_reports_the_kl_of_the_cut_model(calib):
    import torch.nn.functional as F

    from trimformer.structure.costs import sublayer_params

    model = _deep_llama(6)
    dense = copy.deepcopy(model)
    an = anatomy_of(model)
    per_block = sublayer_params(an.blocks[0], "attn") + sublayer_params(an.blocks[0], "mlp")
    res = _prune(model, "finercut", calib, compute=0.3, windows=4, length=32, refine=3, shortlist=4,
                 precision="fp32", rank="per-compute", blocks=True).trimformer_history[-1]["result"]
    assert res["kl"] <= res["greedy_kl"] + 1e-9  # a swap is kept only if it lowers the calibration KL
    assert len(res["swaps"]) <= 3
    gone = sum(sublayer_params(anatomy_of(dense).blocks[i], k) for i, k in res["final"])
    assert gone == pytest.approx(res["compute_removed"] * 6 * per_block)
    assert res["compute_removed"] <= 0.3 + 1e-9  # never more than the budget; attention is the smallest step
    assert res["compute_removed"] > 0.3 - sublayer_params(an.blocks[0], "attn") / (6 * per_block)
    # the KL the search reports is the cut model's KL to the dense one on the same windows
    p = F.log_softmax(dense(input_ids=calib).logits.float(), -1)
    q = F.log_softmax(model(input_ids=calib).logits.float(), -1)
    full = F.kl_div(q, p, log_target=True, reduction="sum").item() / p[..., 0].numel()
    assert res["kl"] == pytest.approx(full, rel=1e-4, abs=1e-7)


def _kl(dense, model, ids):
    import torch.nn.functional as F

    with torch.no_grad():
        p = F.log_softmax(dense(input_ids=ids).logits.float(), -1)
        q = F.log_softmax(model(input_ids=ids).logits.float(), -1)
    return F.kl_div(q, p, log_target=True, reduction="sum").item() / p[..., 0].numel()


def test_depth_fusion_lowers_the_kl_and_leaves_the_kept_blocks_elsewhere_alone(calib):
    model = _deep_llama(6)
    dense = copy.deepcopy(model)
    plain = copy.deepcopy(model)
    res = _prune(model, "depth", calib, remove=2, fuse=True).trimformer_history[-1]["result"]
    again = _prune(plain, "depth", calib, remove=2).trimformer_history[-1]["result"]
    assert res["removed_blocks"] == again["removed_blocks"]  # fusion does not change what is removed
    fused = res["fused"]
    assert fused and all(r["kept"] == (r["kl_after"] < r["kl_before"]) for r in fused)
    assert any(r["kept"] for r in fused)
    assert _kl(dense, model, calib) < _kl(dense, plain, calib)
    # only the neighbours' output projections changed
    tried = {r["block"] for r in fused if r["kept"]}
    kept_blocks = [i for i in range(6) if i not in res["removed_blocks"]]
    for new, i in enumerate(kept_blocks):
        a, b = model.model.layers[new], dense.model.layers[i]
        for name, p in a.named_parameters():
            same = torch.equal(p, b.get_parameter(name))
            assert same or (i in tried and name in ("mlp.down_proj.weight", "self_attn.o_proj.weight")), (i, name)
    with pytest.raises(ValueError, match="fuse_windows"):
        trimformer.build("depth", {"remove": 1, "fuse_windows": 0})


def test_finercut_fusion_reports_the_kl_of_the_cut_model(calib):
    model = _deep_llama(6)
    dense = copy.deepcopy(model)
    res = _prune(model, "finercut", calib, remove=3, windows=4, length=32, precision="fp32", fuse=True,
                 fuse_windows=4).trimformer_history[-1]["result"]
    kept = [r for r in res["fused"] if r["kept"]]
    assert kept and kept[-1]["kl_after"] < res["kl"]  # below the unfused cut's KL
    assert kept[-1]["kl_after"] == pytest.approx(_kl(dense, model, calib), rel=1e-4, abs=1e-7)
