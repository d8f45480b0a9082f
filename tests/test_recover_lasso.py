"""Sparse then prune: group lasso on FFN neurons and heads during recovery shrinks exactly those groups."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny
from test_recover import windows

import trimformer
from trimformer.recover import RecoverConfig, recover_
from trimformer.recover.regularize import GroupLasso


def group_norms(model, parts=("ffn", "heads")) -> dict[str, torch.Tensor]:
    return GroupLasso(trimformer.anatomy_of(model), parts, 1.0).norms()


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: fused qkv, Conv1D weights stored (in, out)
def test_group_norms_are_those_of_neurons_and_heads(family):
    model = tiny(family)
    a = trimformer.anatomy_of(model)
    b = a.blocks[0]
    n = group_norms(model)
    F = b.mlp.up.weight.shape[0]
    ffn = (b.mlp.up.weight.pow(2).sum(1) + b.mlp.down.weight.pow(2).sum(0)
           + (b.mlp.gate.weight.pow(2).sum(1) if b.mlp.gate is not None else 0)
           + (b.mlp.up.bias.pow(2) if b.mlp.up.bias is not None else 0)).sqrt()  # (F,)
    assert n["0.ffn"].shape == (F,) and torch.allclose(n["0.ffn"], ffn, atol=1e-5)
    att, d = b.attention, b.attention.head_dim
    q = (att.q or att.qkv).weight
    h1 = q[d:2 * d].pow(2).sum() + att.o.weight[:, d:2 * d].pow(2).sum()  # head 1
    if (att.q or att.qkv).bias is not None:
        h1 = h1 + (att.q or att.qkv).bias[d:2 * d].pow(2).sum()
    assert n["0.heads"].shape == (att.num_heads,) and n["0.heads"][1].item() == pytest.approx(h1.sqrt().item(), rel=1e-5)


def test_group_lasso_shrinks_the_groups_to_zero_and_keeps_masks():
    teacher = tiny("llama", seed=1)
    plain = tiny("llama")
    trimformer.prune_(plain, trimformer.build("wanda", {"sparsity": 0.5}), calibration=windows(4, 16), progress=False)
    zeros = {n: p == 0 for n, p in plain.named_parameters() if ".layers." in n and p.dim() == 2}
    lasso = copy.deepcopy(plain)
    cfg = dict(steps=6, batch_size=2, lr=1e-2, warmup_steps=0)
    recover_(plain, teacher, windows(), RecoverConfig(**cfg), progress=False)
    recover_(lasso, teacher, windows(), RecoverConfig(**cfg, group_lasso=20.0), progress=False)
    before, after = group_norms(plain), group_norms(lasso)
    for k in before:
        assert after[k].sum() < 0.9 * before[k].sum(), k  # every block's groups shrank
    r = lasso.trimformer_history[-1]["result"]["group_lasso"]
    assert sum(r["zero_groups"].values()) > 0  # and some reached exactly zero, ready to be cut
    assert sum(r["zero_groups"].values()) == sum(int((n == 0).sum()) for n in after.values())
    assert all(not (lasso.get_parameter(n)[z] != 0).any() for n, z in zeros.items())  # masks kept


def test_proximal_step_zeroes_groups_below_the_threshold_and_scales_the_rest():
    model = tiny("llama")
    lasso = GroupLasso(trimformer.anatomy_of(model), ("ffn",), strength=1.0)
    n0 = lasso.norms()["0.ffn"]
    t = n0.median().item()  # lr * strength = the median norm: about half the neurons die
    up0 = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    lasso.shrink_(lr=t)
    n1 = lasso.norms()["0.ffn"]
    dead = n0 <= t
    assert 0 < int(dead.sum()) < len(n0) and bool((n1[dead] == 0).all())
    assert torch.allclose(n1[~dead], n0[~dead] - t, atol=1e-5)  # ||W_g|| shrinks by exactly lr * lambda
    up1 = model.model.layers[0].mlp.up_proj.weight
    assert torch.allclose(up1[~dead], up0[~dead] * (1 - t / n0[~dead])[:, None], atol=1e-6)  # the direction is kept
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, tiny("llama").model.layers[0].self_attn.q_proj.weight)


def test_group_lasso_bad_settings():
    with pytest.raises(ValueError, match="group_lasso_parts"):
        RecoverConfig(group_lasso=0.1, group_lasso_parts="neurons")
    with pytest.raises(ValueError, match="full fine-tuning"):
        RecoverConfig(group_lasso=0.1, lora_rank=4)
    with pytest.raises(ValueError, match="group_lasso must be"):
        RecoverConfig(group_lasso=-1.0)
