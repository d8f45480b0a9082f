"""Block-wise gradient criteria (Taylor, Fisher) against autograd on an explicit mask; the spectral criterion."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny

import trimformer
from trimformer.models import anatomy_of, count_parameters
from trimformer.structure.importance import IMPORTANCE, magnitude, spectral
from trimformer.structure.width import Width


def _mask_reference(model, calib, block_index):
    """d L / d m for a mask m on block `block_index`'s FFN neurons, L the block-local lens loss;
    per token (the FFN is token-wise, so token t's mask gradient comes from token t's loss only)."""
    an = anatomy_of(model)
    b = an.blocks[block_index]
    n = b.mlp.intermediate_size
    xs = []
    h = an.blocks[0].module.register_forward_pre_hook(lambda _m, a, kw: xs.append((a, kw)), with_kwargs=True)
    hidden = {}
    hk = b.module.register_forward_pre_hook(lambda _m, a, kw: hidden.update(x=a[0] if a else kw["hidden_states"]),
                                            with_kwargs=True)
    with torch.no_grad():
        model(input_ids=calib)
    h.remove()
    hk.remove()
    m = torch.ones(n, requires_grad=True)
    hm = b.mlp.down.module.register_forward_pre_hook(lambda _mod, a: (a[0] * m,))
    kw = {k: v for k, v in xs[0][1].items() if k not in ("past_key_values", "past_key_value", "hidden_states")}
    kw["use_cache"] = False
    y = b.module(hidden["x"], **kw)
    y = y[0] if isinstance(y, tuple) else y
    logits = an.head(an.final_norm(y))[:, :-1]  # (B, T-1, V)
    per_tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), calib[:, 1:].reshape(-1), reduction="none")
    grads = torch.stack([torch.autograd.grad(lt, m, retain_graph=True)[0] for lt in per_tok])  # (tokens, n)
    hm.remove()
    return grads


def test_taylor_and_fisher_match_autograd_on_a_mask(calib):
    model = tiny("llama")
    ids = calib[:2, :12]
    w = Width(parts="ffn", importance="fisher")
    stats = w._gradient_statistics(anatomy_of(model), ids, 2, False)
    g = _mask_reference(model, ids, 1)  # (tokens, n)
    st = stats[1]["ffn"]
    groups = list(torch.arange(g.shape[1])[:, None])
    W = anatomy_of(model).blocks[1].mlp.down.weight
    tay = IMPORTANCE["taylor"](W, st, groups)
    fis = IMPORTANCE["fisher"](W, st, groups)
    torch.testing.assert_close(tay.float(), g.sum(0).abs(), rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(fis.float(), (g**2).sum(0) / 2, rtol=1e-3, atol=1e-6)
    assert all(p.requires_grad for p in model.parameters())  # restored


@pytest.mark.parametrize("importance", ["taylor", "fisher", "spectral"])
def test_new_criteria_prune_to_target(importance, calib):
    model = tiny("llama")
    n0 = count_parameters(model)
    trimformer.prune_(model, trimformer.build("width", {"target": "params=0.85", "importance": importance}),
                      calibration=calib, progress=False)
    assert 0.83 <= count_parameters(model) / n0 <= 0.851
    heads = tiny("llama")  # heads and neurons scored together (one score type across both kinds)
    trimformer.prune_(heads, trimformer.build("width", {"target": "params=0.7", "parts": "ffn,heads",
                                                        "importance": importance}), calibration=calib, progress=False)
    assert all(b.attention.num_heads == 2 for b in anatomy_of(heads).blocks)
    assert torch.isfinite(model(input_ids=calib).logits).all() and torch.isfinite(heads(input_ids=calib).logits).all()


def test_gradient_criteria_clear_errors(calib):
    with pytest.raises(ValueError, match="sequential=False"):
        trimformer.prune_(tiny("llama"), trimformer.build("width", {"importance": "taylor", "sequential": True}),
                          calibration=calib, progress=False)
    with pytest.raises(ValueError, match="zero mean gradient.*fisher"):  # an encoder: feature-level, Fisher only
        trimformer.prune_(tiny("bert"), trimformer.build("width", {"importance": "taylor"}), calibration=calib,
                          progress=False)
    bert = tiny("bert")
    trimformer.prune_(bert, trimformer.build("width", {"importance": "fisher"}), calibration=calib, progress=False)
    assert anatomy_of(bert).blocks[0].mlp.intermediate_size < 128


def test_spectral_ignores_an_isolated_tail_column_that_magnitude_keeps():
    torch.manual_seed(0)
    u, w = torch.linalg.qr(torch.randn(8, 2))[0].t()  # two orthonormal directions
    W = torch.cat([u[:, None].repeat(1, 30), 1.5 * w[:, None]], 1)  # (8, 31): 30 aligned columns, one apart
    groups = list(torch.arange(31)[:, None])
    sp, mg = spectral(W, None, groups), magnitude(W, None, groups)
    assert mg.argmax().item() == 30  # the isolated column has the largest norm
    assert sp.argmin().item() == 30 and sp[30].item() == pytest.approx(0.0, abs=1e-9)  # but is spectral tail
    assert "spectral" in IMPORTANCE and trimformer.build("width", {"importance": "spectral"}).importance == "spectral"
