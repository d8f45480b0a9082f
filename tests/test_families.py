"""Every offline method family on Qwen2 (q/k/v biases, untied head) and Gemma3 (sandwich norms, sliding-window
and global layers, one KV head of head_dim 32 > hidden / heads, scaled embeddings); each result reloads in vanilla
transformers with the same logits."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from conftest import tiny
from test_kv import SMALL, continuation, prompt
from test_structure_surgery import _deeper

import trimformer
from trimformer import export, kv, tokens
from trimformer.models import PostNorm, anatomy_of, count_parameters

FAMILIES = ["qwen2", "gemma3"]
STEPS = {
    "sparsegpt-2:4": {"method": "sparsegpt", "pattern": "2:4", "precision": "fp32"},
    "owl-wanda-50%": {"method": "owl", "base": "wanda", "sparsity": 0.5},
    "width-asymmetric": {"method": "width", "target": "params=0.8", "parts": "ffn,heads", "sequential": True,
                         "asymmetric": True},
    "depth-fused": {"method": "depth", "remove": 1, "fuse": True, "fuse_windows": 4},
    "finercut-fused": {"method": "finercut", "remove": 2, "windows": 4, "length": 16, "fuse": True,
                       "precision": "fp32"},
    "search": {"method": "search", "target": "params=0.75", "widths": "0.5,0", "multiple_of": 1, "precision": "fp32",
               "windows": 4, "length": 16},
}


def deep(family: str, n: int = 4):
    """A tiny model with n blocks; gemma3's blocks alternate sliding-window and global (block i copies i % 2)."""
    return _deeper(tiny(family), n)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("step", list(STEPS))
@torch.no_grad()
def test_method_cuts_and_reloads_in_vanilla_transformers(family, step, calib, ids, tmp_path):
    model = deep(family)
    dense = model(input_ids=ids).logits
    n0 = count_parameters(model)
    spec = dict(STEPS[step])
    trimformer.prune_(model, trimformer.build(spec.pop("method"), spec), calibration=calib, progress=False)
    out = model(input_ids=ids).logits
    assert torch.isfinite(out).all() and not torch.equal(out, dense)
    zeros = sum(int((p.weight == 0).sum()) for _, p in anatomy_of(model).projections())
    assert count_parameters(model) < n0 or zeros > 0
    export.save(model, tmp_path / "m")
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True).eval()
    assert "trimformer" not in type(back).__module__ or step in ("width-asymmetric", "finercut-fused", "search")
    torch.testing.assert_close(back(input_ids=ids).logits, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_export_of_unstructured_sparsity_is_a_plain_checkpoint(family, calib, ids, tmp_path):
    model = tiny(family)
    trimformer.prune_(model, trimformer.build("wanda", {"sparsity": 0.5}), calibration=calib, progress=False)
    trimformer.export.save_pretrained(model, tmp_path / "m")
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, model(input_ids=ids).logits)
    if family == "gemma3":
        assert back.lm_head.weight is back.model.embed_tokens.weight


def test_gemma3_anatomy_sees_sandwich_norms_and_kinds():
    a = anatomy_of(deep("gemma3"))
    assert [b.kind for b in a.blocks] == ["sliding_attention", "full_attention"] * 2
    b = a.blocks[0]
    assert b.post_norms["attn"].module is b.module.post_attention_layernorm
    assert b.post_norms["mlp"].module is b.module.post_feedforward_layernorm
    assert set(b.norms) == {"attn", "attn_out", "mlp", "mlp_out"}
    assert (b.attention.num_heads, b.attention.num_kv_heads, b.attention.head_dim) == (4, 1, 32)
    assert not anatomy_of(tiny("qwen2")).blocks[0].post_norms


def test_post_norm_pull_back_is_a_first_order_inverse():
    """norm(y + pull_back(y, e)) = norm(y) + e up to O(|e|^2), for e the norm can express (e / gain orthogonal to y)."""
    model = tiny("gemma3")
    post: PostNorm = anatomy_of(model).blocks[0].post_norms["mlp"]
    g = torch.Generator().manual_seed(0)
    y = torch.randn(5, 64, generator=g) * 3.0
    gain = 1.0 + post.module.weight.detach()
    w = torch.randn(5, 64, generator=g)
    w = w - (w * y).sum(-1, keepdim=True) / (y * y).sum(-1, keepdim=True) * y  # orthogonal to y
    for scale in (1e-2, 1e-3):
        e = scale * gain * w
        with torch.no_grad():
            moved = post.module(y + post.pull_back(y, e)) - post.module(y)
        assert (moved - e).norm() / e.norm() < 20 * scale


# -- KV presses on gemma3: global layers pressed, sliding-window layers keep their window -----------------------
@pytest.fixture(scope="module")
def gemma():
    return tiny("gemma3")


@pytest.mark.parametrize("name", list(SMALL))
@torch.no_grad()
def test_gemma3_press_at_ratio_zero_changes_no_logit(gemma, name):
    ids = prompt(2, 20)  # longer than the sliding window (8)
    full = gemma(ids).logits
    logits, cache = continuation(gemma, name, 0.0, ids, 14, **SMALL[name])
    torch.testing.assert_close(logits, full[:, 14:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("per_head", [False, True])
@torch.no_grad()
def test_gemma3_press_keeps_budget_on_global_layers_and_decodes_exactly(gemma, per_head):
    ids = prompt(2, 23)
    snap = kv.SnapKV(0.5, window=4, kernel=1)
    with kv.press(gemma, kv.PerHead(snap, ratio=0.5) if per_head else snap) as s:
        cache = s.prefill(ids[:, :18])
        kept = cache.kept_tokens()  # (layers, B, H_kv)
        one = gemma(ids[:, 18:], cache=cache.copy()).logits
        steps = torch.cat([gemma(ids[:, t:t + 1], cache=cache).logits for t in range(18, 23)], 1)
    torch.testing.assert_close(steps, one, rtol=0, atol=1e-5)
    assert (kept[0] == 7).all()  # sliding layer: its window (8) minus the incoming token, as transformers keeps it
    assert (kept[1] == 9).all()  # global layer (one KV head: per-head budgets are the layer budget): half of 18
    assert cache.nbytes == sum(layer.nbytes for layer in cache.layers)


def test_gemma3_token_pruning_is_a_clear_error(gemma):
    """LazyLLM scores tokens by attention recomputed from q/k projections: no QK-norm, no sliding windows yet."""
    with pytest.raises(ValueError, match="QK-norm .*Gemma3"):
        with tokens.prune(gemma, "lazy", keep=0.5):
            pass
